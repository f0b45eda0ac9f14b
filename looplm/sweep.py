"""Sweeps: gin files plus a grid of gin bindings times seeds, one task per grid point and seed.

A sweep is declared in one Python file under sweeps/ that defines `SWEEP = Sweep(...)`:

    SWEEP = Sweep(
        name="prior_ablation",                 # Aim experiment, output folder, Slurm job name
        base=["gin/full_unroll.gin"],          # gin files every task reads
        bind=["import variants.priors"],       # bindings every task gets
        grid={                                 # axis -> values; the grid is their product
            "prior": {                         # a dict: label -> binding(s) or Bundle
                "uniform": "Recipe.prior = @UniformPrior()",
                "geometric_0.5": ["Recipe.prior = @GeometricPrior()", "GeometricPrior.lambda_p = 0.5"],
            },
            "UniformPrior.beta": [0.01, 0.1],  # a list: the axis is one gin parameter
        },
        seeds=[0, 1, 2],
    )

A `Bundle(gin=[...], bind=[...])` value adds gin files (read after `base`) as well as bindings.
Task ids run over the grid points in declaration order (the last axis fastest), seeds innermost:
task i is point i // len(seeds) with seed seeds[i % len(seeds)]. `SLURM_ARRAY_TASK_ID` and
`--task` use the same numbering, so task 7 of an array can be rerun on a laptop:

    python -m looplm.sweep list SWEEP.py              task id -> grid point, gin files, bindings
    python -m looplm.sweep count SWEEP.py             the number of tasks (--array=0-(count-1))
    python -m looplm.sweep run SWEEP.py --task 7      run task 7 here; exits with the trainer's code
    python -m looplm.sweep run SWEEP.py --task 7 --print   only print its `python -m looplm.run` line
    python -m looplm.sweep collect SWEEP.py           table and plots of its runs (looplm.analyze)

A task trains with `train.run_dir = <sweep dir>/<task name>` (the task name, e.g.
`prior=uniform,beta=0.1,seed=0`, does not depend on the id, so a task resumes its own checkpoint
whichever grid selection it was started from), into one Aim run of experiment `<sweep name>`
whose hparams hold the grid point (`grid`, `grid_point`), the task name, the seed and the full gin
config. Bindings apply in this order, later ones winning: the sweep's `bind`, the grid point's,
LOOPLM_SWEEP_BIND, then the run directory, seed and tracker that the sweep sets itself.

Environment overrides, read by every command so that list, count, run and collect agree:
    LOOPLM_SWEEP_GRID   a smaller grid: `prior=uniform,geometric_0.5;beta=0.1` keeps these labels
                        (axes by full or short name; an axis not named keeps all its values)
    LOOPLM_SWEEP_SEEDS  other seeds: `0` or `0,1`
                        (in both, spaces may separate values instead of commas: `sbatch --export`
                        splits its argument at every comma)
    LOOPLM_SWEEP_BIND   extra gin bindings, ';'-separated: `train.steps = 6; train.eval_every = 3`
    LOOPLM_SWEEP_DIR    the sweep's output folder (default runs/sweeps/<name>)
    LOOPLM_AIM_REPO     the Aim repo (default runs/aim), or `aim://host:53800` for an Aim server
"""

import argparse
import dataclasses
import fcntl
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_AIM_REPO = "runs/aim"
_LABEL = re.compile(r"[\w.+-]+")


@dataclass(frozen=True)
class Bundle:
    """One grid value that sets several things at once: gin files and bindings."""

    bind: tuple[str, ...] = ()
    gin: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "bind", _strings(self.bind, "Bundle.bind"))
        object.__setattr__(self, "gin", _strings(self.gin, "Bundle.gin"))


@dataclass(frozen=True)
class Value:
    """One value of one axis: its label, what hparams record, and what it sets."""

    label: str
    hparam: object
    gin: tuple[str, ...]
    bind: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    id: int
    name: str  # e.g. "prior=uniform,beta=0.1,seed=0": the run directory's name
    point: str  # e.g. "prior=uniform,beta=0.1": what seeds are grouped by
    grid: dict  # axis -> value (the scalar of a parameter axis, else the label)
    seed: int
    gin: tuple[str, ...]  # the grid point's gin files (after the sweep's base files)
    bind: tuple[str, ...]  # the grid point's bindings


