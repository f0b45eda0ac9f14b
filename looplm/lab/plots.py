"""The collected plots: loss curves, accuracy against loop count, exit distribution and the
early-exit frontier, one panel per value of the first grid axis. Each seed is a thin line and the
mean a thick one; a band (min to max over seeds) only where there are 3 seeds or more, since two
seeds give no spread worth drawing, and min-max stays positive on a log scale where mean - std
need not."""

import math
from pathlib import Path

import numpy as np

from looplm.exits import draw_frontier
from looplm.lab.groups import Group


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


MIN_SEEDS_FOR_BAND = 3
SPREAD_NOTE = "thin lines: seeds, thick: mean, band: min-max over seeds (3 or more)"


def _spread(ax, x, curves: np.ndarray, color, label: str, marker: str = "", crowded: bool = False) -> None:
    """Every seed's curve thin, their mean thick and labelled, min-max band from 3 seeds on
    (fainter in a crowded panel, so that overlapping bands do not hide the means)."""
    for curve in curves:
        ax.plot(x, curve, color=color, lw=0.6, alpha=0.35)
    ax.plot(x, curves.mean(0), marker or "-", color=color, lw=1.8, ms=3, label=f"{label} (n={len(curves)})")
    if len(curves) >= MIN_SEEDS_FOR_BAND:
        ax.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.05 if crowded else 0.15, lw=0)


def _legend(ax, n_series: int) -> None:
    """Inside the panel for a few series, to its right for many (where it would hide the data)."""
    if n_series > 4:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7)


def _per_loop_curves(group: Group, name: str) -> np.ndarray:
    """(seeds, loops) of an evaluation's per-loop metric, cut to the depth every seed has."""
    depth = min(len(r.eval.get(name, [])) for r in group.runs)
    return np.array([r.eval[name][:depth] for r in group.runs], dtype=float)


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
            _spread(ax, g.runs[0].loss_steps[:n], curves, color, label or g.point, crowded=len(members) > 4)
            all_values.append(curves)
        ax.set_title(panel or "train loss", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (objective)")
        ax.grid(alpha=0.3)
        _legend(ax, len(members))
    values = np.concatenate([c.ravel() for c in all_values]) if all_values else np.ones(1)
    if values.min() > 0 and values.max() / values.min() > 10:
        for ax in axes.ravel():
            ax.set_yscale("log")
    smoothing = f"moving average over {window} steps" if window > 1 else "per step"
    _finish(fig, axes, len(facets), f"train loss: the objective, prior term included ({smoothing})\n"
                                    f"{SPREAD_NOTE}", path)


def plot_accuracy_vs_loops(groups: list[Group], path: Path) -> None:
    facets = _facets([g for g in groups if g.runs])
    n = max(len(facets), 1)
    fig, axes, cols = _figure(n, n_rows=2)
    panel_rows = math.ceil(n / cols)
    for i, (panel, members) in enumerate(facets):
        for row, (name, title) in enumerate([("acc", "token accuracy"), ("exact_match", "exact match")]):
            ax = axes[row * panel_rows + i // cols][i % cols]
            for g, label, color in members:
                curves = _per_loop_curves(g, name)
                loops = np.arange(1, curves.shape[1] + 1)
                _spread(ax, loops, curves, color, label or g.point, marker="-o", crowded=len(members) > 4)
                mean = curves.mean(0)
                T = g.n_loops
                if 0 < T <= len(mean):
                    ax.plot([T], [mean[T - 1]], "*", color=color, ms=12, mec="black", mew=0.6)
            ax.set_title(f"{panel + ': ' if panel else ''}{title}", fontsize=10)
            ax.set_xlabel("loops at evaluation")
            ax.set_ylabel(title)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            _legend(ax, len(members))
    for extra in range(len(facets), panel_rows * cols):
        for row in range(2):
            axes[row * panel_rows + extra // cols][extra % cols].axis("off")
    _finish(fig, axes, axes.size, f"held-out accuracy vs loop count (★ trained T)\n{SPREAD_NOTE}", path)


def plot_exit_distribution(groups: list[Group], path: Path) -> None:
    facets = _facets([g for g in groups if g.runs])
    fig, axes, cols = _figure(max(len(facets), 1))
    for i, (panel, members) in enumerate(facets):
        ax = axes[i // cols][i % cols]
        width = 0.8 / max(len(members), 1)
        for j, (g, label, color) in enumerate(members):
            curves = _per_loop_curves(g, "exit_p")
            loops = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            spread = (np.stack([mean - curves.min(0), curves.max(0) - mean])
                      if len(curves) >= MIN_SEEDS_FOR_BAND else None)
            exit_mean = g.scalar("exit_mean")[0]
            ax.bar(loops - 0.4 + width * (j + 0.5), mean, width, yerr=spread, color=color, capsize=2,
                   label=f"{label or g.point} (n={len(curves)}, mean exit {exit_mean:.2f})")
        ax.set_title(panel or "exit distribution", fontsize=10)
        ax.set_xlabel("exit loop t")
        ax.set_ylabel("mean p(exit at t)")
        ax.set_xticks(range(1, max((g.n_loops for g, _, _ in members), default=1) + 1))
        ax.grid(alpha=0.3, axis="y")
        _legend(ax, len(members))
    _finish(fig, axes, len(facets), "exit distribution on held-out data, mean over seeds; "
                                    "error bars: min-max over seeds (3 or more)", path)


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
        _legend(ax, len(members))
    _finish(fig, axes, len(facets), "early exit: exact match vs mean exit loop\n(mean over seeds)", path)


def plot_knowledge_capacity(groups: list[Group], path: Path) -> None:
    """Knowledge bits at the trained T against parameters (Allen-Zhu & Li's Figure 1, Ouro's Capo):
    one panel, the first grid axis along each line (the sizes), a line per value of the others."""
    fig, axes, _ = _figure(1, width=6.0, height=4.2)
    ax = axes[0][0]
    lines: dict = {}
    for panel, members in _facets([g for g in groups if g.runs]):
        for g, label, color in members:
            T = g.n_loops
            bits = [r.eval["knowledge_bits"][T - 1] for r in g.runs if len(r.eval.get("knowledge_bits", [])) >= T]
            params = [r.n_params for r in g.runs if len(r.eval.get("knowledge_bits", [])) >= T]
            if bits:
                ax.plot(params, bits, ".", color=color, alpha=0.4, ms=5)
                lines.setdefault(label or g.point, (color, []))[1].append((np.mean(params), np.mean(bits)))
    for label, (color, points) in lines.items():
        x, y = zip(*sorted(points))
        ax.plot(x, y, "-o", color=color, lw=1.8, ms=4, label=label)
    every = [p for _, points in lines.values() for p, _ in points]
    if every:
        x = np.geomspace(min(every), max(every), 20)
        ax.plot(x, 2 * x, "k--", lw=0.8, label="2 bits / parameter (Allen-Zhu & Li)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (embeddings and head included)")
    ax.set_ylabel("knowledge bits at the trained T")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(lines) + 1)
    _finish(fig, axes, 1, "knowledge memorised vs parameters\ndots: seeds, line: mean over seeds", path)


def _finish(fig, axes, n_used: int, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    import textwrap

    for ax in axes.ravel()[n_used:]:
        ax.axis("off")
    chars = int(fig.get_figwidth() * 12)  # about what a line of 11-point text fits
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in title.split("\n")), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)

