"""Random loop counts: a new T for every training step (LOOP_COUNTS).

    LogNormalLoops(mu=2.0, sigma=0.7, low=1, high=100)   STARS: round(LogNormal(mu, sigma)), clipped
    PoissonLoops(lam=5, low=1, high=100)                  STARS: Poisson(lam), clipped
    UniformLoops(low=1, high=100)                         STARS: uniform on the integers low..high
    PoissonLogNormalLoops(mean=32, sigma=0.5)             Huginn: tau ~ LogNormal(log(mean) - sigma^2/2,
                                                          sigma), T = Poisson(tau) + 1
    RampedLoops(start, end, ramp_steps, shape)            retrofitted recurrence: the mean count ramps

Every draw comes from `step_generator(seed, step, "<registry name>")`: it is a function of the
run seed and the step alone, so every data-parallel rank draws the same T without communicating,
and a resumed run draws exactly what the uninterrupted run drew (no RNG state to checkpoint).
Evaluation always runs a fixed count; the trainer, not these plugins, decides that.

The STARS fine-tune of Ouro-1.4B, as gin:

    Recipe.loop_count = @LogNormalLoops()
    LogNormalLoops.mu = 1.7
    LogNormalLoops.sigma = 0.4
    LogNormalLoops.low = 1
    LogNormalLoops.high = 16

With a random T the exit distribution of the step has T loops (Ouro's p_T takes the remaining
mass of that T). Random counts are usually combined with a truncated backprop window
(variants.truncated) so that memory does not grow with the drawn T.
"""

import math

import torch

from looplm.config import is_number
from looplm.hooks import LOOP_COUNTS, LoopCount, step_generator


def _round(x: float) -> int:
    """Round half up (the draws are continuous, so ties have probability zero)."""
    return int(math.floor(x + 0.5))


def _check_bounds(owner: str, low, high) -> None:
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}.{name}={v!r} must be an integer >= 1")
    if high < low:
        raise ValueError(f"{owner}: high={high} must be >= low={low}")


def _generator(owner, seed, step):
    return step_generator(seed, step, owner.registry_name)


@LOOP_COUNTS.register("lognormal")
class LogNormalLoops(LoopCount):
    """STARS: T = clip(round(exp(mu + sigma * z)), low, high), z ~ N(0, 1).

    mu and sigma are those of the underlying normal (numpy's lognormal convention): the default
    (2.0, 0.7) has median e^2 ~ 7.4 loops and mean ~ 9.4 before rounding."""

    properties = frozenset({"stateless"})

    def __init__(self, mu: float = 2.0, sigma: float = 0.7, low: int = 1, high: int = 100):
        if not is_number(mu):
            raise ValueError(f"LogNormalLoops.mu={mu!r} must be a finite number")
        if not (is_number(sigma) and sigma > 0):
            raise ValueError(f"LogNormalLoops.sigma={sigma!r} must be a finite number > 0")
        _check_bounds("LogNormalLoops", low, high)
        self.mu, self.sigma, self.low, self.high = float(mu), float(sigma), low, high

    def sample(self, step, n_loops, seed):
        z = float(torch.randn((), generator=_generator(self, seed, step), dtype=torch.float64))
        log_t = self.mu + self.sigma * z
        if log_t > math.log(self.high + 1):  # clipped anyway; exp() would overflow for a large mu
            return self.high
        return min(self.high, max(self.low, _round(math.exp(log_t))))

    def describe(self):
        return f"LogNormalLoops(mu={self.mu}, sigma={self.sigma}, [{self.low}, {self.high}])"


@LOOP_COUNTS.register("poisson")
class PoissonLoops(LoopCount):
    """STARS: T = clip(Poisson(lam), low, high)."""

    properties = frozenset({"stateless"})

    def __init__(self, lam: float = 5.0, low: int = 1, high: int = 100):
        if not (is_number(lam) and lam > 0):
            raise ValueError(f"PoissonLoops.lam={lam!r} must be a finite number > 0")
        _check_bounds("PoissonLoops", low, high)
        self.lam, self.low, self.high = float(lam), low, high

    def sample(self, step, n_loops, seed):
        k = int(torch.poisson(torch.tensor(self.lam, dtype=torch.float64), generator=_generator(self, seed, step)))
        return min(self.high, max(self.low, k))

    def describe(self):
        return f"PoissonLoops(lam={self.lam}, [{self.low}, {self.high}])"


@LOOP_COUNTS.register("uniform")
class UniformLoops(LoopCount):
    """STARS: T uniform on the integers low..high (both included)."""

    properties = frozenset({"stateless"})

    def __init__(self, low: int = 1, high: int = 100):
        _check_bounds("UniformLoops", low, high)
        self.low, self.high = low, high

    def sample(self, step, n_loops, seed):
        return int(torch.randint(self.low, self.high + 1, (), generator=_generator(self, seed, step)))

    def describe(self):
        return f"UniformLoops([{self.low}, {self.high}])"


