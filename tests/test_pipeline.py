"""Checkpoints chained through the command line: `looplm.run --init-from` (a looplm run, an
Ouro-layout folder, a hub id in the local cache) and `looplm.pipeline` (Stage I -> SFT -> Stage II
on a toy text corpus and chat set made here), each stage starting from the weights the stage
before it ended with, upcycling included. The weights a run starts from are read where the
trainer hands its loaded model on (looplm.train.wrap)."""

import contextlib
import io
import re
import shutil

import gin
import huggingface_hub
import pytest
import torch
from toy_chat import SPECIAL, WORDS, make_chat_tokenizer, sums, write_corpus, write_jsonl

import looplm.train
from looplm import checkpoint, pipeline
from looplm.io.export import export_run
from looplm.run import GIN_DIR
from looplm.run import main as run_main

SMALL = ["TRAIN_STEPS = 5", "train.batch_size = 4", "train.eval_every = 5", "train.eval_batch_size = 8",
         "train.eval_max_batches = 1", "Tracker.enabled = False", "train.progress = False",
         "model_config.d_model = 32", "model_config.d_ff = 64", "model_config.n_layers = 1",
         "model_config.n_loops = 3", "AdditionTask.n_eval = 8"]


pytestmark = pytest.mark.usefixtures("clean_gin")  # tests/conftest.py


