"""variants.random_loops: each law's draws against its exact moments (or an independent numpy
sampler), bounds, and the rank/resume determinism of the seeded draws."""

import math

import gin
import numpy as np
import pytest
import torch

from looplm.config import model_config
from looplm.data.batch import Batch
from looplm.model import LoopLM
from looplm.recipe import Recipe
from variants.random_loops import (LogNormalLoops, PoissonLogNormalLoops, PoissonLoops, RampedLoops,
                                   UniformLoops)
from variants.truncated import LastLoops

N = 20_000


def draws(plugin, n=N, seed=0, n_loops=4):
    return np.array([plugin.sample(step, n_loops, seed) for step in range(n)], dtype=np.float64)


def moments_of_pmf(pmf: dict) -> tuple[float, float, float]:
    mean = sum(k * p for k, p in pmf.items())
    var = sum((k - mean) ** 2 * p for k, p in pmf.items())
    m4 = sum((k - mean) ** 4 * p for k, p in pmf.items())
    return mean, var, m4


def assert_moments(x, mean, var, m4, z=5.0):
    """Sample mean and variance within z standard errors of the law's own (exact) values."""
    n = len(x)
    assert abs(x.mean() - mean) < z * math.sqrt(var / n), (x.mean(), mean)
    assert abs(x.var() - var) < z * math.sqrt(max(m4 - var**2, 1e-12) / n) + 1e-9, (x.var(), var)


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def lognormal_rounded_pmf(mu, sigma, low, high):
    cdf = lambda y: 0.0 if y <= 0 else phi((math.log(y) - mu) / sigma)  # noqa: E731
    pmf = {k: cdf(k + 0.5) - cdf(k - 0.5) for k in range(low + 1, high)}
    pmf[low] = cdf(low + 0.5)
    pmf[high] = 1 - cdf(high - 0.5)
    return pmf


def poisson_clipped_pmf(lam, low, high):
    raw = lambda k: math.exp(k * math.log(lam) - lam - math.lgamma(k + 1))  # noqa: E731
    pmf = {k: raw(k) for k in range(low + 1, high)}
    pmf[low] = sum(raw(k) for k in range(0, low + 1))
    pmf[high] = 1 - sum(pmf.values())
    return pmf


@pytest.mark.parametrize("mu, sigma, low, high", [(2.0, 0.7, 1, 100), (1.7, 0.4, 1, 16), (3.0, 1.0, 2, 30)])
def test_lognormal_matches_exact_law(mu, sigma, low, high):
    x = draws(LogNormalLoops(mu, sigma, low, high))
    assert x.min() >= low and x.max() <= high and (x == np.round(x)).all()
    assert_moments(x, *moments_of_pmf(lognormal_rounded_pmf(mu, sigma, low, high)))


@pytest.mark.parametrize("lam, low, high", [(5.0, 1, 100), (3.0, 2, 5)])
def test_poisson_matches_exact_law(lam, low, high):
    x = draws(PoissonLoops(lam, low, high))
    assert x.min() >= low and x.max() <= high
    assert_moments(x, *moments_of_pmf(poisson_clipped_pmf(lam, low, high)))


def test_uniform_matches_exact_law():
    x = draws(UniformLoops(1, 100))
    assert x.min() == 1 and x.max() == 100
    assert_moments(x, *moments_of_pmf({k: 1 / 100 for k in range(1, 101)}))


@pytest.mark.parametrize("mean, sigma", [(32.0, 0.5), (4.0, 0.5)])
def test_poisson_lognormal_matches_huginn_law(mean, sigma):
    x = draws(PoissonLogNormalLoops(mean, sigma))
    assert x.min() >= 1
    # closed form: E[T] = mean + 1, Var[T] = E[tau] + Var[tau]
    exact_mean, exact_var = mean + 1, mean + mean**2 * math.expm1(sigma**2)
    # an independent sampler of the same law (numpy) for the fourth moment and as a cross-check
    rng = np.random.default_rng(0)
    ref = rng.poisson(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, 400_000)) + 1
    assert abs(ref.mean() - exact_mean) < 5 * math.sqrt(exact_var / len(ref))
    m4 = ((ref - ref.mean()) ** 4).mean()
    assert_moments(x, exact_mean, exact_var, m4)
    assert (draws(PoissonLogNormalLoops(mean, sigma, high=10), n=2000) <= 10).all()


