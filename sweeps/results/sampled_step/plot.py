"""Curves and table of the sampled-step study from experiment.py's JSON files.

    python sweeps/results/sampled_step/plot.py OUT_PREFIX LABEL=run.json [LABEL=run.json ...]

Writes OUT_PREFIX.png (held-out exact match at T against step and against training FLOPs, and
the exit entropy and the exit probability of loop 1 against step) and OUT_PREFIX.md (final exact match per loop, exit distribution,
entropy, FLOPs relative to the first run, taken as the full-unroll reference, and the first
evaluation reaching 90% exact match at T).
"""

import gzip
import json
import sys
from pathlib import Path


def load(spec):
    """LABEL=PATH; PATH a JSON file of experiment.py, or the same gzipped (curves/*.json.gz)."""
    label, path = spec.split("=", 1)
    raw = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
    return label, json.loads(raw)


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for label, run in runs:
        T = len(run["eval"][0]["exit_p"])
        steps = [r["step"] for r in run["eval"]]
        em = [r["exact_match"][T - 1] for r in run["eval"]]
        style = dict(lw=2.5, color="black") if run is runs[0][1] else dict(lw=1.4)
        axes[0].plot(steps, em, label=label, **style)
        axes[1].plot([r["flops"] / 1e12 for r in run["eval"]], em, label=label, **style)
        axes[2].plot(steps, [r["entropy"] for r in run["eval"]], label=label, **style)
        axes[3].plot(steps, [r["exit_p"][0] for r in run["eval"]], label=label, **style)
    for ax, x, y in zip(axes, ["optimizer step", "training FLOPs (1e12, looplm.tools.bench.flops)",
                               "optimizer step", "optimizer step"],
                            ["exact match at T", "exact match at T", "exit entropy (nats)", "exit probability of loop 1"]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[2].axhline(1.386, color="grey", ls=":", lw=1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def first_reaching(run, level):
    """(step, cumulative FLOPs) of the first evaluation with exact match at T >= level, or None."""
    T = len(run["eval"][0]["exit_p"])
    return next(((r["step"], r["flops"]) for r in run["eval"] if r["exact_match"][T - 1] >= level), None)


def table(runs, level=0.9) -> str:
    """Final scores, and when each run first reached `level` exact match at T; FLOPs relative to
    the first run's whole training (wall time is left out: on a shared CPU it measures the
    neighbours, see timing.py)."""
    ref = runs[0][1]
    lines = [f"| run | exact match, loops 1..T | exit p, loops 1..T | exit entropy | FLOPs vs ref | "
             f"first step >= {level:.0%} at T (FLOPs vs ref) |", "|---|---|---|---|---|---|"]
    for label, run in runs:
        last = run["eval"][-1]
        T = len(last["exit_p"])
        hit = first_reaching(run, level)
        reached = "never" if hit is None else f"{hit[0]} ({hit[1] / ref['flops']:.0%})"
        lines.append(f"| {label} | {' / '.join(f'{v:.1%}' for v in last['exact_match'][:T])} | "
                     f"{' / '.join(f'{v:.2f}' for v in last['exit_p'])} | {last['entropy']:.2f} | "
                     f"{run['flops'] / ref['flops']:.0%} | "
                     f"{reached} |")
    return "\n".join(lines) + "\n"


def main(argv):
    out, runs = Path(argv[0]), [load(spec) for spec in argv[1:]]
    plot(runs, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(table(runs))
    print(table(runs))


if __name__ == "__main__":
    main(sys.argv[1:])
