"""Proposals q(t) over loops 1..T for the sampled-step loss (PROPOSALS; variants.sampled_step).

A proposal only says how often each loop is drawn; the estimator divides by q, so any q with full
support keeps the estimator unbiased. Stateful proposals learn from `observe(loop, ce)`, which
the estimator calls once per optimizer step (from `end_step`), with the token-weighted mean CE of
that loop over all the step's micro-batches: q never changes within a step, so every micro-batch
of a step draws the same loop.
"""

import math

import torch

from looplm.hooks import Plugin
from looplm.recipe import FixedLoops
from looplm.registry import Registry

PROPOSALS = Registry("step proposal")


class Proposal(Plugin):
    def probs(self, n_loops: int, step: int) -> torch.Tensor:
        """q(t) for t = 1..n_loops: float64, positive, sums to 1."""
        raise NotImplementedError

    def observe(self, loop: int, ce: float) -> None:
        """The detached token-mean CE of a sampled loop over one optimizer step."""


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

    def check_model(self, recipe, cfg):
        T, where = recipe.loop_count.n_loops or cfg.n_loops, ("FixedLoops.n_loops" if recipe.loop_count.n_loops
                                                            else "model_config.n_loops")
        if len(self.q) != T:
            raise ValueError(f"FixedScheduleProposal.probs has {len(self.q)} probabilities but the run has "
                             f"T={T} loops ({where}); give one per loop")

    def describe(self):
        return f"FixedScheduleProposal({[round(p, 4) for p in self.q.tolist()]})"


@PROPOSALS.register("clts")
class CLTSProposal(Proposal):
    """Curriculum from uniform to a focused Gaussian on the first loops, which then moves to the
    last (REFERENCE 5; after the CLTS seed idea and Kim et al., arXiv:2403.10348). With
    s = clamp(step / total_steps, 0, 1), r = clamp((s - focus_frac) / (1 - focus_frac), 0, 1)
    and T the step's loop count, the exact schedule is

        a(s)     = a_max * min(1, s / focus_frac)              focus, rising from 0
        mu(s)    = mu_start + (mu_end - mu_start) * r          centre (mu_end=None: T), held on
                                                               mu_start while the focus rises
        sigma(s) = sigma_start + (sigma_end - sigma_start) * s width in loops, shrinking
        G_s(t)   = exp(-(t - mu(s))^2 / (2 sigma(s)^2)) / sum_{t'=1..T} exp(...)
        q_s(t)   = (1 - floor) * [(1 - a(s)) / T + a(s) * G_s(t)] + floor / T

    so q_0 is uniform, at s = focus_frac the mass sits on the first loops (T = 4, defaults: mean
    loop 1.38, q(1) = 0.73), and at s = 1 on the last (mean loop 3.75, q(T) = 0.79). Every loop
    keeps q_s(t) >= floor / T (finite importance weights). Stateless: q is a function of the step.
    Defaults: a_max 0.9, focus_frac 0.1, mu 1 -> T, sigma 0.6 -> 0.4 loops, floor 0.05."""

    def __init__(self, total_steps: int, a_max: float = 0.9, focus_frac: float = 0.1, mu_start: float = 1.0,
                 mu_end: float | None = None, sigma_start: float = 0.6, sigma_end: float = 0.4,
                 floor: float = 0.05):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"CLTSProposal.total_steps={total_steps!r} must be an integer >= 1 "
                             "(the training length the curriculum spans)")
        if not 0.0 <= a_max <= 1.0:
            raise ValueError(f"CLTSProposal.a_max={a_max} must be in [0, 1]")
        if not 0.0 < focus_frac < 1.0:
            raise ValueError(f"CLTSProposal.focus_frac={focus_frac} must be in (0, 1): the share of "
                             "training over which the focus rises on the first loops")
        if not (sigma_start > 0 and sigma_end > 0):
            raise ValueError(f"CLTSProposal sigma_start={sigma_start}, sigma_end={sigma_end} must be > 0")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"CLTSProposal.floor={floor} must be in (0, 1]: the floor keeps q > 0 "
                             "on every loop")
        self.total_steps, self.a_max, self.focus_frac, self.floor = total_steps, a_max, focus_frac, floor
        self.mu_start, self.mu_end = mu_start, mu_end
        self.sigma_start, self.sigma_end = sigma_start, sigma_end

    def schedule(self, n_loops: int, step: int) -> tuple[float, float, float]:
        """(a, mu, sigma) at this step."""
        s = min(1.0, max(0.0, step / self.total_steps))
        r = min(1.0, max(0.0, (s - self.focus_frac) / (1 - self.focus_frac)))
        mu_end = n_loops if self.mu_end is None else self.mu_end
        return (self.a_max * min(1.0, s / self.focus_frac), self.mu_start + (mu_end - self.mu_start) * r,
                self.sigma_start + (self.sigma_end - self.sigma_start) * s)

    def probs(self, n_loops, step):
        a, mu, sigma = self.schedule(n_loops, step)
        t = torch.arange(1, n_loops + 1, dtype=torch.float64)
        gauss = torch.softmax(-((t - mu) ** 2) / (2 * sigma**2), 0)
        uniform = torch.full_like(t, 1.0 / n_loops)
        mix = (1 - a) * uniform + a * gauss
        return (1 - self.floor) * mix + self.floor * uniform

    def describe(self):
        return (f"CLTSProposal(total_steps={self.total_steps}, a_max={self.a_max}, focus_frac="
                f"{self.focus_frac}, mu {self.mu_start}->{'T' if self.mu_end is None else self.mu_end}, "
                f"sigma {self.sigma_start}->{self.sigma_end}, floor={self.floor})")


@PROPOSALS.register("improvement")
class ImprovementProposal(Proposal):
    """Sample the loops whose loss is still falling (REFERENCE 5, the loop analogue of SpeeD,
    arXiv:2405.17403, which samples less from converged diffusion time steps). Per loop, a fast
    and a slow EMA of its sampled token-mean CE (each starts at the loop's first observation):

        progress_t = max(0, slow_t - fast_t) / slow_t       relative recent decrease
        q(t)       = floor / T + (1 - floor) * progress_t / sum_t' progress_t'

    A loop not yet observed gets the largest progress of the observed ones (it is explored); q is
    uniform while no loop has progress. The EMAs move once per optimizer step (module docstring).
    Stateful (the EMAs are checkpointed); q depends on the CEs this process observed, so under
    data parallelism every rank must observe the same (all-reduced) values to draw the same loop."""

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
