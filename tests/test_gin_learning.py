"""Every gin file in gin/ learns (issue 13, part 3): run through the command line as a user would,
shrunk to a small looped model on 2-digit addition, it reaches BAR held-out exact match at one of
its loops 1..T in STEPS steps (the best loop: a prior may rightly favour early exits), or its
header states why it cannot (a line `# learning test: <why>`).

A file that starts from a checkpoint starts from a Stage I run of full_unroll.gin made here (a run
folder, or its Huggingface export for @ouro_checkpoint). A file that trains only the exit gate
(Stage II) learns when its loss falls by STAGE2_LOSS_DROP of its first steps' value in
STAGE2_STEPS steps and the frozen LM's held-out exact match stays exactly the Stage I one (whether
its Q-exit then saves loops is a research question: see the note in the test).

New files are picked up by the glob: every future variant is held to the same bar. Measured on
the shared 2-core CPU (exact match at loops 1/2/3): full_unroll.gin 7.5/67/86.5%; the sampled-step
config shipped before issue 13 (CLTS + Min-SNR) 0/1/0.5%; full_unroll.gin with lr = 1e-9 0/0/0%.
Each run costs ~13-25 s of CPU (more under load).
"""

import json
import re
from pathlib import Path

import gin
import pytest

from looplm import checkpoint
from looplm.export import main as export_main
from looplm.run import main, parse_config
from looplm.train import train

GIN_DIR = Path(__file__).resolve().parent.parent / "gin"
GIN_FILES = sorted(p.name for p in GIN_DIR.glob("*.gin"))
EXEMPT = re.compile(r"^#\s*learning test:\s*(.*)$", re.MULTILINE)
BUDGET = re.compile(r"^#\s*learning test steps:\s*(\d+)\s*$", re.MULTILINE)  # a slower learner's budget
MAX_STEPS = 1200
T = 3  # 1 layer x 3 loops learns in fewer steps than x 4 at less cost per step
STEPS = 300
BAR = 0.5  # held-out exact match at the best of loops 1..T after STEPS steps
STAGE2_STEPS = 100
STAGE2_LOSS_DROP = 0.1  # the gate loss falls by at least this share (it cannot reach 0: soft targets)
SIZE = {  # the model and run, whatever the file: a user's quick check
    "all": [f"TRAIN_STEPS = {STEPS}", "train.eval_every = 100000", "train.checkpoint_every = 100000",
            "train.progress = False", "Tracker.enabled = False", "train.batch_size = 128",
            "model_config.d_model = 64", "model_config.n_heads = 4", "model_config.d_ff = 128",
            "model_config.n_layers = 1", f"model_config.n_loops = {T}", f"train.eval_max_loops = {T}",
            "build_optimizer.lr = 6e-3", "train.eval_batch_size = 200"],
    # per task: the smallest version of it
    "AdditionTask": ["AdditionTask.n_digits = 2", "AdditionTask.n_eval = 200"],
    "MultiHopTask": ["MultiHopTask.n_layers = 3", "MultiHopTask.entities_per_layer = 8",
                     "MultiHopTask.n_relations = 3", "MultiHopTask.hops = 2",
                     "MultiHopTask.n_train_questions = 52", "MultiHopTask.n_eval = 20",
                     "MultiHopTask.seq_len = 32", "train.batch_size = 32"],
    "TextTask": ["train.task = @AdditionTask()", "AdditionTask.n_digits = 2", "AdditionTask.n_eval = 200"],
}


pytestmark = pytest.mark.usefixtures("clean_gin")  # tests/conftest.py


def _query(key: str):
    """A binding's value, a configurable reference's name (e.g. "ouro_checkpoint"), or None."""
    try:
        value = gin.query_parameter(key)
    except ValueError:  # not bound: train's default
        return None
    return value.selector if isinstance(value, gin.config.ConfigurableReference) else value


