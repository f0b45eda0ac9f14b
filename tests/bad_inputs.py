"""The bad-input battery's cases (issue 12, part 4), run through the real command line.

A mistyped flag, gin binding, gin file, data file or checkpoint must stop `looplm.run` before
training with exit code 2 and one message naming the input and what is allowed: never a Python
traceback, never a run that is not what its config says. tests/test_bad_inputs.py runs every row
of CASES; `python tests/bad_inputs.py` counts them (clear / unclear / traceback / silent), the
figures of the README's reliability section.
"""

import collections
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gin
import pytest
import torch

from looplm import checkpoint
from looplm.run import main

REPO = Path(__file__).resolve().parent.parent
FAST = ["Tracker.enabled = False", "train.progress = False", "TRAIN_STEPS = 1", "AdditionTask.n_eval = 8",
        "train.batch_size = 4", "model_config.d_model = 32", "model_config.d_ff = 32",
        "train.eval_max_batches = 1", "train.eval_batch_size = 8", "lr_multiplier.warmup_steps = 0"]
MAX_LINES = 8  # one message: its first line names the input; gin may add a few lines of context
PROGRESS = re.compile(r"\[\d\d:\d\d.*/s\]")  # a progress bar line (datasets' on stderr): not the message


def message_lines(err: str) -> list:
    return [line for line in err.strip().splitlines() if not PROGRESS.search(line)]


@dataclass
class Case:
    id: str
    binds: list
    expect: str  # regex the message must match: the input's name and value, or what is allowed
    gin: str = "gin/full_unroll.gin"
    setup: str | None = None  # name of a Setup method that writes files and returns more binds
    owner: str = ""  # where the check lives (the module that defines the value)
    argv: list = field(default_factory=list)  # extra command-line arguments


def case(id, binds, expect, **kw):
    return pytest.param(Case(id, [binds] if isinstance(binds, str) else binds, expect, **kw), id=id)


