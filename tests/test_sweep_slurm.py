"""Sweeps on a real (local, single-node) Slurm: `sbatch sweeps/prior_ablation.slurm` end to end with
a tiny override, a task pre-empted mid-run that requeues itself and resumes into the same Aim
run, and the same for a task of two ranks (srun as LOOPLM_LAUNCHER)."""

import csv
import json
from pathlib import Path

import pytest
import torch
from slurm_cluster import poll

from looplm import checkpoint
from looplm.lab.declaration import load

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "prior_ablation.slurm"
PRIOR = ROOT / "sweeps" / "prior_ablation.py"
TINY = ("AdditionTask.n_eval = 32; model_config.d_model = 32; model_config.n_layers = 1; "
        "model_config.d_ff = 64; train.batch_size = 16")


def submit(cluster, tmp: Path, grid: str, seeds: str, bind: str, env: dict | None = None,
           sbatch: tuple[str, ...] = ()) -> tuple[str, dict]:
    """sbatch the shipped script as a user would, the override through --export (values without
    commas: --export splits at commas), the array sized by `looplm.sweep count`; `env` and
    `sbatch`: more variables (LOOPLM_LAUNCHER) and options."""
    overrides = {"LOOPLM_SWEEP_GRID": grid, "LOOPLM_SWEEP_SEEDS": seeds, "LOOPLM_SWEEP_BIND": bind,
                 "LOOPLM_SWEEP_DIR": str(tmp / "sweep"), "LOOPLM_AIM_REPO": str(tmp / "aim"),
                 "LOOPLM_ROOT": str(ROOT), **(env or {})}
    assert not any("," in v for v in overrides.values())
    n = len(load(PRIOR, overrides).tasks())
    export = ",".join(["ALL", *(f"{k}={v}" for k, v in overrides.items())])
    array_id = cluster.submit([f"--export={export}", f"--array=0-{n - 1}", f"--chdir={ROOT}",
                               f"--output={tmp}/%x_%A_%a.out", *sbatch, str(SCRIPT)])
    return array_id, overrides


def collect_job(tmp: Path, array_id: str) -> str:
    marker = tmp / "sweep" / "logs" / f"{array_id}_collect.jobid"
    poll(marker.exists, 60, "the collect job submitted by the array's first task")
    poll(lambda: marker.read_text().strip() != "", 10, "the collect job id")
    return marker.read_text().strip()


def metric_steps(repo: Path) -> dict[str, dict]:
    """{task name: {(metric, subset, loop): [steps]}} of every run of the repo."""
    from looplm.tracking import open_repo

    out = {}
    for run in open_repo(str(repo)).iter_runs():
        task = run["hparams"]["task"]
        assert task not in out, f"two Aim runs for task {task}"
        out[task] = {(m.name, m.context.to_dict().get("subset"), m.context.to_dict().get("loop")):
                     m.data.view("val").numpy()[0].tolist() for m in run.metrics()
                     if not m.name.startswith("__system__")}
    return out


def logs(tmp: Path) -> str:
    return "\n".join(f"===== {p.name}\n{p.read_text()}" for p in sorted(tmp.glob("*.out")))


def test_sbatch_prior_ablation_end_to_end(slurm_cluster, tmp_path):  # noqa: F811
    steps = 6
    array_id, env = submit(slurm_cluster, tmp_path, grid="prior=uniform geometric_0.5;beta=0.1",
                           seeds="0 1", bind=f"TRAIN_STEPS = {steps}; train.eval_every = 3; {TINY}")
    collect_id = collect_job(tmp_path, array_id)
    slurm_cluster.wait(array_id, timeout=150)
    slurm_cluster.wait(collect_id, timeout=60)

    assert slurm_cluster.array_states(array_id) == {i: "COMPLETED" for i in range(4)}, logs(tmp_path)
    assert slurm_cluster.job_state(collect_id) == "COMPLETED", logs(tmp_path)
    tasks = load(PRIOR, env).tasks()
    for task in tasks:  # one log per task, named %A_%a
        assert f"task {array_id}_{task.id} " in (tmp_path / f"prior_ablation_{array_id}_{task.id}.out").read_text()
    runs = metric_steps(tmp_path / "aim")
    assert sorted(runs) == sorted(t.name for t in tasks)
    for series in runs.values():
        assert series["loss", "train", None] == list(range(steps))
        assert series["acc", "eval", 8] == [3, 6]

    results = tmp_path / "sweep" / "results"
    _, *rows = csv.reader((results / "table.csv").open())
    assert [(row[0], row[1]) for row in rows] == [("prior=uniform,beta=0.1", "2"),
                                                  ("prior=geometric_0.5,beta=0.1", "2")]
    assert "Missing" not in (results / "table.md").read_text()
    for png in ("loss_curves.png", "accuracy_vs_loops.png", "exit_distribution.png"):
        assert (results / png).stat().st_size > 20_000
    assert "wrote" in (tmp_path / f"prior_ablation_{array_id}_collect.out").read_text()