def test_same_count_on_every_rank_and_on_resume():
    for make in (LogNormalLoops, PoissonLoops, UniformLoops, PoissonLogNormalLoops,
                 lambda: RampedLoops(1, 16, ramp_steps=10)):
        rank0, rank1 = make(), make()  # two processes, same seed, same step
        a = [rank0.sample(s, 4, seed=3) for s in range(200)]
        assert a == [rank1.sample(s, 4, seed=3) for s in range(200)]
        assert a[150:] == [rank1.sample(s, 4, seed=3) for s in range(150, 200)]  # resumed at 150
        assert len(set(a)) > 3  # different steps draw different counts
        assert a != [rank0.sample(s, 4, seed=4) for s in range(200)]


def test_families_draw_independently():
    """The salt is the registry name: two laws at the same (seed, step) use different streams."""
    z = [LogNormalLoops(0.0, 1.0, 1, 10**6).sample(s, 4, 0) for s in range(300)]
    u = [UniformLoops(1, 10**6).sample(s, 4, 0) for s in range(300)]
    assert abs(np.corrcoef(np.log(z), u)[0, 1]) < 0.25


def test_ramped_mean_schedule():
    lin = RampedLoops(start=1, end=9, ramp_steps=100, shape="linear", distribution="fixed")
    sq = RampedLoops(start=1, end=9, ramp_steps=100, shape="sqrt", distribution="fixed")
    assert [lin.mean(s, 4) for s in (0, 50, 100, 500)] == [1, 5, 9, 9]
    assert sq.mean(50, 4) == pytest.approx(1 + 8 * (1 - math.sqrt(0.5)))
    assert [sq.sample(s, 4, 0) for s in (0, 75, 100)] == [1, 5, 9]  # 1 + 8 * 0.5 = 5 at x = 3/4
    assert RampedLoops(start=2, ramp_steps=10, distribution="fixed").sample(10, n_loops=6, seed=0) == 6
    # the random version has mean m at every step: check at the end of a linear ramp (m = 8)
    rnd = RampedLoops(start=1, end=8, ramp_steps=1)
    x = np.array([rnd.sample(s, 4, 0) for s in range(1, 10_001)], dtype=np.float64)
    var = 7 + 49 * math.expm1(0.25)
    assert abs(x.mean() - 8) < 5 * math.sqrt(var / len(x))
    assert RampedLoops(start=1, end=8, ramp_steps=100).sample(0, 4, 0) == 1  # m = 1: T = 1


def test_recipe_runs_with_a_random_count():
    torch.manual_seed(0)
    model = LoopLM(model_config("tiny"))
    b = Batch(torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 6)))
    recipe = Recipe(loop_count=PoissonLoops(lam=3, low=1, high=6), window=LastLoops(2))
    for step in range(3):
        loss, metrics = recipe.loss(model, b, step)
        loss.backward()
        assert metrics["n_loops"] == recipe.loop_count.sample(step, 3, recipe.seed)
        assert len(metrics["ce"]) == metrics["n_loops"]


def test_stars_finetune_setting_is_expressible_in_gin():
    gin.clear_config()
    try:
        gin.parse_config("""
            import variants.random_loops
            Recipe.loop_count = @LogNormalLoops()
            LogNormalLoops.mu = 1.7
            LogNormalLoops.sigma = 0.4
            LogNormalLoops.low = 1
            LogNormalLoops.high = 16
        """)
        recipe = Recipe()
    finally:
        gin.clear_config()
    lc = recipe.loop_count
    assert isinstance(lc, LogNormalLoops) and (lc.mu, lc.sigma, lc.low, lc.high) == (1.7, 0.4, 1, 16)


@pytest.mark.parametrize("make, match", [
    (lambda: LogNormalLoops(sigma=0), "sigma=0"),
    (lambda: LogNormalLoops(low=0), "low=0"),
    (lambda: LogNormalLoops(low=5, high=4), "high=4 must be >= low=5"),
    (lambda: PoissonLoops(lam=-1), "lam=-1"),
    (lambda: UniformLoops(1, 2.5), "high=2.5"),
    (lambda: PoissonLogNormalLoops(mean=0), "mean=0"),
    (lambda: RampedLoops(shape="cosine"), "shape='cosine'"),
    (lambda: RampedLoops(distribution="poisson"), "distribution='poisson'"),
    (lambda: RampedLoops(start=0.5), "start=0.5"),
    (lambda: RampedLoops(ramp_steps=0), "ramp_steps=0"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