CASES = [
    # -- train flags ------------------------------------------------------------------------
    *(case(f"grad_clip={v}", f"train.grad_clip = {v}", rf"train\.grad_clip={re.escape(v)}", owner="train")
      for v in ("-1.0", "0.0", "'inf'")),
    *(case(f"batch_size={v}", f"train.batch_size = {v}", rf"train\.batch_size={v}", owner="train")
      for v in ("0", "-3", "4.5")),
    *(case(f"TRAIN_STEPS={v}", f"TRAIN_STEPS = {v}", rf"steps={re.escape(v)}", owner="train")
      for v in ("0", "-5", "'ten'", "2.5")),
    case("eval_every=-1", "train.eval_every = -1", r"train\.eval_every=-1", owner="train"),
    case("eval_every=0.5", "train.eval_every = 0.5", r"train\.eval_every=0\.5", owner="train"),
    case("eval_batch_size=0", "train.eval_batch_size = 0", r"train\.eval_batch_size=0", owner="train"),
    case("eval_max_loops=0", "train.eval_max_loops = 0", r"train\.eval_max_loops=0", owner="train"),
    case("eval_max_loops=1.5", "train.eval_max_loops = 1.5", r"train\.eval_max_loops=1\.5", owner="train"),
    case("eval_max_batches=0", "train.eval_max_batches = 0", r"train\.eval_max_batches=0", owner="train"),
    case("grad_accum=0", "train.grad_accum = 0", r"train\.grad_accum=0", owner="train"),
    case("checkpoint_every=0", "train.checkpoint_every = 0", r"train\.checkpoint_every=0", owner="train"),
    case("precision=fp16", 'train.precision = "fp16"', r"precision='fp16'.*bf16", owner="train"),
    case("device=cuda without CUDA", 'train.device = "cuda"', r"device='cuda'", owner="train",
         setup="no_cuda"),
    case("device=cdua", 'train.device = "cdua"', r"device='cdua'", owner="train"),
    case("compile='yes'", "train.compile = 'yes'", r"train\.compile='yes'", owner="train"),
    case("seed=1.5", "train.seed = 1.5", r"train\.seed=1\.5", owner="train"),
    case("recipe=3", "train.recipe = 3", r"train\.recipe=3", owner="train"),
    case("run_dir is a file", [], r"run_dir", owner="train", setup="run_dir_is_a_file"),
    case("init_from missing", "train.init_from = '/nonexistent/run'", r"init_from='/nonexistent/run'",
         owner="train"),
    case("task=None", "train.task = None", r"train\.task=None", owner="train"),
    case("hparams=3", "train.hparams = 3", r"train\.hparams=3", owner="train"),
    # -- optimizer --------------------------------------------------------------------------
    *(case(f"lr={v}", f"build_optimizer.lr = {v}", rf"build_optimizer\.lr={re.escape(v)}", owner="optim")
      for v in ("-1.0", "0.0", "'1e-3'")),
    case("weight_decay=-0.1", "build_optimizer.weight_decay = -0.1", r"weight_decay=-0\.1", owner="optim"),
    case("betas=(0.9, 1.5)", "build_optimizer.betas = (0.9, 1.5)", r"build_optimizer\.betas", owner="optim"),
    case("warmup_steps=-1", "lr_multiplier.warmup_steps = -1", r"warmup_steps=-1", owner="optim"),
    case("min_ratio=2.0", "lr_multiplier.min_ratio = 2.0", r"min_ratio=2\.0", owner="optim"),
    # -- model ------------------------------------------------------------------------------
    *(case(f"n_loops={v}", f"model_config.n_loops = {v}", rf"n_loops={v}: allowed are integers >= 1",
           owner="config") for v in ("0", "-1", "2.5", "True")),
    case("n_heads=3 with d_model=32", "model_config.n_heads = 3", r"n_heads=3 must divide d_model=32",
         owner="config"),
    *(case(f"n_kv_heads={v}", f"model_config.n_kv_heads = {v}", rf"n_kv_heads={v}", owner="config")
      for v in ("3", "0", "-2")),
    case("d_model='32'", "model_config.d_model = '32'", r"d_model='32': allowed are integers", owner="config"),
    case("init_std=-1.0", "model_config.init_std = -1.0", r"init_std=-1\.0", owner="config"),
    case("tie_head='yes'", "model_config.tie_head = 'yes'", r"tie_head='yes': allowed are True, False",
         owner="config"),
    case("rope_base=0.5", "model_config.rope_base = 0.5", r"rope_base=0\.5: allowed are finite numbers > 1",
         owner="config"),
    case("preset=tinyy", 'model_config.preset = "tinyy"', r"preset='tinyy'.*did you mean 'tiny'",
         owner="config"),
    case("model_config.n_lops", "model_config.n_lops = 3", r"n_lops.*did you mean 'n_loops'", owner="config"),
    case("norm_placement=pre_nrom", 'model_config.norm_placement = "pre_nrom"', r"norm placement 'pre_nrom'",
         owner="registry"),
    case("norm_type=layernrom", ["import variants.norms", 'model_config.norm_type = "layernrom"'],
         r"norm type 'layernrom'.*did you mean 'layernorm'", owner="registry"),
    case("vocab_size=5 < the task's 15", "model_config.vocab_size = 5", r"vocab_size=5.*15", owner="config"),
    # -- recipe and variants ----------------------------------------------------------------
    case("LastLoops.k=8 > T=4", "LastLoops.k = 8", r"LastLoops\.k=8 exceeds.*T=4", gin="gin/truncated.gin",
         owner="truncated"),
    case("LastLoops.k=0", "LastLoops.k = 0", r"LastLoops\.k=0", gin="gin/truncated.gin", owner="truncated"),
    case("RampedLastLoops.k_end=8 > T=4", ["Recipe.window = @RampedLastLoops()", "RampedLastLoops.k_end = 8"],
         r"k_end=8 exceeds.*T=4", gin="gin/truncated.gin", owner="truncated"),
    *(case(f"lambda_p={v}", f"GeometricPrior.lambda_p = {v}", rf"lambda_p={re.escape(v)}.*\(0, 1\)",
           gin="gin/prior_geometric.gin", owner="priors") for v in ("1.5", "0.0", "'0.5'")),
    case("GeometricPrior.beta=-1", "GeometricPrior.beta = -1.0", r"beta=-1\.0", gin="gin/prior_geometric.gin",
         owner="priors"),
    case("UniformPrior.beta='0.1'", "UniformPrior.beta = '0.1'", r"UniformPrior\.beta='0\.1'", owner="recipe"),
    case("estimator of the wrong family", "Recipe.estimator = @UniformPrior()",
         r"Recipe\.estimator.*UniformPrior.*not a LossEstimator", owner="recipe"),
    case("GateTraining.k=-1", ["Recipe.estimator = @GateTraining()", "Recipe.prior = @NoPrior()",
                               "import variants.priors", "GateTraining.k = -1.0"],
         r"GateTraining\.k=-1\.0", owner="recipe"),
    case("proposal with zero mass", ["SampledStep.proposal = @FixedScheduleProposal()",
                                     "FixedScheduleProposal.probs = (0.5, 0.5, 0.0, 0.0)"],
         r"FixedScheduleProposal\.probs", gin="gin/sampled_step_gate.gin", owner="sampled_step"),
    case("proposal of 2 loops, T=4", ["SampledStep.proposal = @FixedScheduleProposal()",
                                      "FixedScheduleProposal.probs = (0.5, 0.5)"],
         r"FixedScheduleProposal.*2 probabilities.*T=4", gin="gin/sampled_step_gate.gin", owner="sampled_step"),
    case("LogNormalLoops.high=0", "LogNormalLoops.high = 0", r"high=0", gin="gin/random_loops.gin",
         owner="random_loops"),
    case("LogNormalLoops.sigma='0.4'", "LogNormalLoops.sigma = '0.4'", r"sigma='0\.4'",
         gin="gin/random_loops.gin", owner="random_loops"),
    case("L2Limit.weight=-1", ["import variants.trajectory", "Recipe.regularizers = [@L2Limit()]",
                               "L2Limit.weight = -1.0"], r"L2Limit\.weight=-1\.0", owner="trajectory"),
    case("AdditionTask.n_digits=12", "AdditionTask.n_digits = 12", r"n_digits=12.*1\.\.9", owner="data"),
    case("ManoTask.seq_len=5", ["train.task = @ManoTask()", "ManoTask.seq_len = 5"], r"seq_len=5.*>= 20",
         owner="data"),
    # -- gin and the command line -----------------------------------------------------------
    case("@SampledStpe()", "Recipe.estimator = @SampledStpe()", r"SampledStpe.*did you mean '@SampledStep\(\)'",
         gin="gin/sampled_step_gate.gin", owner="run"),
    case("SampledStep.proposl", "SampledStep.proposl = @UniformProposal()", r"proposl.*did you mean 'proposal'",
         gin="gin/sampled_step_gate.gin", owner="run"),
    case("train.stepz", "train.stepz = 3", r"stepz.*did you mean 'steps'", owner="run"),
    case("NoSuch.thing", "NoSuch.thing = 1", r"NoSuch", owner="run"),
    case("bind unparsable", "TRAIN_STEPS = ((", r"TRAIN_STEPS = \(\(", owner="run"),
    case("bind without =", "TRAIN_STEPS", r"TRAIN_STEPS", owner="run"),
    case("macro %NOPE", "TRAIN_STEPS = %NOPE", r"NOPE", owner="run"),
    case("gin file missing", [], r"nope\.gin", gin="gin/nope.gin", owner="run"),
    case("gin file does not parse", [], r"bad\.gin.*line 2", setup="bad_gin", owner="run"),
    case("gin include missing", [], r"nothere\.gin", setup="include_missing", owner="run"),
    case("gin import missing", [], r"no_such_module", setup="import_missing", owner="run"),
    case("gin file is a folder", [], r"gin", gin="gin", owner="run"),
    case("unknown flag", [], r"unrecognized arguments: --gni", argv=["--gni", "x"], owner="run"),
    # -- checkpoints ------------------------------------------------------------------------
    case("resume with another d_model", "model_config.d_model = 64", r"d_model", setup="resume_dir",
         owner="checkpoint"),
    case("init_from another shape", "model_config.d_model = 64", r"another model shape.*embed\.weight",
         setup="init_from_run", owner="checkpoint"),
    case("resume a truncated checkpoint", [], r"truncated or corrupt", setup="resume_truncated",
         owner="checkpoint"),
    case("init_from a truncated checkpoint", [], r"truncated or corrupt", setup="init_from_truncated",
         owner="checkpoint"),
    case("init_from a gin file", "train.init_from = 'gin/base.gin'", r"base\.gin.*truncated or corrupt",
         owner="checkpoint"),
    case("init_from without model", [], r"lacks \['model'\]", setup="init_from_no_model", owner="checkpoint"),
    case("init_from a code-running pickle", [], r"refused.*posix\.system|refused.*system", setup="init_from_evil",
         owner="checkpoint"),
    case("--init-from missing", [], r"'/nonexistent/ouro': no such file or folder; allowed are a looplm run",
         argv=["--init-from", "/nonexistent/ouro"], owner="io.source"),
    case("--init-from a folder of neither kind", [], r"'gin' is a folder with neither checkpoint\.pt nor config\.json",
         argv=["--init-from", "gin"], owner="io.source"),
    case("--init-from a hub id not in the cache", [], r"'no-org/no-model' is not in the local Huggingface cache",
         argv=["--init-from", "no-org/no-model"], owner="io.source"),
    # -- chat data --------------------------------------------------------------------------
    case("chat tokenizer without a chat template", [], r"ChatTask\.tokenizer=.*has no chat template",
         setup="chat_no_template", owner="chat"),
    case("chat data without the messages field", [], r"messages_field='messages' is not a column.*\['text'\]",
         setup="chat_no_messages", owner="chat"),
    # -- text data files --------------------------------------------------------------------
    case("text file empty", [], r"empty\.txt' is empty", setup="text_empty", owner="text"),
    case("text file blank", [], r"holds no text", setup="text_blank", owner="text"),
    case("text file not UTF-8", [], r"latin1\.txt' is not UTF-8.*byte 7", setup="text_latin1", owner="text"),
    case("text file missing", [], r"missing\.txt': no such file", setup="text_missing", owner="text"),
    case("text folder without data", [], r"folder without data files", setup="text_empty_folder", owner="text"),
    case("text dataset from the hub, offline", [], r"no-such-org/no-such-dataset.*unreachable", setup="text_offline",
         owner="text"),
]