@dataclass
class Sweep:
    name: str
    base: list[str]
    grid: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    bind: list[str] = field(default_factory=list)
    overrides: tuple[str, ...] = ()  # LOOPLM_SWEEP_BIND: after the grid's bindings
    file: Path | None = None  # the declaration, once loaded

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name):
            raise ValueError(f"Sweep.name={self.name!r}: use letters, digits, '_', '.', '-'")
        self.base = list(_strings(self.base, "Sweep.base"))
        self.bind = list(_strings(self.bind, "Sweep.bind"))
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Sweep.seeds={self.seeds}: give at least one seed, each once")
        self.axes = {axis: _axis_values(axis, values) for axis, values in self.grid.items()}
        shorts = [_short(axis) for axis in self.axes]
        if len(set(shorts)) != len(shorts):
            raise ValueError(f"grid axes {list(self.axes)} share a short name {shorts}: rename one")

    def tasks(self) -> list[Task]:
        tasks = []
        for values in itertools.product(*self.axes.values()):
            point = ",".join(f"{_short(a)}={v.label}" for a, v in zip(self.axes, values))
            for seed in self.seeds:
                tasks.append(Task(
                    id=len(tasks), name=f"{point},seed={seed}" if point else f"seed={seed}",
                    point=point or "all", grid={a: v.hparam for a, v in zip(self.axes, values)},
                    seed=seed, gin=tuple(f for v in values for f in v.gin),
                    bind=tuple(b for v in values for b in v.bind)))
        return tasks

    def select(self, spec: str) -> "Sweep":
        """The sweep on a smaller grid: `axis=label,label;axis=label` keeps those labels (labels
        may be separated by spaces instead, which passes through `sbatch --export`)."""
        by_name = {**{_short(a): a for a in self.axes}, **{a: a for a in self.axes}}
        grid = dict(self.grid)
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            name, _, labels = part.partition("=")
            axis = by_name.get(name.strip())
            if axis is None:
                raise ValueError(f"LOOPLM_SWEEP_GRID: no axis {name.strip()!r} in sweep "
                                 f"{self.name!r}; axes: {list(self.axes)}")
            wanted = [label for label in re.split(r"[,\s]+", labels) if label]
            known = {v.label: v for v in self.axes[axis]}
            unknown = [label for label in wanted if label not in known]
            if unknown or not wanted:
                raise ValueError(f"LOOPLM_SWEEP_GRID: axis {axis!r} has no value(s) {unknown or wanted}; "
                                 f"labels: {list(known)}")
            grid[axis] = {label: known[label] for label in wanted}
        return dataclasses.replace(self, grid=grid)


def _strings(value, what: str) -> tuple[str, ...]:
    values = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{what}={value!r}: expected strings")
    return values


