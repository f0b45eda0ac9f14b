"""Truncated backprop through the loops: only the last k loops keep a graph (BACKPROP_WINDOWS).

    LastLoops(k)                    loops T-k+1..T keep their graph, loops 1..T-k run under no_grad
                                    (k = 1: HRM's one-step gradient; k = 8: Huginn)
    RampedLastLoops(k_start, k_end, ramp_steps)
                                    k ramps linearly from k_start to k_end over ramp_steps steps,
                                    then stays at k_end (retrofitted recurrence)

`first_grad_loop(step, n_loops) = max(1, n_loops - k + 1)`. The loops before it still run and
their states can still be read out: their losses then train the LM head and the exit gate (the
state is a detached input there) but nothing upstream of it.

A property of the combination, not a bug: Ouro's architecture has no input injection (the
embedding enters only through loop 1), so when loop 1 runs without grad, i.e. whenever k < T,
**the embedding and any prelude layers receive no gradient at all** (except through a tied LM
head). They stay at their initialisation (or at the weights a run started from) for as long as
the window excludes loop 1. HRM and Huginn feed the embedding into every loop, which is why the
one-step gradient still trains their embedding; Ouro's does not. Use k = T, a ramp that reaches
T, or input injection (`model_config.input_injection = "add"` or Huginn's `"concat"`,
looplm.layers.INJECTIONS), which feeds the embedding into every loop, if the embedding must learn.

Under a sampled-step estimator the window counts back from the last loop actually run (the
sampled loop t), since `Recipe.plan` calls `first_grad_loop(step, run_loops)`.

A k larger than every loop count the recipe can run (the fixed T, or a random count's `high`)
is refused before training (`check_model`): that window never truncates, so the run would be
full backprop while its config says truncated.
"""

import math

from looplm.hooks import BACKPROP_WINDOWS, BackpropWindow
from looplm.recipe import FixedLoops


def _check_k(owner: str, name: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{owner}.{name}={k!r} must be an integer >= 1 (the number of last loops "
                         "that keep their graph)")
    return k


def largest_loop_count(recipe, cfg) -> tuple[int | None, str]:
    """The most loops a step of `recipe` can run on a model of config `cfg`, and where that bound
    is set; None when the loop count has no upper bound."""
    lc = recipe.loop_count
    if isinstance(lc, FixedLoops):
        return (lc.n_loops, "FixedLoops.n_loops") if lc.n_loops else (cfg.n_loops, "model_config.n_loops")
    high = getattr(lc, "high", None)
    return high, f"{type(lc).__name__}.high"


def _check_k_fits(owner: str, ks: dict, recipe, cfg) -> None:
    """A window longer than every loop count the recipe can draw never truncates: the run would be
    full backprop while its config says otherwise."""
    largest, where = largest_loop_count(recipe, cfg)
    for name, k in ks.items():
        if largest is not None and k > largest:
            raise ValueError(f"{owner}.{name}={k} exceeds the largest loop count T={largest} ({where}): "
                             f"the window would hold every loop, i.e. full backprop; allowed are "
                             f"1..{largest} (k = T keeps every loop's graph, Recipe.window = @FullBackprop() "
                             "says so directly)")


@BACKPROP_WINDOWS.register("last_loops")
class LastLoops(BackpropWindow):
    """Backprop through the last k loops only (k=1: HRM one-step gradient; k=8: Huginn).

    The embedding and prelude get no gradient while k < T (see the module docstring)."""

    properties = frozenset({"stateless"})

    def __init__(self, k: int = 1):
        self.k = _check_k("LastLoops", "k", k)

    def check_model(self, recipe, cfg):
        _check_k_fits("LastLoops", {"k": self.k}, recipe, cfg)

    def first_grad_loop(self, step, n_loops):
        return max(1, n_loops - self.k + 1)

    def describe(self):
        return f"LastLoops(k={self.k})"


@BACKPROP_WINDOWS.register("ramped_last_loops")
class RampedLastLoops(BackpropWindow):
    """Backprop through the last k(step) loops, k ramped linearly (retrofitted recurrence):

        k(step) = floor(k_start + (k_end - k_start) * min(1, step / ramp_steps) + 1/2)

    k_end < k_start (a shrinking window) is allowed. The schedule is a function of the step
    alone, so there is no state to checkpoint. While k(step) < T the embedding and prelude get no
    gradient (see the module docstring)."""

    properties = frozenset({"stateless"})

    def __init__(self, k_start: int = 1, k_end: int = 8, ramp_steps: int = 1000):
        self.k_start = _check_k("RampedLastLoops", "k_start", k_start)
        self.k_end = _check_k("RampedLastLoops", "k_end", k_end)
        if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
            raise ValueError(f"RampedLastLoops.ramp_steps={ramp_steps!r} must be an integer >= 1")
        self.ramp_steps = ramp_steps

    def check_model(self, recipe, cfg):
        _check_k_fits("RampedLastLoops", {"k_start": self.k_start, "k_end": self.k_end}, recipe, cfg)

    def k(self, step: int) -> int:
        frac = min(1.0, max(0.0, step / self.ramp_steps))
        return int(math.floor(self.k_start + (self.k_end - self.k_start) * frac + 0.5))

    def first_grad_loop(self, step, n_loops):
        return max(1, n_loops - self.k(step) + 1)

    def describe(self):
        return f"RampedLastLoops(k {self.k_start}->{self.k_end} over {self.ramp_steps} steps)"
