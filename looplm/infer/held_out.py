"""Held-out accuracy of generation, by exit rule: every held-out answer is
generated greedily from its prompt (or, teacher forced, each of its tokens predicted from the true
ones before it) with the rule deciding each token's exit (and skipping the
loops after it), and scored by exact match and token accuracy, with tokens/s and the mean loops
actually computed. Unlike looplm.evaluate (teacher forcing, all loops run, the rule selects) this
measures what serving the model costs and what the skipped loops' copied KV entries lose.

A unit is one supervised answer: for a task with answers (addition, Mano, multi-hop) the prompt
is the unit's tokens up to the first supervised position; for text (supervised from the first
token) the first half of the row prompts the second half.
"""

from dataclasses import dataclass

import torch

from looplm.data.batch import IGNORE_INDEX
from looplm.exits import EXIT_RULES
from looplm.infer.generate import generate
from looplm.infer.load import RunError


@dataclass
class Unit:
    prompt: list
    answer: list


def held_out_units(task, max_units: int | None = None, batch_size: int = 256) -> list[Unit]:
    units = []
    for batch in task.eval_batches(batch_size):
        docs = torch.zeros_like(batch.input_ids) if batch.doc_ids is None else batch.doc_ids
        for row in range(batch.input_ids.shape[0]):
            for doc in torch.unique(docs[row]).tolist():
                cols = torch.nonzero(docs[row] == doc).squeeze(1)
                ids, targets = batch.input_ids[row, cols], batch.targets[row, cols]
                supervised = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
                if supervised.numel() == 0:
                    continue
                first = int(supervised[0]) if supervised[0] > 0 else len(cols) // 2
                answer = targets[first:][targets[first:] != IGNORE_INDEX]
                units.append(Unit(ids[:first + 1].tolist(), answer.tolist()))
                if max_units is not None and len(units) >= max_units:
                    return units
    return units


def parse_rule(text: str):
    """`name=value` (e.g. q_exit=0.9, static=2, state_change=0.25) as an exit rule; "all" is
    None (every loop)."""
    if text == "all":
        return None
    name, _, value = text.partition("=")
    if not value:
        raise RunError(f"--rule {text!r}: write NAME=VALUE (names: {sorted(EXIT_RULES._entries)}) or 'all'")
    try:
        cls = EXIT_RULES.get(name)
        number = int(value) if value.lstrip("-").isdigit() else float(value)
        return cls(number)
    except ValueError as error:
        raise RunError(f"--rule {text!r}: {error}") from None


def score(model, units: list[Unit], rule, n_loops: int, batch_size: int, cache: str = "per_loop",
          skip: bool = True, schedule: str = "lockstep", teacher_forced: bool = False) -> dict:
    """Exact match, token accuracy, mean loops computed and tokens/s of greedy answers, `batch_size`
    decoding at once: in batches (lockstep), or as a queue over that many slots (staggered).
    teacher_forced: every step is fed the answer's true token (the decode path, its cache and
    skipped loops unchanged), so token accuracy is next-token accuracy, not diverging text's."""
    exact = correct = n_tokens = loops = generated = 0
    seconds = 0.0
    for start in range(0, len(units), batch_size if schedule == "lockstep" else len(units)):
        chunk = units[start:start + batch_size] if schedule == "lockstep" else units
        width = max(len(u.answer) for u in chunk)
        out = generate(model, [u.prompt for u in chunk], width, exit_rule=rule, n_loops=n_loops,
                       cache=cache, skip=skip, schedule=schedule, slots=batch_size,
                       forced=[u.answer for u in chunk] if teacher_forced else None)
        for unit, new in zip(chunk, out.tokens):
            hits = [a == b for a, b in zip(new, unit.answer)]
            exact += all(hits) and len(new) >= len(unit.answer)
            correct += sum(hits)
            n_tokens += len(unit.answer)
        loops += out.loops_computed
        seconds += out.seconds
        generated += out.n_tokens
    return {"exact_match": exact / len(units), "token_acc": correct / max(n_tokens, 1),
            "mean_loops": loops / max(generated, 1), "tokens_per_s": generated / seconds if seconds else 0.0}
