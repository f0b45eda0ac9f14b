"""A finished (or checkpointed) run folder as a model and its task: config.gin rebuilds the task
and model config exactly as trained, checkpoint.pt gives the weights. Plus text <-> token ids
through whatever the task offers (its encode, its tokenizer, or its vocabulary)."""

import re
from pathlib import Path

import torch

from looplm import checkpoint
from looplm.model import LoopLM


class RunError(ValueError):
    """A run folder, prompt or option that cannot be used; the message names it."""


def load_run(run_dir, device: str = "cpu"):
    """(model in eval mode, task) of the run in `run_dir`."""
    from looplm.run import parse_config  # the trainer's own config reading
    from looplm.train import train

    run_dir = Path(run_dir)
    config, weights = run_dir / "config.gin", run_dir / checkpoint.CHECKPOINT_NAME
    for path in (config, weights):
        if not path.is_file():
            raise RunError(f"{path} does not exist: RUN_DIR must be a run folder (train.run_dir) "
                           "holding config.gin and checkpoint.pt")
    try:
        parse_config([str(config)], [])
        built = train(dry_run=True)
    except Exception as error:  # gin wraps errors of any type
        raise RunError(f"{config} cannot be read back: {error}") from None
    state = checkpoint.load(weights, require=("model",))
    model = LoopLM(built["model"])
    checkpoint.check_model_state(model, state, weights)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), built["task"]


def encode(task, text: str) -> list[int]:
    """Token ids of `text` for `task`: its encode(), its tokenizer, or space-separated vocabulary."""
    if hasattr(task, "encode"):
        try:
            ids = task.encode(text)
        except ValueError:
            raise RunError(f"prompt {text!r} holds characters outside {type(task).__name__}'s "
                           f"vocabulary") from None
    elif hasattr(task, "tokenizer"):
        ids = task.tokenizer.encode(text, add_special_tokens=False)
    else:
        vocab = {token: i for i, token in enumerate(task.vocab)}
        unknown = [w for w in text.split() if w not in vocab]
        if unknown:
            raise RunError(f"prompt token {unknown[0]!r} is not in {type(task).__name__}'s vocabulary "
                           f"(tokens are space separated, e.g. {' '.join(task.vocab[:4])})")
        ids = [vocab[w] for w in text.split()]
    if not ids:
        raise RunError(f"prompt {text!r} encodes to no tokens")
    return ids


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """Token ids given as text, e.g. "3 14 15" or "3,14,15"."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise RunError(f"--ids {text!r}: give token ids as integers separated by spaces or commas")
    ids = [int(p) for p in parts]
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise RunError(f"--ids holds token {bad[0]}: the model's vocabulary is 0..{vocab_size - 1}")
    return ids


def set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise RunError(f"--threads={n} must be >= 1")
        torch.set_num_threads(n)
