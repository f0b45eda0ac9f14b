"""Runs grouped by grid point across seeds: mean, std and count of every scalar, per-loop metric and
early-exit point."""

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

