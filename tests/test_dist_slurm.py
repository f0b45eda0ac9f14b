"""A 2-rank task on the local Slurm: `srun` starts one process per task, looplm reads its rank
from SLURM_PROCID/SLURM_NTASKS and the master from the job's node list, and the two ranks train
one DDP run (rank 0 writes the checkpoint, which records the world size)."""

import sys
from pathlib import Path

import pytest

from looplm import checkpoint

pytestmark = pytest.mark.slurm

TWO_RANKS = """#!/bin/bash
export OMP_NUM_THREADS=1
srun --ntasks=2 {python} -m looplm.run --gin gin/full_unroll.gin \\
  --bind "train.parallel = 'ddp'" --bind "train.run_dir = '{run_dir}'" --bind "TRAIN_STEPS = 4" \\
  --bind "Tracker.enabled = False" --bind "model_config.d_model = 32" --bind "AdditionTask.n_eval = 16" \\
  --bind "train.batch_size = 8"
"""


def test_srun_runs_one_task_on_two_ranks(slurm_cluster, tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "two_ranks.sh"
    script.write_text(TWO_RANKS.format(python=sys.executable, run_dir=tmp_path / "run"))
    job = slurm_cluster.submit([f"--chdir={root}", "--ntasks=2", f"--output={tmp_path}/job.log", str(script)])
    slurm_cluster.wait(job, timeout=300)
    log = (tmp_path / "job.log").read_text()
    assert slurm_cluster.job_state(job) == "COMPLETED", log
    state = checkpoint.load(tmp_path / "run" / checkpoint.CHECKPOINT_NAME)
    assert state["world_size"] == 2 and state["step"] == 4, log
