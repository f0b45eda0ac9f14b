"""Runs that cannot lie: non-finite values stop at their step with the last good checkpoint kept,
summary.json is strict JSON, a run folder is resumed only with its own config, stale temporaries
go, Ctrl-C saves and exits with one line, and eight runs starting at once into a new Aim repo all
log."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import pytest
import torch

from looplm import checkpoint
from looplm.config import model_config
from looplm.data import AdditionTask
from looplm.hooks import Readouts, Regularizer
from looplm.nonfinite import NonFiniteError
from looplm.recipe import Recipe
from looplm.rundir import RunDirError
from looplm.run import main
from looplm.tracking import open_repo
from looplm.train import NONFINITE_EXIT_CODE, train

TINY = dict(preset="tiny", d_model=32, n_layers=1, n_heads=2, d_ff=64, n_loops=3)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    gin.bind_parameter("build_optimizer.lr", 3e-3)
    gin.bind_parameter("lr_multiplier.warmup_steps", 1)  # below the shortest run here (a count must be)
    yield
    gin.clear_config()


def run(run_dir, steps=6, **kw):
    args = dict(task=AdditionTask(n_eval=32), model_config=model_config(**TINY), run_dir=str(run_dir),
                steps=steps, batch_size=8, eval_every=1000, checkpoint_every=2, eval_batch_size=32,
                progress=False, seed=1)
    return train(**(args | kw))


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def assert_finite_checkpoint(run_dir: Path, step: int):
    state = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)
    assert state["step"] == step
    assert all(torch.isfinite(t).all() for t in state["model"].values())


class PoisonedRecipe(Recipe):
    """Stage I with the loss multiplied by `value` from step `at` on."""

    def __init__(self, at, value, until=None):
        super().__init__()
        self.at, self.value, self.until = at, value, until

    def loss(self, model, batch, step, **where):
        loss, metrics = super().loss(model, batch, step, **where)
        if self.at <= step < (self.until or math.inf):
            loss = loss * self.value
        return loss, metrics


class NaNGradient(Regularizer):
    """Adds 0 * sqrt(0): a zero value whose gradient is NaN, from step 3 on."""

    def apply(self, loss, model, traj, batch, step, seed):
        if step < 3:
            return loss, {}
        zero = traj.states[-1].sum() * 0
        return loss + 0 * torch.sqrt(zero), {}


def poison_loop_ce(monkeypatch, loop: int, from_call: int):
    original, calls = Readouts.weighted_ce, []

    def patched(self, loops, coeffs):
        ce, correct, carrier = original(self, loops, coeffs)
        calls.append(1)
        if len(calls) > from_call:
            ce = ce.clone()
            ce[..., loop - 1] = math.nan
            carrier = carrier + math.nan
        return ce, correct, carrier

    monkeypatch.setattr(Readouts, "weighted_ce", patched)


def poison_embedding(monkeypatch, from_call: int):
    original, calls = torch.nn.Embedding.forward, []

    def patched(self, ids):
        calls.append(1)
        out = original(self, ids)
        return out * math.nan if len(calls) > from_call else out

    monkeypatch.setattr(torch.nn.Embedding, "forward", patched)


@pytest.mark.parametrize("case, message", [
    ("nan loss", r"step 3: non-finite loss"),
    ("inf loss", r"step 3: non-finite loss \(loss=inf"),
    ("nan in one loop's CE", r"step 3: non-finite loss .*ce at loop 2 = nan"),
    ("nan gradient", r"step 3: non-finite gradient norm .*non-finite gradient in "),
    ("nan embedding", r"step 3: non-finite loss .*ce at loops 1, 2, 3 = nan"),
    ("lr 1e6", r"step \d+: non-finite"),
])
def test_a_nonfinite_value_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, case, message):
    kw = {}
    if case == "nan loss":
        kw["recipe"] = PoisonedRecipe(3, math.nan)
    elif case == "inf loss":
        kw["recipe"] = PoisonedRecipe(3, math.inf)
    elif case == "nan in one loop's CE":
        poison_loop_ce(monkeypatch, loop=2, from_call=3)
    elif case == "nan gradient":
        kw["recipe"] = Recipe(regularizers=[NaNGradient()])
    elif case == "nan embedding":
        poison_embedding(monkeypatch, from_call=3)
    else:
        gin.bind_parameter("build_optimizer.lr", 1e6)
        kw.update(steps=60, checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=message) as err:
        run(tmp_path, **kw)
    assert "the last good checkpoint is" in str(err.value) and "untouched" in str(err.value)
    kept = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)["step"]
    assert_finite_checkpoint(tmp_path, kept)
    if case != "lr 1e6":
        assert kept == 2  # checkpoint_every=2, failure at step 3: the step-2 checkpoint stays
    summary = strict_json(tmp_path / "summary.json")
    assert summary["status"] == "nonfinite"


def test_skip_mode_skips_counts_and_stops_after_too_many_in_a_row(tmp_path):
    done = run(tmp_path / "skip", nonfinite="skip", recipe=PoisonedRecipe(3, math.nan, until=5))
    assert done["status"] == "complete" and done["skipped_steps"] == 2 and done["step"] == 6
    summary = strict_json(tmp_path / "skip" / "summary.json")
    assert summary["skipped_steps"] == 2 and summary["nonfinite"] == []
    assert_finite_checkpoint(tmp_path / "skip", 6)
    with pytest.raises(NonFiniteError, match=r"step 5: .*\(3 steps in a row\)"):
        run(tmp_path / "stop", steps=10, nonfinite="skip", max_skipped_steps=2,
            recipe=PoisonedRecipe(3, math.nan))


def test_summary_is_strict_json_with_nonfinite_values_as_null(tmp_path):
    from looplm.rundir import write_summary

    write_summary(tmp_path, {"train": {"loss": math.nan, "ce": [1.0, math.inf]}, "step": 3})
    summary = strict_json(tmp_path / "summary.json")
    assert summary["train"] == {"loss": None, "ce": [1.0, None]}
    assert summary["nonfinite"] == ["train.loss", "train.ce[1]"]


def test_the_command_line_exits_non_zero_on_a_nonfinite_run(tmp_path, capsys):
    code = main(["--gin", "gin/full_unroll.gin", "--bind", f"train.run_dir = '{tmp_path}'",
                 "--bind", "Tracker.enabled = False", "--bind", "train.progress = False",
                 "--bind", "build_optimizer.lr = 1e6", "--bind", "TRAIN_STEPS = 60",
                 "--bind", "model_config.d_model = 32", "--bind", "train.batch_size = 8",
                 "--bind", "AdditionTask.n_eval = 16"])
    err = capsys.readouterr().err
    assert code == NONFINITE_EXIT_CODE and "non-finite" in err and "Traceback" not in err, err


# -- run folders ----------------------------------------------------------------------------------
def test_a_finished_run_is_left_as_it_is(tmp_path):
    first = run(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.gin", "summary.json", "checkpoint.pt")}
    again = run(tmp_path)
    assert again["status"] == "complete" and again["history"] == first["history"]
    assert before == {name: (tmp_path / name).read_bytes() for name in before}


def test_a_different_config_stops_with_the_list_of_differences(tmp_path):
    run(tmp_path, steps=4)
    with pytest.raises(RunDirError, match=r"another config \(2 differences\):\n  train.batch_size: 8 -> 4\n"
                                          r"  train.grad_clip: 1.0 -> 0.5"):
        run(tmp_path, steps=4, batch_size=4, grad_clip=0.5)
    with pytest.raises(RunDirError, match=r"train.steps: 4 -> 6"):
        run(tmp_path, steps=6)  # a longer run needs --resume


def test_resume_extends_a_run_and_overwrite_starts_over(tmp_path, capsys):
    part = run(tmp_path / "run", steps=4)
    extended = run(tmp_path / "run", steps=6, existing="extend", progress=True)
    assert extended["history"][:4] == part["history"] and extended["step"] == 6
    assert "warning: the run length changes (train.steps: 4 -> 6)" in capsys.readouterr().out
    with pytest.raises(RunDirError, match=r"--resume continues with a new length only"):
        run(tmp_path / "run", steps=8, existing="extend", batch_size=4)
    fresh = run(tmp_path / "run", steps=3, existing="overwrite")
    assert fresh["step"] == 3 and len(fresh["history"]) == 3


def test_the_command_line_refuses_a_changed_config_with_exit_2(tmp_path, capsys):
    args = ["--gin", "gin/full_unroll.gin", "--bind", f"train.run_dir = '{tmp_path}'",
            "--bind", "Tracker.enabled = False", "--bind", "train.progress = False",
            "--bind", "TRAIN_STEPS = 2", "--bind", "model_config.d_model = 32", "--bind", "AdditionTask.n_eval = 16"]
    assert main(args) == 0
    assert main([*args, "--bind", "UniformPrior.beta = 0.2"]) == 2
    err = capsys.readouterr().err
    assert "gin: UniformPrior.beta: 0.1 -> 0.2" in err and "In call to configurable" not in err
    assert main([*args, "--bind", "UniformPrior.beta = 0.2", "--overwrite"]) == 0


def test_stale_checkpoint_temporaries_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".checkpoint.pt.tmp-{dead.pid}"
    live = tmp_path / f".checkpoint.pt.tmp-{os.getppid()}"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"x")
    run(tmp_path, steps=2)
    assert not stale.exists() and live.exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "looplm.run", "--gin", "gin/full_unroll.gin",
           "--bind", f"train.run_dir = '{tmp_path}'", "--bind", "Tracker.enabled = False",
           "--bind", "TRAIN_STEPS = 100000", "--bind", "train.log_every = 1",
           "--bind", "model_config.d_model = 32", "--bind", "AdditionTask.n_eval = 16"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step 3:") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "interrupted: checkpoint saved at step" in err
    step = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)["step"]
    assert step >= 3 and f"step {step}" in err


def test_eight_runs_starting_at_once_into_a_new_aim_repo_all_log(tmp_path):
    repo = tmp_path / "aim"
    script = ("import sys; from looplm.tracking import Tracker; t = Tracker(repo=sys.argv[1], "
              "experiment='burst'); t.open({'i': int(sys.argv[2])}); t.log({'x': 1.0}, 0); t.close()")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(repo), str(i)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errors
    runs = open_repo(repo)
    logged = {trace.run["hparams"]["i"] for trace in runs.query_metrics("metric.name == 'x'").iter()}
    assert logged == set(range(8))
