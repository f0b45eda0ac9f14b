"""Collect a sweep: its runs from Aim, grouped by grid point across seeds, as a table of mean ± std
and plots.

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
"""

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from looplm.exits import draw_frontier, loops_to_full_depth
from looplm.sweep import is_remote

EVAL_PER_LOOP = ("ce", "acc", "exact_match")
FRONTIER_METRICS = {"exit_acc": "acc", "exit_exact_match": "exact_match", "exit_loops": "mean_loops"}


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
                       n_loops=int(hp.get("model", {}).get("n_loops", 0)), created=float(run.creation_time))
    evals: dict[tuple, tuple] = {}
    frontier: dict[tuple, dict] = {}
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
        elif subset == "eval" and "exit_rule" in context and metric.name in FRONTIER_METRICS:
            steps, (values,) = metric.data.view("val").numpy()
            if len(steps):
                key = (context["exit_rule"], context["threshold"])
                point = frontier.setdefault(key, {"rule": key[0], "threshold": key[1]})
                point[FRONTIER_METRICS[metric.name]] = float(values[-1])
        elif subset == "eval":
            steps, (values,) = metric.data.view("val").numpy()
            if len(steps):
                evals[metric.name, context.get("loop")] = (int(steps[-1]), float(values[-1]))
    if evals:
        result.eval_step = min(step for step, _ in evals.values())
        for name in (*EVAL_PER_LOOP, "exit_p"):
            loops = sorted(loop for n, loop in evals if n == name and loop is not None)
            result.eval[name] = [evals[name, loop][1] for loop in loops]
        for name in ("exit_mean", "entropy"):
            if (name, None) in evals:
                result.eval[name] = evals[name, None][1]
    result.frontier = [p for p in frontier.values() if len(p) == 5]
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


@dataclass
class Expected:
    task: str
    point: str
    seed: int
    run_dir: str


def expected_tasks(sweep_file: str):
    from looplm import sweep as sweep_module

    sweep = sweep_module.load(sweep_file)
    where = sweep_module.paths(sweep)
    tasks = [Expected(t.name, t.point, t.seed, str(where.run_dir(t))) for t in sweep.tasks()]
    return sweep, where, tasks


# ----------------------------------------------------------------------------------- aggregation

def _stats(values) -> tuple[float, float, int]:
    values = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not len(values):
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values)


@dataclass
class Group:
    point: str
    runs: list[RunResult]
    expected: int

    @property
    def n_loops(self) -> int:
        return max((r.n_loops for r in self.runs), default=0)

    def scalar(self, name: str):
        getters = {"train_loss": lambda r: float(r.loss[-1]) if len(r.loss) else math.nan,
                   "tokens_per_s": lambda r: r.tokens_per_s, "wall_s": lambda r: r.wall_s,
                   "exit_mean": lambda r: r.eval.get("exit_mean", math.nan),
                   "entropy": lambda r: r.eval.get("entropy", math.nan),
                   "gate_loops": lambda r: loops_to_full_depth(r.frontier).get("q_exit") if r.frontier else None}
        return _stats(getters[name](r) for r in self.runs)

    def frontier(self) -> list[dict]:
        """Early-exit points (looplm.exits) averaged over seeds: mean exit loop, token accuracy and
        exact match per (rule, threshold); only the points every run of the group has."""
        per_run = [[(p["rule"], p["threshold"]) for p in r.frontier] for r in self.runs]
        keys = [k for k in dict.fromkeys(k for keys in per_run for k in keys) if all(k in ks for ks in per_run)]
        out = []
        for rule, threshold in keys:
            points = [p for r in self.runs for p in r.frontier if (p["rule"], p["threshold"]) == (rule, threshold)]
            out.append({"rule": rule, "threshold": threshold,
                        **{m: float(np.mean([p[m] for p in points])) for m in ("mean_loops", "acc", "exact_match")}})
        return out

    def per_loop(self, name: str) -> list[tuple[float, float, int]]:
        depth = max((len(r.eval.get(name, [])) for r in self.runs), default=0)
        return [_stats(r.eval[name][t] if t < len(r.eval.get(name, [])) else None for r in self.runs)
                for t in range(depth)]


def group_runs(results: list[RunResult], expected: list[Expected] | None) -> list[Group]:
    points = list(dict.fromkeys([e.point for e in expected] if expected else [r.point for r in results]))
    counts = {p: sum(e.point == p for e in expected) for p in points} if expected else {}
    by_point = {p: [r for r in results if r.point == p] for p in points}
    return [Group(p, sorted(by_point[p], key=lambda r: r.seed), counts.get(p, len(by_point[p])))
            for p in points]


