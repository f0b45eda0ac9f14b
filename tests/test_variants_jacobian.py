"""variants.jacobian: every estimator against the exact Jacobian of the loop map on a tiny stack."""

import math

import pytest
import torch

from looplm.config import model_config
from looplm.data.batch import Batch
from looplm.hooks import step_generator
from looplm.model import LoopLM
from looplm.recipe import FixedLoops, GateTraining, Recipe
from variants.jacobian import HutchinsonJacobian, PowerIterationJacobian, SpectralJacobian, loop_map
from variants.priors import NoPrior


@pytest.fixture(scope="module")
def setup():
    """A 1-layer, d=8 stack at B=1, S=4 (n = 32): J is 32 x 32."""
    torch.manual_seed(0)
    model = LoopLM(model_config("tiny", d_model=8, n_heads=2, d_ff=16, n_layers=1, init_std=0.3)).double()
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    traj = model(ids, n_loops=2)
    g = loop_map(model, traj.context)
    x = traj.final_state.detach()
    J = torch.autograd.functional.jacobian(lambda v: g(v.view_as(x)).flatten(), x.flatten())
    return model, ids, traj, g, x, J


def gen(i, salt="test"):
    return step_generator(0, i, salt)


def test_hutchinson_mean_is_frobenius_squared(setup):
    model, _, _, g, x, J = setup
    fro2 = float(J.pow(2).sum())
    n = 3000
    for mode in ("jvp", "vjp"):
        with torch.no_grad():
            samples = HutchinsonJacobian(mode=mode).probe_values(g, x, gen(1, mode), probes=n)
        se = float(samples.std()) / math.sqrt(n)
        assert abs(float(samples.mean()) - fro2) < 4 * se, (mode, float(samples.mean()), fro2, se)
        # the sample spread matches the law's: Var ||J eps||^2 = 2 ||J^T J||_F^2
        M = J.T @ J if mode == "jvp" else J @ J.T
        exact_sd = math.sqrt(2 * float(M.pow(2).sum()))
        assert float(samples.std()) == pytest.approx(exact_sd, rel=0.15)


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_stars_one_iteration_is_frobenius_over_n(setup, mode):
    """Both reads of the one probe, ||J^T v||^2 (STARS) and ||J v||^2 (forward mode), have the mean
    ||J||_F^2 / n and the same spread."""
    model, _, _, g, x, J = setup
    n_entries = x.numel()
    reg = PowerIterationJacobian(iterations=1, mode=mode)
    xs = x.clone().requires_grad_()
    samples = torch.stack([reg.estimate(g, xs, gen(i)).detach() for i in range(1500)])
    se = float(samples.std()) / math.sqrt(len(samples))
    target = float(J.pow(2).sum()) / n_entries
    assert abs(float(samples.mean()) - target) < 4 * se, (float(samples.mean()), target, se)
    # ... and it is the normalised-probe VJP written out by hand
    v = torch.randn(x.shape, generator=gen(0), dtype=torch.float32).double()
    v = v / v.norm()
    by_hand = ((J.T if mode == "vjp" else J) @ v.flatten()).pow(2).sum()
    torch.testing.assert_close(samples[0], by_hand)
    # Var over v uniform on the sphere: (2 tr(M^2) - 2 tr(M)^2 / n) / (n (n + 2)), M = J^T J or J J^T
    M = J.T @ J
    exact_var = (2 * float((M @ M).trace()) - 2 * float(M.trace()) ** 2 / n_entries) / (n_entries * (n_entries + 2))
    assert float(samples.var()) == pytest.approx(exact_var, rel=0.15)


def non_normal_map_with_complex_dominant_pair():
    """A 6 x 6 map whose two largest eigenvalues are the pair 0.9 exp(+-1.1 i), coupled to the
    rest by upper-triangular terms (so A A^T != A^T A), acting on x of shape (1, 2, 3)."""
    c, s = 0.9 * math.cos(1.1), 0.9 * math.sin(1.1)
    A = torch.tensor([[c, -s, 1.0, 0.0, 0.3, 0.0],
                      [s, c, 0.0, 0.5, 0.0, 0.2],
                      [0.0, 0.0, 0.4, 0.6, 0.0, 0.1],
                      [0.0, 0.0, 0.0, -0.3, 0.8, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.2, 0.4],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.1]], dtype=torch.float64)
    eig = torch.linalg.eigvals(A)
    top = eig[eig.abs().argsort(descending=True)[:2]]
    assert top[0].imag.abs() > 0.5 and torch.isclose(top[0], top[1].conj())  # a complex pair
    assert not torch.allclose(A @ A.T, A.T @ A)  # not normal: sigma_max > |lambda_max|
    return A


def linear_map(A):
    return lambda z: (z.reshape(-1) @ A.T).reshape(z.shape)


