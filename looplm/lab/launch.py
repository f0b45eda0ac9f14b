"""Running a sweep's tasks: the `python -m looplm.run` arguments of a task, training it in this
process (the Aim repo created once, a killed start's stale run lock released), the check that a
Slurm array fits the sweep, and the collect job chained after the array.

A task trains with `train.run_dir = <sweep dir>/<task name>` (the name, e.g.
`prior=uniform,beta=0.1,seed=0`, does not depend on the id, so a task resumes its own checkpoint
whichever grid selection it was started from), into one Aim run of experiment `<sweep name>`
whose hparams hold the sweep's id (`sweep_id`), the grid point (`grid`, `grid_point`), the task
name, the seed and the full gin config. Bindings apply in this order, later ones winning: the
sweep's `bind`, the grid point's, LOOPLM_SWEEP_BIND, then the run directory, seed and tracker that
the sweep sets itself.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from looplm.lab.declaration import Sweep, Task, gin_literal
from looplm.lab.paths import Paths
from looplm.tracking import ensure_repo

REPO_ROOT = Path(__file__).resolve().parents[2]


def _gin_path(name: str) -> str:
    """A declared gin file: relative to the current folder if it is there, else to the repository."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return str(path)
    return str(REPO_ROOT / path)


def run_argv(sweep: Sweep, task: Task, where: Paths) -> list[str]:
    """The `python -m looplm.run` arguments of one task."""
    run_dir = str(where.run_dir(task))
    hparams = {"sweep": sweep.name, "sweep_id": sweep.id, "task": task.name, "task_id": task.id,
               "grid_point": task.point, "grid": task.grid, "run_dir": run_dir}
    binds = [*sweep.bind, *task.bind, *sweep.overrides,
             f"train.run_dir = {gin_literal(run_dir)}", f"train.seed = {task.seed}", "train.tracker = @Tracker()",
             f"Tracker.repo = {gin_literal(where.repo)}", f"Tracker.experiment = {gin_literal(sweep.name)}",
             "Tracker.enabled = True", f"train.hparams = {gin_literal(hparams)}"]
    return ([arg for f in (*sweep.base, *task.gin) for arg in ("--gin", _gin_path(f))]
            + [arg for b in binds for arg in ("--bind", b)])


def declared_array(sweep: Sweep) -> tuple[Path, str] | None:
    """The .slurm file next to the declaration and its `#SBATCH --array=` value, if it has one."""
    script = sweep.file.with_suffix(".slurm") if sweep.file else None
    if script is None or not script.is_file():
        return None
    match = re.search(r"^#SBATCH\s+--array=(\S+)", script.read_text(), re.MULTILINE)
    return (script, match[1]) if match else None


def array_problem(sweep: Sweep, env) -> str | None:
    """Why the Slurm array a task runs in does not fit the sweep (tasks beyond the grid, or the
    .slurm file's own --array line left behind by a changed grid), or None. An array smaller
    than the sweep is fine when given on the command line (rerunning some tasks)."""
    if "SLURM_ARRAY_TASK_MAX" not in env:
        return None
    n, low, high = len(sweep.tasks()), int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env["SLURM_ARRAY_TASK_MAX"])
    fix = f"submit with --array=0-{n - 1} (python -m looplm.sweep count {sweep.file})"
    if high >= n:
        return (f"the Slurm array {low}-{high} of job {env.get('SLURM_ARRAY_JOB_ID', '?')} runs tasks beyond the "
                f"{n} tasks (0-{n - 1}) of sweep {sweep.name!r} with the current LOOPLM_SWEEP_* overrides: {fix}")
    declared = declared_array(sweep)
    if declared and declared[1].split("%")[0] == f"{low}-{high}" and high != n - 1:
        return (f"{declared[0]}: its '#SBATCH --array={declared[1]}' line does not match the {n} tasks of "
                f"sweep {sweep.name!r}: write --array=0-{n - 1}, or {fix}")
    return None


def release_stale_run_lock(repo: str, run_dir: Path) -> None:
    """A requeued task may find its Aim run still locked by its previous, killed incarnation (a
    hard kill leaves the lock; Aim clears stale locks only for processes of the same machine).
    Slurm starts a task again only after the old one ended, so that lock is stale: release it."""
    import aim
    from aim.sdk.lock_manager import LockManager

    from looplm.checkpoint import CHECKPOINT_NAME, load

    checkpoint = run_dir / CHECKPOINT_NAME
    if not checkpoint.exists():
        return
    run_hash = load(checkpoint).get("run_hash")  # safe loading: weights_only=True
    locks = LockManager(aim.Repo.from_path(repo).path)
    if run_hash and locks.get_run_lock_info(run_hash).locked:
        print(f"sweep: releasing the stale Aim lock of run {run_hash} (left by a killed earlier start)",
              flush=True)
        locks.release_locks(run_hash, force=True)


def run_task(sweep: Sweep, task: Task, where: Paths, run_flags: tuple[str, ...] = ()) -> int:
    """Train one task in this process (so a signal sent to it reaches the trainer) and return the
    trainer's exit code: 0 done, 2 config error, 3 pre-empted (checkpointed, start it again).
    Under a launcher of N ranks (LOOPLM_LAUNCHER) every rank runs this with the same task.
    run_flags: `python -m looplm.run` flags for a run folder that holds a run (--resume, --overwrite)."""
    from looplm.dist.world import env_rank  # torch: only where a task trains

    run_dir = where.run_dir(task)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not where.remote and env_rank() == 0:  # a task of N ranks: rank 0 alone writes Aim (looplm.dist)
        ensure_repo(where.repo)
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            release_stale_run_lock(where.repo, run_dir)
    from looplm.run import main

    return main([*run_argv(sweep, task, where), *run_flags])


def chain_collect(sweep: Sweep, where: Paths, array_job_id: str, log: str | None = None) -> str | None:
    """Submit the collect job of an array, once: `--dependency=afterok` on the whole array."""
    where.logs.mkdir(parents=True, exist_ok=True)
    log = log or str(where.logs / f"{array_job_id}_collect.out")
    marker = where.logs / f"{array_job_id}_collect.jobid"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        print(f"sweep: collect job of array {array_job_id} already submitted ({marker})")
        return None
    collect = [sys.executable, "-m", "looplm.sweep", "collect", str(sweep.file)]
    cmd = ["sbatch", "--parsable", f"--dependency=afterok:{array_job_id}", "--kill-on-invalid-dep=yes",
           f"--job-name={sweep.name}-collect", f"--output={log}",
           "--time=00:30:00", "--cpus-per-task=1", f"--chdir={os.getcwd()}", f"--wrap={shlex.join(collect)}"]
    # The task's own SLURM_* variables (array ids, cpus, ...) must not leak into the new job.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        os.close(fd)
        marker.unlink()
        raise RuntimeError(f"{shlex.join(cmd)} failed: {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    os.write(fd, f"{job_id}\n".encode())
    os.close(fd)
    print(f"sweep: collect job {job_id} runs after array {array_job_id} succeeds (log {log})")
    return job_id
