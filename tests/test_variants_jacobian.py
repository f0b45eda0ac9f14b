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


def test_stars_one_iteration_is_frobenius_over_n(setup):
    model, _, _, g, x, J = setup
    n_entries = x.numel()
    reg = PowerIterationJacobian(iterations=1)
    xs = x.clone().requires_grad_()
    samples = torch.stack([reg.estimate(g, xs, gen(i)).detach() for i in range(1500)])
    se = float(samples.std()) / math.sqrt(len(samples))
    target = float(J.pow(2).sum()) / n_entries
    assert abs(float(samples.mean()) - target) < 4 * se, (float(samples.mean()), target, se)
    # ... and it is the normalised-probe VJP written out by hand
    v = torch.randn(x.shape, generator=gen(0), dtype=torch.float32).double()
    v = v / v.norm()
    by_hand = (J.T @ v.flatten()).pow(2).sum()
    torch.testing.assert_close(samples[0], by_hand)


def test_stars_many_iterations_tend_to_dominant_eigenvalue_not_spectral_norm(setup):
    """Iterating v <- J^T v / ||J^T v|| finds J^T's dominant eigenvector: ||u||^2 -> |lambda_max|^2,
    which for this non-normal J is well below sigma_max^2 (and can never exceed it)."""
    model, _, _, g, x, J = setup
    sigma_max2 = float(torch.linalg.svdvals(J)[0] ** 2)
    eig = torch.linalg.eigvals(J)
    order = eig.abs().argsort(descending=True)
    lam = eig[order[0]]
    assert abs(lam.imag) < 1e-9 and eig[order[1]].abs() < 0.8 * lam.abs()  # real, separated
    xs = x.clone().requires_grad_()
    got = float(PowerIterationJacobian(iterations=60).estimate(g, xs, gen(0)).detach())
    assert got == pytest.approx(float(lam.abs() ** 2), rel=1e-4)
    assert got < 0.5 * sigma_max2


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
                                 HutchinsonJacobian(weight=0.01, probes=2, mode="jvp"),
                                 HutchinsonJacobian(weight=0.01, mode="vjp"),
                                 SpectralJacobian(weight=0.1, iterations=3)],
                         ids=["stars", "hutchinson_jvp", "hutchinson_vjp", "spectral"])
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
    (lambda: HutchinsonJacobian(probes=0), "probes=0"),
    (lambda: SpectralJacobian(iterations=0), "iterations=0"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
