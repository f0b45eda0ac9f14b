"""Held-out evaluation: per-loop loss, accuracy and exact match, at and beyond the trained depth.

Loop t's state does not depend on how many loops follow it, so one forward pass of `max_loops`
loops yields the metrics of every loop count 1..max_loops (depth extrapolation included).
"""

import torch

from looplm.data.batch import IGNORE_INDEX, exact_match
from looplm.objectives import entropy, log_exit_probs, q_exit_loop


def _held_out_passes(model, task, n_loops: int, batch_size: int, max_batches: int | None):
    """(batch, trajectory, supervised mask) of each held-out batch, the model in eval mode
    meanwhile (its training mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(task.eval_batches(batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            batch = batch.to(model.embed.weight.device)
            traj = model(batch.input_ids, n_loops=n_loops, doc_ids=batch.doc_ids)
            yield batch, traj, batch.targets != IGNORE_INDEX
    finally:
        model.train(was_training)


def _gate_logits(model, traj, n_loops: int) -> torch.Tensor:
    return torch.stack([model.exit_logits(traj.gate_inputs[t]) for t in range(n_loops)], -1)


@torch.no_grad()
def evaluate(model, task, max_loops: int, batch_size: int = 256, max_batches: int | None = None) -> dict:
    """Metrics lists are indexed by loop - 1; exit statistics use the model's trained T."""
    T = min(model.cfg.n_loops, max_loops)
    ce = torch.zeros(max_loops, dtype=torch.float64)
    correct = torch.zeros(max_loops, dtype=torch.float64)
    matched = torch.zeros(max_loops, dtype=torch.float64)
    exit_p = torch.zeros(T, dtype=torch.float64)
    exit_entropy = 0.0
    n_tokens = n_units = 0
    for batch, traj, mask in _held_out_passes(model, task, max_loops, batch_size, max_batches):
        for t in range(max_loops):
            loop_ce, loop_correct = model.token_loss(traj.states[t], batch.targets)
            ce[t] += loop_ce.sum().item()
            correct[t] += loop_correct.sum().item()
            units = exact_match(loop_correct, batch)
            matched[t] += units.sum().item()
        n_units += units.numel()
        n_tokens += mask.sum().item()
        log_p = log_exit_probs(_gate_logits(model, traj, T))[mask]
        exit_p += log_p.exp().sum(0).double().cpu()
        exit_entropy += entropy(log_p).sum().item()
    n_tokens, n_units = max(n_tokens, 1), max(n_units, 1)
    exit_p /= n_tokens
    return {"ce": (ce / n_tokens).tolist(), "acc": (correct / n_tokens).tolist(),
            "exact_match": (matched / n_units).tolist(), "exit_p": exit_p.tolist(),
            "exit_mean": float((exit_p * torch.arange(1, T + 1)).sum()),
            "entropy": exit_entropy / n_tokens}


@torch.no_grad()
def q_exit_frontier(model, task, qs=(0.1, 0.3, 0.5, 0.7, 0.9, 1.0), batch_size: int = 256,
                    max_batches: int | None = None) -> list[dict]:
    """Accuracy against compute under Ouro's Q-exit: for each q, every token exits at the first
    loop whose exit CDF reaches q (looplm.objectives.q_exit_loop) and is scored there.

    Returns one dict per q: token accuracy at the exit loop and the mean exit loop, over supervised
    tokens, at the model's trained T. Comparing the frontier before and after Stage II shows what
    the gate training buys (Ouro, Figure 5)."""
    T = model.cfg.n_loops
    correct_sum = torch.zeros(len(qs), dtype=torch.float64)
    loops_sum = torch.zeros(len(qs), dtype=torch.float64)
    n_tokens = 0
    for batch, traj, mask in _held_out_passes(model, task, T, batch_size, max_batches):
        correct = torch.stack([model.token_loss(traj.states[t], batch.targets)[1] for t in range(T)], -1)
        gates = _gate_logits(model, traj, T)
        for j, q in enumerate(qs):
            exit_loop = q_exit_loop(gates, q)  # (B, S), 1-based
            at_exit = correct.gather(-1, (exit_loop - 1).unsqueeze(-1)).squeeze(-1)
            correct_sum[j] += at_exit[mask].sum().item()
            loops_sum[j] += exit_loop[mask].sum().item()
        n_tokens += mask.sum().item()
    n_tokens = max(n_tokens, 1)
    return [{"q": q, "acc": float(correct_sum[j] / n_tokens), "mean_loops": float(loops_sum[j] / n_tokens)}
            for j, q in enumerate(qs)]
