"""Hypothesis searches for inputs that break looplm's properties (issue 5).

Each test states one property; strategies range over tiny model configs, loop counts 1..64 (forward
only where the property is about depth), batch and sequence shapes, float32/bfloat16, seeds and gate
logits up to the float32 extremes. A failing example hypothesis found is kept as an `@example` or a
plain regression test next to its property. The float64 references come from tests/reference.py or
are written out here from REFERENCE.md.

Profiles (tests/conftest.py): "ci" (default, 25 examples, derandomised) and "thorough"
(HYPOTHESIS_PROFILE=thorough, 1000 examples). Tests that train or run many loops use a fifth of the
profile's examples (`FEW`).
"""

import itertools
import math

import torch
from hypothesis import HealthCheck, assume, example, given, note, reject, settings
from hypothesis import strategies as st

import reference as ref
from looplm.tools.conformance import plugins as conformance
from looplm.config import model_config
from looplm.data import AdditionTask
from looplm.data.batch import IGNORE_INDEX, Batch
from looplm.hooks import (BACKPROP_WINDOWS, ESTIMATORS, EXIT_PRIORS, LOOP_COUNTS, NORMS, PLACEMENTS,
                          REGULARIZERS, Plan, Readouts)
from looplm.model import LoopLM
from looplm.objectives import (entropy, exit_cdf, exit_distribution, log_exit_probs, q_exit_loop, stage1_loss,
                               stage2_loss)
from looplm.recipe import ExitWeighted, FixedLoops, FullBackprop, GateTraining, Recipe, UniformPrior
from looplm.train import RunControl, train

conformance.import_variants()
from variants.jacobian import HutchinsonJacobian, PowerIterationJacobian, SpectralJacobian  # noqa: E402
from variants.priors import GeometricPrior, NoPrior  # noqa: E402
from variants.random_loops import (LogNormalLoops, PoissonLogNormalLoops, PoissonLoops, RampedLoops,  # noqa: E402
                                   UniformLoops)
from variants.sampled_step import (CLTSProposal, FixedScheduleProposal, MinSNRWeighting, NoWeighting,  # noqa: E402
                                   SampledStep, UniformProposal)
from variants.trajectory import L2Limit  # noqa: E402
from variants.truncated import LastLoops, RampedLastLoops  # noqa: E402

F64 = torch.float64
FEW = settings(max_examples=max(4, settings.default.max_examples // 5),
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
MANY_REJECTS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def tiny_config(**overrides):
    base = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=32, n_loops=3)
    return model_config("tiny", **(base | overrides))


def tiny_model(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return LoopLM(tiny_config(**overrides)).to(dtype)


# -- gate logits up to the float32 extremes ----------------------------------------------------------
F32_MAX = torch.finfo(torch.float32).max
BF16_MAX = torch.finfo(torch.bfloat16).max
EXTREMES = [0.0, 1e-30, 0.5, 1.0, 5.0, 17.0, 40.0, 88.7, 104.0, 1e4, 1e7, 1e20, 1e30, 1e37, 3e38, F32_MAX]
gate_value = st.one_of(st.floats(-40, 40, width=32),
                       st.sampled_from(EXTREMES).flatmap(lambda v: st.sampled_from([v, -v])),
                       st.floats(width=32, allow_nan=False, allow_infinity=False))


@st.composite
def gate_tensors(draw, min_T=1, max_T=64, max_B=2, max_S=3):
    """(B, S, T) float32 gate logits: Gaussian of a drawn scale, with up to 8 entries overwritten by
    drawn values (moderate, extreme or any finite float32), which hypothesis shrinks."""
    T = draw(st.integers(min_T, max_T), label="T")
    B, S = draw(st.integers(1, max_B)), draw(st.integers(1, max_S))
    scale = draw(st.sampled_from([0.0, 0.3, 3.0, 30.0, 1e3]))
    g = torch.randn(B, S, T, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))), dtype=F64)
    g = (g * scale).float()
    flat = g.view(-1)
    for i, v in draw(st.lists(st.tuples(st.integers(0, B * S * T - 1), gate_value), max_size=8)):
        flat[i] = v
    return g


def finite_in(g, dtype):
    """g cast to dtype without leaving the finite range (F32_MAX rounds to inf in bfloat16)."""
    if dtype == torch.bfloat16:
        g = g.clamp(-BF16_MAX, BF16_MAX)
    return g.to(dtype)


