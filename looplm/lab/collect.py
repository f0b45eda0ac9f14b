"""Collect a sweep: its runs from Aim, grouped by sweep id and grid point across seeds, as a table
of mean ± std and plots.

    python -m looplm.analyze --experiment prior_ablation --repo runs/aim --out results/
    python -m looplm.analyze --expect-tasks sweeps/prior_ablation.py   # names, repo, out from the sweep

Per grid point: final train loss, eval loss (ce), token accuracy and exact match at every loop
count 1..2T, mean exit step and exit entropy (all from the last evaluation), tokens/s (mean over
steps) and wall time (the trainer's `wall_time` metric: seconds of training summed over requeues).
Writes table.csv (every number, mean and std columns), table.md, runs.csv (one
line per run or expected task, with its status), loss_curves.png, accuracy_vs_loops.png and
exit_distribution.png into --out.

A run counts when it reached its final step and its final evaluation. With --expect-tasks every
task of the sweep (with the same LOOPLM_SWEEP_* overrides as the tasks had) must have such a run;
missing and incomplete ones are reported by name, the table is written for the others, and the
exit code is 1 (so a job chained after this one sees the failure). A task run twice (e.g. a
re-submitted sweep in the same folder) counts once: the run that got furthest, then the newest.

Runs are grouped by their sweep's id (looplm.lab.declaration.Sweep.id) and grid point; with
--expect-tasks only the runs of that sweep's id count. A group whose runs differ in more than the
seed (e.g. runs outside a sweep, which all share the grid point "all"), or repeat a seed, is
refused with exit code 2, naming the runs and the keys, instead of averaged; so are a repo that
does not exist and an experiment with no runs.
"""

import argparse
import csv
import sys
from pathlib import Path

from looplm.lab.aim_runs import RunResult, dedupe, open_aim, read_experiment
from looplm.lab.declaration import Sweep, load
from looplm.lab.groups import Expected, Group, MixedRuns, group_runs
from looplm.lab.paths import paths
from looplm.lab.plots import (plot_accuracy_vs_loops, plot_exit_distribution, plot_exit_frontier,
                              plot_knowledge_capacity, plot_loss_curves)
from looplm.lab.tables import LOOP_TABLES, SUMMARY_HEADER, csv_rows, loop_rows, markdown, summary_rows


class NothingToCollect(ValueError):
    """No repo, no runs of the experiment, or none of the sweep: there is no table to write."""


def expected_tasks(sweep_file: str):
    """The sweep, its paths and its tasks, with the LOOPLM_SWEEP_* overrides the tasks ran with."""
    sweep = load(sweep_file)
    where = paths(sweep)
    tasks = [Expected(t.name, t.point, t.seed, str(where.run_dir(t))) for t in sweep.tasks()]
    return sweep, where, tasks


def read_runs(repo_path: str, experiment: str, sweep: Sweep | None) -> tuple[list[RunResult], list[RunResult]]:
    """(the experiment's runs, of `sweep` only when given; the runs of other sweeps left out). A
    run recorded before sweep ids counts for the sweep of its experiment."""
    try:
        repo = open_aim(repo_path)
    except FileNotFoundError as err:
        raise NothingToCollect(f"{err}: nothing to collect (--repo, or LOOPLM_AIM_REPO for a sweep)") from None
    results = read_experiment(repo, experiment)
    if not results:
        names = sorted({run.experiment for run in repo.iter_runs()} - {None})
        raise NothingToCollect(f"no runs of experiment {experiment!r} in the Aim repo {repo_path!r} "
                               f"(its experiments: {', '.join(names) or 'none'})")
    if sweep is None:
        return results, []
    ours = [r for r in results if r.sweep_id in (None, sweep.id)]
    others = [r for r in results if r not in ours]
    if not ours:
        ids = sorted({r.sweep_id for r in others})
        raise NothingToCollect(f"no runs of sweep {sweep.name!r} (id {sweep.id}) in the Aim repo {repo_path!r}: "
                               f"its {len(others)} run(s) of experiment {experiment!r} belong to sweep id(s) "
                               f"{', '.join(ids)} (other bindings or LOOPLM_SWEEP_BIND)")
    return ours, others


def count_runs(results: list[RunResult], expected: list[Expected] | None):
    """(counted runs, problems as (task, why), runs that are no task of the sweep)."""
    if expected is None:
        problems = [(r.task, f"incomplete: {r.problem} (run {r.run_hash})") for r in results if r.problem]
        return [r for r in results if r.problem is None], problems, []
    by_dir = {r.run_dir: r for r in results}
    counted, problems = [], []
    for e in expected:
        r = by_dir.get(e.run_dir)
        if r is None:
            problems.append((e.task, "missing: no Aim run"))
        elif r.problem:
            problems.append((e.task, f"incomplete: {r.problem} (run {r.run_hash})"))
        else:
            counted.append(r)
    dirs = {e.run_dir for e in expected}
    return counted, problems, [r for r in results if r.run_dir not in dirs]


