"""The trainer and the command line: learning, exact resume, atomic checkpoints, pre-emption,
Stage II from a Stage I checkpoint, Aim tracking, and config errors that stop before training."""

import contextlib
import json
import os
import signal

import gin
import pytest
import torch

from looplm import checkpoint
from looplm.config import model_config
from looplm.data import AdditionTask
from looplm.exits import main as exits_main
from looplm.exits import read_frontier
from looplm.recipe import GateTraining, Recipe
from looplm.run import main
from looplm.tracking import Tracker, open_repo
from looplm.train import RunControl, train

TINY = dict(preset="tiny", d_model=32, n_layers=1, n_heads=2, d_ff=64, n_loops=3)


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    gin.bind_parameter("build_optimizer.lr", 3e-3)
    gin.bind_parameter("lr_multiplier.warmup_steps", 2)  # below the shortest run here (a count must be)
    yield
    gin.clear_config()


def run(tmp_path, steps, **kw):
    args = dict(task=AdditionTask(n_eval=64), model_config=model_config(**TINY), run_dir=str(tmp_path),
                steps=steps, batch_size=16, eval_every=1000, checkpoint_every=1000,
                eval_batch_size=64, progress=False, seed=3)
    args.update(kw)
    return train(**args)


def test_short_run_lowers_the_loss(tmp_path):
    summary = run(tmp_path, steps=60, checkpoint_every=60)
    first, last = sum(summary["history"][:5]) / 5, sum(summary["history"][-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert len(summary["eval"]["ce"]) == 6  # evaluated at 1..2T loops
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "config.gin").exists()


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = run(tmp_path / "full", steps=12)
    control = RunControl()

    class StopAfterStep4(AdditionTask):  # a pre-emption noticed after step 4: checkpoint at 5
        def train_batch(self, step, batch_size):
            if step == 4:
                control.raised = "SIGUSR1"
            return super().train_batch(step, batch_size)

    part = run(tmp_path / "resumed", steps=12, task=StopAfterStep4(n_eval=64), control=control)
    assert part["step"] == 5 and part["status"] == "preempted"
    resumed = run(tmp_path / "resumed", steps=12, task=StopAfterStep4(n_eval=64))
    assert resumed["history"] == full["history"]  # bit-exact, float for float


def test_bf16_autocast_trains_on_cpu(tmp_path):
    summary = run(tmp_path, steps=20, precision="bf16")
    assert all(torch.isfinite(torch.tensor(summary["history"])))
    assert sum(summary["history"][-5:]) < sum(summary["history"][:5])


def test_torch_compile_option_runs_on_cpu_and_matches_eager(tmp_path):
    eager = run(tmp_path / "eager", steps=3)
    compiled = run(tmp_path / "compiled", steps=3, compile=True)
    torch.testing.assert_close(torch.tensor(compiled["history"]), torch.tensor(eager["history"]),
                               rtol=1e-4, atol=1e-5)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, {"step": 2})
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


def test_preemption_signal_checkpoints_and_resume_finishes(tmp_path):
    control = RunControl()

    class SignalAtStep(AdditionTask):
        def train_batch(self, step, batch_size):
            if step == 4:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().train_batch(step, batch_size)

    first = run(tmp_path, steps=10, task=SignalAtStep(n_eval=64), control=control)
    assert first["preempted"] == "SIGUSR1" and first["step"] == 5
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 5
    second = run(tmp_path, steps=10, task=SignalAtStep(n_eval=64))  # resumes at 5: no signal again
    assert second["step"] == 10 and second["preempted"] is None
    assert second["history"] == run(tmp_path / "ref", steps=10)["history"]