def sized(path: Path, stage1_dir: Path) -> list[str]:
    """The --bind lines that shrink the file's run to the test's size, and start it from the Stage
    I run when the file starts from a checkpoint (a run folder, or Ouro's Huggingface layout)."""
    gin.clear_config()
    try:
        parse_config([str(path)], [])
        task, init_from = _query("train.task"), _query("train.init_from")
    finally:
        gin.clear_config()
    binds = [*SIZE["all"], *SIZE.get(task, [])]
    if init_from == "ouro_checkpoint":
        export = stage1_dir.parent / f"{stage1_dir.name}_hf"
        if not export.exists():
            assert export_main([str(stage1_dir), str(export), "--no-tokenizer"]) == 0
        binds.append(f'ouro_checkpoint.path = "{export}"')
    elif isinstance(init_from, str):
        binds.append(f'train.init_from = "{stage1_dir}"')
    elif init_from is not None:
        pytest.fail(f"{path.name}: the test does not know how to start @{init_from}() from Stage I")
    return binds


def trains_only_the_gate(path: Path, binds: list[str]) -> bool:
    gin.clear_config()
    try:
        parse_config([str(path)], binds)
        return train(dry_run=True)["recipe"].estimator.trains == "gate"
    finally:
        gin.clear_config()


def learn(path: Path, run_dir: Path, binds: list[str]) -> dict:
    """python -m looplm.run --gin <path> --bind ... ; returns the run's summary.json."""
    args = ["--gin", str(path)]
    for b in [*binds, f'train.run_dir = "{run_dir}"']:
        args += ["--bind", b]
    assert main(args) == 0, f"{path.name}: the run failed"
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A Stage I run (full_unroll.gin) at the test's size: the start of every file that starts
    from a checkpoint, and full_unroll.gin's own learning run."""
    run_dir = tmp_path_factory.mktemp("stage1")
    path = GIN_DIR / "full_unroll.gin"
    return run_dir, learn(path, run_dir, sized(path, run_dir))


@pytest.mark.parametrize("name", GIN_FILES)
def test_gin_file_learns(name, tmp_path, stage1):
    path = GIN_DIR / name
    stated = EXEMPT.search(path.read_text())
    if stated:  # the file says why a short run cannot show it learning: a reason, not a tag
        assert len(stated.group(1).split()) >= 5, f"{name}: '# learning test:' must say why"
        return
    stage1_dir, stage1_summary = stage1
    binds = sized(path, stage1_dir)
    if trains_only_the_gate(path, binds):
        summary = learn(path, tmp_path, [*binds, f"TRAIN_STEPS = {STAGE2_STEPS}"])
        history = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)["history"]
        start, end = sum(history[:5]) / 5, sum(history[-10:]) / 10
        assert end <= (1 - STAGE2_LOSS_DROP) * start, f"{name}: gate loss {start:.4f} -> {end:.4f}"
        assert summary["eval"]["exact_match"] == stage1_summary["eval"]["exact_match"], (
            f"{name}: the frozen LM's exact match moved")
        # Not asserted: that Q-exit then needs fewer loops. Stage II's target ("continue while CE
        # still falls") did not beat the Stage I gate in 5 of 6 runs (README, Early exit), and in
        # CI it needed 1.96 loops against 1.56 before: a research question, not a learning bar.
        return
    budget = BUDGET.search(path.read_text())
    steps = int(budget.group(1)) if budget else STEPS
    assert STEPS <= steps <= MAX_STEPS, f"{name}: '# learning test steps:' must be in {STEPS}..{MAX_STEPS}"
    if budget:
        binds = [*binds, f"TRAIN_STEPS = {steps}"]
    summary = stage1_summary if name == "full_unroll.gin" else learn(path, tmp_path, binds)
    em = max(summary["eval"]["exact_match"][:T])
    assert em >= BAR, (f"{name}: held-out exact match is at most {em:.1%} (loops 1..{T}) after {steps} "
                       f"steps (bar {BAR:.0%}; per loop {summary['eval']['exact_match']})")


def test_forward_mode_jacobian_learns(tmp_path, stage1):
    """jacobian.gin with the FSDP-ready form of its probe (||J v||^2, forward mode) learns as
    well: the option is held to the same bar as a file (measured 87.5% at loop 3, vjp 87%)."""
    path = GIN_DIR / "jacobian.gin"
    binds = [*sized(path, stage1[0]), "PowerIterationJacobian.mode = 'jvp'"]
    em = max(learn(path, tmp_path, binds)["eval"]["exact_match"][:T])
    assert em >= BAR, f"jacobian.gin with mode='jvp': held-out exact match at most {em:.1%}"