SCALARS = [("train_loss", "train loss", "{:.4f}"), ("exit_mean", "exit mean", "{:.2f}"),
           ("entropy", "exit entropy", "{:.3f}"), ("gate_loops", "Q-exit loops at full acc", "{:.2f}"),
           ("tokens_per_s", "tokens/s", "{:,.0f}"),
           ("wall_s", "wall s", "{:.0f}")]


def _fmt(stat, fmt: str) -> str:
    mean, std, n = stat
    if n == 0:
        return "-"
    return fmt.format(mean) + ("" if n == 1 else " ± " + fmt.format(std))


def _at(stats: list, t: int):
    return stats[t - 1] if 0 < t <= len(stats) else (math.nan, math.nan, 0)


def summary_rows(groups: list[Group]) -> list[list[str]]:
    """The main table: one row per grid point; eval metrics at the trained T."""
    rows = []
    for g in groups:
        T = g.n_loops
        rows.append([g.point, f"{len(g.runs)}/{g.expected}", str(T or "-"),
                     _fmt(g.scalar("train_loss"), "{:.4f}"),
                     _fmt(_at(g.per_loop("ce"), T), "{:.4f}"),
                     _fmt(_at(g.per_loop("acc"), T), "{:.2%}"),
                     _fmt(_at(g.per_loop("exact_match"), T), "{:.2%}"),
                     *[_fmt(g.scalar(key), fmt) for key, _, fmt in SCALARS[1:]]])
    return rows


SUMMARY_HEADER = ["grid point", "seeds", "T", "train loss", "eval ce @T", "eval acc @T", "exact @T",
                  *[title for _, title, _ in SCALARS[1:]]]


def loop_rows(groups: list[Group], name: str, fmt: str) -> tuple[list[str], list[list[str]]]:
    """One eval metric at every loop count 1..2T; `*` marks the trained T (of the first point)."""
    depth = max((len(g.per_loop(name)) for g in groups), default=0)
    rows = []
    for g in groups:
        stats = g.per_loop(name)
        rows.append([g.point] + [_fmt(stats[t], fmt) if t < len(stats) else "" for t in range(depth)])
    trained = {g.n_loops for g in groups if g.runs}
    header = ["grid point"] + [f"{t}{'*' if trained == {t} else ''}" for t in range(1, depth + 1)]
    return header, rows


LOOP_TABLES = [("ce", "eval ce", "{:.3f}"), ("acc", "eval token accuracy", "{:.1%}"),
               ("exact_match", "eval exact match", "{:.1%}")]


