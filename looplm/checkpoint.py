"""Atomic checkpoints: everything a run needs to continue exactly where it stopped.

A run of several ranks keeps the model and optimizer tensors as shards in a folder beside the
file (looplm.dist.state), which the file names under "shards"; `load` puts them back whole when a
caller requires "model" or "optimizer", so a reader never needs to know how the run was trained.

Checkpoints are read with `torch.load(weights_only=True)`: a file that would need to run code to
load (a pickle naming a function or class outside torch's allow-list) is refused, and nothing in it
runs. looplm's own checkpoints hold only tensors and Python primitives, so they need no allow-list.
"""

import os
import random
import re
from dataclasses import asdict
from pathlib import Path

import torch

from looplm.dist import shards

CHECKPOINT_NAME = "checkpoint.pt"
# the two folders sharded saves alternate between (the one checkpoint.pt names is never written)
SHARD_FOLDERS = ("checkpoint-shards-a", "checkpoint-shards-b")
_TEMPORARY = re.compile(rf"^\.{re.escape(CHECKPOINT_NAME)}\.tmp-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, unsafe to load, or of another model."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save(path: Path, state: dict) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over the old
    checkpoint: a crash at any moment leaves either the old or the new one, never half of one."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, require: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint at `path` (None if there is none), read safely; `require` names the entries
    the caller needs (e.g. "model"). Raises CheckpointError, naming the file, if it is truncated,
    corrupt, not a checkpoint, lacks a required entry, or would run code to load."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... on bad bytes
        message = str(error)
        refused = next((line.strip() for line in message.splitlines() if "global" in line.lower()), None)
        if "Weights only load failed" in message and refused:  # else: bytes that are no pickle at all
            raise CheckpointError(f"checkpoint {str(path)!r} refused: loading it would run code ({refused}); "
                                  "looplm loads only tensors and plain Python values "
                                  "(torch.load(weights_only=True))") from None
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        first = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line),
                     lines[0] if lines else "no detail")
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt, or not a torch "
                              f"checkpoint ({type(error).__name__}: {first[:200]}); delete it or "
                              "point to another one") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a "
                              "checkpoint dict")
    if "shards" in state and any(key in ("model", "optimizer") and key not in state for key in require):
        state |= _whole(path, state)
    missing = [key for key in require if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing} (it holds {sorted(state)}); "
                              "it was not written by looplm's trainer")
    return state


def _whole(path: Path, state: dict) -> dict:
    """{"model", "optimizer"} of a sharded checkpoint, as full tensors on the CPU."""
    folder = path.parent / str(state["shards"])
    try:
        return shards.unflatten(shards.read_full(folder), state.get("sharded_rest", {}))
    except (ValueError, RuntimeError, OSError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} names the shard folder {str(folder)!r}, which "
                              f"cannot be read ({type(error).__name__}: {str(error)[:300]})") from None


def shard_folders(run_dir) -> list[Path]:
    """Every shard folder a run folder may hold, and their temporaries."""
    return [Path(run_dir) / f"{prefix}{name}{suffix}" for name in SHARD_FOLDERS
            for prefix, suffix in (("", ""), (".", ".tmp"))]


def resolve(source) -> Path:
    """The checkpoint file of `source`: the file itself, or CHECKPOINT_NAME inside a run folder."""
    source = Path(source)
    return source / CHECKPOINT_NAME if source.is_dir() else source


def _shown(names: list, limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_model_state(model: torch.nn.Module, state: dict, source) -> None:
    """Raise CheckpointError if `state["model"]` does not fit `model` exactly, naming the missing,
    unexpected and wrong-shape tensors and, when the checkpoint records its model config, the
    config fields that differ. Call it before `model.load_state_dict`."""
    saved, own = state["model"], model.state_dict()
    missing = [name for name in own if name not in saved]
    unexpected = [name for name in saved if name not in own]
    wrong = [f"{name} {tuple(saved[name].shape)} in the checkpoint, {tuple(own[name].shape)} here"
             for name in own if name in saved and tuple(saved[name].shape) != tuple(own[name].shape)]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{label} {len(names)}: {_shown(names)}" for label, names in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
    message = f"checkpoint {str(source)!r} is of another model shape: " + "; ".join(parts)
    config = getattr(model, "cfg", None)
    if isinstance(state.get("model_config"), dict) and config is not None:
        mine = asdict(config)
        differ = [f"{k}={v!r} there, {mine[k]!r} here" for k, v in state["model_config"].items()
                  if k in mine and mine[k] != v]
        if differ:
            message += f" (model_config differs: {', '.join(differ)})"
    raise CheckpointError(message)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the `.checkpoint.pt.tmp-PID` files in `folder` whose writer process is gone (a run
    killed mid-save leaves one, as large as a checkpoint); return the paths removed. Files of live
    processes (a concurrent writer) are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)
