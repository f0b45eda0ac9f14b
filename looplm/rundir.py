"""A run folder holds one run: what may happen when a run starts in a folder that has one.

    existing="resume"     (default) continue the checkpoint there, only with the same config;
                          a finished run is left as it is (nothing trained, nothing rewritten)
    existing="extend"     the same, but the number of steps may grow (`--resume`): schedules
                          that follow the length (the lr's cosine, curricula) change, and say so
    existing="overwrite"  start over (`--overwrite`): the old checkpoint and results are removed

A different config stops with the list of differences, so a re-run never mixes two configs in
one folder nor overwrites a result with settings it did not train with.
"""

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

from looplm import checkpoint, compose

EXISTING = ("resume", "extend", "overwrite")
STEP_KEYS = frozenset({"train.steps", "gin: TRAIN_STEPS", "gin: train.steps"})
RESULT_FILES = ("config.gin", "summary.json")
# may change between starts of one run: how it is shown, and how it is computed (N ranks compute
# what one process computes, so a checkpoint of one parallel mode resumes in another)
COSMETIC = frozenset({"run_dir", "progress", "log_every", "parallel", "activation_checkpointing"})


class RunDirError(ValueError):
    """The folder holds a run this start may not continue."""


class AlreadyComplete(Exception):
    """The folder holds this very run, finished: the caller reports it and trains nothing."""

    def __init__(self, state: dict):
        super().__init__(f"complete at step {state['step']}")
        self.state = state


def simple(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, (tuple, list)) and all(simple(v) for v in value))


def run_config(settings: dict, cfg, recipe, task) -> dict:
    """The flat settings a run is defined by, compared when a run folder is reused."""
    flat = {f"train.{k}": repr(v) for k, v in settings.items() if k not in COSMETIC}
    flat |= {f"model.{k}": repr(v) for k, v in asdict(cfg).items()}
    flat |= {f"recipe.{k}": v for k, v in recipe.describe().items()}
    flat["task"] = type(task).__name__ + repr({k: v for k, v in sorted(vars(task).items())
                                               if simple(v) and not k.startswith("_")})
    flat |= {f"gin: {k}": v for k, v in compose.bindings_in_force().items()
             if k.removeprefix("train.") not in COSMETIC}
    return flat


def differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting that differs (a missing one shows as <unset>)."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}"
            for k in keys if old.get(k) != new.get(k)]


def prepare(run_dir: Path, existing: str) -> None:
    """What one process (rank 0) does to the folder before any reads it: create it, remove a
    killed writer's temporaries, and for "overwrite" the old run."""
    if existing not in EXISTING:
        raise RunDirError(f"existing={existing!r}; choose one of {EXISTING}")
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_stale_temporaries(run_dir)
    if existing == "overwrite":
        for name in (checkpoint.CHECKPOINT_NAME, *RESULT_FILES):
            (run_dir / name).unlink(missing_ok=True)
        for folder in checkpoint.shard_folders(run_dir):
            shutil.rmtree(folder, ignore_errors=True)


def open_run(run_dir: Path, config: dict, steps: int, existing: str, say) -> dict | None:
    """The checkpoint state to resume from, or None to start fresh; raises RunDirError or
    AlreadyComplete. Reads only (every rank calls it, after `prepare`). `config` is the flat
    settings dict of this start; `say` prints a warning."""
    if existing == "overwrite":
        return None
    path = run_dir / checkpoint.CHECKPOINT_NAME
    state = checkpoint.load(path)
    if state is None:
        if _finished_result(run_dir):
            raise RunDirError(f"{run_dir} holds the summary.json of a finished run but no checkpoint:"
                              " this start would overwrite it; use another train.run_dir or --overwrite")
        return None
    saved = state.get("config")
    if saved is None:
        raise RunDirError(f"{path} records no config (written by an older looplm), so resuming "
                          "cannot check it is the same run; --overwrite starts over")
    diff = differences(saved, config)
    changed = {k for k in set(saved) | set(config) if saved.get(k) != config.get(k)}
    if diff and not (existing == "extend" and changed <= STEP_KEYS):
        hint = ("--resume continues with a new length only; " if existing == "extend" else "")
        raise RunDirError(f"{run_dir} holds a run with another config ({len(diff)} difference"
                          f"{'s' * (len(diff) != 1)}):\n  " + "\n  ".join(diff)
                          + f"\n{hint}use the same config, another train.run_dir, or --overwrite")
    if diff:
        if steps < state["step"]:
            raise RunDirError(f"--resume to {steps} steps, but {run_dir} has trained {state['step']}")
        followers = sorted(k.removeprefix("gin: ") for k, v in config.items() if v == "%TRAIN_STEPS")
        say(f"warning: the run length changes ({'; '.join(diff)}): the learning-rate schedule "
            + (f"and {', '.join(followers)} " if followers else "")
            + f"follow the new length from step {state['step']} on")
    elif state["step"] >= steps:
        raise AlreadyComplete(state)
    return state


def _finished_result(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("status", "complete") == "complete"
    except (json.JSONDecodeError, AttributeError):
        return True  # unreadable: keep it rather than guess


def write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json as strict JSON: a non-finite number becomes null and is listed under
    "nonfinite" (json.dumps would write the bare NaN that JSON parsers reject)."""
    bad = []

    def clean(value, where):
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(where)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(summary, "")
    cleaned["nonfinite"] = bad
    (run_dir / "summary.json").write_text(json.dumps(cleaned, allow_nan=False))
