"""Sampled-step loss: supervise one loop t ~ q(t), importance-weighted (ESTIMATORS "sampled_step").

The diffusion analogy (REFERENCE 3 and 5): instead of reading out all T loops and weighting their
losses by the exit probabilities p_t (Ouro Stage I), draw one loop t from a proposal q per batch
(or one per sequence), run only loops 1..t and read out only loop t:

    L = token_mean[ w_t * p_t / q_t * CE_t  +  beta * prior_t / q_t ]

with p_t = exp(log_exit_probs(gates 1..t, T)[t]) (p_t needs only the first t gates) and
prior_t = prior.loop_terms(log p, T)[t] (the prior's own term for loop t, e.g. p_t log p_t).
Since q does not depend on the parameters, with w = 1 the expectation over t ~ q of this loss
*and of its gradient* equals the full-unroll loss `sum_t p_t CE_t + beta * sum_t prior_t`
(the tests check that by exact enumeration over t).

Parts, each picked by name and gin-configurable:

    proposals  (PROPOSALS)   uniform, fixed_schedule(probs), clts(total_steps, ...),
                             improvement(fast_decay, slow_decay, floor)
    weightings (WEIGHTINGS)  none, min_snr(gamma, snr="ema"|"schedule", s0, ema_decay)

**A weighting changes the objective.** With Min-SNR weights the expectation is
`sum_t w_t p_t CE_t + beta * prior`: by design no longer the plain Stage I loss (it reweights
the loops, like Min-SNR-gamma does for diffusion time steps). Only `NoWeighting` is unbiased for
Stage I. The prior term is importance-weighted but never loss-weighted, so the exit prior keeps
its meaning under any weighting.

Notes on the composition with other families:
- Every micro-batch of one optimizer step draws the same t (the draw is a function of (seed,
  step) alone, so every data-parallel rank agrees and a resumed run repeats it).
- The plan keeps the states of loops 1..t: the exit gate needs loops 1..t to form p_t
  (`Readouts.gate_logits` reads `traj.gate_inputs`, kept only for planned loops). Only loop t
  goes through the LM head.
- `per_sequence=True` draws t independently for every row; the step runs loops 1..max_b t_b and
  every row is read out once, at its own loop, in one fused read-out over the whole batch. A
  backprop window then counts back from that deepest loop, not from each row's t.
- A truncated window (variants.truncated) counts back from the sampled loop t.
"""

import itertools
import math

import torch

from looplm.hooks import ESTIMATORS, LossEstimator, Plugin, step_generator
from looplm.objectives import at_least_float32, log_exit_probs
from looplm.recipe import FixedLoops
from looplm.registry import Registry

PROPOSALS = Registry("step proposal")
WEIGHTINGS = Registry("step weighting")


# -- proposals q(t) over loops 1..T -----------------------------------------------------------
class Proposal(Plugin):
    def probs(self, n_loops: int, step: int) -> torch.Tensor:
        """q(t) for t = 1..n_loops: float64, positive, sums to 1."""
        raise NotImplementedError

    def observe(self, loop: int, ce: float) -> None:
        """The detached token-mean CE of a sampled loop (after this step's draw)."""


@PROPOSALS.register("uniform")
class UniformProposal(Proposal):
    """q(t) = 1/T."""

    def probs(self, n_loops, step):
        return torch.full((n_loops,), 1.0 / n_loops, dtype=torch.float64)


@PROPOSALS.register("fixed_schedule")
class FixedScheduleProposal(Proposal):
    """A fixed q over the loops: probs[t-1] for loop t, positive (renormalised to sum to 1). Its
    length must equal the step's T, so it suits a fixed loop count."""

    def __init__(self, probs=(0.25, 0.25, 0.25, 0.25)):
        probs = [float(p) for p in probs]
        if not probs or not all(math.isfinite(p) and p > 0 for p in probs):
            raise ValueError(f"FixedScheduleProposal.probs={probs} must be a non-empty list of finite "
                             "positive numbers (every loop needs q > 0 for finite importance weights)")
        total = sum(probs)
        self.q = torch.tensor([p / total for p in probs], dtype=torch.float64)

    def probs(self, n_loops, step):
        if len(self.q) != n_loops:
            raise ValueError(f"FixedScheduleProposal has {len(self.q)} probabilities but this step runs "
                             f"T={n_loops} loops; give one per loop or use a fixed loop count")
        return self.q.clone()

    def validate(self, recipe):
        lc = recipe.loop_count
        if not isinstance(lc, FixedLoops):
            raise ValueError(f"FixedScheduleProposal gives one probability per loop, so it needs a fixed "
                             f"loop count, but Recipe.loop_count = {lc.describe()} draws T every step; "
                             "use UniformProposal or CLTSProposal with a random loop count")
        if lc.n_loops is not None and lc.n_loops != len(self.q):
            raise ValueError(f"FixedScheduleProposal has {len(self.q)} probabilities but FixedLoops.n_loops="
                             f"{lc.n_loops}")

    def describe(self):
        return f"FixedScheduleProposal({[round(p, 4) for p in self.q.tolist()]})"


