"""Held-out evaluation and the early-exit frontier against a token-by-token recomputation."""

import math

import pytest
import torch

from looplm.config import model_config
from looplm.data import AdditionTask
from looplm.evaluate import evaluate
from looplm.exits import EXIT_RULES, QExit, StateChangeExit, StaticExit, default_rules, loops_to_full_depth
from looplm.model import LoopLM

T = 3


def brute_force_exit(model, traj, b, s, rule) -> int:
    """The exit loop (1-based) of one token, from the definitions in REFERENCE 2."""
    if isinstance(rule, StaticExit):
        return rule.loop
    if isinstance(rule, QExit):
        lam = [torch.sigmoid(model.gate(traj.gate_inputs[t][b, s])).item() for t in range(T)]
        stay, cdf = 1.0, []
        for t in range(T):
            stay *= 1 - lam[t]
            cdf.append(1.0 if t == T - 1 else 1 - stay)
        return next(t for t in range(T) if cdf[t] >= rule.q) + 1
    for t in range(2, T + 1):  # state change: the first t >= 2 whose relative change is below tau
        prev, cur = traj.states[t - 2][b, s].tolist(), traj.states[t - 1][b, s].tolist()
        change = math.dist(cur, prev) / math.hypot(*prev)
        if change < rule.threshold:
            return t
    return T


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    task = AdditionTask(n_eval=24)
    model = LoopLM(model_config("tiny", vocab_size=task.vocab_size, n_loops=T))
    torch.nn.init.normal_(model.gate.weight, std=0.3)  # spread the exit CDFs over the loops (not to 1)
    return task, model


def test_exit_frontier_matches_a_token_by_token_recomputation(setup):
    task, model = setup
    with torch.no_grad():  # thresholds around this model's own state changes, so every branch fires
        traj = model(next(task.eval_batches(24)).input_ids)
        change = ((traj.states[1] - traj.states[0]).norm(dim=-1) / traj.states[0].norm(dim=-1)).median().item()
    rules = [StaticExit(1), StaticExit(3), QExit(0.2), QExit(0.5), QExit(0.8), QExit(1.0),
             StateChangeExit(0.5 * change), StateChangeExit(change), StateChangeExit(2 * change)]
    frontier = evaluate(model, task, max_loops=T, batch_size=10, exit_rules=rules)["exit_frontier"]

    n = len(rules)
    hits, loops, matched, n_tokens, n_units = [0.0] * n, [0.0] * n, [0.0] * n, 0, 0
    with torch.no_grad():
        for batch in task.eval_batches(10):
            traj = model(batch.input_ids)
            for row in range(batch.targets.shape[0]):  # one addition per row: a unit
                positions = torch.nonzero(batch.targets[row] != -100).squeeze(1).tolist()
                for j, rule in enumerate(rules):
                    right = []
                    for s in positions:
                        exit_t = brute_force_exit(model, traj, row, s, rule)
                        pred = model.logits(traj.states[exit_t - 1][row, s]).argmax().item()
                        right.append(pred == batch.targets[row, s].item())
                        loops[j] += exit_t
                    hits[j] += sum(right)
                    matched[j] += all(right)
                n_tokens += len(positions)
                n_units += 1
    for j, point in enumerate(frontier):
        assert (point["rule"], point["threshold"]) == rules[j].label
        assert point["acc"] == pytest.approx(hits[j] / n_tokens, abs=1e-9)
        assert point["exact_match"] == pytest.approx(matched[j] / n_units, abs=1e-9)
        assert point["mean_loops"] == pytest.approx(loops[j] / n_tokens, abs=1e-9)
    q_means = [p["mean_loops"] for p in frontier if p["rule"] == "q_exit"]
    assert q_means == sorted(q_means) and q_means[0] < q_means[-1] <= T
    tau_means = [p["mean_loops"] for p in frontier if p["rule"] == "state_change"]
    assert tau_means == sorted(tau_means, reverse=True) and 2 < tau_means[0] and tau_means[-1] < T


def test_static_frontier_is_the_per_loop_metrics_and_defaults_cover_each_rule(setup):
    task, model = setup
    out = evaluate(model, task, max_loops=2 * T, batch_size=10)
    static = [p for p in out["exit_frontier"] if p["rule"] == "static"]
    assert [p["threshold"] for p in static] == [1.0, 2.0, 3.0]  # loops 1..trained T, not 2T
    for t, point in enumerate(static):
        assert point["acc"] == out["acc"][t] and point["exact_match"] == out["exact_match"][t]
        assert point["mean_loops"] == t + 1
    assert {p["rule"] for p in out["exit_frontier"]} == set(EXIT_RULES.names())
    assert len(out["exit_frontier"]) == len(default_rules(T))
    assert evaluate(model, task, max_loops=T, batch_size=10, exit_rules=())["exit_frontier"] == []


@pytest.mark.parametrize("bad", [lambda: StaticExit(0), lambda: QExit(1.5), lambda: StateChangeExit(-0.1)])
def test_rules_reject_bad_settings(bad):
    with pytest.raises(ValueError, match="must be"):
        bad()


def test_loops_to_full_depth_picks_the_cheapest_point_within_tolerance():
    points = [{"rule": "static", "threshold": t, "acc": a, "mean_loops": t} for t, a in ((1, 0.5), (2, 0.9), (3, 0.95))]
    points += [{"rule": "q_exit", "threshold": q, "acc": a, "mean_loops": m}
               for q, a, m in ((0.1, 0.90, 1.4), (0.5, 0.946, 1.9), (0.9, 0.95, 2.6))]
    points += [{"rule": "state_change", "threshold": 0.5, "acc": 0.8, "mean_loops": 2.0}]
    assert loops_to_full_depth(points, tolerance=0.005) == {"static": 3, "q_exit": 1.9, "state_change": None}
    assert loops_to_full_depth(points, tolerance=0.05) == {"static": 2, "q_exit": 1.4, "state_change": None}