def _short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def _literal(value) -> str:
    """A gin (Python) literal, strings in double quotes so that a shell line quotes it cleanly."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_literal, value)) + "]"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    raise ValueError(f"grid value {value!r} has no gin literal: use a string binding instead")


def _gin_literal(value) -> str:
    if isinstance(value, str) and value[:1] in "@%":  # a configurable reference or macro
        return value
    return _literal(value)


def _axis_values(axis: str, values) -> list[Value]:
    """A list makes `axis` a gin parameter (`UniformPrior.beta: [0.01, 0.1]`); a dict maps each
    label to a binding, a list of bindings, or a Bundle."""
    if isinstance(values, dict):
        out = []
        for label, value in values.items():
            if isinstance(value, Value):  # already normalised (a selected sweep)
                out.append(value)
                continue
            bundle = value if isinstance(value, Bundle) else Bundle(bind=_strings(value, f"grid[{axis!r}]"))
            out.append(Value(str(label), label, bundle.gin, bundle.bind))
    elif isinstance(values, (list, tuple)):
        if "." not in axis:
            raise ValueError(f"grid axis {axis!r} has a list of values, so it must be a gin parameter "
                             "such as 'UniformPrior.beta'; give a dict {label: bindings} otherwise")
        out = [Value(v if isinstance(v, str) else repr(v), v, (), (f"{axis} = {_gin_literal(v)}",))
               for v in values]
    else:
        raise ValueError(f"grid axis {axis!r}: give a list of values or a dict of labelled values")
    labels = [v.label for v in out]
    if not out or len(set(labels)) != len(labels) or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"grid axis {axis!r}: labels {labels} must be distinct, non-empty, and made of "
                         "letters, digits, '_', '.', '+', '-'")
    return out


def load(path: str | Path, env=None) -> Sweep:
    """The sweep declared in `path` (its SWEEP), with the LOOPLM_SWEEP_* overrides of `env`."""
    env = os.environ if env is None else env
    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(f"_looplm_sweep_{path.stem}", path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"sweep file {str(path)!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep = getattr(module, "SWEEP", None)
    if not isinstance(sweep, Sweep):
        raise ValueError(f"{path} must define SWEEP = looplm.sweep.Sweep(...)")
    if env.get("LOOPLM_SWEEP_GRID"):
        sweep = sweep.select(env["LOOPLM_SWEEP_GRID"])
    if env.get("LOOPLM_SWEEP_SEEDS"):
        seeds = [int(s) for s in re.split(r"[,\s]+", env["LOOPLM_SWEEP_SEEDS"]) if s]
        sweep = dataclasses.replace(sweep, seeds=seeds)
    overrides = tuple(b.strip() for b in re.split(r"[;\n]", env.get("LOOPLM_SWEEP_BIND", "")) if b.strip())
    return dataclasses.replace(sweep, overrides=overrides, file=path)


@dataclass(frozen=True)
class Paths:
    """Where a sweep writes: <dir>/<task name>/ per task, <dir>/logs/, <dir>/results/."""

    dir: Path
    repo: str  # an Aim repo folder, or aim://host:port

    def run_dir(self, task: Task) -> Path:
        return self.dir / task.name

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def results(self) -> Path:
        return self.dir / "results"

    @property
    def remote(self) -> bool:
        return is_remote(self.repo)


def is_remote(repo: str) -> bool:
    """Whether an Aim repo is a tracking server (`aim://host:port`) rather than a folder."""
    return str(repo).startswith("aim://")


def paths(sweep: Sweep, env=None) -> Paths:
    env = os.environ if env is None else env
    repo = env.get("LOOPLM_AIM_REPO") or DEFAULT_AIM_REPO
    return Paths(dir=Path(env.get("LOOPLM_SWEEP_DIR") or f"runs/sweeps/{sweep.name}").absolute(),
                 repo=repo if is_remote(repo) else str(Path(repo).absolute()))


def _gin_path(name: str) -> str:
    """A declared gin file: relative to the current folder if it is there, else to the repository."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return str(path)
    return str(REPO_ROOT / path)


def run_argv(sweep: Sweep, task: Task, where: Paths) -> list[str]:
    """The `python -m looplm.run` arguments of one task."""
    run_dir = str(where.run_dir(task))
    hparams = {"sweep": sweep.name, "task": task.name, "task_id": task.id, "grid_point": task.point,
               "grid": task.grid, "run_dir": run_dir}
    binds = [*sweep.bind, *task.bind, *sweep.overrides,
             f"train.run_dir = {_literal(run_dir)}", f"train.seed = {task.seed}", "train.tracker = @Tracker()",
             f"Tracker.repo = {_literal(where.repo)}", f"Tracker.experiment = {_literal(sweep.name)}",
             "Tracker.enabled = True", f"train.hparams = {_literal(hparams)}"]
    return ([arg for f in (*sweep.base, *task.gin) for arg in ("--gin", _gin_path(f))]
            + [arg for b in binds for arg in ("--bind", b)])


def ensure_aim_repo(repo: str) -> None:
    """Create the Aim repo once: the first tasks of an array start together, and Aim's own
    initialisation is not safe against several processes creating the same repo at once."""
    import aim

    if aim.Repo.exists(repo):
        return
    Path(repo).mkdir(parents=True, exist_ok=True)
    with open(Path(repo) / ".looplm-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not aim.Repo.exists(repo):
            aim.Repo.from_path(repo, init=True)


def release_stale_run_lock(repo: str, run_dir: Path) -> None:
    """A requeued task may find its Aim run still locked by its previous, killed incarnation (a
    hard kill leaves the lock; Aim clears stale locks only for processes of the same machine).
    Slurm starts a task again only after the old one ended, so that lock is stale: release it."""
    import aim
    import torch
    from aim.sdk.lock_manager import LockManager

    from looplm.checkpoint import CHECKPOINT_NAME

    checkpoint = run_dir / CHECKPOINT_NAME
    if not checkpoint.exists():
        return
    run_hash = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False).get("run_hash")
    locks = LockManager(aim.Repo.from_path(repo).path)
    if run_hash and locks.get_run_lock_info(run_hash).locked:
        print(f"sweep: releasing the stale Aim lock of run {run_hash} (left by a killed earlier start)",
              flush=True)
        locks.release_locks(run_hash, force=True)


