"""The sampled-step remedies (issue 13), each computed a second way: the Rao-Blackwellised read-out
over loops 1..t and the CE_1 control variate stay unbiased (exact enumeration, float64, value and
gradient); the control variate's gate gradient equals autograd of its surrogate written out; the
fixed and detached exit weights, the Stage II gate target, stratified draws and clipped ratios
against their formulas."""

import itertools
import math

import pytest
import torch

from looplm.hooks import Plan, Readouts
from looplm.objectives import log_exit_probs, stage2_loss, token_mean
from looplm.recipe import ExitWeighted, FixedLoops, Recipe, UniformPrior
from test_variants_sampled_step import PRIORS, Counting, batch, forced_loss, param_grads, tiny
from variants.priors import NoPrior
from variants.sampled_step import FixedScheduleProposal, SampledStep, UniformProposal, survival

Q4 = [0.1, 0.2, 0.3, 0.4]


def full_readouts(model, b, T):
    """Every loop's CE (detached) and the gate logits from one full pass: the reference."""
    traj = model(b.input_ids, n_loops=T)
    ro = Readouts(model, traj, b, T)
    ce, _ = ro.ce_all()
    return ro, ce.detach(), ro.gate_logits()


def expectation(model, b, est, prior, T, q):
    """E over t ~ q of the loss (per batch draws), as a differentiable tensor."""
    return sum(q[t - 1] * forced_loss(model, b, est, prior, T, q, t=t) for t in range(1, T + 1))


def test_survival_by_hand():
    q = torch.tensor(Q4, dtype=torch.float64)
    torch.testing.assert_close(survival(q), torch.tensor([1.0, 0.9, 0.7, 0.4], dtype=torch.float64))


@pytest.mark.parametrize("prior", PRIORS, ids=["uniform", "geometric"])
@pytest.mark.parametrize("options", [dict(readout="run"), dict(baseline="first_loop"),
                                     dict(readout="run", baseline="first_loop")], ids=["rb", "cv", "rb+cv"])
def test_remedies_keep_the_stage1_expectation_value_and_gradient(prior, options):
    T = 4
    model, b = tiny(torch.float64), batch()
    q = torch.tensor(Q4, dtype=torch.float64)
    est = SampledStep(proposal=FixedScheduleProposal(Q4), **options)
    assert "unbiased_for_stage1" in est.properties
    full, _ = Recipe(loop_count=FixedLoops(T), estimator=ExitWeighted(), prior=prior).loss(model, b, 0)
    expected = expectation(model, b, est, prior, T, q)
    torch.testing.assert_close(expected, full.to(expected.dtype), rtol=1e-9, atol=1e-12)
    for g_est, g_full in zip(param_grads(model, expected), param_grads(model, full)):
        torch.testing.assert_close(g_est, g_full, rtol=1e-8, atol=1e-12)


