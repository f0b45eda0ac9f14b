"""N ranks compute what one process computes (gloo on the CPU, launched by torchrun): for every
recipe family, 2 ranks under DDP and under FSDP2 match one process with the same global batch
(losses and final parameters within 1e-4); a checkpoint written at 2 ranks resumes at 1 and gives
the uninterrupted run's losses; every rank draws the same loop counts and sampled loops."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looplm import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_cases  # noqa: E402

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, out: Path, stage1: Path, modes: str, cases: list[str], *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
           f"--master-port={free_port()}", str(HERE / "dist_worker.py"), str(out), str(stage1), modes,
           ",".join(cases), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun of 2 ranks trains every case under DDP and FSDP; the references run here."""
    root = tmp_path_factory.mktemp("dist")
    stage1 = root / "stage1"
    dist_cases.run("full_unroll", stage1, steps=4)
    torchrun(2, root, stage1, "ddp", dist_cases.CASES)
    torchrun(2, root, stage1, "fsdp", [c for c in dist_cases.CASES if (c, "fsdp") not in dist_cases.REFUSED])
    for case in dist_cases.CASES:
        dist_cases.run(case, root / f"{case}-none", stage1=stage1)
    return root


def final(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)


PAIRS = [(case, mode) for case in dist_cases.CASES for mode in ("ddp", "fsdp")
         if (case, mode) not in dist_cases.REFUSED]


@pytest.mark.parametrize("case, mode", PAIRS)
def test_two_ranks_match_one_process(runs, case, mode):
    one, two = final(runs / f"{case}-none"), final(runs / f"{case}-{mode}")
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["step"] == dist_cases.STEPS
    atol = dist_cases.TOLERANCE.get(case, 1e-4)
    torch.testing.assert_close(torch.tensor(two["history"]), torch.tensor(one["history"]), rtol=0, atol=atol)
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=0, atol=atol, msg=name)
    changed = [n for n, v in one["model"].items() if not torch.equal(v, final(runs / "stage1")["model"][n])]
    assert changed, "the run trained nothing"


def test_a_checkpoint_written_at_two_ranks_resumes_at_one(runs, tmp_path):
    """Stopped at step 5 at 2 ranks (FSDP, sharded parameters gathered into the checkpoint), then
    resumed in one process: the next 5 losses are the uninterrupted run's."""
    torchrun(2, tmp_path, runs / "stage1", "fsdp", ["sampled_seq"], "stop_at=5")
    part = tmp_path / "sampled_seq-fsdp"
    assert final(part)["step"] == 5 and final(part)["world_size"] == 2
    resumed = dist_cases.run("sampled_seq", part)
    reference = final(runs / "sampled_seq-none")["history"]
    torch.testing.assert_close(torch.tensor(resumed["history"][5:]), torch.tensor(reference[5:]),
                               rtol=0, atol=1e-4)


def test_fsdp_refuses_a_double_backward_regularizer_with_a_clear_error(tmp_path):
    torchrun_fails = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}",
         str(HERE / "dist_worker.py"), str(tmp_path), str(tmp_path), "fsdp", "jacobian"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert torchrun_fails.returncode != 0
    assert "train.parallel='fsdp' cannot train PowerIterationJacobian" in torchrun_fails.stderr


@pytest.mark.parametrize("case", ["sampled_seq", "random_loops", "sampled_step"])
def test_every_rank_draws_the_loops_one_process_draws(case):
    """The plan is a function of (seed, step): T and the sampled loop agree on every rank, and
    per-row loops of the ranks' shares are the one-process batch's rows, at every step."""
    recipe = dist_cases.recipe(case)
    for step in range(40):
        whole = recipe.plan(step, 3, 8)
        shares = [recipe.plan(step, 3, 8, rows=slice(r * 4, r * 4 + 4)) for r in range(2)]
        for share in shares:
            assert (share.n_loops, share.run_loops, share.readout) == (whole.n_loops, whole.run_loops, whole.readout)
            assert share.extra.get("t") == whole.extra.get("t")
        if "rows" in whole.extra:
            assert torch.equal(torch.cat([s.extra["rows"] for s in shares]), whole.extra["rows"])
