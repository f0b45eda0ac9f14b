"""Runs grouped by sweep id and grid point across seeds: mean, std and count of every scalar,
per-loop metric and early-exit point. A group holds one config over several seeds: runs whose
configs differ in more than the seed (runs outside a sweep, a grid point whose bindings changed)
or that repeat a seed are refused, never averaged."""

import math
from dataclasses import dataclass

import numpy as np

from looplm.exits import loops_to_full_depth
from looplm.lab.aim_runs import RunResult


@dataclass
class Expected:
    """A task the sweep declares, which a complete run should stand for."""

    task: str
    point: str
    seed: int
    run_dir: str


def _stats(values) -> tuple[float, float, int]:
    values = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not len(values):
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values)


class MixedRuns(ValueError):
    """Runs that collect would put in one group are not one config over several seeds."""


@dataclass
class Group:
    point: str  # the grid point; with runs of several sweeps, followed by the sweep's id
    runs: list[RunResult]
    expected: int
    sweep_id: str | None = None

    @property
    def n_loops(self) -> int:
        return max((r.n_loops for r in self.runs), default=0)

    def scalar(self, name: str):
        getters = {"train_loss": lambda r: float(r.loss[-1]) if len(r.loss) else math.nan,
                   "tokens_per_s": lambda r: r.tokens_per_s, "wall_s": lambda r: r.wall_s,
                   "n_params": lambda r: r.n_params,
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
    """One group per (sweep id, grid point), in the order of `expected` (one sweep's tasks) or of
    the results; raises MixedRuns when a group's runs are not one config over distinct seeds."""
    keys = list(dict.fromkeys([(None, e.point) for e in expected] if expected else
                              [(r.sweep_id, r.point) for r in results]))
    if expected:  # one sweep's runs (collect keeps only those): a grid point is the whole key
        by_key = {k: [r for r in results if r.point == k[1]] for k in keys}
    else:
        by_key = {k: [r for r in results if (r.sweep_id, r.point) == k] for k in keys}
    several = len({sweep_id for sweep_id, _ in keys}) > 1
    groups = []
    for key in keys:
        sweep_id, point = key
        runs = sorted(by_key[key], key=lambda r: r.seed)
        label = f"{point} [{sweep_id or 'no sweep'}]" if several else point
        groups.append(Group(label, runs, sum(e.point == point for e in expected) if expected else len(runs),
                            sweep_id))
    for g in groups:
        check_one_config(g)
    return groups


def check_one_config(group: Group) -> None:
    """Raise MixedRuns, naming the runs and the keys, unless the group's runs share one config
    (looplm.lab.aim_runs.run_config) and each has its own seed."""
    by_seed: dict[int, RunResult] = {}
    first = group.runs[0] if group.runs else None
    for run in group.runs:
        keys = sorted((k for k in set(first.config) | set(run.config) if first.config.get(k) != run.config.get(k)),
                      key=_salience)
        if keys:
            shown = "; ".join(f"{k}: {first.config.get(k, '<unset>')!r} vs {run.config.get(k, '<unset>')!r}"
                              for k in keys[:8])
            more = f" (and {len(keys) - 8} more keys)" if len(keys) > 8 else ""
            raise MixedRuns(f"grid point {group.point!r}: runs {_name(first)} and {_name(run)} differ in more "
                            f"than the seed, so they are not seeds of one config: {shown}{more}. Collect groups runs "
                            "by sweep id and grid point; give unrelated runs their own Tracker.experiment, or run "
                            "them as one sweep")
        if run.seed in by_seed:
            raise MixedRuns(f"grid point {group.point!r}: runs {_name(by_seed[run.seed])} and {_name(run)} have the "
                            f"same config and the same seed {run.seed}: averaging them would count one seed twice; "
                            "collect one of them")
        by_seed[run.seed] = run


def _salience(key: str) -> tuple[int, str]:
    """Differences named first: the recipe's families, then the gin bindings that chose them."""
    return (0 if key.startswith("recipe: ") else 1 if key.startswith("gin: Recipe.") else 2, key)


def _name(r: RunResult) -> str:
    return f"{r.run_hash} ({r.run_dir or r.task})"