def _poisson_lognormal(mean: float, sigma: float, g: torch.Generator) -> int:
    """Huginn: tau ~ LogNormal(log(mean) - sigma^2/2, sigma) (so E[tau] = mean), T = Poisson(tau) + 1."""
    z = torch.randn((), generator=g, dtype=torch.float64)
    tau = torch.exp(math.log(mean) - sigma**2 / 2 + sigma * z)
    return int(torch.poisson(tau, generator=g)) + 1


@LOOP_COUNTS.register("poisson_lognormal")
class PoissonLogNormalLoops(LoopCount):
    """Huginn (recurrent depth): tau ~ LogNormal(log(mean) - sigma^2/2, sigma),
    T = Poisson(tau) + 1, optionally capped at `high`.

    `mean` is Huginn's r-bar, the mean of tau: E[T] = mean + 1 and
    Var[T] = mean + mean^2 (exp(sigma^2) - 1) (before the cap). Heavy-tailed: pair it with a
    truncated window (Huginn backprops through the last 8 loops)."""

    properties = frozenset({"stateless"})

    def __init__(self, mean: float = 32.0, sigma: float = 0.5, high: int | None = None):
        if not (is_number(mean) and mean > 0):
            raise ValueError(f"PoissonLogNormalLoops.mean={mean!r} must be a finite number > 0")
        if not (is_number(sigma) and sigma > 0):
            raise ValueError(f"PoissonLogNormalLoops.sigma={sigma!r} must be a finite number > 0")
        if high is not None:
            _check_bounds("PoissonLogNormalLoops", 1, high)
        self.mean, self.sigma, self.high = float(mean), float(sigma), high

    def sample(self, step, n_loops, seed):
        T = _poisson_lognormal(self.mean, self.sigma, _generator(self, seed, step))
        return T if self.high is None else min(T, self.high)

    def describe(self):
        return f"PoissonLogNormalLoops(mean={self.mean}, sigma={self.sigma}, high={self.high})"


@LOOP_COUNTS.register("ramped")
class RampedLoops(LoopCount):
    """Retrofitted recurrence: the mean loop count m ramps from `start` to `end` over ramp_steps,

        x = min(1, step / ramp_steps),  m = start + (end - start) * f(x),
        f(x) = x (shape="linear")  or  1 - sqrt(1 - x) (shape="sqrt": slow start, fast finish)

    and T is drawn with mean m (E[T] = m exactly):
        distribution="poisson_lognormal": T = 1 + Poisson(tau), tau ~ LogNormal with E[tau] = m - 1
                                          (Huginn's law; T = 1 while m <= 1)
        distribution="fixed":             T = round(m), no randomness
    end=None: the model's configured n_loops. `high` optionally caps T."""

    properties = frozenset({"stateless"})

    SHAPES = ("linear", "sqrt")
    DISTRIBUTIONS = ("poisson_lognormal", "fixed")

    def __init__(self, start: float = 1.0, end: float | None = None, ramp_steps: int = 1000,
                 shape: str = "linear", distribution: str = "poisson_lognormal", sigma: float = 0.5,
                 high: int | None = None):
        if not (is_number(start) and start >= 1):
            raise ValueError(f"RampedLoops.start={start!r} must be a finite mean loop count >= 1")
        if end is not None and not (is_number(end) and end >= 1):
            raise ValueError(f"RampedLoops.end={end!r} must be a finite mean loop count >= 1 (or None: "
                             "the model's n_loops)")
        if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
            raise ValueError(f"RampedLoops.ramp_steps={ramp_steps!r} must be an integer >= 1")
        if shape not in self.SHAPES:
            raise ValueError(f"RampedLoops.shape={shape!r}; choose one of {self.SHAPES}")
        if distribution not in self.DISTRIBUTIONS:
            raise ValueError(f"RampedLoops.distribution={distribution!r}; choose one of {self.DISTRIBUTIONS}")
        if not (is_number(sigma) and sigma > 0):
            raise ValueError(f"RampedLoops.sigma={sigma!r} must be a finite number > 0")
        if high is not None:
            _check_bounds("RampedLoops", 1, high)
        self.start, self.end, self.ramp_steps = float(start), end, ramp_steps
        self.shape, self.distribution, self.sigma, self.high = shape, distribution, float(sigma), high

    def mean(self, step: int, n_loops: int) -> float:
        x = min(1.0, max(0.0, step / self.ramp_steps))
        f = x if self.shape == "linear" else 1.0 - math.sqrt(1.0 - x)
        end = n_loops if self.end is None else self.end
        return self.start + (end - self.start) * f

    def sample(self, step, n_loops, seed):
        m = self.mean(step, n_loops)
        if self.distribution == "fixed":
            T = max(1, _round(m))
        else:
            T = 1 if m <= 1 else _poisson_lognormal(m - 1, self.sigma, _generator(self, seed, step))
        return T if self.high is None else min(T, self.high)

    def describe(self):
        return (f"RampedLoops({self.start}->{'T' if self.end is None else self.end} over {self.ramp_steps}, "
                f"{self.shape}, {self.distribution})")
