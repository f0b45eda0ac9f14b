"""A recipe: one choice per hook family, and the one training step they define together.

Ouro's own choices are the defaults and live here: a fixed loop count, backprop through every
loop, the exit-weighted full-unroll loss (Stage I) with the uniform prior, and Stage II gate
training. Everything else is a plugin in `variants/`.
"""

import gin
import torch

from looplm.config import is_number
from looplm.hooks import (BACKPROP_WINDOWS, ESTIMATORS, EXIT_PRIORS, LOOP_COUNTS, BackpropWindow,
                          ExitPrior, LossEstimator, LoopCount, Plan, Readouts, Regularizer)
from looplm.objectives import (entropy, log_exit_probs, neg_entropy_terms, stage1_loss, stage2_loss,
                               token_mean)


@LOOP_COUNTS.register("fixed")
class FixedLoops(LoopCount):
    """The same T every step (default: the model's configured n_loops)."""

    properties = frozenset({"stateless"})

    def __init__(self, n_loops: int | None = None):
        if n_loops is not None and n_loops < 1:
            raise ValueError(f"FixedLoops.n_loops={n_loops} must be >= 1")
        self.n_loops = n_loops

    def sample(self, step, n_loops, seed):
        return self.n_loops or n_loops


@BACKPROP_WINDOWS.register("full")
class FullBackprop(BackpropWindow):
    """Every loop keeps its graph (Ouro)."""

    properties = frozenset({"stateless"})

    def first_grad_loop(self, step, n_loops):
        return 1


@EXIT_PRIORS.register("uniform")
class UniformPrior(ExitPrior):
    """Ouro's entropy bonus: terms p_t log p_t sum to -H(p) = KL(p || Uniform_T) - log T."""

    properties = frozenset({"stateless"})

    def __init__(self, beta: float = 0.1):
        if not (is_number(beta) and beta >= 0):
            raise ValueError(f"UniformPrior.beta={beta!r} must be a finite number >= 0")
        self.beta = beta

    def loop_terms(self, log_p, n_loops):
        return neg_entropy_terms(log_p, n_loops)


@ESTIMATORS.register("exit_weighted")
class ExitWeighted(LossEstimator):
    """Ouro Stage I, full unroll: every loop read out, `sum_t p_t CE_t + beta * prior`.

    readout="fused" (default) forms the read-out gradients in the forward pass with the exit
    probabilities as known coefficients; "recompute" uses the generic autograd read-out, which
    recomputes the logits in backward (a third more read-out FLOPs; kept for comparison).
    """

    properties = frozenset({"unbiased_for_stage1"})

    @classmethod
    def conformance_examples(cls):
        return [cls(), cls(readout="recompute")]

    def __init__(self, readout: str = "fused"):
        if readout not in ("fused", "recompute"):
            raise ValueError(f"ExitWeighted.readout={readout!r}; choose 'fused' or 'recompute'")
        self.readout = readout

    def plan(self, n_loops, step, seed, batch_size):
        return n_loops, tuple(range(1, n_loops + 1)), {}

    def loss(self, ro, plan, prior):
        gates = ro.gate_logits()
        if self.readout == "fused" and torch.is_grad_enabled():
            # d loss / d CE_t,i = p_t,i / n_tokens: known once the gates are, so read out with it
            p = log_exit_probs(gates).exp().detach()
            coeffs = p * (ro.mask.to(p.dtype) / ro.mask.sum().clamp_min(1))[..., None]
            ce, correct, carrier = ro.weighted_ce(plan.readout, coeffs)
        else:
            (ce, correct), carrier = ro.ce_all(), 0.0
        loss, log_p = stage1_loss(ce, gates, ro.mask, prior.beta, prior.loop_terms)
        return loss + carrier, loop_metrics(ce, correct, ro.mask) | exit_metrics(log_p, ro.mask)


@ESTIMATORS.register("stage2_gate")
class GateTraining(LossEstimator):
    """Ouro Stage II: LM frozen, the gate learns to exit when the next loop stops helping."""

    trains = "gate"

    def __init__(self, k: float = 50.0, gamma: float = 0.005):
        if not (is_number(k) and k > 0):
            raise ValueError(f"GateTraining.k={k!r} must be a finite number > 0 (the sharpness of the "
                             "continue target)")
        if not (is_number(gamma) and gamma >= 0):
            raise ValueError(f"GateTraining.gamma={gamma!r} must be a finite number >= 0")
        self.k, self.gamma = k, gamma

    def validate(self, recipe):
        if recipe.prior.beta:
            raise ValueError("stage2_gate trains the gate on its own target; an exit prior has no "
                             "effect there: set Recipe.prior = @NoPrior() (variants.priors)")
        if recipe.regularizers:
            raise ValueError("stage2_gate freezes the LM, so trajectory regularizers cannot act; "
                             "remove Recipe.regularizers")

    def plan(self, n_loops, step, seed, batch_size):
        return n_loops, tuple(range(1, n_loops + 1)), {}

    def loss(self, ro, plan, prior):
        ce, correct = ro.ce_all()
        g = ro.gate_logits()
        loss = stage2_loss(ce, g, ro.mask, k=self.k, gamma=self.gamma)
        return loss, loop_metrics(ce, correct, ro.mask) | exit_metrics(log_exit_probs(g), ro.mask)