@pytest.fixture
def starts(monkeypatch) -> list[dict]:
    """The weights each run in this test starts training from, in order."""
    seen, wrap = [], looplm.train.wrap

    def spy(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return wrap(model, *args, **kwargs)

    monkeypatch.setattr(looplm.train, "wrap", spy)
    return seen


def final(run_dir) -> dict:
    return checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(main, argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    gin.clear_config()
    return code, err.getvalue()


def binds(*lines) -> list[str]:
    return [a for line in lines for a in ("--bind", line)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tokenizer with a chat template, a text corpus and a chat set over its words, and the
    bindings that point the pipeline's three files at them."""
    root = tmp_path_factory.mktemp("toy")
    tok = make_chat_tokenizer(root / "tok")
    world = [f'TOKENIZER = "{tok}"', f'TextTask.dataset = "{write_corpus(root / "corpus.txt")}"',
             "TextTask.dataset_config = None", "TextTask.split = 'train[:90%]'", "TextTask.eval_split = 'train[90%:]'",
             "TextTask.seq_len = 16", f'TextTask.cache_dir = "{root / "cache"}"',
             f'ChatTask.dataset = "{write_jsonl(root / "chat.jsonl", sums(24))}"', "ChatTask.dataset_config = None",
             "ChatTask.split = 'train[:80%]'", "ChatTask.eval_split = 'train[80%:]'", "ChatTask.seq_len = 32"]
    return root, [*SMALL, *world]


@pytest.fixture(scope="module")
def addition_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("addition") / "run"
    code, err = cli(run_main, ["--gin", str(GIN_DIR / "full_unroll.gin"),
                               *binds(*SMALL, f'train.run_dir = "{run_dir}"')])
    assert code == 0, err
    return run_dir


# -- looplm.run --init-from ---------------------------------------------------------------------
def test_init_from_a_run_takes_its_weights_and_model_config(addition_run, tmp_path, starts):
    # stage2_gate.gin's model is base.gin's (d_model 128): the run's (32) wins, as its weights need
    code, err = cli(run_main, ["--gin", str(GIN_DIR / "stage2_gate.gin"), "--init-from", str(addition_run),
                               *binds("TRAIN_STEPS = 2", "Tracker.enabled = False", "train.progress = False",
                                      "AdditionTask.n_eval = 8", f'train.run_dir = "{tmp_path}"')])
    assert code == 0, err
    assert same(starts[0], final(addition_run)["model"])
    assert final(tmp_path)["model_config"] == final(addition_run)["model_config"] | {"vocab_from_task": False}


def test_init_from_an_ouro_folder_and_a_hub_id_in_the_local_cache(addition_run, tmp_path, starts, monkeypatch):
    export_run(addition_run, tmp_path / "hf", tokenizer=False)
    snapshot = tmp_path / "cache" / "models--someone--tiny-ouro" / "snapshots" / "0123abcd"
    shutil.copytree(tmp_path / "hf", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    for source, extra in ((str(tmp_path / "hf"), []), ("someone/tiny-ouro", ["weight_source.n_loops = 2"])):
        run_dir = tmp_path / source.replace("/", "_")
        code, err = cli(run_main, ["--init-from", source, *binds(*SMALL, *extra, f'train.run_dir = "{run_dir}"')])
        assert code == 0, err
        assert same(starts[-1], final(addition_run)["model"])
    assert final(tmp_path / "someone_tiny-ouro")["model_config"]["n_loops"] == 2  # an override of the source's


def test_init_from_keeps_the_checkpoints_vocabulary(addition_run, toy, tmp_path):
    root, world = toy
    code, err = cli(run_main, ["--gin", str(GIN_DIR / "ouro_stage1.gin"), "--init-from", str(addition_run),
                               *binds(*world, f'train.run_dir = "{tmp_path}"')])
    vocab = len(SPECIAL) + len(WORDS)
    assert code == 2 and f"vocab_size=15 is fixed but TextTask has {vocab} tokens" in err, err


# -- python -m looplm.pipeline ------------------------------------------------------------------
def test_the_three_stages_each_start_where_the_last_ended(toy, tmp_path, starts):
    root, world = toy
    argv = ["--runs", str(tmp_path), *binds(*world, "sft: TRAIN_STEPS = 4")]
    code, err = cli(pipeline.main, argv)
    assert code == 0, err
    ends = {stage: final(tmp_path / stage) for stage in pipeline.STAGES}
    assert [ends[s]["step"] for s in pipeline.STAGES] == [5, 4, 5]  # the sft-only binding
    assert same(starts[1], ends["stage1"]["model"]) and same(starts[2], ends["sft"]["model"])
    assert not same(ends["sft"]["model"], ends["stage1"]["model"])  # SFT trained
    assert [ends[s]["config"]["task"].split("{")[0] for s in pipeline.STAGES] == ["TextTask", "ChatTask", "TextTask"]
    lm = [k for k in starts[2] if not k.startswith("gate.")]
    assert all(torch.equal(starts[2][k], ends["stage2"]["model"][k]) for k in lm)  # Stage II: LM frozen
    assert not torch.equal(starts[2]["gate.weight"], ends["stage2"]["model"]["gate.weight"])
    assert ends["stage1"]["model_config"]["vocab_size"] == len(SPECIAL) + len(WORDS)
    before = {s: (tmp_path / s / checkpoint.CHECKPOINT_NAME).read_bytes() for s in pipeline.STAGES}
    assert cli(pipeline.main, argv)[0] == 0  # run again: every stage is complete, nothing trains
    assert before == {s: (tmp_path / s / checkpoint.CHECKPOINT_NAME).read_bytes() for s in pipeline.STAGES}


def test_stage1_can_start_from_an_upcycled_model(toy, tmp_path, starts):
    """Ouro's 2.6B from its 1.4B, in small: a 1-layer stage 1 run, its layer repeated, continued
    through the whole pipeline as a 2-layer model."""
    root, world = toy
    small = tmp_path / "small"
    code, err = cli(run_main, ["--gin", str(GIN_DIR / "ouro_stage1.gin"), *binds(*world, f'train.run_dir = "{small}"')])
    assert code == 0, err
    code, err = cli(pipeline.main, ["--runs", str(tmp_path / "grown"), *binds(
        *world, "stage1: train.init_from = @upcycled_checkpoint()", f'stage1: upcycled_checkpoint.path = "{small}"',
        "stage1: train.model_config = None")])
    assert code == 0, err
    grown, ends = starts[1], final(small)["model"]
    for layer in (0, 1):
        assert all(torch.equal(grown[k.replace("layers.0.", f"layers.{layer}.")], v)
                   for k, v in ends.items() if k.startswith("layers.0."))
    assert same({k: v for k, v in grown.items() if not k.startswith("layers.")},
                {k: v for k, v in ends.items() if not k.startswith("layers.")})
    assert [final(tmp_path / "grown" / s)["model_config"]["n_layers"] for s in pipeline.STAGES] == [2, 2, 2]


@pytest.mark.parametrize("argv, message", [
    (["--bind", "sfft: TRAIN_STEPS = 3"], r"no stage 'sfft'; the stages are stage1, sft, stage2"),
])
def test_a_binding_for_no_stage_is_a_clear_error(argv, message):
    code, err = cli(pipeline.main, argv)
    assert code == 2 and re.search(message, err), err


def test_dry_run_prints_the_chain(tmp_path, capsys):
    assert pipeline.main(["--runs", str(tmp_path), "--init-from", "ByteDance/Ouro-1.4B", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["== stage1", "== sft", "== stage2"]
    assert "--init-from ByteDance/Ouro-1.4B" in lines[0] and f"--init-from {tmp_path / 'stage1'}" in lines[1]
    assert f"--init-from {tmp_path / 'sft'}" in lines[2] and not list(tmp_path.iterdir())
