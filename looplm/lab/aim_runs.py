"""A sweep's runs read back from Aim: what the table and plots need of each run (final train
loss, the last evaluation per loop, the early-exit frontier, tokens/s, wall time), its sweep id and
config (to group by and to compare), and which runs count (one per task: the one that got
furthest, then the newest)."""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from looplm.lab.paths import is_remote
from looplm.tracking import FRONTIER_KEYS

EVAL_PER_LOOP = ("ce", "acc", "exact_match")
KNOWLEDGE_PER_LOOP = ("knowledge_bits", "bits_per_param")  # BiographyTask's eval (the capacity sweep)
PER_TASK_HPARAMS = {"seed", "task", "task_id", "run_dir"}  # what the seeds of one grid point differ in
PER_TASK_BINDINGS = {"train.seed", "train.run_dir", "train.hparams"}


def run_config(hparams: dict) -> dict:
    """A run's config from its hparams, flat (`gin: Recipe.prior`, `model: d_model`, `steps`, ...),
    without what the seeds of one grid point differ in: the seed and the task's name, id and run
    folder. Two runs of one grid point must agree on every key."""
    flat = {}
    for key, value in hparams.items():
        if key in PER_TASK_HPARAMS:
            continue
        if key == "gin" and isinstance(value, str):  # older runs: the operative config's text
            value = dict(line.split(" = ", 1) for line in value.splitlines()
                         if " = " in line and not line.startswith((" ", "#")))
        if key in ("gin", "recipe", "model") and isinstance(value, dict):
            flat |= {f"{key}: {k}": v for k, v in value.items() if not (key == "gin" and k in PER_TASK_BINDINGS)}
        else:
            flat[key] = value
    return flat


@dataclass(eq=False)
class RunResult:
    """What the table and plots need of one Aim run."""

    run_hash: str
    task: str
    task_id: int  # in the sweep's declaration order (the order of the table without --expect-tasks)
    point: str
    seed: int
    run_dir: str
    steps: int  # the configured number of steps
    n_loops: int  # trained T
    created: float
    n_params: float = math.nan
    sweep_id: str | None = None  # the sweep's id (looplm.lab.declaration.Sweep.id); None outside a sweep
    config: dict = field(default_factory=dict)  # run_config of its hparams
    loss_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tokens_per_s: float = math.nan
    eval_step: int = -1
    eval: dict = field(default_factory=dict)  # ce/acc/exact_match/exit_p: per loop; exit_mean, entropy
    frontier: list = field(default_factory=list)  # early-exit points of the last evaluation (looplm.exits)
    wall_s: float = math.nan

    @property
    def last_step(self) -> int:
        return int(self.loss_steps[-1]) if len(self.loss_steps) else -1

    @property
    def problem(self) -> str | None:
        """Why this run does not count, or None."""
        if self.last_step < self.steps - 1:
            return f"stopped at step {self.last_step + 1} of {self.steps}"
        if self.eval_step < self.steps:
            return f"no final evaluation (last at step {self.eval_step})"
        return None


def open_aim(repo: str, wait_s: float = 180.0):
    """The repo, with every finished run indexed (looplm.tracking.open_repo). Through an Aim
    server (aim://) the index is the one `aim up` keeps on the server's host, lazily: wait until
    every run the server lists shows in it, or wait_s."""
    if is_remote(repo):
        import aim

        remote = aim.Repo.from_path(repo)
        deadline = time.monotonic() + wait_s
        while True:
            unindexed = set(remote.list_all_runs()) - {run.hash for run in remote.iter_runs()}
            if not unindexed or time.monotonic() > deadline:
                break
            print(f"waiting for the Aim server's index: {len(unindexed)} run(s) not in it yet "
                  "(`aim up` must run on the server's repo)", flush=True)
            time.sleep(5)
        if unindexed:
            print(f"warning: {len(unindexed)} run(s) still not indexed after {wait_s:.0f}s: "
                  f"{sorted(unindexed)}", flush=True)
        return remote
    if not Path(repo, ".aim").is_dir():
        raise FileNotFoundError(f"no Aim repo at {repo!r}")
    from looplm.tracking import open_repo

    return open_repo(repo)


def read_run(run) -> RunResult:
    hp = run["hparams"]
    result = RunResult(run_hash=run.hash, task=str(hp.get("task", run.hash)), task_id=int(hp.get("task_id", 0)),
                       point=str(hp.get("grid_point", "all")), seed=int(hp.get("seed", 0)),
                       run_dir=str(hp.get("run_dir", "")), steps=int(hp.get("steps", 0)),
                       n_loops=int(hp.get("model", {}).get("n_loops", 0)), created=float(run.creation_time),
                       n_params=float(hp.get("n_params", math.nan)),
                       sweep_id=hp.get("sweep_id"), config=run_config(hp))
    evals: dict[tuple, tuple] = {}
    for metric in run.metrics():
        context = metric.context.to_dict()
        subset = context.get("subset")
        if subset == "train" and metric.name in ("loss", "tokens_per_s", "wall_time") and "loop" not in context:
            steps, (values,) = metric.data.view("val").numpy()
            if metric.name == "loss":
                result.loss_steps, result.loss = steps, values
            elif metric.name == "wall_time" and len(values):
                result.wall_s = float(values[-1])  # the trainer's seconds, summed over requeues
            elif len(values):
                result.tokens_per_s = float(values[1:].mean() if len(values) > 1 else values[0])
        elif subset == "eval":
            steps, (values,) = metric.data.view("val").numpy()
            if len(steps):
                evals[metric.name, context.get("loop")] = (int(steps[-1]), float(values[-1]))
    if evals:
        result.eval_step = min(step for step, _ in evals.values())
        for name in (*EVAL_PER_LOOP, *KNOWLEDGE_PER_LOOP, "exit_p"):
            loops = sorted(loop for n, loop in evals if n == name and loop is not None)
            result.eval[name] = [evals[name, loop][1] for loop in loops]
        for name in ("exit_mean", "entropy"):
            if (name, None) in evals:
                result.eval[name] = evals[name, None][1]
    stored = run.get("exit_frontier") or {}
    if stored.get("step") == result.eval_step:  # the last evaluation's, not an earlier one's
        result.frontier = [{k: p[k] for k in FRONTIER_KEYS} for p in stored["points"]]
    return result


def read_experiment(repo, experiment: str) -> list[RunResult]:
    """The experiment's runs in task order (Aim lists runs in no particular order)."""
    runs = [read_run(run) for run in repo.iter_runs() if run.experiment == experiment]
    return sorted(runs, key=lambda r: (r.task_id, r.task, r.created))


def dedupe(results: list[RunResult]) -> tuple[list[RunResult], list[RunResult]]:
    """One run per run directory (a task): the one that got furthest, then the newest."""
    best: dict[str, RunResult] = {}
    for r in sorted(results, key=lambda r: (r.problem is None, r.last_step, r.created)):
        best[r.run_dir or r.run_hash] = r
    kept = set(map(id, best.values()))
    return [r for r in results if id(r) in kept], [r for r in results if id(r) not in kept]