@PROPOSALS.register("clts")
class CLTSProposal(Proposal):
    """Curriculum from uniform to a focused Gaussian moving from early to late loops (REFERENCE 5;
    after the CLTS seed idea and Kim et al., arXiv:2403.10348). With s = clamp(step /
    total_steps, 0, 1) and T the step's loop count, the exact schedule is

        a(s)     = a_max * s                                   focus, rising from 0
        mu(s)    = mu_start + (mu_end - mu_start) * s          centre (mu_end=None: T)
        sigma(s) = sigma_start + (sigma_end - sigma_start) * s width in loops, shrinking
        G_s(t)   = exp(-(t - mu(s))^2 / (2 sigma(s)^2)) / sum_{t'=1..T} exp(...)
        q_s(t)   = (1 - floor) * [(1 - a(s)) / T + a(s) * G_s(t)] + floor / T

    so q_0 is uniform and every loop keeps q_s(t) >= floor / T (finite importance weights).
    Easy loops first: as the focus rises the mass first gathers on the early loops (the mean
    loop dips below the uniform (T+1)/2), then follows the centre to the last loops.
    Stateless: q is a function of the step. Defaults: a_max 0.8, mu 1 -> T, sigma 2 -> 0.5
    loops, floor 0.05."""

    def __init__(self, total_steps: int, a_max: float = 0.8, mu_start: float = 1.0,
                 mu_end: float | None = None, sigma_start: float = 2.0, sigma_end: float = 0.5,
                 floor: float = 0.05):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"CLTSProposal.total_steps={total_steps!r} must be an integer >= 1 "
                             "(the training length the curriculum spans)")
        if not 0.0 <= a_max <= 1.0:
            raise ValueError(f"CLTSProposal.a_max={a_max} must be in [0, 1]")
        if not (sigma_start > 0 and sigma_end > 0):
            raise ValueError(f"CLTSProposal sigma_start={sigma_start}, sigma_end={sigma_end} must be > 0")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"CLTSProposal.floor={floor} must be in (0, 1]: the floor keeps q > 0 "
                             "on every loop")
        self.total_steps, self.a_max, self.floor = total_steps, a_max, floor
        self.mu_start, self.mu_end = mu_start, mu_end
        self.sigma_start, self.sigma_end = sigma_start, sigma_end

    def schedule(self, n_loops: int, step: int) -> tuple[float, float, float]:
        """(a, mu, sigma) at this step."""
        s = min(1.0, max(0.0, step / self.total_steps))
        mu_end = n_loops if self.mu_end is None else self.mu_end
        return (self.a_max * s, self.mu_start + (mu_end - self.mu_start) * s,
                self.sigma_start + (self.sigma_end - self.sigma_start) * s)

    def probs(self, n_loops, step):
        a, mu, sigma = self.schedule(n_loops, step)
        t = torch.arange(1, n_loops + 1, dtype=torch.float64)
        gauss = torch.softmax(-((t - mu) ** 2) / (2 * sigma**2), 0)
        uniform = torch.full_like(t, 1.0 / n_loops)
        mix = (1 - a) * uniform + a * gauss
        return (1 - self.floor) * mix + self.floor * uniform

    def describe(self):
        return (f"CLTSProposal(total_steps={self.total_steps}, a_max={self.a_max}, mu {self.mu_start}->"
                f"{'T' if self.mu_end is None else self.mu_end}, sigma {self.sigma_start}->{self.sigma_end}, "
                f"floor={self.floor})")


