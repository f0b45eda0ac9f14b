"""variants.sampled_step, the plain estimator: unbiasedness by exact enumeration over the sampled
loop, the draws, that only loops 1..t run, state and arguments. Proposals and weightings:
test_variants_sampled_step_proposals.py; the remedies: test_variants_sampled_step_remedies.py."""

import io
import itertools
import math

import pytest
import torch

from looplm.config import model_config
from looplm.data.batch import IGNORE_INDEX, Batch
from looplm.hooks import Plan, Readouts
from looplm.model import LoopLM
from looplm.objectives import log_exit_probs, token_mean
from looplm.recipe import ExitWeighted, FixedLoops, Recipe, UniformPrior
from variants.priors import GeometricPrior
from variants.sampled_step import (CLTSProposal, FixedScheduleProposal, MinSNRWeighting, NoWeighting,
                                   SampledStep, UniformProposal)
from variants.truncated import LastLoops


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    return LoopLM(model_config("tiny")).to(dtype)


def batch(B=2, S=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (B, S), generator=g)
    targets = torch.randint(0, 64, (B, S), generator=g)
    targets[0, :3] = IGNORE_INDEX
    return Batch(ids, targets)


def forced_loss(model, b, est, prior, T, q, t=None, rows=None):
    """The estimator's loss with its draw forced: loop t for the batch, or loops `rows` per row."""
    extra = {"q": q, "seed": 0, "step": 0}
    if rows is None:
        extra["t"] = t
        run = t
    else:
        extra["rows"] = torch.tensor(rows)
        run = max(rows)
    plan = Plan(n_loops=T, run_loops=run, first_grad_loop=1, readout=tuple(range(1, run + 1)), extra=extra)
    traj = model(b.input_ids, n_loops=run, keep=plan.readout)
    return est.loss(Readouts(model, traj, b, T), plan, prior)[0]


def param_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


PRIORS = [UniformPrior(0.1), GeometricPrior(beta=0.2, lambda_p=0.3)]


@pytest.mark.parametrize("prior", PRIORS, ids=["uniform", "geometric"])
def test_expectation_over_q_equals_full_unroll_value_and_gradient(prior):
    T = 4
    model, b = tiny(torch.float64), batch()
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    est = SampledStep(proposal=FixedScheduleProposal(q.tolist()))
    full, _ = Recipe(loop_count=FixedLoops(T), estimator=ExitWeighted(), prior=prior).loss(model, b, 0)
    expected = sum(q[t - 1] * forced_loss(model, b, est, prior, T, q, t=t) for t in range(1, T + 1))
    torch.testing.assert_close(expected, full.to(expected.dtype), rtol=1e-6, atol=1e-7)
    for g_est, g_full in zip(param_grads(model, expected), param_grads(model, full)):
        torch.testing.assert_close(g_est, g_full, rtol=1e-5, atol=1e-7)


def test_per_sequence_expectation_equals_full_unroll():
    T, B = 3, 2
    model, b = tiny(torch.float64), batch(B=B)
    prior = UniformPrior(0.1)
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    est = SampledStep(proposal=FixedScheduleProposal(q.tolist()), per_sequence=True)
    full, _ = Recipe(loop_count=FixedLoops(T), prior=prior).loss(model, b, 0)
    expected = 0
    for rows in itertools.product(range(1, T + 1), repeat=B):
        weight = math.prod(float(q[t - 1]) for t in rows)
        expected = expected + weight * forced_loss(model, b, est, prior, T, q, rows=list(rows))
    torch.testing.assert_close(expected, full.to(expected.dtype), rtol=1e-6, atol=1e-7)
    for g_est, g_full in zip(param_grads(model, expected), param_grads(model, full)):
        torch.testing.assert_close(g_est, g_full, rtol=1e-5, atol=1e-7)


def test_weighted_expectation_is_the_reweighted_objective():
    """With Min-SNR weights E_q[L] = sum_t w_t p_t CE_t + beta * prior: not Stage I, by design."""
    T = 4
    model, b = tiny(torch.float64), batch()
    q = UniformProposal().probs(T, 0)
    weighting = MinSNRWeighting(gamma=2.0, snr="schedule")
    w = weighting.weights(q, T)
    est = SampledStep(weighting=weighting)
    prior = UniformPrior(0.1)
    with torch.no_grad():
        expected = sum(q[t - 1] * forced_loss(model, b, est, prior, T, q, t=t) for t in range(1, T + 1))
        traj = model(b.input_ids, n_loops=T)
        ro = Readouts(model, traj, b, T)
        ce, _ = ro.ce_all()
        p = log_exit_probs(ro.gate_logits()).double().exp()
        want = token_mean((w * p * ce.double()).sum(-1) + 0.1 * (p * p.log()).sum(-1), ro.mask)
        plain = token_mean((p * ce.double()).sum(-1) + 0.1 * (p * p.log()).sum(-1), ro.mask)
    torch.testing.assert_close(expected, want, rtol=1e-6, atol=1e-7)
    assert not torch.isclose(expected, plain)