def test_per_sequence_remedies_keep_the_expectation():
    T, B = 3, 2
    model, b = tiny(torch.float64), batch(B=B)
    prior = UniformPrior(0.1)
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for options in (dict(readout="run"), dict(baseline="first_loop")):
        full, _ = Recipe(loop_count=FixedLoops(T), prior=prior).loss(model, b, 0)
        est = SampledStep(proposal=FixedScheduleProposal(q.tolist()), per_sequence=True, **options)
        expected = sum(math.prod(float(q[t - 1]) for t in rows)
                       * forced_loss(model, b, est, prior, T, q, rows=list(rows))
                       for rows in itertools.product(range(1, T + 1), repeat=B))
        torch.testing.assert_close(expected, full.to(expected.dtype), rtol=1e-9, atol=1e-12)
        for g_est, g_full in zip(param_grads(model, expected), param_grads(model, full)):
            torch.testing.assert_close(g_est, g_full, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("readout", ["sampled", "run"])
def test_control_variate_gate_gradient_is_its_surrogate(readout):
    """Per draw: the value is the plain estimator's, and the gate's gradient is autograd of the
    surrogate sum_s c_s (CE_s - CE_1) p_s with the CEs detached, written out from a full pass."""
    T = 4
    model, b = tiny(torch.float64), batch()
    q = torch.tensor(Q4, dtype=torch.float64)
    plain = SampledStep(proposal=FixedScheduleProposal(Q4), readout=readout)
    cv = SampledStep(proposal=FixedScheduleProposal(Q4), readout=readout, baseline="first_loop")
    prior = NoPrior()
    gate = list(model.gate.parameters())
    for t in range(1, T + 1):
        a, c = forced_loss(model, b, plain, prior, T, q, t=t), forced_loss(model, b, cv, prior, T, q, t=t)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)
        ro, ce, gates = full_readouts(model, b, T)
        p = log_exit_probs(gates).exp()
        loops = range(1, t + 1) if readout == "run" else [t]
        ratio = {s: 1 / float(survival(q)[s - 1] if readout == "run" else q[s - 1]) for s in loops}
        surrogate = token_mean(sum(ratio[s] * (ce[..., s - 1] - ce[..., 0]) * p[..., s - 1] for s in loops), ro.mask)
        want = torch.autograd.grad(surrogate, gate)
        got = torch.autograd.grad(c, gate)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        if t > 1:  # the plain estimator's gate gradient is another (higher-variance) one
            assert not torch.allclose(torch.autograd.grad(a, gate)[0], got[0])


def test_rao_blackwell_reads_every_loop_that_ran_at_ratio_one_over_Q():
    T, t = 4, 3
    model, b = tiny(torch.float64), batch()
    q = torch.tensor(Q4, dtype=torch.float64)
    counter = Counting(model)
    loss = forced_loss(model, b, SampledStep(proposal=FixedScheduleProposal(Q4), readout="run"), NoPrior(), T, q, t=t)
    del model.recurrence, model.token_loss, model.weighted_token_loss
    assert counter.loops == [1, 2, 3] and len(counter.readouts) == 3
    with torch.no_grad():
        ro, ce, gates = full_readouts(model, b, T)
        p = log_exit_probs(gates).exp()
        Q = [1.0, 0.9, 0.7]
        want = token_mean(sum(p[..., s] * ce[..., s] / Q[s] for s in range(t)), ro.mask)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("readout", ["sampled", "run"])
def test_uniform_exit_weights_expect_the_mean_loop_loss_and_leave_the_gate_alone(readout):
    T = 4
    model, b = tiny(torch.float64), batch()
    q = torch.tensor(Q4, dtype=torch.float64)
    est = SampledStep(proposal=FixedScheduleProposal(Q4), readout=readout, exit_weights="uniform")
    expected = expectation(model, b, est, NoPrior(), T, q)
    ro, ce, _ = full_readouts(model, b, T)
    torch.testing.assert_close(expected, token_mean(ce.mean(-1), ro.mask), rtol=1e-9, atol=1e-12)
    model.zero_grad(set_to_none=True)
    expected.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.gate.parameters())
    assert all(p.grad is not None and p.grad.any() for p in model.layers.parameters())


def test_detached_exit_weights_expect_the_stage1_lm_value_and_leave_the_gate_alone():
    T = 4
    model, b = tiny(torch.float64), batch()
    q = torch.tensor(Q4, dtype=torch.float64)
    est = SampledStep(proposal=FixedScheduleProposal(Q4), exit_weights="detached")
    expected = expectation(model, b, est, NoPrior(), T, q)
    ro, ce, gates = full_readouts(model, b, T)
    want = token_mean((log_exit_probs(gates).exp() * ce).sum(-1), ro.mask)
    torch.testing.assert_close(expected, want, rtol=1e-9, atol=1e-12)
    model.zero_grad(set_to_none=True)
    expected.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.gate.parameters())