@PROPOSALS.register("improvement")
class ImprovementProposal(Proposal):
    """Sample the loops whose loss is still falling (REFERENCE 5, the loop analogue of SpeeD,
    arXiv:2405.17403, which samples less from converged diffusion time steps). Per loop, a fast
    and a slow EMA of its sampled token-mean CE (each starts at the loop's first observation):

        progress_t = max(0, slow_t - fast_t) / slow_t       relative recent decrease
        q(t)       = floor / T + (1 - floor) * progress_t / sum_t' progress_t'

    A loop not yet observed gets the largest progress of the observed ones (it is explored); q is
    uniform while no loop has progress. Stateful (the EMAs are checkpointed); q depends on the
    CEs this process observed, so under data parallelism every rank must observe the same
    (all-reduced) values to draw the same loop."""

    def __init__(self, fast_decay: float = 0.9, slow_decay: float = 0.99, floor: float = 0.2):
        if not 0.0 <= fast_decay < slow_decay < 1.0:
            raise ValueError(f"ImprovementProposal fast_decay={fast_decay}, slow_decay={slow_decay}: need "
                             "0 <= fast_decay < slow_decay < 1 (the slow EMA must remember longer)")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"ImprovementProposal.floor={floor} must be in (0, 1]: the floor keeps q > 0 "
                             "on every loop")
        self.fast_decay, self.slow_decay, self.floor = fast_decay, slow_decay, floor
        self.ema: dict[int, list] = {}  # loop -> [fast, slow]

    def progress(self, n_loops: int) -> torch.Tensor:
        seen = {t: max(0.0, slow - fast) / max(slow, 1e-12) for t, (fast, slow) in self.ema.items()}
        explore = max(seen.values(), default=0.0)
        return torch.tensor([seen.get(t, explore) for t in range(1, n_loops + 1)], dtype=torch.float64)

    def probs(self, n_loops, step):
        progress = self.progress(n_loops)
        uniform = torch.full((n_loops,), 1.0 / n_loops, dtype=torch.float64)
        if float(progress.sum()) <= 0:
            return uniform
        return self.floor * uniform + (1 - self.floor) * progress / progress.sum()

    def observe(self, loop, ce):
        ce = float(ce)
        if not math.isfinite(ce):
            return
        if loop not in self.ema:
            self.ema[loop] = [ce, ce]
            return
        fast, slow = self.ema[loop]
        self.ema[loop] = [self.fast_decay * fast + (1 - self.fast_decay) * ce,
                          self.slow_decay * slow + (1 - self.slow_decay) * ce]

    def state_dict(self):
        return {"ema": {t: list(v) for t, v in self.ema.items()}} if self.ema else {}

    def load_state_dict(self, state):
        self.ema = {int(t): [float(x) for x in v] for t, v in state.get("ema", {}).items()}

    def describe(self):
        return (f"ImprovementProposal(fast_decay={self.fast_decay}, slow_decay={self.slow_decay}, "
                f"floor={self.floor})")


# -- weightings w_t ---------------------------------------------------------------------------
class Weighting(Plugin):
    def weights(self, q: torch.Tensor, n_loops: int) -> torch.Tensor:
        """w_t for t = 1..n_loops (float64), normalised so that sum_t q_t w_t = 1."""
        raise NotImplementedError

    def observe(self, loop: int, ce: float) -> None:
        """The detached token-mean CE of a sampled loop (after its weight was used)."""


@WEIGHTINGS.register("none")
class NoWeighting(Weighting):
    """w_t = 1: the estimator is unbiased for the Stage I loss."""

    def weights(self, q, n_loops):
        return torch.ones(n_loops, dtype=torch.float64)