def test_iterating_j_transpose_alone_oscillates_on_this_map():
    """Why the STARS loop cannot simply repeat v <- J^T v / ||J^T v||: on a complex dominant pair
    the estimate keeps rotating and never settles, and never reaches sigma_max^2."""
    A = non_normal_map_with_complex_dominant_pair()
    v = torch.randn(6, generator=gen(0), dtype=torch.float32).double()
    values = []
    for _ in range(200):
        u = A.T @ (v / v.norm())
        values.append(float(u.pow(2).sum()))
        v = u
    late = values[150:]
    assert max(late) - min(late) > 0.1 * max(late)
    assert max(late) < 0.99 * float(torch.linalg.matrix_norm(A, ord=2)) ** 2


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("make_map", ["complex_pair", "loop_map"])
def test_stars_iterations_converge_to_squared_spectral_norm(make_map, mode, setup):
    """iterations = k > 1 is power iteration on J^T J: the estimate rises monotonically (Rayleigh
    quotients of a PSD matrix) to sigma_max(J)^2, on a non-normal linear map with a complex
    dominant pair and on the real loop map of a tiny stack."""
    if make_map == "complex_pair":
        A = non_normal_map_with_complex_dominant_pair()
        g, x = linear_map(A), torch.zeros(1, 2, 3, dtype=torch.float64)
    else:
        _, _, _, g, x, A = setup
    want = float(torch.linalg.matrix_norm(A, ord=2)) ** 2
    xs = x.clone().requires_grad_()
    ks = (1, 2, 3, 5, 8, 13, 21, 34)  # the same start v for every k: one power-iteration sequence
    got = [float(PowerIterationJacobian(iterations=k, mode=mode).estimate(g, xs, gen(0)).detach()) for k in ks]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(got, got[1:])), got
    assert got[-1] == pytest.approx(want, rel=1e-6), (got[-5:], want)
    assert got[0] < 0.9 * want  # the one-probe start is well below: convergence is what the rounds do


def test_stars_forward_mode_gradient_matches_exact_jacobian_gradient(setup):
    """d/dtheta ||J v||^2 (mode="jvp", reverse over forward) equals the same from the explicit
    Jacobian, at the probe the VJP form reads."""
    model, _, _, g, x, _ = setup
    params = [p for p in model.layers.parameters()] + list(model.final_norm.parameters())
    reg = PowerIterationJacobian(mode="jvp").estimate(g, x, gen(4))
    v = torch.randn(x.shape, generator=gen(4), dtype=torch.float32).double().flatten()
    J = torch.autograd.functional.jacobian(lambda u: g(u.view_as(x)).flatten(), x.flatten(), create_graph=True)
    exact = (J @ (v / v.norm())).pow(2).sum()
    torch.testing.assert_close(reg, exact)
    for a, b in zip(torch.autograd.grad(reg, params), torch.autograd.grad(exact, params)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_which_estimators_take_a_backward_inside_the_loss():
    """What train.parallel='fsdp' refuses: a VJP in the loss; the forward-mode reads run."""
    takes = {"stars vjp": PowerIterationJacobian(), "stars jvp k=2": PowerIterationJacobian(mode="jvp", iterations=2),
             "hutchinson vjp": HutchinsonJacobian(mode="vjp"), "spectral": SpectralJacobian()}
    forward = {"stars jvp": PowerIterationJacobian(mode="jvp"), "hutchinson jvp": HutchinsonJacobian(mode="jvp")}
    assert all(r.backward_in_loss for r in takes.values())
    assert not any(r.backward_in_loss for r in forward.values())


def test_stars_converged_gradient_is_that_of_the_squared_spectral_norm():
    """Envelope theorem: at the converged v, d reg / dA = d sigma_max(A)^2 / dA."""
    A = non_normal_map_with_complex_dominant_pair().requires_grad_()
    x = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    reg = PowerIterationJacobian(iterations=80).estimate(linear_map(A), x, gen(0))
    (got,) = torch.autograd.grad(reg, A)
    (want,) = torch.autograd.grad(torch.linalg.matrix_norm(A, ord=2) ** 2, A)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_stars_two_iterations_by_hand():
    """k = 2: v1 random unit, u1 = J^T v1, v2 = J u1 / ||J u1||, reg = ||J^T v2||^2."""
    A = non_normal_map_with_complex_dominant_pair()
    x = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    got = PowerIterationJacobian(iterations=2).estimate(linear_map(A), x, gen(3))
    v1 = torch.randn(x.shape, generator=gen(3), dtype=torch.float32).double().reshape(-1)
    v1 = v1 / v1.norm()
    v2 = A @ (A.T @ v1)
    torch.testing.assert_close(got.detach(), (A.T @ (v2 / v2.norm())).pow(2).sum())


def test_spectral_converges_to_sigma_max_squared(setup):
    model, _, _, g, x, J = setup
    s = torch.linalg.svdvals(J)
    got = float(SpectralJacobian(iterations=150).estimate(g, x, gen(0)))
    assert got == pytest.approx(float(s[0] ** 2), rel=1e-6), (got, s[:3] ** 2)


def test_hutchinson_gradient_matches_exact_jacobian_gradient(setup):
    """d/dtheta ||J eps||^2 by torch.func.jvp equals the same from the explicit Jacobian."""
    model, _, _, g, x, _ = setup
    params = [p for p in model.layers.parameters()] + list(model.final_norm.parameters())
    for mode in ("jvp", "vjp"):
        eps = torch.randn(x.shape, generator=gen(5), dtype=torch.float32).double()
        reg = HutchinsonJacobian(mode=mode).probe_values(g, x, gen(5), probes=1)[0]
        got = torch.autograd.grad(reg, params)
        J = torch.autograd.functional.jacobian(lambda v: g(v.view_as(x)).flatten(), x.flatten(),
                                               create_graph=True)
        exact = (J @ eps.flatten() if mode == "jvp" else J.T @ eps.flatten()).pow(2).sum()
        want = torch.autograd.grad(exact, params)
        torch.testing.assert_close(reg, exact)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reg", [PowerIterationJacobian(weight=0.1, iterations=2),
                                 PowerIterationJacobian(weight=0.1, mode="jvp"),
                                 HutchinsonJacobian(weight=0.01, probes=2, mode="jvp"),
                                 HutchinsonJacobian(weight=0.01, mode="vjp"),
                                 SpectralJacobian(weight=0.1, iterations=3)],
                         ids=["stars", "stars_jvp", "hutchinson_jvp", "hutchinson_vjp", "spectral"])