def csv_rows(groups: list[Group]) -> tuple[list[str], list[list]]:
    depth = max((len(g.per_loop("ce")) for g in groups), default=0)
    header = ["grid_point", "n_seeds", "n_expected", "n_loops"]
    for key, _, _ in SCALARS:
        header += [f"{key}_mean", f"{key}_std"]
    for name in EVAL_PER_LOOP:
        for t in range(1, depth + 1):
            header += [f"eval_{name}_loop{t}_mean", f"eval_{name}_loop{t}_std"]
    rows = []
    for g in groups:
        row = [g.point, len(g.runs), g.expected, g.n_loops]
        for key, _, _ in SCALARS:
            row += list(g.scalar(key)[:2])
        for name in EVAL_PER_LOOP:
            stats = g.per_loop(name)
            for t in range(depth):
                row += list(stats[t][:2]) if t < len(stats) else [math.nan, math.nan]
        rows.append(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- plots

def _facets(groups: list[Group]):
    """Panels by the first grid axis (when there are two or more axes), one colour per value of
    the remaining axes, the same colour in every panel."""
    def split(point):
        parts = point.split(",")
        return (parts[0], ",".join(parts[1:])) if len(parts) > 1 else ("", point)

    panels = list(dict.fromkeys(split(g.point)[0] for g in groups))
    series = list(dict.fromkeys(split(g.point)[1] for g in groups))
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"]
    colors = {s: cmap(i % cmap.N) for i, s in enumerate(series)}
    return [(panel, [(g, split(g.point)[1], colors[split(g.point)[1]]) for g in groups
                     if split(g.point)[0] == panel]) for panel in panels]


def _figure(n_panels: int, n_rows: int = 1, width: float = 5.0, height: float = 3.6):
    """Panels side by side (3 per row), one shared y scale so that panels compare at a glance."""
    import matplotlib.pyplot as plt

    cols = min(n_panels, 3)
    panel_rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(panel_rows * n_rows, cols, figsize=(width * cols, height * panel_rows * n_rows),
                             squeeze=False, sharey="row" if n_rows > 1 else True)
    return fig, axes, cols


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_loss_curves(groups: list[Group], path: Path) -> None:
    facets = _facets([g for g in groups if g.runs])
    fig, axes, cols = _figure(max(len(facets), 1))
    longest = max((len(r.loss) for g in groups for r in g.runs), default=0)
    window = max(1, longest // 50)
    all_values = []
    for i, (panel, members) in enumerate(facets):
        ax = axes[i // cols][i % cols]
        for g, label, color in members:
            n = min(len(r.loss) for r in g.runs)
            curves = np.stack([_smooth(r.loss[:n], window) for r in g.runs])
            steps = g.runs[0].loss_steps[:n]
            mean = curves.mean(0)
            ax.plot(steps, mean, color=color, label=f"{label or g.point} (n={len(g.runs)})", lw=1.5)
            if len(g.runs) > 1:
                std = curves.std(0, ddof=1)
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
            all_values.append(curves)
        ax.set_title(panel or "train loss", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (objective)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    values = np.concatenate([c.ravel() for c in all_values]) if all_values else np.ones(1)
    if values.min() > 0 and values.max() / values.min() > 10:
        for ax in axes.ravel():
            ax.set_yscale("log")
    smoothing = f"moving average over {window} steps" if window > 1 else "per step"
    _finish(fig, axes, len(facets), f"train loss: the objective, prior term included ({smoothing}); "
                                    "band: mean ± std over seeds", path)


def plot_accuracy_vs_loops(groups: list[Group], path: Path) -> None:
    facets = _facets([g for g in groups if g.runs])
    n = max(len(facets), 1)
    fig, axes, cols = _figure(n, n_rows=2)
    panel_rows = math.ceil(n / cols)
    for i, (panel, members) in enumerate(facets):
        for row, (name, title) in enumerate([("acc", "token accuracy"), ("exact_match", "exact match")]):
            ax = axes[row * panel_rows + i // cols][i % cols]
            for g, label, color in members:
                stats = g.per_loop(name)
                loops = np.arange(1, len(stats) + 1)
                mean = np.array([s[0] for s in stats])
                std = np.nan_to_num(np.array([s[1] for s in stats]))
                ax.plot(loops, mean, "-o", color=color, ms=3, label=f"{label or g.point}")
                ax.fill_between(loops, mean - std, mean + std, color=color, alpha=0.15, lw=0)
                T = g.n_loops
                if 0 < T <= len(mean):
                    ax.plot([T], [mean[T - 1]], "*", color=color, ms=12, mec="black", mew=0.6)
            ax.set_title(f"{panel + ': ' if panel else ''}{title}", fontsize=10)
            ax.set_xlabel("loops at evaluation")
            ax.set_ylabel(title)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    for extra in range(len(facets), panel_rows * cols):
        for row in range(2):
            axes[row * panel_rows + extra // cols][extra % cols].axis("off")
    _finish(fig, axes, axes.size, "held-out accuracy vs loop count (★ trained T); band: ± std over seeds", path)


def plot_exit_distribution(groups: list[Group], path: Path) -> None:
    facets = _facets([g for g in groups if g.runs])
    fig, axes, cols = _figure(max(len(facets), 1))
    for i, (panel, members) in enumerate(facets):
        ax = axes[i // cols][i % cols]
        width = 0.8 / max(len(members), 1)
        for j, (g, label, color) in enumerate(members):
            stats = g.per_loop("exit_p")
            loops = np.arange(1, len(stats) + 1)
            mean = np.array([s[0] for s in stats])
            std = np.nan_to_num(np.array([s[1] for s in stats]))
            exit_mean = g.scalar("exit_mean")[0]
            ax.bar(loops - 0.4 + width * (j + 0.5), mean, width, yerr=std if len(g.runs) > 1 else None,
                   color=color, capsize=2, label=f"{label or g.point} (mean exit {exit_mean:.2f})")
        ax.set_title(panel or "exit distribution", fontsize=10)
        ax.set_xlabel("exit loop t")
        ax.set_ylabel("mean p(exit at t)")
        ax.set_xticks(range(1, max((g.n_loops for g, _, _ in members), default=1) + 1))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    _finish(fig, axes, len(facets), "mean exit distribution on held-out data; error bars: std over seeds",
            path)


def plot_exit_frontier(groups: list[Group], path: Path) -> None:
    """Exact match against mean exit loop for each early-exit rule (Ouro's Figure 5), per grid point."""
    facets = _facets([g for g in groups if g.runs])
    fig, axes, cols = _figure(max(len(facets), 1))
    for i, (panel, members) in enumerate(facets):
        ax = axes[i // cols][i % cols]
        for g, label, color in members:
            draw_frontier(ax, g.frontier(), label=label or g.point, color=color)
        ax.set_title(panel or "early exit", fontsize=10)
        ax.set_xlabel("mean exit loop")
        ax.set_ylabel("exact match")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    _finish(fig, axes, len(facets), "early exit: exact match vs mean exit loop\n(mean over seeds)", path)


def _finish(fig, axes, n_used: int, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes.ravel()[n_used:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main

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
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    expected = None
    if args.expect_tasks:
        sweep, where, expected = expected_tasks(args.expect_tasks)
        args.experiment = args.experiment or sweep.name
        args.repo = args.repo or where.repo
        args.out = args.out or str(where.results)
    missing_args = [name for name in ("experiment", "repo", "out") if not getattr(args, name)]
    if missing_args:
        parser.error(f"give --{', --'.join(missing_args)} (or --expect-tasks)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    try:
        results = read_experiment(open_aim(args.repo), args.experiment)
    except FileNotFoundError as err:
        console.print(f"[red]{err}[/]")
        results = []
    results, superseded = dedupe(results)
    problems: list[tuple[str, str]] = []  # (task, why)
    if expected is not None:
        by_dir = {r.run_dir: r for r in results}
        counted = []
        for e in expected:
            r = by_dir.get(e.run_dir)
            if r is None:
                problems.append((e.task, "missing: no Aim run"))
            elif r.problem:
                problems.append((e.task, f"incomplete: {r.problem} (run {r.run_hash})"))
            else:
                counted.append(r)
        unexpected = [r for r in results if r.run_dir not in {e.run_dir for e in expected}]
    else:
        counted = [r for r in results if r.problem is None]
        problems = [(r.task, f"incomplete: {r.problem} (run {r.run_hash})") for r in results if r.problem]
        unexpected = []
    groups = group_runs(counted, expected)

    header, rows = SUMMARY_HEADER, summary_rows(groups)
    table = Table(*header, title=f"{args.experiment}: mean ± std over seeds (eval at the trained T)")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    loop_tables = []
    for name, title, fmt in LOOP_TABLES:
        loop_header, loops = loop_rows(groups, name, fmt)
        title = f"{title} per loop count (* trained T)"
        loop_tables.append((title, loop_header, loops))
        loop_table = Table(*loop_header, title=title)
        for row in loops:
            loop_table.add_row(*row)
        console.print(loop_table)

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
    md = [f"# {args.experiment}", "", f"{len(counted)} runs counted. Mean ± std over seeds; eval at "
          "the trained T.", "", _markdown(header, rows)]
    for title, loop_header, loops in loop_tables:
        md += ["", f"## {title[0].upper()}{title[1:]}", "", _markdown(loop_header, loops)]
    if problems:
        md += ["", "## Missing or failed tasks", ""] + [f"- `{task}`: {why}" for task, why in problems]
    (out / "table.md").write_text("\n".join(md) + "\n")

    plot_loss_curves(groups, out / "loss_curves.png")
    plot_accuracy_vs_loops(groups, out / "accuracy_vs_loops.png")
    plot_exit_distribution(groups, out / "exit_distribution.png")
    plot_exit_frontier(groups, out / "exit_frontier.png")

    for r in superseded:
        console.print(f"note: run {r.run_hash} of task {r.task} superseded by a later or longer one")
    for r in unexpected:
        console.print(f"note: run {r.run_hash} ({r.task}, {r.run_dir}) is not a task of {args.expect_tasks} "
                      "with the current overrides: left out")
    console.print(f"wrote {out}/table.csv, table.md, runs.csv, loss_curves.png, accuracy_vs_loops.png, "
                  "exit_distribution.png, exit_frontier.png", highlight=False)
    if problems:
        console.print(f"[bold red]{len(problems)} missing or failed task(s):[/]")
        for task, why in problems:
            console.print(f"  {task}: {why}", highlight=False)
        return 1
    if not counted:
        console.print(f"[bold red]no complete runs of experiment {args.experiment!r} in {args.repo}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
