"""The collected tables: one row per grid point (mean ± std over seeds), per-loop tables, and the
CSV with every number."""

import math

from looplm.lab.aim_runs import EVAL_PER_LOOP, KNOWLEDGE_PER_LOOP
from looplm.lab.groups import Group

SCALARS = [("train_loss", "train loss", "{:.4f}"), ("exit_mean", "exit mean", "{:.2f}"),
           ("entropy", "exit entropy", "{:.3f}"), ("gate_loops", "Q-exit loops at full acc", "{:.2f}"),
           ("n_params", "params", "{:,.0f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
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
               ("exact_match", "eval exact match", "{:.1%}"),
               ("knowledge_bits", "knowledge bits (BiographyTask)", "{:,.0f}"),
               ("bits_per_param", "bits of knowledge per parameter (BiographyTask)", "{:.3f}")]


def csv_rows(groups: list[Group]) -> tuple[list[str], list[list]]:
    depth = max((len(g.per_loop("ce")) for g in groups), default=0)
    per_loop = [n for n in (*EVAL_PER_LOOP, *KNOWLEDGE_PER_LOOP) if any(g.per_loop(n) for g in groups)]
    header = ["grid_point", "n_seeds", "n_expected", "n_loops"]
    for key, _, _ in SCALARS:
        header += [f"{key}_mean", f"{key}_std"]
    for name in per_loop:
        for t in range(1, depth + 1):
            header += [f"eval_{name}_loop{t}_mean", f"eval_{name}_loop{t}_std"]
    rows = []
    for g in groups:
        row = [g.point, len(g.runs), g.expected, g.n_loops]
        for key, _, _ in SCALARS:
            row += list(g.scalar(key)[:2])
        for name in per_loop:
            stats = g.per_loop(name)
            for t in range(depth):
                row += list(stats[t][:2]) if t < len(stats) else [math.nan, math.nan]
        rows.append(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)

