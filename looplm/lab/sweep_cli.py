"""`python -m looplm.sweep`: list, count, run and collect the tasks of a sweep declaration.

    python -m looplm.sweep list SWEEP.py              task id -> grid point, gin files, bindings
    python -m looplm.sweep count SWEEP.py             the number of tasks (--array=0-(count-1))
    python -m looplm.sweep check SWEEP.py             the .slurm file's --array line matches the count
    python -m looplm.sweep run SWEEP.py --task 7      run task 7 here; exits with the trainer's code
    python -m looplm.sweep run SWEEP.py --task 7 --print   only print its `python -m looplm.run` line
    python -m looplm.sweep run SWEEP.py --task 7 --resume  continue its run with a new TRAIN_STEPS
    python -m looplm.sweep collect SWEEP.py           table and plots of its runs (looplm.analyze)

A sweep declaration (looplm/lab/declaration.py) is gin files plus a grid of gin bindings times
seeds. Task ids run over the grid points in declaration order (the last axis fastest), seeds
innermost: task i is point i // len(seeds) with seed seeds[i % len(seeds)]. `SLURM_ARRAY_TASK_ID`
and `--task` use the same numbering, so task 7 of an array can be rerun on a laptop. A task of a
Slurm array that does not fit the sweep (tasks beyond its count, or the .slurm file's own
--array line behind a changed grid) stops with exit code 2 before it trains.

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
import os
import shlex
import sys

from looplm.lab.declaration import Sweep, load
from looplm.lab.launch import array_problem, chain_collect, declared_array, run_argv, run_task
from looplm.lab.paths import Paths, paths


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


def _check(sweep: Sweep) -> int:
    n = len(sweep.tasks())
    declared = declared_array(sweep)
    if declared is None:
        print(f"sweep error: no '#SBATCH --array=' line in {sweep.file.with_suffix('.slurm')}", file=sys.stderr)
        return 2
    script, array = declared
    if array.split("%")[0] != f"0-{n - 1}":
        print(f"sweep error: {script}: '#SBATCH --array={array}' does not match the {n} tasks of sweep "
              f"{sweep.name!r}: write --array=0-{n - 1}", file=sys.stderr)
        return 2
    print(f"sweep {sweep.name}: {n} tasks, {script.name} --array={array}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in [("list", "print task id -> grid point, gin files and bindings"),
                       ("count", "print the number of tasks"),
                       ("check", "check that the .slurm file's --array line covers the tasks"),
                       ("run", "run one task here (exit code: the trainer's)"),
                       ("collect", "table and plots of the sweep's runs (python -m looplm.analyze)"),
                       ("chain-collect", "submit the collect job after an array (used by sweeps/task.sh)")]:
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("sweep", help="a sweep declaration, e.g. sweeps/prior_ablation.py")
        if name == "run":
            command.add_argument("--task", type=int, default=os.environ.get("SLURM_ARRAY_TASK_ID"),
                                 help="task id (default: $SLURM_ARRAY_TASK_ID)")
            command.add_argument("--print", action="store_true", help="print the command, do not run it")
            existing = command.add_mutually_exclusive_group()
            existing.add_argument("--resume", dest="run_flags", action="store_const", const=("--resume",),
                                  default=(), help="continue the task's run with a new TRAIN_STEPS (looplm.run)")
            existing.add_argument("--overwrite", dest="run_flags", action="store_const", const=("--overwrite",),
                                  help="start the task's run over (looplm.run)")
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
    elif args.command == "check":
        return _check(sweep)
    elif args.command == "run":
        tasks = sweep.tasks()
        if args.task is None or not 0 <= int(args.task) < len(tasks):
            print(f"sweep error: --task {args.task}: sweep {sweep.name!r} has tasks 0-{len(tasks) - 1} "
                  f"(python -m looplm.sweep list {args.sweep})", file=sys.stderr)
            return 2
        problem = array_problem(sweep, os.environ)
        if problem:
            print(f"sweep error: {problem}", file=sys.stderr)
            return 2
        task = tasks[int(args.task)]
        if args.print:
            print(shlex.join(["python", "-m", "looplm.run", *run_argv(sweep, task, where), *args.run_flags]))
            return 0
        print(f"sweep {sweep.name}: task {task.id}/{len(tasks)} {task.name} -> {where.run_dir(task)}",
              flush=True)
        return run_task(sweep, task, where, args.run_flags)
    elif args.command == "collect":
        from looplm.lab.collect import main as collect

        return collect(["--expect-tasks", str(sweep.file), "--experiment", sweep.name,
                        "--repo", where.repo, "--out", str(where.results)])
    elif args.command == "chain-collect":
        chain_collect(sweep, where, args.after, args.log)
    return 0
