"""Held-out evaluation: per-loop loss, accuracy and exact match, at and beyond the trained depth.

Loop t's state does not depend on how many loops follow it, so one forward pass of `max_loops`
loops yields the metrics of every loop count 1..max_loops (depth extrapolation included).
"""

import torch

from looplm.data.batch import IGNORE_INDEX, exact_match
from looplm.exits import default_rules
from looplm.objectives import entropy, log_exit_probs


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


@torch.no_grad()
def evaluate(model, task, max_loops: int, batch_size: int = 256, max_batches: int | None = None,
             exit_rules: list | None = None) -> dict:
    """Metrics lists are indexed by loop - 1; exit statistics use the model's trained T.

    "exit_frontier" scores every token at the loop each early-exit rule picks (looplm.exits;
    default_rules(T) unless `exit_rules` is given, () for none): one dict per rule with its name
    and threshold, token accuracy, exact match and the mean exit loop, over loops 1..T.

    A task may add metrics of its own: `task.eval_metric(model, max_loops)` returns an object whose
    `add(loop, ce, batch)` sees each loop's per-token cross-entropy (nats, (B, S), 0 where no
    target; loop 0-based) on every held-out batch and whose `result()` returns more entries
    (floats, or per-loop lists), logged and summarised like the others (knowledge bits:
    looplm.data.biographies)."""
    T = min(model.cfg.n_loops, max_loops)
    extra = task.eval_metric(model, max_loops) if hasattr(task, "eval_metric") else None
    rules = default_rules(T) if exit_rules is None else list(exit_rules)
    ce = torch.zeros(max_loops, dtype=torch.float64)
    correct = torch.zeros(max_loops, dtype=torch.float64)
    matched = torch.zeros(max_loops, dtype=torch.float64)
    exit_p = torch.zeros(T, dtype=torch.float64)
    at_exit = torch.zeros(len(rules), 3, dtype=torch.float64)  # correct, matched, exit loops
    exit_entropy = 0.0
    n_tokens = n_units = 0
    for batch, traj, mask in _held_out_passes(model, task, max_loops, batch_size, max_batches):
        loop_correct = []
        for t in range(max_loops):
            loop_ce, hit = model.token_loss(traj.states[t], batch.targets)
            ce[t] += loop_ce.sum().item()
            correct[t] += hit.sum().item()
            units = exact_match(hit, batch)
            matched[t] += units.sum().item()
            loop_correct.append(hit)
            if extra is not None:
                extra.add(t, loop_ce, batch)
        n_units += units.numel()
        n_tokens += mask.sum().item()
        gates = torch.stack([model.exit_logits(traj.gate_inputs[t]) for t in range(T)], -1)
        log_p = log_exit_probs(gates)[mask]
        exit_p += log_p.exp().sum(0).double().cpu()
        exit_entropy += entropy(log_p).sum().item()
        hits = torch.stack(loop_correct[:T], -1)
        for j, rule in enumerate(rules):
            loops = rule.exit_loops(gates, traj.states[:T])
            hit = hits.gather(-1, (loops - 1).unsqueeze(-1)).squeeze(-1)
            at_exit[j] += torch.tensor([hit[mask].sum().item(), exact_match(hit, batch).sum().item(),
                                        loops[mask].sum().item()], dtype=torch.float64)
    n_tokens, n_units = max(n_tokens, 1), max(n_units, 1)
    exit_p /= n_tokens
    frontier = [{"rule": rule.label[0], "threshold": rule.label[1], "acc": float(a / n_tokens),
                 "exact_match": float(m / n_units), "mean_loops": float(n / n_tokens)}
                for rule, (a, m, n) in zip(rules, at_exit)]
    scores = {"ce": (ce / n_tokens).tolist(), "acc": (correct / n_tokens).tolist(),
              "exact_match": (matched / n_units).tolist(), "exit_p": exit_p.tolist(),
              "exit_mean": float((exit_p * torch.arange(1, T + 1)).sum()),
              "entropy": exit_entropy / n_tokens, "exit_frontier": frontier}
    if extra is not None:
        added = extra.result()
        if set(added) & set(scores):
            raise ValueError(f"{type(task).__name__}.eval_metric returns {sorted(set(added) & set(scores))}, "
                             f"names evaluate() already uses")
        scores |= added
    return scores