# ===================================================================================================
# 1. The exit distribution
# ===================================================================================================
@given(g=gate_tensors(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       qs=st.lists(st.floats(0, 1), min_size=2, max_size=4))
@example(g=torch.tensor([[[F32_MAX, F32_MAX, 0.0]]]), dtype=torch.float32, qs=[0.0, 1.0]).via("regression")
@example(g=torch.tensor([[[1e4, -1e4, 3.0, -88.7]]]), dtype=torch.bfloat16, qs=[0.5, 0.999]).via("regression")
def test_exit_distribution_is_a_distribution(g, dtype, qs):
    """p >= 0, sums to 1 per token and matches the float64 products; the CDF is monotone, ends at 1
    and is the running sum of p; Q-exit is monotone in q and is the first loop whose CDF reaches q;
    the entropy lies in [0, log T]; everything in float32 even for bf16 gates."""
    g = finite_in(g, dtype)
    T = g.shape[-1]
    log_p, p, cdf = log_exit_probs(g), exit_distribution(g), exit_cdf(g)
    assert log_p.dtype == p.dtype == cdf.dtype == torch.float32
    assert not torch.isnan(log_p).any() and (log_p <= 0).all()
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5 * T, rtol=0), p.sum(-1)
    want = ref.exit_probs(g.float())
    assert torch.allclose(p.double(), want, atol=2e-6 * T, rtol=0), (p - want).abs().max()

    assert torch.isfinite(cdf).all() and (cdf >= 0).all() and (cdf <= 1).all()
    assert (cdf[..., 1:] >= cdf[..., :-1]).all() and (cdf[..., -1] == 1).all()
    assert torch.allclose(cdf.double(), ref.exit_cdf(g.float()), atol=2e-6 * T, rtol=0)
    assert torch.allclose(cdf[..., :-1].double(), p.double().cumsum(-1)[..., :-1], atol=1e-5 * T, rtol=0)

    loops = [q_exit_loop(g, q) for q in sorted(qs)]
    for lo, hi in zip(loops, loops[1:]):
        assert (lo <= hi).all()
    for q, n in zip(sorted(qs), loops):
        assert ((n >= 1) & (n <= T)).all()
        reached = cdf.gather(-1, (n - 1).unsqueeze(-1)).squeeze(-1)
        before = torch.where(n > 1, cdf.gather(-1, (n - 2).clamp_min(0).unsqueeze(-1)).squeeze(-1), -1.0)
        assert (reached >= q).all() and (before < q).all()

    H = entropy(log_p)
    assert H.dtype == torch.float32 and torch.isfinite(H).all(), H
    assert (H >= -1e-6).all() and (H <= math.log(T) + 1e-5).all(), H


# ===================================================================================================
# 2. Objectives against float64 references
# ===================================================================================================
def log_sigmoid64(x):
    """log(sigmoid(x)) in float64, written out: -(max(-x, 0) + log1p(exp(-|x|)))."""
    x = x.to(F64)
    return -(torch.clamp(-x, min=0) + torch.log1p(torch.exp(-x.abs())))


def prior_penalty64(prior, p):
    """sum_t of the prior's per-loop terms, float64, from REFERENCE 3 (0 log 0 = 0)."""
    T = p.shape[-1]
    if isinstance(prior, UniformPrior):
        return torch.xlogy(p, p).sum(-1)  # -H(p)
    if isinstance(prior, GeometricPrior):
        lam = prior.lambda_p
        w = [lam * (1 - lam) ** t for t in range(T)]
        log_pi = torch.tensor([math.log(v / sum(w)) for v in w], dtype=F64)
        return (torch.xlogy(p, p) - p * log_pi).sum(-1)  # KL(p || pi)
    assert isinstance(prior, NoPrior)
    return torch.zeros_like(p[..., 0])


priors = st.one_of(st.builds(UniformPrior, beta=st.floats(0, 1)),
                   st.builds(GeometricPrior, beta=st.floats(0, 1), lambda_p=st.floats(0.01, 0.99)),
                   st.just(NoPrior()))
# per-loop losses: non-negative, up to 1e30 (the token mean sums in float32, so a value within a
# factor n_tokens of float32's maximum could overflow that sum whatever the implementation)
ce_value = st.one_of(st.floats(0, 20, width=32), st.sampled_from([0.0, 1e-30, 1e4, 1e10, 1e30]))


@st.composite
def losses_and_mask(draw, shape):
    B, S, T = shape
    ce = torch.randn(B, S, T, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))).abs() * 3
    flat = ce.view(-1)
    for i, v in draw(st.lists(st.tuples(st.integers(0, B * S * T - 1), ce_value), max_size=6)):
        flat[i] = v
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * S, max_size=B * S))).view(B, S)
    mask.view(-1)[draw(st.integers(0, B * S - 1))] = True  # at least one supervised token
    return ce, mask


@given(data=st.data(), g=gate_tensors(max_T=16), prior=priors)
@example(data=None, g=torch.tensor([[[F32_MAX, F32_MAX, 0.0]]]), prior=UniformPrior(0.1)).via("regression")
def test_stage1_with_every_prior_is_finite_and_matches_float64(data, g, prior):
    """Stage I `sum_t p_t CE_t + beta * prior` (uniform: -H, geometric: KL(p || pi), none) is finite
    for any finite gates and losses and matches the float64 reference; the prior's terms are
    loop-local (a prefix of the loops gives the first terms, what a sampled-step estimator reads)."""
    T = g.shape[-1]
    if data is None:
        ce, mask = torch.ones_like(g), torch.ones(g.shape[:2], dtype=torch.bool)
    else:
        ce, mask = data.draw(losses_and_mask(tuple(g.shape)))
    loss, log_p = stage1_loss(ce, g, mask, prior.beta, prior.loop_terms)
    assert torch.isfinite(loss), (float(loss), log_p)
    p64 = ref.exit_probs(g)
    per_token = (p64 * ce.to(F64)).sum(-1) + prior.beta * prior_penalty64(prior, p64)
    want = ref.masked_mean(per_token, mask)
    scale = float(ce.max()) + 1.0
    assert abs(float(loss) - float(want)) <= 2e-6 * T * scale, (float(loss), float(want))
    terms = prior.loop_terms(log_p, T)
    assert torch.isfinite(terms).all()
    for t in range(1, T):
        prefix = prior.loop_terms(log_exit_probs(g[..., :t], T), T)
        assert torch.allclose(prefix, terms[..., :t], rtol=1e-6, atol=1e-7)