class Counting:
    """Wraps a model's recurrence and read-outs (both kinds) to record what ran."""

    def __init__(self, model):
        self.loops, self.readouts = [], []
        recurrence, token_loss, weighted = model.recurrence, model.token_loss, model.weighted_token_loss

        def counted_recurrence(x, ctx, loop=0):
            self.loops.append(loop + 1)
            return recurrence(x, ctx, loop)

        def counted_token_loss(state, targets, chunk_size=None):
            self.readouts.append(state)
            return token_loss(state, targets, chunk_size)

        def counted_weighted(states, targets, coeffs, chunk_size=None):
            self.readouts.extend(states)
            return weighted(states, targets, coeffs, chunk_size)

        model.recurrence, model.token_loss, model.weighted_token_loss = (
            counted_recurrence, counted_token_loss, counted_weighted)


def test_only_loops_up_to_t_run_and_only_loop_t_is_read_out():
    model, b = tiny(), batch()
    recipe = Recipe(loop_count=FixedLoops(6), estimator=SampledStep())
    seen = set()
    for step in range(12):
        counter = Counting(model)
        t = recipe.plan(step, model.cfg.n_loops, batch_size=2).extra["t"]
        loss, metrics = recipe.loss(model, b, step)
        assert counter.loops == list(range(1, t + 1))
        assert len(counter.readouts) == 1 and counter.readouts[0].shape == (2, 8, model.cfg.d_model)
        assert metrics["sampled_loop"] == t and metrics["q_t"] == pytest.approx(1 / 6)
        seen.add(t)
        del model.recurrence, model.token_loss, model.weighted_token_loss  # back to the class methods
    assert len(seen) > 2  # different steps draw different loops


def test_read_out_state_is_loop_t():
    model, b = tiny(), batch()
    est = SampledStep()
    plan_t = 3
    q = UniformProposal().probs(4, 0)
    counter = Counting(model)
    forced_loss(model, b, est, UniformPrior(), 4, q, t=plan_t)
    del model.recurrence, model.token_loss, model.weighted_token_loss
    with torch.no_grad():
        traj = model(b.input_ids, n_loops=4)
    torch.testing.assert_close(counter.readouts[0].detach(), traj.states[plan_t - 1])


def test_per_sequence_reads_every_row_once_at_its_own_loop():
    """Loops up to the deepest row's run, then one fused read-out over the whole batch: row b's
    read-out input is its own loop's state."""
    model, b = tiny(), batch(B=4)
    rows = [3, 1, 3, 2]
    q = UniformProposal().probs(4, 0)
    counter = Counting(model)
    loss = forced_loss(model, b, SampledStep(per_sequence=True), UniformPrior(), 4, q, rows=rows)
    del model.recurrence, model.token_loss, model.weighted_token_loss
    assert counter.loops == [1, 2, 3]  # T = 4, but no row drew loop 4
    assert len(counter.readouts) == 1 and counter.readouts[0].shape == (4, 8, model.cfg.d_model)
    with torch.no_grad():
        traj = model(b.input_ids, n_loops=4)
    for r, t in enumerate(rows):
        torch.testing.assert_close(counter.readouts[0][r].detach(), traj.states[t - 1][r])
    loss.backward()  # the gathered rows pass their gradients back to the loops they came from
    assert all(p.grad is not None for p in model.layers.parameters())


def test_draws_follow_q_and_agree_across_ranks():
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    est = SampledStep(proposal=FixedScheduleProposal(q.tolist()))
    n = 4000
    draws = torch.tensor([est.plan(4, step, seed=7, batch_size=1)[2]["t"] for step in range(n)])
    freq = torch.bincount(draws - 1, minlength=4).double() / n
    se = (q * (1 - q) / n).sqrt()
    assert ((freq - q).abs() < 5 * se).all(), (freq, q)
    # another "rank" (a fresh estimator, same seed and step) draws the same; another seed differs
    other = SampledStep(proposal=FixedScheduleProposal(q.tolist()))
    assert [other.plan(4, s, seed=7, batch_size=1)[2]["t"] for s in range(50)] == draws[:50].tolist()
    assert [other.plan(4, s, seed=8, batch_size=1)[2]["t"] for s in range(50)] != draws[:50].tolist()
    # per sequence: one draw per row, the same on every rank, and the step runs to the deepest
    per_row = SampledStep(proposal=FixedScheduleProposal(q.tolist()), per_sequence=True)
    plans = [per_row.plan(4, step, seed=7, batch_size=64) for step in range(60)]
    rows = torch.cat([extra["rows"] for _, _, extra in plans])
    freq = torch.bincount(rows - 1, minlength=4).double() / len(rows)
    assert ((freq - q).abs() < 5 * (q * (1 - q) / len(rows)).sqrt()).all(), (freq, q)
    assert all(run == int(extra["rows"].max()) for run, _, extra in plans)
    again = SampledStep(proposal=FixedScheduleProposal(q.tolist()), per_sequence=True).plan(4, 5, 7, 64)
    assert torch.equal(again[2]["rows"], plans[5][2]["rows"])
    assert not torch.equal(per_row.plan(4, 5, 8, 64)[2]["rows"], plans[5][2]["rows"])