def write_results(out: Path, experiment: str, groups: list[Group], results, counted, problems, expected,
                  console) -> list[str]:
    """Print the tables; write table.csv, runs.csv, table.md and the plots into `out`; returns
    the names written."""
    from rich.table import Table

    header, rows = SUMMARY_HEADER, summary_rows(groups)
    table = Table(*header, title=f"{experiment}: mean ± std over seeds (eval at the trained T)")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    loop_tables = []
    for name, title, fmt in LOOP_TABLES:
        loop_header, loops = loop_rows(groups, name, fmt)
        if len(loop_header) == 1:  # no run has this metric (the knowledge bits outside BiographyTask)
            continue
        title = f"{title} per loop count (* trained T)"
        loop_tables.append((title, loop_header, loops))
        loop_table = Table(*loop_header, title=title)
        for row in loops:
            loop_table.add_row(*row)
        console.print(loop_table)

    out.mkdir(parents=True, exist_ok=True)
    csv_header, csv_body = csv_rows(groups)
    with open(out / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([csv_header, *csv_body])
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "grid_point", "seed", "status", "run_hash", "last_step", "steps", "run_dir"])
        status = dict(problems)
        for r in results:
            writer.writerow([r.task, r.point, r.seed, status.get(r.task, "ok" if r in counted else "not expected"),
                             r.run_hash, r.last_step + 1, r.steps, r.run_dir])
        for e in expected or []:
            if status.get(e.task, "").startswith("missing"):
                writer.writerow([e.task, e.point, e.seed, status[e.task], "", "", "", e.run_dir])
    md = [f"# {experiment}", "", f"{len(counted)} runs counted. Mean ± std over seeds; eval at "
          "the trained T.", "", markdown(header, rows)]
    for title, loop_header, loops in loop_tables:
        md += ["", f"## {title[0].upper()}{title[1:]}", "", markdown(loop_header, loops)]
    if problems:
        md += ["", "## Missing or failed tasks", ""] + [f"- `{task}`: {why}" for task, why in problems]
    (out / "table.md").write_text("\n".join(md) + "\n")

    plots = {"loss_curves.png": plot_loss_curves, "accuracy_vs_loops.png": plot_accuracy_vs_loops,
             "exit_distribution.png": plot_exit_distribution, "exit_frontier.png": plot_exit_frontier}
    if any(g.per_loop("knowledge_bits") for g in groups):
        plots["knowledge_capacity.png"] = plot_knowledge_capacity
    for name, draw in plots.items():
        draw(groups, out / name)
    return ["table.csv", "table.md", "runs.csv", *plots]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", help="the Aim experiment (a sweep's name)")
    parser.add_argument("--repo", help="the Aim repo (folder or aim://host:port)")
    parser.add_argument("--out", help="folder for the table and plots")
    parser.add_argument("--expect-tasks", metavar="SWEEP.py",
                        help="report every task of this sweep without a complete run; defaults "
                             "--experiment, --repo and --out (<sweep dir>/results) from it")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    sweep, expected = None, None
    if args.expect_tasks:
        try:
            sweep, where, expected = expected_tasks(args.expect_tasks)
        except (ValueError, FileNotFoundError) as err:
            print(f"collect error: {err}", file=sys.stderr)
            return 2
        args.experiment = args.experiment or sweep.name
        args.repo = args.repo or where.repo
        args.out = args.out or str(where.results)
    missing_args = [name for name in ("experiment", "repo", "out") if not getattr(args, name)]
    if missing_args:
        parser.error(f"give --{', --'.join(missing_args)} (or --expect-tasks)")
    try:
        results, other_sweeps = read_runs(args.repo, args.experiment, sweep)
        results, superseded = dedupe(results)
        counted, problems, unexpected = count_runs(results, expected)
        groups = group_runs(counted, expected)
    except (NothingToCollect, MixedRuns) as err:
        print(f"collect error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    written = write_results(out, args.experiment, groups, results, counted, problems, expected, console)

    for r in superseded:
        console.print(f"note: run {r.run_hash} of task {r.task} superseded by a later or longer one")
    for r in unexpected:
        console.print(f"note: run {r.run_hash} ({r.task}, {r.run_dir}) is not a task of {args.expect_tasks} "
                      "with the current overrides: left out")
    for r in other_sweeps:
        console.print(f"note: run {r.run_hash} ({r.task}) belongs to sweep {r.sweep_id}, not {sweep.id}: left out",
                      highlight=False)
    console.print(f"wrote {out}/{', '.join(written)}", highlight=False)
    if problems:
        console.print(f"[bold red]{len(problems)} missing or failed task(s):[/]")
        for task, why in problems:
            console.print(f"  {task}: {why}", highlight=False)
        return 1
    if not counted:
        console.print(f"[bold red]no complete runs of experiment {args.experiment!r} in {args.repo}[/]")
        return 1
    return 0