class Setup:
    """Files a case needs, written under tmp; each method returns extra bindings and may set the
    gin file or the run folder."""

    def __init__(self, tmp: Path, monkeypatch, reference_run: Path, tokenizer: Path):
        self.tmp, self.monkeypatch, self.reference, self.tokenizer = tmp, monkeypatch, reference_run, tokenizer
        self.gin, self.run_dir = None, tmp / "fresh_run"

    def no_cuda(self):
        self.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return []

    def run_dir_is_a_file(self):
        self.run_dir = self.tmp / "file"
        self.run_dir.write_text("not a folder")
        return []

    def bad_gin(self):
        return self._gin_file("bad.gin", "include 'full_unroll.gin'\nTRAIN_STEPS = = 3\n")

    def include_missing(self):
        return self._gin_file("inc.gin", "include 'nothere.gin'\n")

    def import_missing(self):
        return self._gin_file("imp.gin", "import no_such_module\ninclude 'full_unroll.gin'\n")

    def _gin_file(self, name, text):
        self.gin = self.tmp / name
        self.gin.write_text(text)
        return []

    def resume_dir(self):
        self.run_dir = self.tmp / "run"
        shutil.copytree(self.reference, self.run_dir)
        return []

    def init_from_run(self):
        return [f"train.init_from = '{self.reference}'"]

    def _truncated(self):
        shutil.copytree(self.reference, self.tmp / "run")
        path = self.tmp / "run" / checkpoint.CHECKPOINT_NAME
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path

    def resume_truncated(self):
        self.run_dir = self._truncated().parent
        return []

    def init_from_truncated(self):
        return [f"train.init_from = '{self._truncated()}'"]

    def init_from_no_model(self):
        torch.save({"step": 3}, self.tmp / "no_model.pt")
        return [f"train.init_from = '{self.tmp / 'no_model.pt'}'"]

    def init_from_evil(self):
        write_code_running_pickle(self.tmp / "evil.pt", self.tmp / "ran")
        return [f"train.init_from = '{self.tmp / 'evil.pt'}'"]

    def _text(self, dataset):
        return ["train.task = @TextTask()", f"TextTask.dataset = '{dataset}'", f"TextTask.tokenizer = '{self.tokenizer}'",
                "TextTask.seq_len = 4", "TextTask.split = 'train[:50%]'", "TextTask.eval_split = 'train[50%:]'",
                f"TextTask.cache_dir = '{self.tmp / 'cache'}'", f"TextTask.hf_cache_dir = '{self.tmp / 'hf'}'"]

    def text_empty(self):
        (self.tmp / "empty.txt").write_bytes(b"")
        return self._text(self.tmp / "empty.txt")

    def text_blank(self):
        (self.tmp / "blank.txt").write_text("\n   \n\n")
        return self._text(self.tmp / "blank.txt")

    def text_latin1(self):
        (self.tmp / "latin1.txt").write_bytes("the caf\xe9 sat on the mat\n".encode("latin-1") * 20)
        return self._text(self.tmp / "latin1.txt")

    def text_missing(self):
        return self._text(self.tmp / "missing.txt")

    def text_offline(self):
        import datasets
        import huggingface_hub

        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import: patch the libraries too
        self.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        self.monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        return self._text("no-such-org/no-such-dataset")

    def _chat(self, record: dict, tokenizer: Path):
        (self.tmp / "chat.jsonl").write_text(json.dumps(record) + "\n")
        return ["train.task = @ChatTask()", f"ChatTask.dataset = '{self.tmp / 'chat.jsonl'}'",
                f"ChatTask.tokenizer = '{tokenizer}'", "ChatTask.split = 'train'", "ChatTask.eval_split = 'train'"]

    def chat_no_template(self):
        return self._chat({"messages": [{"role": "user", "content": "the cat"}]}, self.tokenizer)

    def chat_no_messages(self):
        from toy_chat import make_chat_tokenizer
        return self._chat({"text": "the cat sat"}, make_chat_tokenizer(self.tmp / "chat_tok"))

    def text_empty_folder(self):
        (self.tmp / "corpus").mkdir()
        (self.tmp / "corpus" / "notes.md").write_text("not a data file")
        return self._text(self.tmp / "corpus")


