"""Held-out evaluation helpers against brute-force recomputation."""

import torch

from looplm.config import model_config
from looplm.data import AdditionTask
from looplm.evaluate import q_exit_frontier
from looplm.model import LoopLM


def test_q_exit_frontier_matches_a_token_by_token_recomputation():
    torch.manual_seed(0)
    task = AdditionTask(n_eval=24)
    model = LoopLM(model_config("tiny", vocab_size=task.vocab_size, n_loops=3))
    torch.nn.init.normal_(model.gate.weight, std=0.3)  # spread the exit CDFs over the loops (not to 1)
    qs = (0.2, 0.5, 0.8, 1.0)
    frontier = q_exit_frontier(model, task, qs, batch_size=10)

    hits, loops, n = [0.0] * len(qs), [0.0] * len(qs), 0
    with torch.no_grad():
        for batch in task.eval_batches(10):
            traj = model(batch.input_ids)
            for b, s in zip(*torch.nonzero(batch.targets != -100, as_tuple=True)):
                lam = [torch.sigmoid(model.gate(traj.gate_inputs[t][b, s])).item() for t in range(3)]
                cdf, stay = [], 1.0
                for t in range(3):
                    stay *= 1 - lam[t]
                    cdf.append(1.0 if t == 2 else 1 - stay)
                for j, q in enumerate(qs):
                    exit_t = next(t for t in range(3) if cdf[t] >= q)
                    pred = model.logits(traj.states[exit_t][b, s]).argmax().item()
                    hits[j] += pred == batch.targets[b, s].item()
                    loops[j] += exit_t + 1
                n += 1
    for j, row in enumerate(frontier):
        assert row["q"] == qs[j]
        assert abs(row["acc"] - hits[j] / n) < 1e-9
        assert abs(row["mean_loops"] - loops[j] / n) < 1e-9
    means = [row["mean_loops"] for row in frontier]
    assert means == sorted(means) and means[0] < means[-1] <= 3