@given(data=st.data(), g=gate_tensors(min_T=2, max_T=16), k=st.floats(1, 100), gamma=st.floats(0, 0.1))
def test_stage2_is_finite_and_matches_float64(data, g, k, gamma):
    """Ouro Stage II against a float64 reference with the log-sigmoids written out. Its value grows
    like |gate logit| on the wrong side of saturation, so it is required to be finite whenever the
    reference's float32 accumulator (the sum over tokens and loops) is representable."""
    T = g.shape[-1]
    ce, mask = data.draw(losses_and_mask(tuple(g.shape)))
    loss = stage2_loss(ce, g, mask, k=k, gamma=gamma)
    ce64, g64 = ce.to(F64), g.to(F64)
    total, sums = torch.zeros((), dtype=F64), torch.zeros((), dtype=F64)
    m = mask.to(F64)
    for t in range(1, T):
        x = k * (torch.clamp(ce64[..., t - 1] - ce64[..., t], min=0) - gamma)
        w, w_exit = torch.sigmoid(x), torch.sigmoid(-x)  # 1 - w without cancellation, even in float64
        bce = -(w * log_sigmoid64(-g64[..., t]) + w_exit * log_sigmoid64(g64[..., t]))
        total = total + (bce * m).sum() / m.sum()
        sums = sums + (bce * m).sum()
    want = float(total / T)
    note(f"loss {float(loss)!r}, reference {want!r}")
    if float(sums) < 3e38:
        assert torch.isfinite(loss)
        assert math.isclose(float(loss), want, rel_tol=1e-5, abs_tol=1e-6)


