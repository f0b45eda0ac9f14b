"""variants.step_proposals and variants.step_weightings: the CLTS curriculum written out with
python floats (and easy-first-then-last over training), Min-SNR weights by hand, the improvement
proposal's EMAs, and that state learned from a step changes once per optimizer step."""

import math

import pytest
import torch

from looplm.recipe import FixedLoops, Recipe
from test_variants_sampled_step import batch, tiny
from variants.sampled_step import CLTSProposal, ImprovementProposal, MinSNRWeighting, SampledStep


def clts_reference(T, s, a_max, focus_frac, sigma_start, sigma_end, floor):
    """The documented CLTS schedule written out with python floats."""
    r = min(1.0, max(0.0, (s - focus_frac) / (1 - focus_frac)))
    a, mu = a_max * min(1.0, s / focus_frac), 1 + (T - 1) * r
    sigma = sigma_start + (sigma_end - sigma_start) * s
    dens = [math.exp(-((t - mu) ** 2) / (2 * sigma * sigma)) for t in range(1, T + 1)]
    g = [d / sum(dens) for d in dens]
    return [(1 - floor) * ((1 - a) / T + a * gt) + floor / T for gt in g]


def test_clts_schedule():
    T, total = 8, 1000
    prop = CLTSProposal(total_steps=total, a_max=1.0, focus_frac=0.2, sigma_start=3.0, sigma_end=0.3, floor=0.02)
    for step in (0, 100, 200, 250, 500, 750, 1000, 5000):
        q = prop.probs(T, step)
        s = min(1.0, step / total)
        want = torch.tensor(clts_reference(T, s, 1.0, 0.2, 3.0, 0.3, 0.02), dtype=torch.float64)
        torch.testing.assert_close(q, want)
        assert float(q.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float(q.min()) >= 0.02 / T - 1e-15  # full support through the floor
    torch.testing.assert_close(prop.probs(T, 0), torch.full((T,), 1 / T, dtype=torch.float64))


@pytest.mark.parametrize("T, kwargs", [(4, {}), (8, dict(a_max=1.0, floor=0.02)), (3, {})])
def test_clts_goes_easy_first_then_to_the_last_loops(T, kwargs):
    """Issue 17: the mean loop under q starts uniform, falls to <= 1.5 (the first loops) while
    the focus rises, then climbs monotonically to >= T - 0.5 (the last loops)."""
    total = 1000
    prop = CLTSProposal(total_steps=total, **kwargs)
    loops = torch.arange(1, T + 1, dtype=torch.float64)
    means = [float((prop.probs(T, step) * loops).sum()) for step in range(0, total + 1, 10)]
    assert means[0] == pytest.approx((T + 1) / 2)
    low = means.index(min(means))
    assert min(means) <= 1.5 and low * 10 <= 0.15 * total, (min(means), low)
    assert all(a >= b - 1e-12 for a, b in zip(means[:low], means[1:low + 1]))  # down to the first loops
    assert all(a <= b + 1e-12 for a, b in zip(means[low:], means[low + 1:]))  # then up to the last
    assert means[-1] >= T - 0.5
    assert int(prop.probs(T, total).argmax()) == T - 1


def test_clts_rejects_a_bad_focus_fraction():
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="focus_frac"):
            CLTSProposal(total_steps=10, focus_frac=bad)


def test_min_snr_weights_by_hand():
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    sched = MinSNRWeighting(gamma=2.0, snr="schedule", s0=1.0)
    raw = [1.0, 1.0, 2 / 3, 2 / 4]  # min(t, 2) / t
    norm = sum(qt * r for qt, r in zip(q.tolist(), raw))
    torch.testing.assert_close(sched.weights(q, 4), torch.tensor([r / norm for r in raw], dtype=torch.float64))
    assert float((q * sched.weights(q, 4)).sum()) == pytest.approx(1.0)

    ema = MinSNRWeighting(gamma=5.0, snr="ema", ema_decay=0.5)
    torch.testing.assert_close(ema.weights(q, 4), torch.ones(4, dtype=torch.float64))  # nothing observed
    ema.observe(1, 0.1)   # SNR 10 -> capped: raw 0.5
    ema.observe(2, 2.0)   # SNR 0.5 -> raw 1
    ema.observe(2, 1.0)   # EMA 0.5 * 2 + 0.5 * 1 = 1.5 -> SNR 2/3 -> raw 1
    ema.observe(3, 0.4)   # SNR 2.5 -> raw 1
    ema.observe(3, 0.0)   # EMA 0.2 -> SNR 5 -> raw 1
    ema.observe(4, 0.1)
    ema.observe(4, 0.0)   # EMA 0.05 -> SNR 20 -> raw 0.25
    assert ema.ema == pytest.approx({1: 0.1, 2: 1.5, 3: 0.2, 4: 0.05})
    raw = [0.5, 1.0, 1.0, 0.25]
    norm = sum(qt * r for qt, r in zip(q.tolist(), raw))
    torch.testing.assert_close(ema.weights(q, 4), torch.tensor([r / norm for r in raw], dtype=torch.float64))
    assert float((q * ema.weights(q, 4)).sum()) == pytest.approx(1.0)