def run_task(sweep: Sweep, task: Task, where: Paths) -> int:
    """Train one task in this process (so a signal sent to it reaches the trainer) and return the
    trainer's exit code: 0 done, 2 config error, 3 pre-empted (checkpointed, start it again)."""
    run_dir = where.run_dir(task)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not where.remote:
        ensure_aim_repo(where.repo)
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            release_stale_run_lock(where.repo, run_dir)
    from looplm.run import main

    return main(run_argv(sweep, task, where))


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


def _print_list(sweep: Sweep, where: Paths) -> None:
    from rich.console import Console
    from rich.table import Table

    tasks = sweep.tasks()
    console = Console(width=None if sys.stdout.isatty() else 200)
    n_points = len(tasks) // len(sweep.seeds)
    console.print(f"sweep [bold]{sweep.name}[/] ({sweep.file}): {len(tasks)} tasks = {n_points} grid "
                  f"points x seeds {sweep.seeds}; base {sweep.base}", highlight=False)
    console.print(f"output {where.dir}, Aim repo {where.repo}", highlight=False)
    if sweep.bind or sweep.overrides:
        console.print(f"every task binds: {'; '.join([*sweep.bind, *sweep.overrides])}", highlight=False)
    table = Table("id", "task (run directory)", "gin files", "bindings")
    for task in tasks:
        table.add_row(str(task.id), task.name, "\n".join(task.gin), "\n".join(task.bind))
    console.print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in [("list", "print task id -> grid point, gin files and bindings"),
                       ("count", "print the number of tasks"),
                       ("run", "run one task here (exit code: the trainer's)"),
                       ("collect", "table and plots of the sweep's runs (python -m looplm.analyze)"),
                       ("chain-collect", "submit the collect job after an array (used by sweeps/task.sh)")]:
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("sweep", help="a sweep declaration, e.g. sweeps/prior_ablation.py")
        if name == "run":
            command.add_argument("--task", type=int, default=os.environ.get("SLURM_ARRAY_TASK_ID"),
                                 help="task id (default: $SLURM_ARRAY_TASK_ID)")
            command.add_argument("--print", action="store_true", help="print the command, do not run it")
        if name == "chain-collect":
            command.add_argument("--after", required=True, help="the array's job id")
            command.add_argument("--log", help="the collect job's log (default <sweep dir>/logs/)")
    args = parser.parse_args(argv)
    try:
        sweep = load(args.sweep)
    except (ValueError, FileNotFoundError) as err:
        print(f"sweep error: {err}", file=sys.stderr)
        return 2
    where = paths(sweep)
    if args.command == "list":
        _print_list(sweep, where)
    elif args.command == "count":
        print(len(sweep.tasks()))
    elif args.command == "run":
        tasks = sweep.tasks()
        if args.task is None or not 0 <= int(args.task) < len(tasks):
            print(f"sweep error: --task {args.task}: sweep {sweep.name!r} has tasks 0-{len(tasks) - 1} "
                  f"(python -m looplm.sweep list {args.sweep})", file=sys.stderr)
            return 2
        task = tasks[int(args.task)]
        if args.print:
            print(shlex.join(["python", "-m", "looplm.run", *run_argv(sweep, task, where)]))
            return 0
        print(f"sweep {sweep.name}: task {task.id}/{len(tasks)} {task.name} -> {where.run_dir(task)}",
              flush=True)
        return run_task(sweep, task, where)
    elif args.command == "collect":
        from looplm import analyze

        return analyze.main(["--expect-tasks", str(sweep.file), "--experiment", sweep.name,
                             "--repo", where.repo, "--out", str(where.results)])
    elif args.command == "chain-collect":
        chain_collect(sweep, where, args.after, args.log)
    return 0


if __name__ == "__main__":
    # Run the imported module's main: declarations build `looplm.sweep.Sweep`s, not `__main__.Sweep`s.
    from looplm.sweep import main as _main

    sys.exit(_main())
