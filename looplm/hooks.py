"""The hook surface: one small interface and one registry per variant family.

    loop count        how many loops T this batch runs                  LOOP_COUNTS
    backprop window   which of the T loops keep a graph                 BACKPROP_WINDOWS
    loss estimator    which loops are supervised, with what weight      ESTIMATORS
    exit prior        the regulariser on the exit distribution          EXIT_PRIORS
    regularizers      extra loss terms on the trajectory (a list)       REGULARIZERS
    model structure   norm type and placement, input injection          NORMS, PLACEMENTS,
                      (looplm.layers)                                   INJECTIONS

A plugin subclasses one interface, registers itself with `@FAMILY.register("name")` (which also
makes it gin-configurable) and lives in one file. The core never imports `variants/`.
"""

import hashlib
from dataclasses import dataclass

import torch

from looplm.layers import INJECTIONS, NORMS, PLACEMENTS  # noqa: F401  (re-exported: the structure family)
from looplm.readout import IGNORE_INDEX
from looplm.registry import Registry

LOOP_COUNTS = Registry("loop count")
BACKPROP_WINDOWS = Registry("backprop window")
ESTIMATORS = Registry("loss estimator")
EXIT_PRIORS = Registry("exit prior")
REGULARIZERS = Registry("regularizer")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over the data-parallel ranks (the values themselves in one
    process). A plugin whose state learns from the data (an EMA, a curriculum) sums its step's
    statistics with it in `end_step`, so every rank learns the same and draws the same."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def step_generator(seed: int, step: int, salt: str) -> torch.Generator:
    """A generator determined by (seed, step, salt) alone: every data-parallel rank draws the same
    value, and a resumed run draws what the uninterrupted run drew, with no RNG state to save."""
    digest = hashlib.blake2b(f"{seed}/{step}/{salt}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class Plugin:
    """Common base: optional checkpointed state and a config-time compatibility check.

    `properties` names claims the conformance battery checks (looplm/tools/conformance/), e.g.
    "stateless" or "unbiased_for_stage1"; a classmethod `conformance_examples()` may return
    instances for the battery to check when the defaults are not enough."""

    properties: frozenset = frozenset()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but the checkpoint holds {sorted(state)}")

    def validate(self, recipe) -> None:
        """Raise ValueError, saying why, if this plugin cannot work with the rest of `recipe`."""

    def end_step(self) -> None:
        """Called by the trainer once per optimizer step, after all its micro-batches: where state
        learned from the step (EMAs, a proposal) changes, so it never changes within a step."""

    def check_model(self, recipe, cfg) -> None:
        """Raise ValueError, saying why, if this plugin cannot work with the model config `cfg`
        (e.g. a window longer than the loop count); the trainer calls it before training."""

    def describe(self) -> str:
        return type(self).__name__


class LoopCount(Plugin):
    def sample(self, step: int, n_loops: int, seed: int) -> int:
        """Loops to run this step; n_loops is the model's configured T."""
        raise NotImplementedError


class BackpropWindow(Plugin):
    def first_grad_loop(self, step: int, n_loops: int) -> int:
        """1-based index of the first loop that keeps a graph (n_loops + 1: none does)."""
        raise NotImplementedError


class ExitPrior(Plugin):
    beta: float = 0.0

    def loop_terms(self, log_p: torch.Tensor, n_loops: int) -> torch.Tensor:
        """Per-loop terms whose sum over all T loops is the penalty, e.g. p_t (log p_t - log pi_t)
        for KL(p || pi). log_p holds loops 1..n <= T (the last dim); a term may depend on its own
        loop only, so a sampled-step estimator can importance-weight a single one."""
        raise NotImplementedError


@dataclass
class Plan:
    """What one step runs: decided before the forward pass."""

    n_loops: int  # T of the exit distribution this step
    run_loops: int  # loops actually run (a sampled-step estimator stops at its loop)
    first_grad_loop: int  # earlier loops run under no_grad
    readout: tuple  # 1-based loops whose states are read out
    extra: dict  # estimator-specific choices (sampled loops, proposal probabilities)


class Readouts:
    """Lazy per-loop read-outs of one trajectory: CE and accuracy per token, gate logits.

    Estimators ask only for what they need, so unread loops never form logits."""

    def __init__(self, model, traj, batch, n_loops: int):
        self.model, self.traj, self.batch, self.n_loops = model, traj, batch, n_loops
        self.mask = batch.targets != IGNORE_INDEX
        self._ce = {}

    def state(self, loop):
        """The read-out input of `loop`: a 1-based loop number, or a (B,) LongTensor giving every
        row its own loop (rows gathered from their loops' states, differentiably)."""
        if not isinstance(loop, torch.Tensor):
            return self._kept(int(loop))
        distinct = torch.unique(loop).tolist()
        if len(distinct) == 1:
            return self._kept(distinct[0])
        rows = [torch.nonzero(loop == t).squeeze(1) for t in distinct]
        gathered = torch.cat([self._kept(t)[r.to(self.mask.device)] for t, r in zip(distinct, rows)])
        return gathered[torch.argsort(torch.cat(rows)).to(gathered.device)]

    def _kept(self, t: int):
        if not 1 <= t <= len(self.traj.states) or self.traj.states[t - 1] is None:
            raise RuntimeError(f"loop {t} was not kept; the estimator's plan must list it in readout")
        return self.traj.states[t - 1]

    def ce(self, t):
        """(ce, correct) of loop t (an int, or per-row loops as for `state`), each (B, S)."""
        key = t if not isinstance(t, torch.Tensor) else tuple(t.tolist())
        if key not in self._ce:
            self._ce[key] = self.model.token_loss(self.state(t), self.batch.targets)
        return self._ce[key]

    def ce_all(self, loops=None):
        loops = loops or range(1, self.n_loops + 1)
        pairs = [self.ce(t) for t in loops]
        return torch.stack([c for c, _ in pairs], -1), torch.stack([k for _, k in pairs], -1)

    def weighted_ce(self, loops, coeffs):
        """(ce, correct), each (B, S, len(loops)) and detached, and a zero-valued tensor carrying
        the gradient of `sum_t sum_i coeffs[..., t] CE_t`: for losses linear in the CE whose
        coefficients (detached) are known before the read-out; no logits are recomputed. An entry
        of `loops` may be per-row loops, as for `state`."""
        ces, corrects, carrier = self.model.weighted_token_loss(
            [self.state(t) for t in loops], self.batch.targets, [coeffs[..., i] for i in range(len(loops))])
        return torch.stack(ces, -1), torch.stack(corrects, -1), carrier

    def gate_logits(self, upto: int | None = None) -> torch.Tensor:
        """(B, S, upto) gate logits of loops 1..upto."""
        upto = upto or self.n_loops
        return torch.stack([self.model.exit_logits(self.traj.gate_inputs[t]) for t in range(upto)], -1)


class LossEstimator(Plugin):
    trains = "all"  # "gate": only the exit gate is trained (Ouro Stage II)

    def plan(self, n_loops: int, step: int, seed: int, batch_size: int) -> tuple[int, tuple, dict]:
        """(loops to run, loops to read out, extra) for a step whose exit distribution has
        n_loops loops, over a (micro-)batch of batch_size rows."""
        raise NotImplementedError

    def loss(self, ro: Readouts, plan: Plan, prior: ExitPrior) -> tuple[torch.Tensor, dict]:
        """The scalar loss and a dict of metrics (floats or per-loop lists)."""
        raise NotImplementedError

    def local_rows(self, extra: dict, rows: slice) -> dict:
        """`extra` of a plan drawn for the global batch, cut to this rank's `rows` (data
        parallelism): an estimator with per-row draws returns their slice."""
        return extra


class Regularizer(Plugin):
    backward_in_loss = False  # takes a VJP inside the loss (a backward in the forward): FSDP2 cannot

    def apply(self, loss: torch.Tensor, model, traj, batch, step: int, seed: int) -> tuple[torch.Tensor, dict]:
        """Return the loss with this term added (or mixed in) and metrics about the term; random
        probes come from `step_generator(seed, step, name)`."""
        raise NotImplementedError