def test_stage2_exit_target_keeps_its_precision_near_saturation():
    """Regression (found by the thorough search): the exit target 1 - w_t was formed as 1 - sigmoid(x)
    in float32, which cancels when w_t is near 1; with a confident "continue" gate (g = -1e4) the
    loss came out 9% low. 1 - w_t = sigmoid(-x) keeps it (REFERENCE 3: k = 50, gamma = 0.005)."""
    g, ce = torch.tensor([[[0.0, -1e4]]]), torch.tensor([[[0.3, 0.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    x = 50 * (float(ce[0, 0, 0]) - 0.005)
    w, w_exit = 1 / (1 + math.exp(-x)), 1 / (1 + math.exp(x))
    want = -(w * float(log_sigmoid64(torch.tensor(1e4))) + w_exit * float(log_sigmoid64(torch.tensor(-1e4)))) / 2
    assert math.isclose(float(stage2_loss(ce, g, mask)), want, rel_tol=1e-5)


# ===================================================================================================
# 3. Forward stability over 64 loops
# ===================================================================================================
def rms(x):
    return x.float().pow(2).mean(-1).sqrt()  # per token


@given(seed=st.integers(0, 2**16), init_std=st.sampled_from([0.02, 0.2, 1.0]),
       norm_scale=st.sampled_from([0.0, 0.5, 3.0]), B=st.integers(1, 2), S=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), n_layers=st.integers(1, 2))
@settings(FEW)
def test_sandwich_state_stays_bounded_over_64_loops(seed, init_std, norm_scale, B, S, dtype, n_layers):
    """Ouro's default (sandwich_branch, final norm after every loop): at random weights (norm gains
    too) and inputs, for every loop t <= 64 the carried state's per-token RMS is at most the largest
    final-norm gain, and the stack output z_t at most RMS(h_{t-1}) + the sum of the largest
    branch-output norm gains (triangle inequality): bounds that do not depend on t."""
    model = tiny_model(seed, n_layers=n_layers, init_std=init_std)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and norm_scale:
                p.copy_(torch.randn(p.shape, generator=g) * norm_scale)
    model = model.to(dtype)
    slack = 1.02 if dtype == torch.bfloat16 else 1.0 + 1e-5
    with torch.no_grad():
        final_gain = float(model.final_norm.weight.float().abs().max())
        branch_gain = sum(float(m.norm_out.weight.float().abs().max()) for layer in model.layers
                          for m in (layer.attn, layer.mlp))
    ids = torch.randint(0, 32, (B, S), generator=g)
    ctx = model.context(S, dtype=dtype)
    with torch.no_grad():
        h = model.embed(ids)
        for t in range(64):
            prev = rms(h)
            h, z = model.recurrence(h, ctx, t)
            assert torch.isfinite(h).all() and torch.isfinite(z).all()
            assert (rms(h) <= final_gain * slack + 1e-6).all(), (t, rms(h).max(), final_gain)
            assert (rms(z) <= (prev + branch_gain) * slack + 1e-4).all(), (t, rms(z).max(), prev.max())


PLACEMENT_NAMES = ["sandwich_branch", "pre_norm", "post_norm", "sandwich_dual", "deepnorm"]
GROWTH_BANDS = {  # RMS(x_64) / RMS(x_8), carry_normed=False, mean of 3 seeds, random init (std 0.02)
    "pre_norm": (4.0, 20.0),  # grows ~linearly: every loop adds a nearly constant f(N(x)) (STARS)
    "sandwich_branch": (4.0, 20.0),  # grows too without the between-loop norm (see test_variants_norms)
    "post_norm": (0.99, 1.01), "sandwich_dual": (0.99, 1.01), "deepnorm": (0.99, 1.01),  # normed sums
}


def state_rms_curve(placement, carry_normed, seed, loops=64):
    model = tiny_model(seed, norm_placement=placement, carry_normed=carry_normed)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(seed))
    ctx, out = model.context(8), []
    with torch.no_grad():
        x = model.embed(ids)
        for t in range(loops):
            x, _ = model.recurrence(x, ctx, t)
            out.append(float(x.pow(2).mean().sqrt()))
    return out


def test_state_growth_report_per_placement(capsys):
    """The STARS norm study at random weights, recorded (printed) and held in a band, so that a
    regression shows: with Ouro's between-loop final norm every placement carries a unit-RMS state;
    without it (carry_normed=False) pre_norm and sandwich_branch grow about linearly with the loop
    count while the placements that normalise the residual sum stay at 1."""
    rows, growth = [], {}
    for name in PLACEMENT_NAMES:
        for carry in (True, False):
            curves = [state_rms_curve(name, carry, seed) for seed in range(3)]
            mean = [sum(c[t] for c in curves) / 3 for t in range(64)]
            rows.append(f"{name:16s} carry_normed={carry!s:5s} " +
                        " ".join(f"{mean[t - 1]:8.3f}" for t in (1, 8, 16, 32, 64)) +
                        f"   x{mean[63] / mean[7]:.2f}")
            if carry:
                assert max(abs(v - 1) for v in mean) < 2e-3, (name, mean)
            else:
                growth[name] = mean[63] / mean[7]
    with capsys.disabled():
        print("\ncarried-state RMS at loops 1 8 16 32 64 (growth 64/8), tiny model, random init:")
        print("\n".join(rows))
    for name, (lo, hi) in GROWTH_BANDS.items():
        assert lo <= growth[name] <= hi, (name, growth[name], (lo, hi))


# ===================================================================================================
# 4. No NaN/Inf for any registered combination, float32 and bf16 autocast
# ===================================================================================================
def ints(lo, hi):
    return st.integers(lo, hi)


@st.composite
def bounded_pair(draw, lo=1, hi=64):
    a, b = draw(ints(lo, hi)), draw(ints(lo, hi))
    return min(a, b), max(a, b)


# hypothesis builders for the in-tree plugins (random arguments within what the constructor
# accepts, loop counts capped at 64); a plugin registered later falls back to its battery examples
PLUGIN_STRATEGIES = {
    FixedLoops: st.builds(FixedLoops, st.one_of(st.none(), ints(1, 64))),
    LogNormalLoops: bounded_pair().flatmap(lambda lh: st.builds(
        LogNormalLoops, mu=st.floats(-1, 4), sigma=st.floats(0.05, 1.5), low=st.just(lh[0]), high=st.just(lh[1]))),
    PoissonLoops: bounded_pair().flatmap(lambda lh: st.builds(
        PoissonLoops, lam=st.floats(0.1, 40), low=st.just(lh[0]), high=st.just(lh[1]))),
    UniformLoops: bounded_pair().flatmap(lambda lh: st.builds(UniformLoops, low=st.just(lh[0]), high=st.just(lh[1]))),
    PoissonLogNormalLoops: st.builds(PoissonLogNormalLoops, mean=st.floats(0.5, 32), sigma=st.floats(0.05, 1),
                                     high=ints(1, 64)),
    RampedLoops: st.builds(RampedLoops, start=st.floats(1, 4), end=st.one_of(st.none(), st.floats(1, 16)),
                           ramp_steps=ints(1, 500), shape=st.sampled_from(RampedLoops.SHAPES),
                           distribution=st.sampled_from(RampedLoops.DISTRIBUTIONS), high=ints(1, 64)),
    FullBackprop: st.just(FullBackprop()),
    LastLoops: st.builds(LastLoops, ints(1, 10)),
    RampedLastLoops: st.builds(RampedLastLoops, k_start=ints(1, 8), k_end=ints(1, 8), ramp_steps=ints(1, 100)),
    ExitWeighted: st.builds(ExitWeighted, st.sampled_from(["fused", "recompute"])),
    GateTraining: st.builds(GateTraining, k=st.floats(1, 100), gamma=st.floats(0, 0.1)),
    SampledStep: st.builds(
        SampledStep,
        proposal=st.one_of(st.just(UniformProposal()),
                           st.builds(CLTSProposal, total_steps=ints(1, 1000), a_max=st.floats(0, 1),
                                     floor=st.floats(0.01, 1))),
        weighting=st.one_of(st.just(NoWeighting()),
                            st.builds(MinSNRWeighting, gamma=st.floats(0.1, 10),
                                      snr=st.sampled_from(["ema", "schedule"]))),
        per_sequence=st.booleans()),
    UniformPrior: st.builds(UniformPrior, st.floats(0, 1)),
    GeometricPrior: st.builds(GeometricPrior, beta=st.floats(0, 1), lambda_p=st.floats(0.01, 0.99)),
    NoPrior: st.just(NoPrior()),
    PowerIterationJacobian: st.builds(PowerIterationJacobian, weight=st.floats(0, 1), iterations=ints(1, 3)),
    HutchinsonJacobian: st.builds(HutchinsonJacobian, weight=st.floats(0, 1), probes=ints(1, 2),
                                  mode=st.sampled_from(HutchinsonJacobian.MODES)),
    SpectralJacobian: st.builds(SpectralJacobian, weight=st.floats(0, 1), iterations=ints(1, 3)),
    L2Limit: st.builds(L2Limit, st.floats(0, 2)),
}


def plugin_of(registry):
    def build(cls):
        if cls in PLUGIN_STRATEGIES:
            return PLUGIN_STRATEGIES[cls]
        return st.sampled_from(conformance.examples(cls)).map(lambda c: c.fresh())
    return st.sampled_from([cls for _, cls in registry.items()]).flatmap(build)


def random_batch(seed, B, S, vocab=32, packed=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    targets = torch.randint(0, vocab, (B, S), generator=g)
    targets[torch.rand(B, S, generator=g) < 0.3] = IGNORE_INDEX
    doc_ids = None
    if packed:
        doc_ids = torch.cumsum(torch.rand(B, S, generator=g) < 0.3, dim=1)
    return Batch(ids, targets, doc_ids)


@given(loop_count=plugin_of(LOOP_COUNTS), window=plugin_of(BACKPROP_WINDOWS), estimator=plugin_of(ESTIMATORS),
       prior=plugin_of(EXIT_PRIORS), regs=st.lists(plugin_of(REGULARIZERS), max_size=2),
       norm_type=st.sampled_from(NORMS.names()), placement=st.sampled_from(PLACEMENTS.names()),
       init_std=st.sampled_from([0.02, 0.3, 1.0]), precision=st.sampled_from(["fp32", "bf16"]),
       seed=st.integers(0, 2**16), step=st.integers(0, 2000), B=st.integers(1, 2), S=st.integers(2, 6),
       packed=st.booleans())
@settings(MANY_REJECTS)
def test_any_combination_has_finite_loss_and_gradients(loop_count, window, estimator, prior, regs, norm_type,
                                                       placement, init_std, precision, seed, step, B, S, packed):
    """One step of any registered combination (a combination the recipe accepts) on a random tiny
    model: a finite loss and finite gradients, in float32 and under bfloat16 autocast."""
    try:
        recipe = Recipe(loop_count=loop_count, window=window, estimator=estimator, prior=prior,
                        regularizers=regs, seed=seed)
    except ValueError:
        reject()
    model = tiny_model(seed, norm_type=norm_type, norm_placement=placement, init_std=init_std,
                       deepnorm_alpha=1.5)
    trainable = recipe.trainable_parameters(model)
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with cast:
        loss, metrics = recipe.loss(model, random_batch(seed, B, S, packed=packed), step)
    note(f"loss {loss!r}, metrics {metrics}")
    assert torch.isfinite(loss), metrics
    loss.backward()
    for p in trainable:
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_stage2_gate_with_a_loop_count_that_can_draw_one_loop():
    """Regression (found by the battery's composition check and the search above): Recipe accepts
    stage2_gate with a random loop count whose support includes T = 1, and the step that draws
    T = 1 then raises "Stage II needs at least 2 loops" in the middle of training. Either the
    recipe must reject the combination when it is built, or Stage II must handle T = 1."""
    try:
        recipe = Recipe(loop_count=RampedLoops(start=1.0, end=4.0, ramp_steps=100), estimator=GateTraining(),
                        prior=NoPrior())
    except ValueError:
        return  # rejected at config time: fine
    model = tiny_model(0)
    assert recipe.plan(0, model.cfg.n_loops, batch_size=2).n_loops == 1  # step 0 draws T = 1
    loss, _ = recipe.loss(model, random_batch(0, 2, 5), 0)
    assert torch.isfinite(loss)


# ===================================================================================================
# 5. Causality and packed documents, for any loop count
# ===================================================================================================
@given(T=st.integers(1, 64), B=st.integers(1, 2), S=st.integers(2, 8), data=st.data(),
       placement=st.sampled_from(PLACEMENT_NAMES), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16), packed=st.booleans())
@settings(FEW)
def test_no_information_flows_backwards_or_across_documents(T, B, S, data, placement, dtype, seed, packed):
    """Changing the token at position j changes no logit or gate logit, at any loop, of a position
    before j, nor of any position of another packed document (bitwise)."""
    model = tiny_model(seed, norm_placement=placement, init_std=0.3).to(dtype)
    b = random_batch(seed, B, S, packed=packed)
    j = data.draw(st.integers(0, S - 1), label="changed position")
    changed = b.input_ids.clone()
    changed[:, j] = (changed[:, j] + data.draw(st.integers(1, 31), label="token shift")) % 32
    with torch.no_grad():
        out = [model(ids, n_loops=T, doc_ids=b.doc_ids) for ids in (b.input_ids, changed)]
    if packed:
        unaffected = (b.doc_ids != b.doc_ids[:, j:j + 1]) | (torch.arange(S) < j)
    else:
        unaffected = (torch.arange(S) < j).expand(B, S)
    for t in range(T):
        logits = [model.logits(o.states[t])[unaffected] for o in out]
        assert torch.equal(*logits), (t, (logits[0] - logits[1]).abs().max())
        gates = [model.exit_logits(o.gate_inputs[t])[unaffected] for o in out]
        assert torch.equal(*gates), t


# ===================================================================================================
# 6. The full-unroll gradient against central finite differences, float64
# ===================================================================================================
@given(seed=st.integers(0, 2**16), T=st.integers(1, 4), prior=priors, readout=st.sampled_from(["fused", "recompute"]),
       stage=st.sampled_from([1, 2]), packed=st.booleans())
def test_full_unroll_gradient_matches_finite_differences(seed, T, prior, readout, stage, packed):
    """d loss / d theta along a random direction equals (L(theta + hv) - L(theta - hv)) / 2h in
    float64: Stage I (fused read-out or recompute, any prior) over all parameters, Stage II over
    the gate (the LM is frozen there)."""
    assume(stage == 1 or T >= 2)
    model = tiny_model(seed, dtype=F64, init_std=0.3)
    if stage == 1:
        recipe = Recipe(loop_count=FixedLoops(T), estimator=ExitWeighted(readout), prior=prior)
    else:
        recipe = Recipe(loop_count=FixedLoops(T), estimator=GateTraining(), prior=NoPrior())
    params = recipe.trainable_parameters(model)
    b = random_batch(seed, 2, 5, packed=packed)
    g = torch.Generator().manual_seed(seed + 1)
    v = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in v))
    v = [d / norm for d in v]  # a unit direction in parameter space
    loss, _ = recipe.loss(model, b, 0)
    grads = torch.autograd.grad(loss, params)
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, v))

    def at(x):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(x * d)
            value = float(recipe.loss(model, b, 0)[0])
            for p, d in zip(params, v):
                p.sub_(x * d)
            return value

    def central(h):
        return (at(h) - at(-h)) / (2 * h)

    h = 1e-4
    numeric = (4 * central(h / 2) - central(h)) / 3  # Richardson: error O(h^4)
    assert math.isclose(analytic, numeric, rel_tol=1e-6, abs_tol=1e-10), (analytic, numeric)


