"""Sampled-step loss: supervise loops 1..t for one t ~ q(t), importance-weighted (ESTIMATORS "sampled_step").

The diffusion analogy (REFERENCE 3 and 5): instead of reading out all T loops and weighting their
losses by the exit probabilities p_t (Ouro Stage I), draw one loop t from a proposal q per batch
(or one per sequence) and run only loops 1..t. Per token, with c_s the importance ratio of loop s:

    L = sum_{s read} c_s [ w_s e_s CE_s + beta prior_s ]        (the gate term aside, below)

    readout="sampled"  read loop t only, c_t = 1 / q_t (the plain estimator)
    readout="run"      read every loop that ran (Rao-Blackwellised over loops 1..t),
                       c_s = 1 / Q_s with Q_s = P(t >= s) = sum_{u >= s} q_u

Since q does not depend on the parameters, with w = 1 and e = p the expectation over t ~ q of
this loss *and of its gradient* equals the full-unroll loss `sum_t p_t CE_t + beta sum_t prior_t`
(tests and the conformance battery check that by exact enumeration over t). The exit weights e:

    exit_weights="learned"   e_s = p_s, and the gate learns through the LM term (Stage I)
    exit_weights="detached"  e_s = p_s detached: tokens weighted by where the gate exits, but
                             the gate learns only from gate_target (or not at all)
    exit_weights="uniform"   e_s = 1/T: the diffusion-style fixed weighting, no gate in the loss

The gate's term under "learned": the single-draw gradient `c_s CE_s grad p_s` never sums to
zero over the loops read, so it moves p by the size of CE itself (nats), not by the differences
between loops that the full-unroll gradient `sum_t CE_t grad p_t` carries (`sum_t grad p_t = 0`).
baseline="first_loop" subtracts the control variate b = CE_1 (detached; loop 1 always runs, so
b does not depend on the draw): the gate's gradient becomes `c_s (w_s CE_s - CE_1) grad p_s`,
still unbiased (its expectation adds `-b sum_t grad p_t = 0`), the loss value unchanged.
gate_target="stage2" trains the gate on Ouro's Stage II target from the loops read out
(variants.step_gate). max_ratio clips c (biased: a variance-for-bias trade). Weightings
(variants.step_weightings) change the objective by design; proposals live in
variants.step_proposals.

Notes on the composition with other families:
- Every micro-batch of one optimizer step draws the same t: the draw is a function of (seed,
  step) and of q, and the stateful proposals and weightings learn once per optimizer step
  (`end_step`, from the CE of all its micro-batches), so q is fixed within a step.
- The plan keeps the states of loops 1..t: the exit gate needs loops 1..t to form p_t.
- `per_sequence=True` draws t independently for every row (`stratified=True`: a systematic
  draw, every loop in its share q_t of the rows, each row's loop still distributed as q); the
  step runs loops 1..max_b t_b and every row is supervised at its own loops, in one fused
  read-out. A backprop window then counts back from the deepest loop, not from each row's t.
- A truncated window (variants.truncated) counts back from the sampled loop t.
"""

import itertools
import math

import torch

from looplm.hooks import ESTIMATORS, LossEstimator, step_generator, sum_over_ranks
from looplm.objectives import at_least_float32, log_exit_probs
from variants.step_gate import stage2_gate_term
from variants.step_proposals import (PROPOSALS, CLTSProposal, FixedScheduleProposal,  # noqa: F401 (re-exported)
                                     ImprovementProposal, Proposal, UniformProposal)
from variants.step_weightings import WEIGHTINGS, MinSNRWeighting, NoWeighting, Weighting  # noqa: F401

CHOICES = {"readout": ("sampled", "run"), "exit_weights": ("learned", "detached", "uniform"),
           "baseline": ("none", "first_loop"), "gate_target": ("none", "stage2")}


def survival(q: torch.Tensor) -> torch.Tensor:
    """Q_s = P(t >= s) = sum_{u >= s} q_u for s = 1..T: how often loop s runs."""
    return q.flip(0).cumsum(0).flip(0)


