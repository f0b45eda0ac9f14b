"""The bad-input battery (issue 12, part 4): every row of bad_inputs.CASES, through the real
command line, stops before training with exit code 2 and one message naming the input; plus safe
checkpoint loading, the model-state check, stale temporaries, and why a long sequence is not bad
input."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_inputs import (CASES, REPO, Case, RunsCode, argv_of, make_reference_run, make_tokenizer, run_cli, try_case,
                        verdict, write_code_running_pickle)

from looplm import checkpoint
from looplm.config import model_config
from looplm.model import LoopLM


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    return make_reference_run(tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("c", CASES)
def test_bad_input_gives_one_clear_error_and_trains_nothing(c, tmp_path, monkeypatch, reference_run, tokenizer):
    monkeypatch.chdir(REPO)
    code, err, trained = try_case(c, tmp_path, monkeypatch, reference_run, tokenizer)
    kind, why = verdict(c, code, err, trained)
    assert kind == "clear", why
    assert not (tmp_path / "ran").exists(), "loading the checkpoint ran code"


# -- the real command line, in a fresh process ------------------------------------------------
@pytest.mark.parametrize("argv, expect", [
    # a fresh process has not imported variants.sampled_step: the hint names the import
    (["--gin", "gin/full_unroll.gin", "--bind", "Recipe.estimator = @SampledStep()"],
     r"import variants\.sampled_step"),
    (["--gin", "README.md"], r"README\.md"),
])
def test_command_line_process_exits_2_without_a_traceback(argv, expect):
    result = subprocess.run([sys.executable, "-m", "looplm.run", *argv, "--bind", "Tracker.enabled = False"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(expect, result.stderr), result.stderr


# -- checkpoints: safe loading, shape checks, stale temporaries --------------------------------
def test_own_checkpoints_load_with_weights_only(reference_run, tmp_path):
    """The default run's checkpoint, and one whose recipe holds learned state (the improvement
    proposal's and Min-SNR's EMAs), load with torch.load(weights_only=True): no allow-list needed."""
    stateful = ["SampledStep.proposal = @ImprovementProposal()", "SampledStep.weighting = @MinSNRWeighting()",
                'MinSNRWeighting.snr = "ema"']
    code, err = run_cli(argv_of(Case("stateful", stateful, "", gin="gin/sampled_step_gate.gin"), tmp_path / "run"))
    assert code == 0, err
    for run in (reference_run, tmp_path / "run"):
        path = run / checkpoint.CHECKPOINT_NAME
        state = torch.load(path, map_location="cpu", weights_only=True)  # raises if anything needs code
        assert checkpoint.load(path, require=("model", "optimizer", "rng"))["step"] == state["step"] == 1
    assert state["recipe"]["estimator"]["proposal"]["ema"] and state["recipe"]["estimator"]["weighting"]["ema"]


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    write_code_running_pickle(tmp_path / "evil.pt", tmp_path / "ran")
    with pytest.raises(checkpoint.CheckpointError, match="refused: loading it would run code"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(RunsCode(tmp_path / "ran"), protocol=2))  # a bare pickle
    with pytest.raises(checkpoint.CheckpointError, match="refused"):
        checkpoint.load(tmp_path / "evil.pkl")
    assert not (tmp_path / "ran").exists()


def test_state_check_names_missing_unexpected_and_wrong_shape_tensors():
    model = LoopLM(model_config(d_model=32, n_layers=1, n_heads=2))
    state = {"model": dict(model.state_dict())}
    checkpoint.check_model_state(model, state, "same")  # fits: no error
    state["model"].pop("gate.bias")
    state["model"]["extra.weight"] = torch.zeros(1)
    state["model"]["embed.weight"] = torch.zeros(64, 16)
    state["model_config"] = {"d_model": 16, "n_layers": 1}
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.check_model_state(model, state, "ck.pt")
    message = str(error.value)
    for part in ("'ck.pt'", "missing 1: gate.bias", "unexpected 1: extra.weight",
                 "embed.weight (64, 16) in the checkpoint, (64, 32) here", "d_model=16 there, 32 here"):
        assert part in message


def test_stale_checkpoint_temporaries_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f".checkpoint.pt.tmp-{dead.pid}"
        kept = [tmp_path / f".checkpoint.pt.tmp-{live.pid}", tmp_path / f".checkpoint.pt.tmp-{os.getpid()}",
                tmp_path / checkpoint.CHECKPOINT_NAME, tmp_path / ".other.pt.tmp-1"]
        for path in [stale, *kept]:
            path.write_bytes(b"x")
        assert checkpoint.remove_stale_temporaries(tmp_path) == [stale]
        assert not stale.exists() and all(path.exists() for path in kept)
    finally:
        live.kill()
        live.wait()


# -- sequence length: not a bad input ---------------------------------------------------------
def test_sequences_have_no_maximum_length():
    """RoPE angles are computed per call from the positions and the model has no position table,
    so there is no maximum to exceed: a sequence far longer than the tasks' (here 600 > every
    gin task's seq_len) runs, and causality keeps its prefix's states those of the short run."""
    torch.manual_seed(0)
    model = LoopLM(model_config(d_model=32, n_layers=1, n_heads=2, n_loops=2)).eval()
    ids = torch.randint(0, 64, (1, 600))
    with torch.no_grad():
        long, short = model(ids).states[-1], model(ids[:, :20]).states[-1]
    assert torch.isfinite(long).all()
    torch.testing.assert_close(long[:, :20], short, rtol=1e-4, atol=1e-5)