def loop_metrics(ce, correct, mask) -> dict:
    """Per-loop token-mean CE and accuracy: lists indexed by loop - 1."""
    m = mask.unsqueeze(-1).float()
    n = m.sum().clamp_min(1)
    return {"ce": ((ce.detach() * m).sum((0, 1)) / n).tolist(),
            "acc": ((correct.float() * m).sum((0, 1)) / n).tolist()}


def exit_metrics(log_p, mask) -> dict:
    """Mean exit distribution, mean exit loop and entropy over supervised tokens."""
    log_p = log_p.detach()
    p = log_p.exp()
    loops = torch.arange(1, p.shape[-1] + 1, dtype=p.dtype, device=p.device)
    m = mask.unsqueeze(-1).float()
    return {"exit_p": ((p * m).sum((0, 1)) / m.sum().clamp_min(1)).tolist(),
            "exit_mean": token_mean((p * loops).sum(-1), mask).item(),
            "entropy": token_mean(entropy(log_p), mask).item()}


@gin.configurable
class Recipe:
    """One choice per family. Checked for compatibility when built (i.e. when gin is read)."""

    def __init__(self, loop_count: LoopCount = None, window: BackpropWindow = None,
                 estimator: LossEstimator = None, prior: ExitPrior = None, regularizers=(),
                 seed: int = 0):
        self.loop_count = loop_count or FixedLoops()
        self.window = window or FullBackprop()
        self.estimator = estimator or ExitWeighted()
        self.prior = prior or UniformPrior()
        self.regularizers = tuple(regularizers)
        self.seed = seed
        interfaces = {"loop_count": LoopCount, "window": BackpropWindow, "estimator": LossEstimator,
                      "prior": ExitPrior}
        for name, part in self.parts().items():
            expected = interfaces.get(name, Regularizer)
            if not isinstance(part, expected):
                raise ValueError(f"Recipe.{name} = {part!r} is not a {expected.__name__}")
        for part in self.parts().values():
            part.validate(self)

    def check_model(self, cfg) -> None:
        """Every part's check against the model config (Plugin.check_model), before training."""
        for part in self.parts().values():
            part.check_model(self, cfg)

    def parts(self) -> dict:
        named = {"loop_count": self.loop_count, "window": self.window,
                 "estimator": self.estimator, "prior": self.prior}
        return named | {f"regularizer{i}": r for i, r in enumerate(self.regularizers)}

    def describe(self) -> dict:
        return {k: v.describe() for k, v in self.parts().items()}

    def plan(self, step: int, n_loops: int, batch_size: int, rows: slice | None = None) -> Plan:
        """The step's plan for a batch of `batch_size` rows; under data parallelism batch_size is
        the global batch and `rows` this rank's share of it (the estimator localises per-row
        draws, so every rank draws what one process would)."""
        T = self.loop_count.sample(step, n_loops, self.seed)
        run, readout, extra = self.estimator.plan(T, step, self.seed, batch_size)
        if rows is not None:
            extra = self.estimator.local_rows(extra, rows)
        first_grad = run + 1 if self.estimator.trains == "gate" else self.window.first_grad_loop(step, run)
        return Plan(n_loops=T, run_loops=run, first_grad_loop=first_grad, readout=readout, extra=extra)

    def loss(self, model, batch, step: int, rows: slice | None = None, global_batch: int | None = None):
        """Forward, read out and combine: the loss of one micro-batch and its metrics (`rows` of a
        `global_batch` under data parallelism)."""
        plan = self.plan(step, model.cfg.n_loops, global_batch if rows is not None else batch.input_ids.shape[0],
                         rows)
        traj = model(batch.input_ids, n_loops=plan.run_loops, doc_ids=batch.doc_ids,
                     first_grad_loop=plan.first_grad_loop, keep=plan.readout)
        loss, metrics = self.estimator.loss(Readouts(model, traj, batch, plan.n_loops), plan, self.prior)
        for reg in self.regularizers:
            loss, reg_metrics = reg.apply(loss, model, traj, batch, step, self.seed)
            metrics |= reg_metrics
        metrics["n_loops"] = plan.n_loops
        if rows is not None and traj.last_state.requires_grad:
            # every rank backpropagates through every loop that ran, even where its own rows read
            # out earlier loops only (per-row loops): FSDP's per-layer reductions then line up
            loss = loss + 0.0 * traj.last_state.sum()
        return loss, metrics

    def trainable_parameters(self, model):
        if self.estimator.trains == "gate":
            return list(model.gate.parameters())
        return [p for p in model.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        return {k: v.state_dict() for k, v in self.parts().items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.parts().items():
            v.load_state_dict(state.get(k, {}))