def test_preempted_task_requeues_and_resumes_into_the_same_aim_run(slurm_cluster, tmp_path):  # noqa: F811
    steps = 300
    array_id, _ = submit(slurm_cluster, tmp_path, grid="prior=uniform;beta=0.1", seeds="0",
                         bind=f"TRAIN_STEPS = {steps}; train.eval_every = 100; train.log_every = 10; {TINY}")
    log = tmp_path / f"prior_ablation_{array_id}_0.out"
    poll(lambda: log.exists() and "step 20:" in log.read_text(), 90, "task 0 training")

    # What Slurm does two minutes before the time limit (--signal=B:USR1@120): USR1 to the batch shell.
    slurm_cluster.check(["scancel", "--signal=USR1", "--batch", f"{array_id}_0"])
    poll(lambda: slurm_cluster.array_states(array_id)[0] == "PENDING", 60, "task requeued")
    text = log.read_text()
    assert "got SIGUSR1" in text and "requeueing" in text, text
    saved = torch.load(tmp_path / "sweep" / "prior=uniform,beta=0.1,seed=0" / "checkpoint.pt",
                            weights_only=False)
    assert 20 <= saved["step"] < steps  # written on the signal, mid-run
    # Released at once instead of after the ~2 min requeue delay; not in the very second the
    # first start ended (slurmd would refuse the launch: "Job credential revoked").
    slurm_cluster.check(["scontrol", "update", f"JobId={array_id}_0", "StartTime=now+1"])
    collect_id = (tmp_path / "sweep" / "logs" / f"{array_id}_collect.jobid").read_text().strip()
    slurm_cluster.wait(array_id, timeout=120)
    slurm_cluster.wait(collect_id, timeout=60)

    assert slurm_cluster.array_states(array_id) == {0: "COMPLETED"}, logs(tmp_path)
    assert slurm_cluster.job_state(collect_id) == "COMPLETED", logs(tmp_path)
    text = log.read_text()
    assert "start 2" in text and "resumed from" in text, text
    [series] = metric_steps(tmp_path / "aim").values()  # one Aim run for the task
    assert series["loss", "train", None] == list(range(steps))  # each step once, none missing
    assert series["ce", "train", 4] == list(range(steps))
    assert series["acc", "eval", 1] == [100, 200, 300]


def test_a_task_on_two_ranks_is_preempted_requeued_and_resumed(slurm_cluster, tmp_path):  # noqa: F811
    """`sbatch --ntasks=2` with LOOPLM_LAUNCHER='srun --kill-on-bad-exit=1': srun starts the task's
    two ranks (DDP, one process each). USR1 to the batch shell reaches both through srun; they
    stop at one step, write their shards, wait for rank 0's summary, and the task requeues and
    resumes at 2 ranks. Rank 0 alone wrote the Aim run, checkpoint.pt and summary.json."""
    steps = 120
    array_id, _ = submit(slurm_cluster, tmp_path, grid="prior=uniform;beta=0.1", seeds="0",
                         bind=f"TRAIN_STEPS = {steps}; train.eval_every = 60; train.log_every = 10; "
                              f"train.parallel = 'ddp'; {TINY}",
                         env={"LOOPLM_LAUNCHER": "srun --kill-on-bad-exit=1"}, sbatch=("--ntasks=2",))
    log = tmp_path / f"prior_ablation_{array_id}_0.out"
    run_dir = tmp_path / "sweep" / "prior=uniform,beta=0.1,seed=0"
    poll(lambda: log.exists() and "step 20:" in log.read_text(), 120, "task 0 training on two ranks")
    slurm_cluster.check(["scancel", "--signal=USR1", "--batch", f"{array_id}_0"])
    poll(lambda: slurm_cluster.array_states(array_id)[0] == "PENDING", 60, "task requeued")
    text = log.read_text()
    # the first rank to exit (3) makes srun end the other (--kill-on-bad-exit), so srun's code may
    # be that rank's 143; task.sh requeues on any code after the signal
    assert "got SIGUSR1" in text and "requeueing" in text, text
    state = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)
    assert state["world_size"] == 2 and 20 <= state["step"] < steps, text
    first = json.loads((run_dir / "summary.json").read_text())  # rank 0 finished before any rank left
    assert first["status"] == "preempted" and first["step"] == state["step"], text
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (run_dir / state["shards"]).iterdir()}
    slurm_cluster.check(["scontrol", "update", f"JobId={array_id}_0", "StartTime=now+1"])
    collect_id = (tmp_path / "sweep" / "logs" / f"{array_id}_collect.jobid").read_text().strip()
    slurm_cluster.wait(array_id, timeout=180)
    slurm_cluster.wait(collect_id, timeout=60)

    assert slurm_cluster.array_states(array_id) == {0: "COMPLETED"}, logs(tmp_path)
    assert slurm_cluster.job_state(collect_id) == "COMPLETED", logs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "complete", logs(tmp_path)
    assert checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)["world_size"] == 2
    [series] = metric_steps(tmp_path / "aim").values()  # one Aim run: rank 1 wrote none
    assert series["loss", "train", None] == list(range(steps))  # each step once, none missing
    from looplm.tracking import open_repo

    [run] = open_repo(str(tmp_path / "aim")).iter_runs()
    assert run["hparams"]["world_size"] == 2