@WEIGHTINGS.register("min_snr")
class MinSNRWeighting(Weighting):
    """Min-SNR-gamma (Hang et al. 2023) mapped to loops; looplm's own definition (REFERENCE 5):

        snr="ema":      SNR_t = 1 / ema(CE_t)   (EMA of loop t's detached token-mean CE, nats)
        snr="schedule": SNR_t = s0 * t          (deeper loops are cleaner)
        raw_t = min(SNR_t, gamma) / SNR_t,  w_t = raw_t / sum_t' q_t' raw_t'  (so E_q[w] = 1)

    The EMA of a loop starts at its first observed CE and is updated, `ema <- d*ema + (1-d)*CE`,
    only when that loop is sampled, after its weight was used. A loop not yet observed has no SNR
    and gets raw weight 1 (uncapped). The EMAs are saved in state_dict. The weighted loss is by
    design no longer the plain Stage I objective."""

    def __init__(self, gamma: float = 5.0, snr: str = "ema", s0: float = 1.0, ema_decay: float = 0.99):
        if not gamma > 0:
            raise ValueError(f"MinSNRWeighting.gamma={gamma} must be > 0")
        if snr not in ("ema", "schedule"):
            raise ValueError(f"MinSNRWeighting.snr={snr!r}; choose 'ema' (1/EMA of each loop's CE) or "
                             "'schedule' (s0 * t)")
        if not s0 > 0:
            raise ValueError(f"MinSNRWeighting.s0={s0} must be > 0")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"MinSNRWeighting.ema_decay={ema_decay} must be in [0, 1)")
        self.gamma, self.snr, self.s0, self.ema_decay = float(gamma), snr, float(s0), float(ema_decay)
        self.ema: dict[int, float] = {}

    def snr_values(self, n_loops: int) -> list:
        """SNR_t for t = 1..n_loops (None where a loop's EMA has no observation yet)."""
        if self.snr == "schedule":
            return [self.s0 * t for t in range(1, n_loops + 1)]
        return [1.0 / max(self.ema[t], 1e-12) if t in self.ema else None for t in range(1, n_loops + 1)]

    def weights(self, q, n_loops):
        raw = torch.tensor([1.0 if s is None else min(s, self.gamma) / s for s in self.snr_values(n_loops)],
                           dtype=torch.float64)
        return raw / (q.to(torch.float64) * raw).sum()

    def observe(self, loop, ce):
        if self.snr != "ema":
            return
        ce = float(ce)
        if not math.isfinite(ce):
            return
        old = self.ema.get(loop)
        self.ema[loop] = ce if old is None else self.ema_decay * old + (1 - self.ema_decay) * ce

    def state_dict(self):
        return {"ema": dict(self.ema)} if self.snr == "ema" else {}

    def load_state_dict(self, state):
        self.ema = {int(k): float(v) for k, v in state.get("ema", {}).items()}

    def describe(self):
        return f"MinSNRWeighting(gamma={self.gamma}, snr={self.snr!r})"