def test_improvement_proposal_follows_the_loops_still_improving():
    prop = ImprovementProposal(fast_decay=0.5, slow_decay=0.9, floor=0.2)
    torch.testing.assert_close(prop.probs(4, 0), torch.full((4,), 0.25, dtype=torch.float64))
    series = {1: [2.0, 2.0, 2.0, 2.0], 2: [3.0, 2.0, 1.0, 0.5], 3: [1.0, 0.9, 0.9, 0.9]}  # loop 4 unseen
    ema = {}
    for i in range(4):
        for t, values in series.items():
            prop.observe(t, values[i])
            ce = values[i]  # the same EMAs written out with python floats
            fast, slow = ema.get(t, (ce, ce))
            ema[t] = (ce, ce) if t not in ema else (0.5 * fast + 0.5 * ce, 0.9 * slow + 0.1 * ce)
    progress = {t: max(0.0, slow - fast) / slow for t, (fast, slow) in ema.items()}
    progress[4] = max(progress.values())  # unseen: explored at the best observed progress
    total = sum(progress.values())
    want = [0.2 / 4 + 0.8 * progress[t] / total for t in range(1, 5)]
    q = prop.probs(4, 0)
    torch.testing.assert_close(q, torch.tensor(want, dtype=torch.float64))
    assert q[1] == q[3] > q[2] > q[0] == 0.2 / 4  # flat loop 1 keeps only the floor
    restored = ImprovementProposal(fast_decay=0.5, slow_decay=0.9, floor=0.2)
    restored.load_state_dict(prop.state_dict())
    torch.testing.assert_close(restored.probs(4, 0), q)


def test_improvement_proposal_learns_from_the_sampled_loops_in_training():
    model, b = tiny(), batch()
    est = SampledStep(proposal=ImprovementProposal())
    recipe = Recipe(loop_count=FixedLoops(4), estimator=est)
    sampled = set()
    for step in range(8):
        before = {t: list(v) for t, v in est.proposal.ema.items()}
        sampled.add(recipe.loss(model, b, step)[1]["sampled_loop"])
        assert est.proposal.ema == before  # this step's loop is observed at the step's end
        est.end_step()
    assert set(est.proposal.ema) == sampled


@pytest.mark.parametrize("kwargs", [dict(fast_decay=0.99, slow_decay=0.9), dict(floor=0.0)])
def test_improvement_proposal_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="ImprovementProposal"):
        ImprovementProposal(**kwargs)


def test_state_changes_once_per_optimizer_step_from_all_micro_batches():
    """Issue 14: with two micro-batches the second draws the same loop as the first (q does not
    move within the step), and the EMAs move once, by the token-weighted mean of both CEs."""
    model = tiny()
    est = SampledStep(proposal=ImprovementProposal(fast_decay=0.5, slow_decay=0.9),
                      weighting=MinSNRWeighting(ema_decay=0.5))
    recipe = Recipe(loop_count=FixedLoops(4), estimator=est)
    micro = [batch(B=2, seed=1), batch(B=3, seed=2)]
    for step in range(6):
        q_before = est.proposal.probs(4, step).clone()
        ema_before = dict(est.weighting.ema)
        out = [recipe.loss(model, b, step)[1] for b in micro]
        assert out[0]["sampled_loop"] == out[1]["sampled_loop"]  # the same t in both micro-batches
        assert dict(est.weighting.ema) == ema_before  # nothing moves before the step ends
        torch.testing.assert_close(est.proposal.probs(4, step), q_before)
        t = int(out[0]["sampled_loop"])
        n = [int((b.targets != -100).sum()) for b in micro]
        mean_ce = (out[0]["sampled_ce"] * n[0] + out[1]["sampled_ce"] * n[1]) / sum(n)
        est.end_step()
        old = ema_before.get(t)
        want = mean_ce if old is None else 0.5 * old + 0.5 * mean_ce
        assert est.weighting.ema[t] == pytest.approx(want, rel=1e-6)


def test_the_trainer_ends_every_step_once(tmp_path):
    """train() calls end_step once per optimizer step, after all micro-batches."""
    from looplm.data import AdditionTask
    from looplm.train import train

    calls = []

    class Counting(ImprovementProposal):
        def observe(self, loop, ce):
            calls.append(loop)
            super().observe(loop, ce)

    est = SampledStep(proposal=Counting())
    train(task=AdditionTask(n_digits=2), recipe=Recipe(estimator=est), run_dir=str(tmp_path), steps=3,
          batch_size=4, grad_accum=2, eval_every=100, checkpoint_every=100, eval_max_batches=1,
          eval_batch_size=8, progress=False)
    assert len(calls) == 3  # one observation per step (one loop drawn per step), not per micro-batch