def test_stage2_gate_target_expects_ouros_stage2_loss_and_trains_only_the_gate():
    T = 4
    model, b = tiny(torch.float64), batch()
    with torch.no_grad():  # gates away from 0 so the target term is not symmetric
        model.gate.bias.fill_(-0.7)
    q = torch.tensor(Q4, dtype=torch.float64)
    est = SampledStep(proposal=FixedScheduleProposal(Q4), readout="run", exit_weights="detached",
                      gate_target="stage2")
    lm_only = SampledStep(proposal=FixedScheduleProposal(Q4), readout="run", exit_weights="detached")
    expected_gate = 0.0
    for t in range(1, T + 1):
        with_gate, without = forced_loss(model, b, est, NoPrior(), T, q, t=t), forced_loss(model, b, lm_only, NoPrior(), T, q, t=t)
        expected_gate = expected_gate + q[t - 1] * (with_gate - without)
        body = [p for n, p in model.named_parameters() if not n.startswith("gate.")]
        for g, w in zip(torch.autograd.grad(with_gate, body, allow_unused=True),
                        torch.autograd.grad(without, body, allow_unused=True)):
            if w is not None:  # the gate term adds nothing to the body's gradient
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    ro, ce, gates = full_readouts(model, b, T)
    want = stage2_loss(ce, gates, ro.mask)
    torch.testing.assert_close(expected_gate, want, rtol=1e-9, atol=1e-12)


def test_stratified_rows_fill_each_loops_share_and_keep_the_marginal():
    q = torch.tensor(Q4, dtype=torch.float64)
    est = SampledStep(proposal=FixedScheduleProposal(Q4), per_sequence=True, stratified=True)
    B, n = 20, 400
    per_row = torch.zeros(B, 4, dtype=torch.float64)
    for step in range(n):
        rows = est.plan(4, step, seed=3, batch_size=B)[2]["rows"]
        counts = torch.bincount(rows - 1, minlength=4).double()
        assert ((counts - q * B).abs() < 1 + 1e-9).all(), counts  # every loop within one row of q_t B
        per_row[torch.arange(B), rows - 1] += 1
    freq = per_row.sum(0) / (n * B)
    assert ((freq - q).abs() < 5 * (q * (1 - q) / (n * B)).sqrt()).all()
    first_row = per_row[0] / n  # one row's loop is distributed as q too (the rows are permuted)
    assert ((first_row - q).abs() < 5 * (q * (1 - q) / n).sqrt()).all(), first_row
    assert "unbiased_for_stage1" not in est.properties


def test_clipped_ratio_is_min_of_one_over_q_and_the_cap():
    T, cap = 4, 4.0
    model, b = tiny(torch.float64), batch()
    q = torch.tensor(Q4, dtype=torch.float64)
    est = SampledStep(proposal=FixedScheduleProposal(Q4), max_ratio=cap)
    assert "unbiased_for_stage1" not in est.properties
    with torch.no_grad():
        ro, ce, gates = full_readouts(model, b, T)
        p = log_exit_probs(gates).exp()
        for t in range(1, T + 1):
            got = forced_loss(model, b, est, NoPrior(), T, q, t=t)
            want = token_mean(min(1 / float(q[t - 1]), cap) * p[..., t - 1] * ce[..., t - 1], ro.mask)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gate_free_options_reject_an_exit_prior():
    with pytest.raises(ValueError, match="NoPrior"):
        Recipe(estimator=SampledStep(exit_weights="uniform"), prior=UniformPrior(0.1))
    Recipe(estimator=SampledStep(exit_weights="uniform"), prior=NoPrior())


def test_train_metrics_count_the_loops_run_and_read():
    model, b = tiny(), batch()
    recipe = Recipe(loop_count=FixedLoops(4), estimator=SampledStep(UniformProposal(), readout="run"),
                    prior=NoPrior())
    for step in range(4):
        _, metrics = recipe.loss(model, b, step)
        assert metrics["read_loops"] == metrics["run_loops"] == metrics["sampled_loop"]
    plan = Plan(4, 2, 1, (1, 2), {"q": UniformProposal().probs(4, 0), "t": 2})
    traj = model(b.input_ids, n_loops=2, keep=plan.readout)
    _, metrics = SampledStep(baseline="first_loop").loss(Readouts(model, traj, b, 4), plan, UniformPrior())
    assert metrics["read_loops"] == 2 and metrics["run_loops"] == 2  # loop 2, and loop 1 for the baseline
