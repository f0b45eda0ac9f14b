"""looplm.objectives against the float64 explicit-loop references in tests/reference.py
(REFERENCE sections 2-3): the exit distribution, its CDF and Q-exit, Stage I and Stage II."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from looplm.objectives import exit_cdf, exit_distribution, log_exit_probs, q_exit_loop, stage1_loss, stage2_loss

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)

moderate = st.floats(-30, 30, allow_nan=False)
extreme = st.sampled_from([-1e4, -80.0, -30.0, -1.0, 0.0, 1.0, 30.0, 80.0, 1e4])
logit_rows = st.lists(st.one_of(moderate, extreme), min_size=1, max_size=7)


def random_gates(shape=(3, 5), T=4, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, T, generator=g, dtype=F64)


# -- exit distribution -----------------------------------------------------------------------------
@given(st.lists(moderate, min_size=1, max_size=7))
def test_exit_probs_match_explicit_products(row):
    g = torch.tensor(row, dtype=F64)
    want = ref.exit_probs(g)
    log_p = log_exit_probs(g)
    torch.testing.assert_close(log_p.exp(), want, **TIGHT)
    torch.testing.assert_close(log_p, want.log(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(exit_distribution(g), want, **TIGHT)


def test_exit_probs_float32_and_batched():
    g = random_gates(shape=(2, 3, 5), T=4)
    got = log_exit_probs(g.float())
    assert got.dtype == torch.float32 and got.shape == g.shape
    torch.testing.assert_close(got.exp().double(), ref.exit_probs(g), rtol=1e-5, atol=1e-6)
    # bf16 gate logits are read in float32 at least
    assert log_exit_probs(g.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@given(row=logit_rows)
def test_exit_probs_sum_to_one_with_extreme_logits(dtype, row):
    g = torch.tensor(row, dtype=dtype)
    log_p = log_exit_probs(g)
    p = log_p.exp()
    assert not torch.isnan(log_p).any() and (log_p <= 1e-6).all()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert abs(p.double().sum().item() - 1.0) <= tol, (row, p.tolist())
    torch.testing.assert_close(p.double(), ref.exit_probs(g.double()), rtol=0, atol=tol)


@pytest.mark.parametrize("row", [[0.0, 1e4, 0.0], [0.0, 80.0, 0.0, 0.0], [-1e4, 1e4, -1e4, 5.0],
                                 [80.0, -80.0, 80.0], [-1e4, -1e4, -1e4]])
def test_a_saturated_gate_does_not_bleed_mass(row):
    """A gate at +1e4 after an undecided one: p = (0.5, 0.5, 0) exactly, also in float32 (a
    cumulative sum that subtracts the current term back out loses ~1e-4 there)."""
    g = torch.tensor(row, dtype=torch.float32)
    torch.testing.assert_close(log_exit_probs(g).exp().double(), ref.exit_probs(g.double()), rtol=1e-6, atol=1e-7)


@given(st.lists(st.one_of(moderate, extreme), min_size=2, max_size=7), st.data())
def test_partial_loops_are_a_prefix(row, data):
    """log_exit_probs(g[..., :n], T) == log_exit_probs(g, T)[..., :n] for n < T."""
    g = torch.tensor(row, dtype=F64)
    T = len(row)
    n = data.draw(st.integers(1, T - 1))
    full = log_exit_probs(g, T)
    part = log_exit_probs(g[:n], T)
    assert part.shape == (n,)
    torch.testing.assert_close(part, full[:n], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part.exp(), ref.exit_probs(g[:n], T), rtol=1e-10, atol=1e-12)


def test_partial_loops_differ_from_a_shorter_total():
    """The last given loop is a t < T loop, not the catch-all p_T."""
    g = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    assert not torch.allclose(log_exit_probs(g[:2], 3), log_exit_probs(g[:2]))


def test_more_gates_than_loops_raises():
    with pytest.raises(ValueError):
        log_exit_probs(torch.zeros(4), 3)


def test_one_loop_takes_all_mass():
    g = torch.tensor([[5.0], [-5.0]], dtype=F64)
    torch.testing.assert_close(log_exit_probs(g).exp(), torch.ones(2, 1, dtype=F64))


# -- CDF and Q-exit --------------------------------------------------------------------------------
@given(logit_rows)
def test_cdf_matches_reference(row):
    g = torch.tensor(row, dtype=F64)
    cdf = exit_cdf(g)
    torch.testing.assert_close(cdf, ref.exit_cdf(g), rtol=1e-10, atol=1e-12)
    assert cdf[-1] == 1.0
    assert (cdf[1:] >= cdf[:-1] - 1e-12).all()
    torch.testing.assert_close(cdf, ref.exit_probs(g).cumsum(-1), rtol=1e-9, atol=1e-12)


def test_cdf_is_float32_for_bf16_gates():
    """In bf16, 1 - sigmoid(-8) = 0.99966 rounds to 1 and Q-exit would stop early."""
    g = torch.tensor([8.0, 2.0, 0.0], dtype=torch.bfloat16)
    assert (1 - torch.sigmoid(-g[0])).bfloat16() == 1.0  # the hazard is real
    cdf = exit_cdf(g)
    assert cdf.dtype == torch.float32
    assert cdf[0] < 1.0 and cdf[1] < 1.0
    assert q_exit_loop(g, 0.9999).item() == 2


@pytest.mark.parametrize("q", [0.0, 0.05, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0])
def test_q_exit_loop_matches_reference(q):
    g = random_gates(shape=(6, 7), T=5)
    got = q_exit_loop(g, q)
    assert got.shape == (6, 7) and got.min() >= 1 and got.max() <= 5
    assert torch.equal(got, ref.q_exit_loop(g, q))
    if q == 0.0:
        assert (got == 1).all()
    if q == 1.0:  # moderate gates: no CDF before T is exactly 1
        assert (got == 5).all()


def test_q_one_exits_where_the_cdf_is_exactly_one():
    g = torch.tensor([[0.0, 200.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]], dtype=F64)
    assert ref.exit_cdf(g)[0, 1] == 1.0  # 1 - 0.5 * sigmoid(-200) rounds to 1 in float64 too
    assert q_exit_loop(g, 1.0).tolist() == [2, 4]


@given(logit_rows, st.floats(0, 1), st.floats(0, 1))
def test_q_exit_is_monotone_in_q(row, q1, q2):
    g = torch.tensor(row, dtype=F64)
    lo, hi = min(q1, q2), max(q1, q2)
    assert q_exit_loop(g, lo) <= q_exit_loop(g, hi)


@pytest.mark.parametrize("q", [-0.1, 1.5])
def test_q_out_of_range_raises(q):
    with pytest.raises(ValueError):
        q_exit_loop(torch.zeros(2, 3), q)


# -- Stage I --------------------------------------------------------------------------------------
def stage1_inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = 2 * torch.randn(3, 6, T, generator=g, dtype=F64)
    ce = 3 * torch.rand(3, 6, T, generator=g, dtype=F64)
    mask = torch.rand(3, 6, generator=g) > 0.3
    mask[0, 0] = True
    return gates, ce, mask


@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.05])
def test_stage1_value_and_gradients_match_reference(T, beta):
    gates, ce, mask = stage1_inputs(T)
    g1, c1 = gates.clone().requires_grad_(), ce.clone().requires_grad_()
    loss, log_p = stage1_loss(c1, g1, mask, beta)
    loss.backward()
    g2, c2 = gates.clone().requires_grad_(), ce.clone().requires_grad_()
    want = ref.stage1(c2, g2, mask, beta)
    want.backward()
    torch.testing.assert_close(loss, want, **TIGHT)
    torch.testing.assert_close(log_p.exp(), ref.exit_probs(gates), **TIGHT)
    zero = torch.zeros_like(gates)
    # T = 1: p_1 = 1 whatever the gate, so the gate's gradient is zero (or absent)
    torch.testing.assert_close(g1.grad if g1.grad is not None else zero, g2.grad if g2.grad is not None else zero, **TIGHT)
    torch.testing.assert_close(c1.grad, c2.grad, **TIGHT)
    # masked-out tokens get no gradient
    assert (c1.grad[~mask] == 0).all() and (g1.grad is None or (g1.grad[~mask] == 0).all())


def test_stage1_entropy_sign_and_masking():
    gates, ce, mask = stage1_inputs(4)
    # the entropy bonus lowers the loss (beta > 0 rewards spread-out exits)
    assert stage1_loss(ce, gates, mask, 0.1)[0] < stage1_loss(ce, gates, mask, 0.0)[0]
    p = ref.exit_probs(gates)
    H = -torch.xlogy(p, p).sum(-1)
    diff = stage1_loss(ce, gates, mask, 0.1)[0] - stage1_loss(ce, gates, mask, 0.0)[0]
    torch.testing.assert_close(diff, -0.1 * H[mask].mean(), **TIGHT)
    # a masked-out token's CE does not enter the loss
    spoiled = ce.clone()
    spoiled[~mask] = 1e6
    torch.testing.assert_close(stage1_loss(spoiled, gates, mask, 0.1)[0], stage1_loss(ce, gates, mask, 0.1)[0])


def test_stage1_gradcheck():
    gates, ce, mask = stage1_inputs(3)
    gates, ce = gates[:1, :3].requires_grad_(), ce[:1, :3].requires_grad_()
    assert torch.autograd.gradcheck(lambda g, c: stage1_loss(c, g, mask[:1, :3], 0.1)[0], (gates, ce))


# -- Stage II -------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [2, 4])
@pytest.mark.parametrize("k,gamma", [(50.0, 0.005), (10.0, 0.1)])
def test_stage2_matches_reference(T, k, gamma):
    gates, _, mask = stage1_inputs(T, seed=3)
    g = torch.Generator().manual_seed(4)
    # losses that mostly fall, by amounts around gamma and around zero
    ce = 2.0 - torch.cumsum(0.05 * torch.randn(3, 6, T, generator=g, dtype=F64).abs(), -1)
    ce[..., 1:] += 0.02 * torch.randn(3, 6, T - 1, generator=g, dtype=F64)
    g1, c1 = gates.clone().requires_grad_(), ce.clone().requires_grad_()
    loss = stage2_loss(c1, g1, mask, k=k, gamma=gamma)
    loss.backward()
    g2 = gates.clone().requires_grad_()
    want = ref.stage2(ce, g2, mask, k=k, gamma=gamma)
    want.backward()
    torch.testing.assert_close(loss, want, **TIGHT)
    torch.testing.assert_close(g1.grad, g2.grad, **TIGHT)
    assert c1.grad is None  # CE is detached: no gradient reaches the LM
    assert (g1.grad[..., 0] == 0).all()  # lambda_1 has no Stage II target
    # divided by T, not T - 1
    per_loop_sum = want * T
    assert not torch.isclose(loss, per_loop_sum / (T - 1))


def test_stage2_target_direction():
    """A loop that still helps (CE drop >> gamma) pushes its exit logit down; one that does not
    (CE rises) pushes it up."""
    ce = torch.tensor([[[2.0, 1.0], [2.0, 2.5]]], dtype=F64)  # token 0 improves, token 1 gets worse
    gates = torch.zeros(1, 2, 2, dtype=F64, requires_grad=True)
    stage2_loss(ce, gates, torch.ones(1, 2, dtype=torch.bool)).backward()
    assert gates.grad[0, 0, 1] > 0 and gates.grad[0, 1, 1] < 0


def test_stage2_with_one_loop_is_the_empty_sum_and_keeps_the_gate_in_the_graph():
    """T = 1 (a random loop count can draw it) has no pair of loops to compare: L = 0 / T."""
    gates = torch.randn(2, 3, 1, requires_grad=True)
    loss = stage2_loss(torch.rand(2, 3, 1), gates, torch.ones(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(gates.grad, torch.zeros_like(gates))


def test_log_T_constant_of_the_uniform_prior():
    """sum_t p_t CE_t + beta KL(p || U_T) == Stage I + beta log T (REFERENCE section 3)."""
    gates, ce, mask = stage1_inputs(4)
    p = ref.exit_probs(gates)
    kl = (torch.xlogy(p, p) - p * math.log(1 / 4)).sum(-1)
    with_kl = ref.masked_mean((p * ce).sum(-1) + 0.1 * kl, mask)
    torch.testing.assert_close(stage1_loss(ce, gates, mask, 0.1)[0] + 0.1 * math.log(4), with_kl, **TIGHT)