def test_stage2_trains_only_the_gate_from_a_stage1_checkpoint(tmp_path):
    class NoPrior(__import__("looplm.hooks", fromlist=["ExitPrior"]).ExitPrior):
        beta = 0.0

        def loop_terms(self, log_p, n_loops):
            return torch.zeros_like(log_p)

    run(tmp_path / "stage1", steps=10)
    before = checkpoint.load(tmp_path / "stage1" / "checkpoint.pt")["model"]
    run(tmp_path / "stage2", steps=5, init_from=str(tmp_path / "stage1"),
        recipe=Recipe(estimator=GateTraining(), prior=NoPrior()))
    after = checkpoint.load(tmp_path / "stage2" / "checkpoint.pt")["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"gate.weight", "gate.bias"}
    # the LM is frozen: every rule that ignores the gate scores exactly as before Stage II
    frontiers = [read_frontier(tmp_path / name) for name in ("stage1", "stage2")]
    gate_free = [[p for p in f if p["rule"] != "q_exit"] for f in frontiers]
    assert gate_free[0] == gate_free[1] and len(gate_free[0]) == len(frontiers[0]) - 6 > 0


def test_exits_command_compares_finished_runs(tmp_path, capsys):
    run(tmp_path / "a", steps=3)
    run(tmp_path / "b", steps=3, seed=4)
    plot = tmp_path / "frontier.png"
    assert exits_main([str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("q_exit", "state_change", "static", "exact match"))
    assert plot.stat().st_size > 10_000
    assert exits_main([str(tmp_path / "missing")]) == 2
    assert "missing/summary.json does not exist" in capsys.readouterr().err


def test_aim_run_holds_per_loop_and_eval_metrics(tmp_path):
    tracker = Tracker(repo=str(tmp_path / "aim"), experiment="unit")
    run(tmp_path / "run", steps=4, eval_every=4, tracker=tracker)
    repo = open_repo(tmp_path / "aim")
    hashes = repo.list_all_runs()
    assert len(hashes) == 1
    tracked = {}
    for trace in repo.query_metrics("run.experiment == 'unit'", report_mode=0).iter():
        tracked[(trace.name, tuple(sorted(trace.context.to_dict().items())))] = trace.data.indices_list()
    assert tracked[("ce", (("loop", 2), ("subset", "train")))] == [0, 1, 2, 3]
    assert ("exact_match", (("loop", 6), ("subset", "eval"))) in tracked
    assert not {"exit_acc", "exit_exact_match", "exit_loops"} & {name for name, _ in tracked}
    frontier = repo.get_run(hashes[0])["exit_frontier"]  # one structured value, not 57 series
    assert frontier["step"] == 4
    assert ("q_exit", 0.5) in {(p["rule"], p["threshold"]) for p in frontier["points"]}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert frontier["points"] == [{k: p[k] for k in ("rule", "threshold", "acc", "exact_match", "mean_loops")}
                                  for p in summary["eval"]["exit_frontier"]]


@pytest.mark.parametrize("binding, message", [
    ("train.stepz = 3", "stepz"),
    ("Recipe.estimator = @NoSuchEstimator()", "NoSuchEstimator"),
    ("AdditionTask.n_digits = 0", "n_digits"),
    ("train.steps = 0", "train.steps"),
])
def test_config_errors_stop_before_training(tmp_path, capsys, binding, message):
    code = main(["--gin", "gin/full_unroll.gin", "--bind", f'train.run_dir = "{tmp_path}"',
                 "--bind", "Tracker.enabled = False", "--bind", binding])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_command_line_runs_the_default_job_briefly(tmp_path):
    code = main(["--gin", "gin/full_unroll.gin", "--bind", f'train.run_dir = "{tmp_path}"',
                 "--bind", "train.steps = 3", "--bind", "Tracker.enabled = False",
                 "--bind", "train.progress = False", "--bind", "AdditionTask.n_eval = 32"])
    assert code == 0
    operative = (tmp_path / "config.gin").read_text()
    assert "Recipe.estimator = @ExitWeighted()" in operative
    assert "build_optimizer.lr = 0.002" in operative and "train.steps = 3" in operative


def test_accumulated_micro_batches_of_unequal_token_counts_equal_the_full_batch():
    """Each micro-batch's token-mean loss is weighted by its share of the supervised tokens, so
    four uneven micro-batches give the full batch's loss and gradient (float64)."""
    from looplm.data.batch import IGNORE_INDEX, Batch
    from looplm.dist.parallel import StepModule
    from looplm.model import LoopLM
    from looplm.train import train_step

    torch.manual_seed(0)
    model = LoopLM(model_config(**TINY, vocab_size=15)).double()
    full = AdditionTask().train_batch(0, 16)
    targets = full.targets.clone()
    for row, keep in enumerate([1, 2, 3, 5, 1, 1, 1, 2, 6, 6, 6, 6, 1, 3, 2, 4]):
        supervised = (targets[row] != IGNORE_INDEX).nonzero().squeeze(1)
        targets[row, supervised[keep:]] = IGNORE_INDEX  # rows of 1..6 supervised tokens
    full = Batch(full.input_ids, targets)
    micro = [Batch(full.input_ids[i:j], targets[i:j]) for i, j in ((0, 4), (4, 7), (7, 13), (13, 16))]
    assert len({b.n_targets for b in micro}) == 4
    params = list(model.parameters())

    def grads(batches):
        model.zero_grad()
        recipe = Recipe()
        loss, _, _ = train_step(StepModule(model, recipe), recipe, batches, 0, contextlib.nullcontext(),
                                params, 1e9)
        return loss, [p.grad.clone() for p in params]

    loss_full, g_full = grads([full])
    loss_micro, g_micro = grads(micro)
    assert abs(loss_full - loss_micro) < 1e-12
    for a, b in zip(g_full, g_micro):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["loop", "layer"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode):
    """Recomputing a loop (or a layer) in backward changes memory, not the numbers (float64)."""
    from looplm.model import LoopLM

    torch.manual_seed(0)
    model = LoopLM(model_config(**TINY, vocab_size=15)).double()
    batch = AdditionTask().train_batch(0, 8)
    recipe = Recipe()

    def loss_and_grads():
        model.zero_grad()
        loss, _ = recipe.loss(model, batch, 0)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    plain = loss_and_grads()
    model.checkpointing = mode
    again = loss_and_grads()
    assert plain[0] == pytest.approx(again[0], abs=1e-12)
    for a, b in zip(plain[1], again[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