def test_state_round_trip_through_recipe():
    model, b = tiny(), batch()

    def make():
        return Recipe(loop_count=FixedLoops(4), window=LastLoops(2),
                      estimator=SampledStep(proposal=CLTSProposal(total_steps=10),
                                            weighting=MinSNRWeighting(snr="ema", ema_decay=0.9),
                                            per_sequence=True))

    recipe = make()
    for step in range(5):
        loss, metrics = recipe.loss(model, b, step)
        loss.backward()
        recipe.estimator.end_step()
    assert set(metrics) >= {"sampled_loop", "sampled_ce", "sampled_acc", "q_t", "weight", "n_loops"}
    state = recipe.state_dict()
    assert state["estimator"]["weighting"]["ema"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.estimator.weighting.ema == recipe.estimator.weighting.ema
    with torch.no_grad():
        a, ma = recipe.loss(model, b, 5)
        c, mc = resumed.loss(model, b, 5)
    torch.testing.assert_close(a, c)
    assert ma == mc


def test_stateless_parts_have_empty_state():
    est = SampledStep(proposal=CLTSProposal(total_steps=5), weighting=NoWeighting())
    assert est.state_dict() == {}
    est.load_state_dict({})
    with pytest.raises(ValueError, match="no state"):
        est.load_state_dict({"weighting": {"ema": {1: 1.0}}})


@pytest.mark.parametrize("make, match", [
    (lambda: FixedScheduleProposal([0.5, 0.0, 0.5]), "positive"),
    (lambda: CLTSProposal(total_steps=0), "total_steps"),
    (lambda: CLTSProposal(total_steps=10, floor=0.0), "floor"),
    (lambda: CLTSProposal(total_steps=10, a_max=1.5), "a_max"),
    (lambda: MinSNRWeighting(snr="loss"), "snr='loss'"),
    (lambda: MinSNRWeighting(gamma=0), "gamma"),
    (lambda: MinSNRWeighting(ema_decay=1.0), "ema_decay"),
    (lambda: SampledStep(proposal="uniform"), "not a Proposal"),
    (lambda: SampledStep(per_sequence=1), "per_sequence"),
    (lambda: SampledStep(readout="all"), "readout='all'"),
    (lambda: SampledStep(exit_weights="fixed"), "exit_weights='fixed'"),
    (lambda: SampledStep(baseline="ema"), "baseline='ema'"),
    (lambda: SampledStep(stratified=True), "needs per_sequence=True"),
    (lambda: SampledStep(exit_weights="uniform", baseline="first_loop"), "control variate"),
    (lambda: SampledStep(gate_target="stage2"), "gate_target='stage2'"),
    (lambda: SampledStep(readout="run", exit_weights="learned", gate_target="stage2"), "LM term trains"),
    (lambda: SampledStep(max_ratio=0.5), "max_ratio=0.5"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fixed_schedule_length_must_match_T():
    est = SampledStep(proposal=FixedScheduleProposal([0.5, 0.5]))
    with pytest.raises(ValueError, match="T=3"):
        est.plan(3, 0, 0, batch_size=1)


def test_fixed_schedule_needs_a_fixed_loop_count():
    from variants.random_loops import PoissonLoops
    est = SampledStep(proposal=FixedScheduleProposal([0.5, 0.5]))
    with pytest.raises(ValueError, match="fixed loop count"):
        Recipe(loop_count=PoissonLoops(), estimator=est)
    with pytest.raises(ValueError, match="FixedLoops.n_loops=3"):
        Recipe(loop_count=FixedLoops(3), estimator=est)
    Recipe(loop_count=FixedLoops(2), estimator=est)




def test_local_rows_cut_a_per_sequence_draw_to_a_ranks_rows():
    est = SampledStep(per_sequence=True)
    _, _, extra = est.plan(4, 3, seed=0, batch_size=8)
    local = est.local_rows(extra, slice(4, 8))
    assert torch.equal(local["rows"], extra["rows"][4:]) and local["q"] is extra["q"]
    _, _, per_batch = SampledStep().plan(4, 3, seed=0, batch_size=8)
    assert SampledStep().local_rows(per_batch, slice(4, 8)) == per_batch  # one t for every row
