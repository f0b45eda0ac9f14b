"""variants.trajectory: STARS' l2_limit against a hand computation from loops run by hand."""

import pytest
import torch

from looplm.config import model_config
from looplm.data.batch import IGNORE_INDEX, Batch
from looplm.model import LoopLM
from looplm.recipe import ExitWeighted, FixedLoops, GateTraining, Recipe
from variants.priors import NoPrior
from variants.sampled_step import SampledStep
from variants.trajectory import L2Limit
from variants.truncated import LastLoops


def tiny(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return LoopLM(model_config("tiny", **overrides)).to(dtype)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    targets = torch.randint(0, 64, (2, 7), generator=g)
    targets[:, :4] = IGNORE_INDEX  # the term still averages over every position
    return Batch(ids, targets)


def hand_states(model, ids, T, detach_before=None):
    """x_1..x_T by calling the recurrence in a python loop (x_t detached for t < detach_before)."""
    ctx = model.context(ids.shape[1])
    x, states = model.embed(ids), []
    for t in range(1, T + 1):
        x, _ = model.recurrence(x, ctx, t - 1)
        if detach_before is not None and t < detach_before:
            x = x.detach()
        states.append(x)
    return states


def hand_term(states):
    """mean over B*S positions of sqrt(sum_d (x_T - x_{T-1})^2), written out."""
    diff = states[-1].double() - states[-2].double()
    return diff.pow(2).sum(-1).sqrt().sum() / (diff.shape[0] * diff.shape[1])


def test_term_matches_hand_computation_value_and_gradient():
    model, b = tiny(torch.float64), batch()
    T, w = 4, 0.3
    loss, metrics = Recipe(loop_count=FixedLoops(T), regularizers=[L2Limit(w)]).loss(model, b, 0)
    base, _ = Recipe(loop_count=FixedLoops(T)).loss(model, b, 0)
    term = hand_term(hand_states(model, b.input_ids, T))
    assert metrics["l2_limit"] == pytest.approx(float(term), rel=1e-5)
    torch.testing.assert_close((loss - base).double(), w * term, rtol=1e-4, atol=1e-6)
    params = list(model.layers.parameters())
    got = torch.autograd.grad(loss - base, params)
    want = torch.autograd.grad(w * term, params)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c.to(a.dtype), rtol=1e-4, atol=1e-7)


def test_with_one_step_gradient_only_the_last_loop_learns():
    model, b = tiny(torch.float64), batch()
    T = 3
    recipe = Recipe(loop_count=FixedLoops(T), window=LastLoops(1), regularizers=[L2Limit(1.0)])
    base = Recipe(loop_count=FixedLoops(T), window=LastLoops(1))
    params = list(model.layers.parameters())
    got = torch.autograd.grad(recipe.loss(model, b, 0)[0] - base.loss(model, b, 0)[0], params)
    want = torch.autograd.grad(hand_term(hand_states(model, b.input_ids, T, detach_before=T)), params)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c.to(a.dtype), rtol=1e-4, atol=1e-7)


def test_with_sampled_step_uses_the_sampled_loop():
    model, b = tiny(), batch()
    recipe = Recipe(loop_count=FixedLoops(4), estimator=SampledStep(), regularizers=[L2Limit(1.0)])
    for step in range(6):
        t = recipe.plan(step, 4, batch_size=2).run_loops
        _, metrics = recipe.loss(model, b, step)
        want = 0.0 if t == 1 else float(hand_term(hand_states(model, b.input_ids, t)))
        assert metrics["l2_limit"] == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_single_loop_adds_nothing():
    model, b = tiny(), batch()
    loss, metrics = Recipe(loop_count=FixedLoops(1), regularizers=[L2Limit(5.0)]).loss(model, b, 0)
    base, _ = Recipe(loop_count=FixedLoops(1)).loss(model, b, 0)
    torch.testing.assert_close(loss, base)
    assert metrics["l2_limit"] == 0.0


class LastLoopOnly(ExitWeighted):
    """An estimator that keeps only the last loop (as a user's plugin might)."""

    def plan(self, n_loops, step, seed, batch_size):
        return n_loops, (n_loops,), {}


def test_validate_rejects_estimators_without_the_last_two_loops():
    with pytest.raises(ValueError, match="keeps only loops"):
        Recipe(estimator=LastLoopOnly(), regularizers=[L2Limit()])
    with pytest.raises(ValueError, match="trains only the exit gate"):
        L2Limit().validate(Recipe(estimator=GateTraining(), prior=NoPrior()))


def test_rejects_models_whose_kept_states_are_not_the_carried_ones():
    b = batch()
    for overrides in ({"carry_normed": False}, {"n_coda": 1}):
        model = tiny(**overrides)
        with pytest.raises(ValueError, match="carried states"):
            Recipe(loop_count=FixedLoops(2), regularizers=[L2Limit()]).loss(model, b, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="weight=-1"):
        L2Limit(-1)
