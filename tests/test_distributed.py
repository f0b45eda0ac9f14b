"""N ranks compute what one process computes (gloo on the CPU, launched by torchrun): for every
recipe family, 2 ranks under DDP and under FSDP2 match one process with the same global batch
(losses and final parameters within 1e-4); every rank draws the same loop counts and sampled
loops. Checkpoints across world sizes and pre-emption: tests/test_dist_preemption.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looplm import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_cases  # noqa: E402

HERE = Path(__file__).resolve().parent


def torchrun(n: int, out: Path, stage1: Path, modes: str, cases: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
           f"--master-port={dist_cases.free_port()}", str(HERE / "dist_worker.py"), str(out), str(stage1), modes,
           ",".join(cases)]
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
    return checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME, require=("model",))  # whole, if sharded


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


def test_fsdp_refuses_a_vjp_inside_the_loss_with_a_clear_error(tmp_path):
    torchrun_fails = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={dist_cases.free_port()}",
         str(HERE / "dist_worker.py"), str(tmp_path), str(tmp_path), "fsdp", "jacobian"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert torchrun_fails.returncode != 0
    assert "train.parallel='fsdp' cannot train PowerIterationJacobian(" in torchrun_fails.stderr
    assert "PowerIterationJacobian.mode = 'jvp'" in torchrun_fails.stderr  # names the form that runs


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