# ===================================================================================================
# 7. Estimators and samplers
# ===================================================================================================
@st.composite
def proposals_q(draw):
    T = draw(st.integers(1, 5))
    raw = draw(st.lists(st.one_of(st.floats(1e-6, 1), st.sampled_from([1e-6, 1.0])), min_size=T, max_size=T))
    return [r / sum(raw) for r in raw]


def enumerate_sampled_step(model, b, est, prior, T, q):
    """sum over every draw of q(draw) * (loss, grads): the exact expectation of the estimator."""
    params = list(model.parameters())
    exp_loss, exp_grads = 0.0, [torch.zeros_like(p) for p in params]
    qt = torch.tensor(q, dtype=F64)
    if est.per_sequence:
        draws = [(math.prod(q[t - 1] for t in rows), max(rows), {"rows": torch.tensor(rows)})
                 for rows in itertools.product(range(1, T + 1), repeat=b.input_ids.shape[0])]
    else:
        draws = [(q[t - 1], t, {"t": t}) for t in range(1, T + 1)]
    for prob, run, pin in draws:
        plan = Plan(n_loops=T, run_loops=run, first_grad_loop=1, readout=tuple(range(1, run + 1)),
                    extra={"q": qt, "seed": 0, "step": 0} | pin)
        traj = model(b.input_ids, n_loops=run, doc_ids=b.doc_ids, keep=plan.readout)
        loss, _ = est.loss(Readouts(model, traj, b, T), plan, prior)
        exp_loss += prob * float(loss)
        for acc, gr in zip(exp_grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if gr is not None:
                acc += prob * gr
    return exp_loss, exp_grads


@given(q=proposals_q(), prior=priors, per_sequence=st.booleans(), seed=st.integers(0, 2**16),
       weighting=st.sampled_from(["none", "min_snr_schedule"]))
@example(q=[0.2, 0.3, 0.5], prior=GeometricPrior(0.1, 0.5), per_sequence=False, seed=0,
         weighting="none").via("regression: SampledStep rounded CE to float32 in a float64 model")
def test_sampled_step_is_unbiased_for_any_full_support_proposal(q, prior, per_sequence, seed, weighting):
    """Exact enumeration over the sampled loop(s): with w = 1, E_q[loss] and E_q[grad] equal the
    full-unroll Stage I loss and gradient (same prior) for any q > 0, per batch or per sequence;
    with Min-SNR weights they equal the documented weighted objective sum_t w_t p_t CE_t + beta prior."""
    T = len(q)
    model = tiny_model(seed, dtype=F64, init_std=0.5, n_loops=T)
    b = random_batch(seed, 2, 5)
    w8 = NoWeighting() if weighting == "none" else MinSNRWeighting(gamma=1.5, snr="schedule", s0=0.7)
    est = SampledStep(FixedScheduleProposal(q), w8, per_sequence=per_sequence)
    Recipe(loop_count=FixedLoops(T), estimator=est, prior=prior)  # accepted
    got, got_grads = enumerate_sampled_step(model, b, est, prior, T, q)

    traj = model(b.input_ids, n_loops=T, doc_ids=b.doc_ids)
    ro = Readouts(model, traj, b, T)
    ce, _ = ro.ce_all()
    gates = ro.gate_logits()
    w = w8.weights(torch.tensor(q, dtype=F64), T)
    log_p = log_exit_probs(gates)
    per_token = (w * log_p.exp() * ce).sum(-1) + prior.beta * prior.loop_terms(log_p, T).sum(-1)
    want = (per_token * ro.mask).sum() / ro.mask.sum()
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    assert math.isclose(got, float(want), rel_tol=1e-9, abs_tol=1e-12), (got, float(want))
    for (name, _), a, wg in zip(model.named_parameters(), got_grads, want_grads):
        wg = torch.zeros_like(a) if wg is None else wg
        err = float((a - wg).norm())
        assert err <= 1e-9 * float(wg.norm()) + 1e-12, (name, err, float(wg.norm()))


@given(cls=st.sampled_from([LogNormalLoops, PoissonLoops, UniformLoops, PoissonLogNormalLoops, RampedLoops]),
       data=st.data(), seed=st.integers(0, 2**32), n_loops=st.integers(1, 64),
       steps=st.lists(st.integers(0, 10**6), min_size=1, max_size=8))
@example(cls=LogNormalLoops, data=None, seed=0, n_loops=4, steps=[0]).via("regression: mu=800 overflowed math.exp")
def test_loop_count_samplers_stay_in_their_bounds(cls, data, seed, n_loops, steps):
    """Any loop-count sampler, any arguments its constructor accepts: every draw is an int in
    [low, high] (and >= 1), for any seed and step."""
    if data is None:  # the regression: an accepted mu whose exp overflows
        lc, low, high = LogNormalLoops(mu=800.0, sigma=0.7, low=1, high=100), 1, 100
    else:
        low, high = data.draw(bounded_pair(1, 200), label="low, high")
        lc = data.draw({
            LogNormalLoops: st.builds(LogNormalLoops, mu=st.floats(-1e3, 1e3), sigma=st.floats(1e-3, 1e2),
                                      low=st.just(low), high=st.just(high)),
            PoissonLoops: st.builds(PoissonLoops, lam=st.floats(1e-3, 1e6), low=st.just(low), high=st.just(high)),
            UniformLoops: st.builds(UniformLoops, low=st.just(low), high=st.just(high)),
            PoissonLogNormalLoops: st.builds(PoissonLogNormalLoops, mean=st.floats(1e-3, 1e4),
                                             sigma=st.floats(1e-3, 10), high=st.one_of(st.none(), st.just(high))),
            RampedLoops: st.builds(RampedLoops, start=st.floats(1, 1e3), end=st.one_of(st.none(), st.floats(1, 1e3)),
                                   ramp_steps=ints(1, 10**4), shape=st.sampled_from(RampedLoops.SHAPES),
                                   distribution=st.sampled_from(RampedLoops.DISTRIBUTIONS),
                                   sigma=st.floats(1e-3, 10), high=st.one_of(st.none(), st.just(high))),
        }[cls], label="sampler")
        if cls in (PoissonLogNormalLoops, RampedLoops):
            low, high = 1, lc.high or math.inf
    for step in steps:
        T = lc.sample(step, n_loops, seed)
        assert isinstance(T, int) and not isinstance(T, bool)
        assert low <= T <= high and T >= 1, (lc.describe(), step, T)
        if isinstance(lc, RampedLoops) and lc.distribution == "fixed":
            want = max(1, math.floor(lc.mean(step, n_loops) + 0.5))
            assert T == (want if lc.high is None else min(want, lc.high))


@given(T=st.integers(1, 64), step=st.integers(-10, 10**5), seed=st.integers(0, 2**32), B=st.integers(1, 8),
       total_steps=ints(1, 10**4), a_max=st.floats(0, 1), floor=st.floats(1e-6, 1),
       mu_start=st.floats(-10, 70), mu_end=st.one_of(st.none(), st.floats(-10, 70)),
       sigma_start=st.floats(1e-3, 50), sigma_end=st.floats(1e-3, 50))
def test_step_proposals_and_draws_stay_in_their_bounds(T, step, seed, B, total_steps, a_max, floor, mu_start, mu_end,
                                                      sigma_start, sigma_end):
    """Proposals keep full support (q_t >= floor / T for CLTS) and sum to 1; the sampled loop, per
    batch or per row, lies in 1..T and the plan runs exactly loops 1..t."""
    clts = CLTSProposal(total_steps, a_max=a_max, mu_start=mu_start, mu_end=mu_end, sigma_start=sigma_start,
                        sigma_end=sigma_end, floor=floor)
    for proposal in (UniformProposal(), clts):
        q = proposal.probs(T, step)
        assert q.shape == (T,) and q.dtype == F64 and torch.isfinite(q).all()
        assert abs(float(q.sum()) - 1) < 1e-9 and (q > 0).all()
        if proposal is clts:
            assert (q >= floor / T * (1 - 1e-9)).all()
        for per_sequence in (False, True):
            est = SampledStep(proposal, per_sequence=per_sequence)
            run, readout, extra = est.plan(T, step, seed, B)
            if per_sequence:
                rows = extra["rows"]
                assert rows.shape == (B,) and ((rows >= 1) & (rows <= T)).all()
                assert run == int(rows.max()) and readout == tuple(range(1, run + 1))
            else:
                assert 1 <= extra["t"] <= T and run == extra["t"] and readout == tuple(range(1, run + 1))


@given(T=st.integers(1, 8), step=st.integers(0, 300), seed=st.integers(0, 2**16), data=st.data(),
       windowed=st.sampled_from(["last", "ramped"]))
@settings(FEW)
def test_truncated_backprop_has_no_gradient_path_through_no_grad_loops(T, step, seed, data, windowed):
    """A window's first grad loop f lies in [1, T + 1]; loops before f keep no graph; the gradient of
    any function of the states equals that of the loops run by hand with x_{f-1} detached, and the
    embedding gets none when f > 1. Through Recipe too."""
    if windowed == "last":
        window = LastLoops(data.draw(st.integers(1, 10), label="k"))
    else:
        window = RampedLastLoops(data.draw(st.integers(1, 9), label="k_start"),
                                 data.draw(st.integers(1, 9), label="k_end"), data.draw(st.integers(1, 300)))
    f = window.first_grad_loop(step, T)
    assert 1 <= f <= T + 1
    model = tiny_model(seed, dtype=F64, init_std=0.3)
    b = random_batch(seed, 2, 5)
    r = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed + t), dtype=F64) for t in range(T)]

    def objective(states):
        return sum((s * w).sum() for s, w in zip(states, r))

    traj = model(b.input_ids, n_loops=T, first_grad_loop=f)
    for t in range(1, T + 1):
        assert traj.states[t - 1].requires_grad == (t >= f), (t, f)
    params = list(model.parameters())
    got = torch.autograd.grad(objective(traj.states), params, allow_unused=True) if f <= T else [None] * len(params)
    # by hand: loops before f without a graph
    ctx = model.context(5, dtype=F64)
    x, states = model.embed(b.input_ids), []
    for t in range(1, T + 1):
        if t < f:
            with torch.no_grad():
                x, _ = model.recurrence(x, ctx, t - 1)
        else:
            x, _ = model.recurrence(x, ctx, t - 1)
        states.append(x)
    if f <= T:
        want = torch.autograd.grad(objective(states), params, allow_unused=True)
        for (name, _), a, w in zip(model.named_parameters(), got, want):
            assert (a is None) == (w is None), name
            if a is not None:
                assert torch.allclose(a, w, rtol=1e-10, atol=1e-12), name
    if f > 1:
        assert got[0] is None  # the embedding: no input injection, so no gradient (variants.truncated)
    recipe = Recipe(loop_count=FixedLoops(T), window=window)
    loss, _ = recipe.loss(model, b, step)
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert (model.embed.weight.grad is None) == (f > 1)


