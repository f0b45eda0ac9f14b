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
from pathlib import Path

from looplm import checkpoint

EXISTING = ("resume", "extend", "overwrite")
STEP_KEYS = frozenset({"train.steps", "gin: TRAIN_STEPS", "gin: train.steps"})
RESULT_FILES = ("config.gin", "summary.json")


class RunDirError(ValueError):
    """The folder holds a run this start may not continue."""


class AlreadyComplete(Exception):
    """The folder holds this very run, finished: the caller reports it and trains nothing."""

    def __init__(self, state: dict):
        super().__init__(f"complete at step {state['step']}")
        self.state = state


def differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting that differs (a missing one shows as <unset>)."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}"
            for k in keys if old.get(k) != new.get(k)]


def open_run(run_dir: Path, config: dict, steps: int, existing: str, say) -> dict | None:
    """The checkpoint state to resume from, or None to start fresh; raises RunDirError or
    AlreadyComplete. `config` is the flat settings dict of this start; `say` prints a warning."""
    if existing not in EXISTING:
        raise RunDirError(f"existing={existing!r}; choose one of {EXISTING}")
    path = run_dir / checkpoint.CHECKPOINT_NAME
    if existing == "overwrite":
        for name in (checkpoint.CHECKPOINT_NAME, *RESULT_FILES):
            (run_dir / name).unlink(missing_ok=True)
        return None
    checkpoint.remove_stale_temporaries(run_dir)
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