class RunsCode:
    """Unpickling this runs `touch marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_code_running_pickle(path: Path, marker: Path) -> None:
    """A checkpoint-looking file whose unpickling would run a shell command creating `marker`."""
    torch.save({"model": RunsCode(marker)}, path)


def run_cli(argv: list) -> tuple[int, str]:
    """looplm.run.main on a clean gin config: (exit code, stderr). A raised exception propagates."""
    gin.clear_config()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse
                code = exit_.code
    finally:
        gin.clear_config()
    return code, err.getvalue()


def argv_of(c: Case, run_dir: Path, gin_file=None, extra=()) -> list:
    binds = [f'train.run_dir = "{run_dir}"', *FAST, *c.binds, *extra]
    return ["--gin", str(gin_file or c.gin), *(a for b in binds for a in ("--bind", b)), *c.argv]


def make_reference_run(run: Path) -> Path:
    """A finished 1-step run (d_model 32): the checkpoint the checkpoint cases start from."""
    code, err = run_cli(argv_of(Case("ok", [], ""), run))
    assert code == 0, err
    return run


def make_tokenizer(path: Path) -> Path:
    """A word-level tokenizer saved as a local folder (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(["the cat sat on the mat"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(path)
    return path


def checkpoint_bytes(run_dir: Path) -> bytes | None:
    path = run_dir / checkpoint.CHECKPOINT_NAME
    return path.read_bytes() if path.is_file() else None


def try_case(c: Case, tmp: Path, monkeypatch, reference: Path, tokenizer_dir: Path) -> tuple[int, str, bool]:
    """Set the case up under tmp and run it: (exit code, stderr, whether the checkpoint of the run
    folder it names changed: nothing may train)."""
    setup = Setup(tmp, monkeypatch, reference, tokenizer_dir)
    extra = getattr(setup, c.setup)() if c.setup else []
    before = checkpoint_bytes(setup.run_dir)
    code, err = run_cli(argv_of(c, setup.run_dir, setup.gin, extra))
    return code, err, checkpoint_bytes(setup.run_dir) != before




def verdict(c: Case, code, err: str, trained: bool) -> tuple[str, str]:
    """("clear", "") or ("silent" | "unclear", why) for a case's outcome (a raised exception is a
    traceback)."""
    if code == 0 or trained:
        return "silent", f"exit code {code}, trained: {trained}: the bad input was accepted\n{err}"
    if code != 2 or "Traceback" in err:
        return "unclear", f"exit code {code} (expected 2) or a traceback in stderr:\n{err}"
    if not re.search(c.expect, err, re.DOTALL):
        return "unclear", f"the message does not name the input ({c.expect!r}):\n{err}"
    if len(message_lines(err)) > MAX_LINES:
        return "unclear", f"not one message:\n{err}"
    return "clear", ""


def count() -> None:
    """Run every case outside pytest and print each outcome and the totals."""
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    with contextlib.redirect_stdout(io.StringIO()):
        reference = make_reference_run(root / "reference" / "run")
    tokenizer = make_tokenizer(root / "tokenizer")
    totals = collections.Counter()
    for i, param in enumerate(CASES):
        c, tmp, patch = param.values[0], root / f"case{i}", pytest.MonkeyPatch()
        tmp.mkdir()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                code, err, trained = try_case(c, tmp, patch, reference, tokenizer)
            kind, why = verdict(c, code, err, trained)
            first = (message_lines(err) or [""])[0]
        except Exception as error:  # noqa: BLE001 - counted: that is the point
            kind, first = "traceback", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        finally:
            patch.undo()
        totals[kind] += 1
        print(f"{kind:<9} {c.owner:<12} {c.id:<34} {first[:120]}")
    print(f"\n{len(CASES)} bad inputs: " + ", ".join(f"{totals[k]} {k}" for k in ("clear", "unclear", "traceback", "silent")))


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, os.getcwd())
    count()
