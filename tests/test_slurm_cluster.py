"""The local Slurm cluster runs array jobs, dependencies and requeue-on-signal like the real one."""

import time

import pytest
from slurm_cluster import poll

pytestmark = pytest.mark.slurm

ARRAY_TASK = """#!/bin/bash
echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_JOB_ID" > task-$SLURM_ARRAY_TASK_ID.txt
sleep 1
date +%s.%N > task-$SLURM_ARRAY_TASK_ID.end
"""

AFTER_ARRAY = """#!/bin/bash
date +%s.%N > after.start
ls task-*.txt > after.seen
"""

# Traps USR1 like a training run saving a checkpoint before preemption, then requeues itself.
REQUEUE = """#!/bin/bash
if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then
    echo "$SLURM_RESTART_COUNT" > restart_count
    exit 0
fi
trap 'touch checkpointed; scontrol requeue $SLURM_JOB_ID; exit 0' USR1
touch trap_ready
sleep 100 &
wait
"""


def test_array_then_dependent_job(slurm_cluster, tmp_path):  # noqa: F811
    (tmp_path / "task.sh").write_text(ARRAY_TASK)
    (tmp_path / "after.sh").write_text(AFTER_ARRAY)
    common = [f"--chdir={tmp_path}", "--output=%x-%A_%a.log"]
    array_id = slurm_cluster.submit([*common, "--array=0-3", "task.sh"])
    after_id = slurm_cluster.submit([*common, f"--dependency=afterok:{array_id}", "after.sh"])

    slurm_cluster.wait(after_id, timeout=30)

    assert slurm_cluster.array_states(array_id) == {task: "COMPLETED" for task in range(4)}
    assert slurm_cluster.job_state(after_id) == "COMPLETED"
    for task in range(4):
        assert (tmp_path / f"task-{task}.txt").read_text().split() == [str(task), array_id]
    assert (tmp_path / "after.seen").read_text().split() == [f"task-{task}.txt" for task in range(4)]
    last_task_end = max(float((tmp_path / f"task-{task}.end").read_text()) for task in range(4))
    assert float((tmp_path / "after.start").read_text()) >= last_task_end


def test_requeue_on_signal(slurm_cluster, tmp_path):  # noqa: F811
    (tmp_path / "job.sh").write_text(REQUEUE)
    # The time-limit signal would come ~110 s in; the test sends USR1 itself as soon as the trap is set.
    job_id = slurm_cluster.submit(
        [f"--chdir={tmp_path}", "--output=job.log", "--open-mode=append",
         "--time=2", "--requeue", "--signal=B:USR1@10", "job.sh"]
    )
    poll((tmp_path / "trap_ready").exists, 20, f"job {job_id} started")
    slurm_cluster.check(["scancel", "--signal=USR1", "--batch", job_id])
    poll(lambda: slurm_cluster.job_state(job_id) == "PENDING", 20, f"job {job_id} requeued")
    assert (tmp_path / "checkpointed").exists()

    # A requeued job waits ~2 min (BeginTime) before it may start again: release it now. Not in
    # the second its first run was killed in, though: slurmd would refuse that launch ("Job
    # credential revoked") and fail the job. (StartTime=now+1 instead waits for a backfill pass.)
    time.sleep(1)
    slurm_cluster.check(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    slurm_cluster.wait(job_id, timeout=30)

    assert slurm_cluster.job_state(job_id) == "COMPLETED"
    assert (tmp_path / "restart_count").read_text().strip() == "1"