# -- the estimator ----------------------------------------------------------------------------
@ESTIMATORS.register("sampled_step")
class SampledStep(LossEstimator):
    """One loop t ~ q(t) per batch (or per sequence), loss `w_t p_t / q_t CE_t + beta prior_t / q_t`.

    proposal: a Proposal (default UniformProposal); weighting: a Weighting (default NoWeighting,
    the only unbiased one for Stage I); per_sequence: one t per row instead of per batch.
    Metrics: sampled_loop, sampled_ce, sampled_acc, q_t, weight (means over rows if per_sequence).
    """

    @classmethod
    def conformance_examples(cls):
        return [cls(),
                cls(CLTSProposal(total_steps=10), MinSNRWeighting()),
                cls(FixedScheduleProposal((0.5, 0.3, 0.2)), per_sequence=True),  # the battery runs T = 3
                cls(ImprovementProposal())]

    @property
    def properties(self):
        """Unbiased for Stage I only without a loss weighting (a weighting changes the objective)."""
        return frozenset({"unbiased_for_stage1"}) if isinstance(self.weighting, NoWeighting) else frozenset()

    def plan_outcomes(self, n_loops, step, seed, batch_size):
        """Every plan this estimator can draw, with its probability: (q, (run, readout, extra)).
        The conformance battery enumerates them to check unbiasedness exactly."""
        q = self.proposal.probs(n_loops, step)
        extra = {"q": q, "seed": seed, "step": step}
        if self.per_sequence:
            for rows in itertools.product(range(1, n_loops + 1), repeat=batch_size):
                yield (math.prod(float(q[t - 1]) for t in rows),
                       (max(rows), tuple(range(1, max(rows) + 1)), extra | {"rows": torch.tensor(rows)}))
        else:
            for t in range(1, n_loops + 1):
                yield float(q[t - 1]), (t, tuple(range(1, t + 1)), extra | {"t": t})

    def __init__(self, proposal: Proposal = None, weighting: Weighting = None, per_sequence: bool = False):
        self.proposal = UniformProposal() if proposal is None else proposal
        self.weighting = NoWeighting() if weighting is None else weighting
        if not isinstance(self.proposal, Proposal):
            raise ValueError(f"SampledStep.proposal={self.proposal!r} is not a Proposal; registered: "
                             f"{PROPOSALS.names()}")
        if not isinstance(self.weighting, Weighting):
            raise ValueError(f"SampledStep.weighting={self.weighting!r} is not a Weighting; registered: "
                             f"{WEIGHTINGS.names()}")
        if not isinstance(per_sequence, bool):
            raise ValueError(f"SampledStep.per_sequence={per_sequence!r} must be True or False")
        self.per_sequence = per_sequence

    def plan(self, n_loops, step, seed, batch_size):
        q = self.proposal.probs(n_loops, step)
        if q.shape != (n_loops,) or not bool((q > 0).all()) or abs(float(q.sum()) - 1) > 1e-9:
            raise ValueError(f"{self.proposal.describe()} gave q={q.tolist()} for T={n_loops}: it must "
                             "be positive on every loop and sum to 1")
        extra = {"q": q, "seed": seed, "step": step}
        if self.per_sequence:  # every row its own loop; run up to the deepest one drawn
            rows = torch.multinomial(q, batch_size, replacement=True,
                                     generator=step_generator(seed, step, "sampled_step/rows")) + 1
            run = int(rows.max())
            return run, tuple(range(1, run + 1)), extra | {"rows": rows}
        t = int(torch.multinomial(q, 1, generator=step_generator(seed, step, "sampled_step"))) + 1
        return t, tuple(range(1, t + 1)), extra | {"t": t}

    def loss(self, ro, plan, prior):
        """plan.extra holds q, and t (per batch) or `rows` (per sequence: a LongTensor of the
        1-based loop of every row)."""
        T, q = plan.n_loops, plan.extra["q"]
        w = self.weighting.weights(q, T)
        n_rows = ro.batch.targets.shape[0]
        if self.per_sequence:
            loops = plan.extra["rows"]
            if loops.shape != (n_rows,):
                raise ValueError(f"the plan drew loops for {loops.shape[0]} rows but the batch has {n_rows}")
        else:
            loops = torch.full((n_rows,), plan.extra["t"], dtype=torch.long)
        log_p_upto = log_exit_probs(ro.gate_logits(upto=int(loops.max())), T)  # p_t needs gates 1..t only
        device, dtype = log_p_upto.device, log_p_upto.dtype
        at_loop = (loops.to(device) - 1)[:, None, None].expand(*ro.mask.shape, 1)
        log_p = log_p_upto.gather(-1, at_loop).squeeze(-1)  # (B, S): each row's own p_t
        q_row, w_row = q[loops - 1], w[loops - 1]  # each row's q_t and w_t
        ratio = (w_row / q_row).to(device, dtype)[:, None]
        mask = ro.mask.to(dtype)
        n_tok = ro.mask.sum().clamp_min(1)
        if torch.is_grad_enabled():
            # linear in CE_t with known coefficients: read-out gradients formed in the forward pass
            coeff = (ratio * log_p.exp()).detach() * mask / n_tok
            ce, correct, carrier = ro.weighted_ce((loops,), coeff[..., None])
            ce, correct = ce[..., 0], correct[..., 0]
        else:
            (ce, correct), carrier = ro.ce(loops), 0.0
        per_token = ratio * log_p.exp() * at_least_float32(ce)
        if prior.beta:
            prior_t = prior.loop_terms(log_p_upto, T).gather(-1, at_loop).squeeze(-1)
            per_token = per_token + prior.beta * prior_t / q_row.to(device, dtype)[:, None]
        ce, correct = ce.detach() * mask, correct.to(dtype) * mask
        for t in torch.unique(loops).tolist():
            rows = (loops == t).to(device)
            if ro.mask[rows].any():
                mean_ce = float(ce[rows].sum() / mask[rows].sum())
                self.weighting.observe(t, mean_ce)
                self.proposal.observe(t, mean_ce)
        metrics = {"sampled_loop": loops.double().mean().item(),
                   "sampled_ce": float(ce.sum() / n_tok), "sampled_acc": float(correct.sum() / n_tok),
                   "q_t": q_row.mean().item(), "weight": w_row.mean().item()}
        return (per_token * mask).sum() / n_tok + carrier, metrics

    def validate(self, recipe):
        for part in (self.proposal, self.weighting):
            part.validate(recipe)

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
        return (f"SampledStep({self.proposal.describe()}, {self.weighting.describe()}, "
                f"per_sequence={self.per_sequence})")