# ===================================================================================================
# 8. Determinism and checkpoint round trip through the trainer
# ===================================================================================================
@given(loop_count=plugin_of(LOOP_COUNTS), window=plugin_of(BACKPROP_WINDOWS), estimator=plugin_of(ESTIMATORS),
       prior=plugin_of(EXIT_PRIORS), regs=st.lists(plugin_of(REGULARIZERS), max_size=1),
       precision=st.sampled_from(["fp32", "bf16"]), seed=st.integers(0, 100), split=st.integers(1, 3))
@settings(FEW)
def test_same_seed_same_losses_and_a_mid_run_checkpoint_changes_nothing(tmp_path_factory, loop_count, window,
                                                                         estimator, prior, regs, precision, seed,
                                                                         split):
    """train() twice from the same seed gives the same loss history, bit for bit, and a run stopped
    at a checkpoint after `split` steps and resumed in a fresh process state (fresh plugin
    instances, restored from the checkpoint) gives exactly the uninterrupted run's history."""
    import copy
    import gin
    parts = dict(loop_count=loop_count, window=window, estimator=estimator, prior=prior, regularizers=regs)
    try:
        Recipe(**copy.deepcopy(parts)).check_model(tiny_config())  # what the trainer refuses too
    except ValueError:
        reject()
    if isinstance(estimator, GateTraining):
        assume(isinstance(loop_count, FixedLoops) and (loop_count.n_loops or 3) >= 2)  # see the regression above
    if isinstance(loop_count, FixedLoops) and loop_count.n_loops and loop_count.n_loops > 8:
        loop_count = FixedLoops(8)  # trainer-level runs: keep them short
    parts["loop_count"] = loop_count

    def run(run_dir, steps, **kw):
        gin.clear_config()
        args = dict(task=AdditionTask(n_digits=2, n_eval=8), model_config=tiny_config(),
                    recipe=Recipe(**copy.deepcopy(parts)), run_dir=str(run_dir), steps=steps, batch_size=4,
                    eval_every=1000, checkpoint_every=1000, eval_batch_size=8, eval_max_loops=3, progress=False,
                    seed=seed, precision=precision)
        return train(**(args | kw))["history"]

    class StopAfterSplit(AdditionTask):
        """A pre-emption noticed while step `split` - 1 is read: checkpoint after it, stop."""

        def train_batch(self, step, batch_size):
            if step == split - 1 and self._control is not None:
                self._control.raised = "SIGUSR1"
            return super().train_batch(step, batch_size)

    def stopping(control):
        task = StopAfterSplit(n_digits=2, n_eval=8)
        task._control = control
        return task

    root = tmp_path_factory.mktemp("det")
    steps = split + 2
    full = run(root / "a", steps)
    assert all(math.isfinite(v) for v in full)
    assert run(root / "b", steps) == full
    control = RunControl()
    assert len(run(root / "c", steps, task=stopping(control), control=control)) == split
    assert run(root / "c", steps, task=stopping(None)) == full