@ESTIMATORS.register("sampled_step")
class SampledStep(LossEstimator):
    """One loop t ~ q(t) per batch (or per sequence); loops 1..t run; the loss of the module
    docstring. Metrics: sampled_loop, sampled_ce, sampled_acc, q_t, weight (means over rows if
    per_sequence), run_loops and read_loops (loops run and read out this step)."""

    @classmethod
    def conformance_examples(cls):
        return [cls(),
                cls(CLTSProposal(total_steps=10), MinSNRWeighting()),
                cls(FixedScheduleProposal((0.5, 0.3, 0.2)), per_sequence=True),  # the battery runs T = 3
                cls(ImprovementProposal()),
                cls(readout="run", baseline="first_loop"),
                cls(baseline="first_loop", per_sequence=True),
                cls(readout="run", exit_weights="detached", gate_target="stage2"),
                cls(exit_weights="uniform", per_sequence=True, stratified=True, max_ratio=3.0)]

    @property
    def properties(self):
        """Unbiased for Stage I without a loss weighting, with the learned exit weights, the
        enumerable draws and unclipped ratios."""
        unbiased = (isinstance(self.weighting, NoWeighting) and self.exit_weights == "learned"
                    and not self.stratified and self.max_ratio is None)
        return frozenset({"unbiased_for_stage1"}) if unbiased else frozenset()

    def __init__(self, proposal: Proposal = None, weighting: Weighting = None, per_sequence: bool = False,
                 readout: str = "sampled", exit_weights: str = "learned", baseline: str = "none",
                 gate_target: str = "none", stratified: bool = False, max_ratio: float | None = None):
        self.proposal = UniformProposal() if proposal is None else proposal
        self.weighting = NoWeighting() if weighting is None else weighting
        if not isinstance(self.proposal, Proposal):
            raise ValueError(f"SampledStep.proposal={self.proposal!r} is not a Proposal; registered: "
                             f"{PROPOSALS.names()}")
        if not isinstance(self.weighting, Weighting):
            raise ValueError(f"SampledStep.weighting={self.weighting!r} is not a Weighting; registered: "
                             f"{WEIGHTINGS.names()}")
        for name, flag in (("per_sequence", per_sequence), ("stratified", stratified)):
            if not isinstance(flag, bool):
                raise ValueError(f"SampledStep.{name}={flag!r} must be True or False")
        for name, value in (("readout", readout), ("exit_weights", exit_weights), ("baseline", baseline),
                            ("gate_target", gate_target)):
            if value not in CHOICES[name]:
                raise ValueError(f"SampledStep.{name}={value!r}; choose one of {CHOICES[name]}")
        if stratified and not per_sequence:
            raise ValueError("SampledStep.stratified=True spreads the loops over the rows of a batch, so "
                             "it needs per_sequence=True")
        if baseline != "none" and exit_weights != "learned":
            raise ValueError(f"SampledStep.baseline={baseline!r} is a control variate for the gate's "
                             f"gradient through the LM term, which exit_weights={exit_weights!r} removes")
        if gate_target != "none" and (exit_weights == "learned" or readout != "run"):
            raise ValueError(f"SampledStep.gate_target={gate_target!r} trains the gate on the loops that "
                             "ran: it needs readout='run' and exit_weights='detached' or 'uniform' (with "
                             f"'learned' the LM term trains the gate too); got readout={readout!r}, "
                             f"exit_weights={exit_weights!r}")
        if max_ratio is not None and not (isinstance(max_ratio, (int, float)) and max_ratio >= 1):
            raise ValueError(f"SampledStep.max_ratio={max_ratio!r} must be None or a number >= 1")
        self.per_sequence, self.stratified, self.max_ratio = per_sequence, stratified, max_ratio
        self.readout, self.exit_weights, self.baseline, self.gate_target = readout, exit_weights, baseline, gate_target
        self._pending: dict[int, list] = {}  # loop -> [sum of token CE, tokens], this optimizer step
        self._step_loops = 0

    def check_model(self, recipe, cfg):
        for part in (self.proposal, self.weighting):
            part.check_model(recipe, cfg)

    def validate(self, recipe):
        for part in (self.proposal, self.weighting):
            part.validate(recipe)
        if self.exit_weights != "learned" and recipe.prior.beta:
            raise ValueError(f"SampledStep.exit_weights={self.exit_weights!r} keeps the gate out of the "
                             f"LM term, so an exit prior ({recipe.prior.describe()}) has nothing to act "
                             "on: set Recipe.prior = @NoPrior() (variants.priors)")

    # -- the draw -------------------------------------------------------------------------------
    def _q(self, n_loops, step):
        q = self.proposal.probs(n_loops, step)
        if q.shape != (n_loops,) or not bool((q > 0).all()) or abs(float(q.sum()) - 1) > 1e-9:
            raise ValueError(f"{self.proposal.describe()} gave q={q.tolist()} for T={n_loops}: it must "
                             "be positive on every loop and sum to 1")
        return q

    def _outcome(self, run, extra):
        return run, tuple(range(1, run + 1)), extra

    def plan_outcomes(self, n_loops, step, seed, batch_size):
        """Every plan this estimator can draw, with its probability: (q, (run, readout, extra)).
        The conformance battery enumerates them to check unbiasedness exactly."""
        q = self._q(n_loops, step)
        extra = {"q": q, "seed": seed, "step": step}
        if self.per_sequence:
            for rows in itertools.product(range(1, n_loops + 1), repeat=batch_size):
                yield (math.prod(float(q[t - 1]) for t in rows),
                       self._outcome(max(rows), extra | {"rows": torch.tensor(rows)}))
        else:
            for t in range(1, n_loops + 1):
                yield float(q[t - 1]), self._outcome(t, extra | {"t": t})

    def plan(self, n_loops, step, seed, batch_size):
        self._step_loops = n_loops  # every rank plans the same T: the length of the tallies to sum
        q = self._q(n_loops, step)
        extra = {"q": q, "seed": seed, "step": step}
        if self.per_sequence:  # every row its own loop; run up to the deepest one drawn
            g = step_generator(seed, step, "sampled_step/rows")
            if self.stratified:  # systematic: row i at u = (perm_i + U) / B, so each row's u ~ U[0, 1)
                u = (torch.randperm(batch_size, generator=g).double()
                     + torch.rand(1, generator=g, dtype=torch.float64)) / batch_size
                rows = torch.searchsorted(q.cumsum(0), u, right=True).clamp_max(n_loops - 1) + 1
            else:
                rows = torch.multinomial(q, batch_size, replacement=True, generator=g) + 1
            return self._outcome(int(rows.max()), extra | {"rows": rows})
        t = int(torch.multinomial(q, 1, generator=step_generator(seed, step, "sampled_step"))) + 1
        return self._outcome(t, extra | {"t": t})

    def local_rows(self, extra, rows):
        """Data parallelism: rows were drawn for the global batch; this rank keeps its share (and
        runs to the deepest loop of the whole batch, as one process would)."""
        return extra | {"rows": extra["rows"][rows]} if "rows" in extra else extra

    # -- the loss -------------------------------------------------------------------------------
    def _slots(self, loops, q, run):
        """(loop per row, importance ratio per row) of every read-out: one for readout="sampled"
        (plus loop 1 at ratio 0 when the baseline needs CE_1), one per loop that ran for "run"."""
        if self.readout == "run":
            Q = survival(q)
            slots = [(torch.full_like(loops, s), (loops >= s).double() / Q[s - 1]) for s in range(1, run + 1)]
        else:
            slots = [(loops, 1.0 / q[loops - 1])]
            if self.baseline == "first_loop":
                slots.append((torch.ones_like(loops), torch.zeros(loops.shape, dtype=torch.float64)))
        if self.max_ratio is not None:
            slots = [(at, ratio.clamp_max(self.max_ratio)) for at, ratio in slots]
        return slots

    def loss(self, ro, plan, prior):
        """plan.extra holds q, and t (per batch) or `rows` (per sequence: a LongTensor of the
        1-based loop of every row)."""
        T, q = plan.n_loops, plan.extra["q"]
        n_rows = ro.batch.targets.shape[0]
        if self.per_sequence:
            loops = plan.extra["rows"]
            if loops.shape != (n_rows,):
                raise ValueError(f"the plan drew loops for {loops.shape[0]} rows but the batch has {n_rows}")
        else:
            loops = torch.full((n_rows,), plan.extra["t"], dtype=torch.long)
        run = int(loops.max())
        w = self.weighting.weights(q, T)
        log_p_upto = log_exit_probs(ro.gate_logits(upto=run), T)  # p_s needs gates 1..s only
        device, dtype = log_p_upto.device, log_p_upto.dtype
        mask = ro.mask.to(dtype)
        n_tok = ro.mask.sum().clamp_min(1)
        slots = self._slots(loops, q, run)
        at = [(s.to(device) - 1)[:, None, None].expand(*ro.mask.shape, 1) for s, _ in slots]
        ratio = torch.stack([r.to(device, dtype) for _, r in slots], -1)[:, None, :]  # (B, 1, K)
        weight = torch.stack([w[s - 1].to(device, dtype) for s, _ in slots], -1)[:, None, :]
        log_p = torch.cat([log_p_upto.gather(-1, i) for i in at], -1)  # (B, S, K)
        exit_w = {"learned": log_p.exp(), "detached": log_p.exp().detach(),
                  "uniform": torch.full_like(log_p, 1.0 / T)}[self.exit_weights]
        if torch.is_grad_enabled():
            # linear in CE_s with known coefficients: read-out gradients formed in the forward pass
            coeff = (ratio * weight * exit_w).detach() * (mask / n_tok)[..., None]
            ce, correct, carrier = ro.weighted_ce([s for s, _ in slots], coeff)
        else:
            pairs = [ro.ce(s) for s, _ in slots]
            ce, correct = torch.stack([c for c, _ in pairs], -1), torch.stack([k for _, k in pairs], -1)
            carrier = 0.0
        ce = at_least_float32(ce).detach()
        b = (ce[..., :1] if self.readout == "run" else ce[..., 1:2]) if self.baseline == "first_loop" \
            else torch.zeros_like(ce[..., :1])  # CE_1: slot 0 of the loops that ran, else the extra slot
        # value sum c w e CE; the gate's gradient (learned e) is c (w CE - b) grad p
        per_token = (ratio * exit_w * (weight * ce - b)).sum(-1) + (ratio * exit_w * b).sum(-1).detach()
        if prior.beta:
            prior_terms = prior.loop_terms(log_p_upto, T)
            per_token = per_token + prior.beta * (ratio * torch.cat([prior_terms.gather(-1, i) for i in at], -1)).sum(-1)
        loss = (per_token * mask).sum() / n_tok + carrier
        metrics = {}
        if self.gate_target == "stage2":
            gate_loss = stage2_gate_term(ro, ce, ratio, run, T)
            loss = loss + gate_loss
            metrics["gate_loss"] = gate_loss.item()
        drawn = (torch.zeros_like(loops) if self.readout == "sampled" else loops - 1).to(device)
        drawn = drawn[:, None, None].expand(*ro.mask.shape, 1)  # each row's drawn loop among the slots
        drawn_ce, drawn_ok = ce.gather(-1, drawn).squeeze(-1), correct.gather(-1, drawn).squeeze(-1)
        self._record(slots, ce, mask)
        if not self.per_sequence:  # every row read the same loops: per-loop train metrics of those
            read = {int(at[0]): k for k, (at, _) in enumerate(slots)}
            metrics["ce"] = {t: float((ce[..., k] * mask).sum() / n_tok) for t, k in sorted(read.items())}
            metrics["acc"] = {t: float((correct[..., k].to(dtype) * mask).sum() / n_tok)
                              for t, k in sorted(read.items())}
        return loss, metrics | {
            "sampled_loop": loops.double().mean().item(), "sampled_ce": float((drawn_ce * mask).sum() / n_tok),
            "sampled_acc": float((drawn_ok.to(dtype) * mask).sum() / n_tok), "q_t": q[loops - 1].mean().item(),
            "weight": w[loops - 1].mean().item(), "run_loops": run, "read_loops": len(slots)}

    def _record(self, slots, ce, mask):
        """Add each read loop's token CE (rows where it was drawn or ran) to this step's tally."""
        for k, (at, ratio) in enumerate(slots):
            valid = (ratio > 0).to(mask.device)[:, None] * mask
            for t in torch.unique(at[ratio > 0]).tolist():
                rows = valid * (at == t).to(mask.device)[:, None]
                if rows.sum() > 0:
                    tally = self._pending.setdefault(t, [0.0, 0.0])
                    tally[0] += float((ce[..., k] * rows).sum())
                    tally[1] += float(rows.sum())

    def end_step(self):
        """Once per optimizer step: the proposal and the weighting observe the step's mean CE of
        every loop read out, over all its micro-batches."""
        flat = sum_over_ranks([x for t in range(1, self._step_loops + 1)
                               for x in self._pending.get(t, (0.0, 0.0))])  # all ranks' tallies
        for t in range(1, self._step_loops + 1):
            total, n = flat[2 * t - 2], flat[2 * t - 1]
            if n > 0:
                self.weighting.observe(t, total / n)
                self.proposal.observe(t, total / n)
        self._pending = {}

    def state_dict(self):
        state = {"proposal": self.proposal.state_dict(), "weighting": self.weighting.state_dict()}
        return {k: v for k, v in state.items() if v}

    def load_state_dict(self, state):
        unknown = set(state) - {"proposal", "weighting"}
        if unknown:
            raise ValueError(f"SampledStep state has unknown keys {sorted(unknown)}")
        self.proposal.load_state_dict(state.get("proposal", {}))
        self.weighting.load_state_dict(state.get("weighting", {}))

    def describe(self):
        options = {k: getattr(self, k) for k in CHOICES} | {"per_sequence": self.per_sequence,
                                                            "stratified": self.stratified, "max_ratio": self.max_ratio}
        return (f"SampledStep({self.proposal.describe()}, {self.weighting.describe()}, "
                + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")")