def test_regularizer_gradient_reaches_parameters_only(reg):
    torch.manual_seed(0)
    model = LoopLM(model_config("tiny"))
    b = Batch(torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 6)))
    recipe = Recipe(loop_count=FixedLoops(2), regularizers=[reg])
    loss, metrics = recipe.loss(model, b, step=0)
    assert reg.registry_name in metrics and metrics[reg.registry_name] > 0
    # the term alone: x is detached, so only the stack (and final norm) receive its gradient
    traj = model(b.input_ids, n_loops=2)
    x = traj.final_state.detach().requires_grad_()
    term = reg.estimate(loop_map(model, traj.context), x, step_generator(0, 0, reg.registry_name))
    model.zero_grad(set_to_none=True)
    term.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.layers.parameters())
    assert model.embed.weight.grad is None and model.lm_head.weight.grad is None
    # mixing: STARS (1-w) loss + w reg, others loss + w reg
    base, _ = Recipe(loop_count=FixedLoops(2)).loss(model, b, step=0)
    r = metrics[reg.registry_name]
    want = (1 - reg.weight) * base + reg.weight * r if reg.mix else base + reg.weight * r
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()


def test_warmup_and_seed():
    torch.manual_seed(0)
    model = LoopLM(model_config("tiny"))
    b = Batch(torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 5)))
    reg = PowerIterationJacobian(weight=0.1, warmup_steps=3)
    recipe = Recipe(loop_count=FixedLoops(2), regularizers=[reg])
    base, _ = Recipe(loop_count=FixedLoops(2)).loss(model, b, step=0)
    loss, metrics = recipe.loss(model, b, step=2)
    torch.testing.assert_close(loss, base)
    assert "stars_jacobian" not in metrics
    _, m3 = recipe.loss(model, b, step=3)
    _, m3_again = recipe.loss(model, b, step=3)
    assert m3["stars_jacobian"] == m3_again["stars_jacobian"]  # probe is a function of (seed, step)
    recipe.seed = 1  # the trainer sets the seed after building the recipe: the probe follows it
    _, m3_seed1 = recipe.loss(model, b, step=3)
    assert m3_seed1["stars_jacobian"] != m3["stars_jacobian"]


def test_rejects_gate_only_training():
    stage2 = Recipe(estimator=GateTraining(), prior=NoPrior())
    for reg in (PowerIterationJacobian(), HutchinsonJacobian(), SpectralJacobian()):
        with pytest.raises(ValueError, match="trains only the exit gate"):
            reg.validate(stage2)
        with pytest.raises(ValueError):
            Recipe(estimator=GateTraining(), prior=NoPrior(), regularizers=[reg])


@pytest.mark.parametrize("make, match", [
    (lambda: PowerIterationJacobian(weight=-1), "weight=-1"),
    (lambda: PowerIterationJacobian(weight=2.0), "mixing weight"),
    (lambda: PowerIterationJacobian(iterations=0), "iterations=0"),
    (lambda: PowerIterationJacobian(warmup_steps=-1), "warmup_steps=-1"),
    (lambda: HutchinsonJacobian(mode="fd"), "mode='fd'"),
    (lambda: PowerIterationJacobian(mode="fd"), "mode='fd'"),
    (lambda: HutchinsonJacobian(probes=0), "probes=0"),
    (lambda: SpectralJacobian(iterations=0), "iterations=0"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
