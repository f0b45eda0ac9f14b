"""The bench report: the results table (Markdown and rich), the configurations, targets and method."""

import math

from looplm.tools.bench.configs import CONFIGS
from looplm.tools.bench.summary import CLEAN_OCCUPANCY, targets


def _alt_text(alt: dict) -> str:
    return "".join(f"; {k} basis {v:.3f}" for k, v in alt.items())


COLUMNS = ["config", "step ms (median)", "spread ms (min–max)", "tokens/s", "time ×Llama-NxT", "time ×Llama-N",
           "occupancy", "clean ms (n)", "clean ×Llama-NxT", "clean ×Llama-N", "peak RSS MB", "RSS ×Llama-NxT",
           "RSS ×Llama-N", "GFLOP/step", "MFU %", "MFU % (clean)"]


def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def _finite(x):
    return x if x is not None and math.isfinite(x) else None


def _g(x):
    """A positive quantity with 3 significant digits (no rounding to 0.0 on tiny shapes)."""
    if x is None:
        return "–"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def table_rows(summary: dict, configs: list[str]) -> list[list[str]]:
    out = []
    cuda = any("cuda_peak_mb" in r for r in summary["rows"].values())
    for name in configs:
        r = summary["rows"][name]
        if "error" in r:
            out.append([name, "failed"] + ["–"] * (len(COLUMNS) - 2 + 2 * cuda))
            continue
        cells = [name, _f(r["median_ms"], ".1f"), f"{r['min_ms']:.1f}–{r['max_ms']:.1f}",
                 _f(r["tokens_per_s"], ".0f"), _f(r.get("time_x_llama_nxt"), ".2f"),
                 _f(r.get("time_x_llama_n"), ".2f"), _f(r["occupancy"], ".2f"),
                 f"{r['clean_median_ms']:.1f} ({r['n_clean']})" if r["n_clean"] else "– (0)",
                 _f(_finite(r.get("clean_time_x_llama_nxt")), ".2f"), _f(_finite(r.get("clean_time_x_llama_n")), ".2f"),
                 _f(r["peak_rss_mb"], ".0f"), _f(r.get("rss_x_llama_nxt"), ".2f"), _f(r.get("rss_x_llama_n"), ".2f"),
                 _g(r["model_gflop"]), _g(100 * r["mfu"]), _g(_finite(100 * r["mfu_clean"]))]
        if cuda:
            cells += [_f(r.get("cuda_peak_mb"), ".0f"), _f(r.get("cuda_x_llama_nxt"), ".2f")]
        out.append(cells)
    return out


def columns(summary) -> list[str]:
    cuda = any("cuda_peak_mb" in r for r in summary["rows"].values())
    return COLUMNS + (["peak CUDA MB", "CUDA ×Llama-NxT"] if cuda else [])


def markdown(summary: dict, configs: list[str], meta: dict) -> str:
    cols = columns(summary)
    lines = [f"# looplm.bench: {meta['shape_text']}", "",
             f"`{meta['command']}`", ""] + ([f"**Warning:** {meta['warning']}.", ""] if meta.get("warning") else []) + [
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(summary, configs)]
    lines += ["", "## Configurations", ""]
    for name in configs:
        r = summary["rows"][name]
        extra = (f"params {r['params'] / 1e6:.1f}M; model GFLOP/step {r['model_gflop']:.2f} "
                 f"(+{r['hardware_gflop'] - r['model_gflop']:.2f} overhead: recompute / unused grads); "
                 f"mean step {r['mean_ms']:.1f} ms; "
                 f"IQR {r['p25_ms']:.1f}–{r['p75_ms']:.1f} ms over {r['n_steps']} steps / {r['n_reps']} workers; "
                 f"min-time ×Llama-NxT {_f(r.get('min_time_x_llama_nxt'), '.2f')}; "
                 f"CPU {r['cpu_s_median']:.2f} s/step (×Llama-NxT {_f(r.get('cpu_x_llama_nxt'), '.2f')}), "
                 f"MFU on a CPU-time basis {100 * r['mfu_cpu']:.1f}%; "

                 f"baseline RSS {r['baseline_rss_mb']:.0f} MB; HFU {100 * r['hfu']:.1f}%"
                 if "error" not in r else "FAILED: " + r["error"].replace("\n", " | ")[-600:])
        lines.append(f"- `{name}`: {CONFIGS[name].describe}. {extra}")
    t = targets(summary["rows"])
    if t:
        lines += ["", "## Targets", ""]
        for what, value, bound, op, met, alt in t:
            lines.append(f"- {what}: {value:.3f} (target {op} {bound}) — **{'met' if met else 'MISSED'}**"
                         + _alt_text(alt))
    lines += ["", "## Method", "",
              f"- Matmul rate (MFU denominator): {summary['matmul_rate'] / 1e9:.1f} GFLOP/s, the FLOP-weighted rate "
              f"of the dense matmul shapes of one full-unroll step (flops.linear_shapes), timed back to "
              f"back in a `_matmul` worker each round (median over rounds); a {meta.get('square_n', '')}³ square "
              f"matmul ran at {summary['square_rate'] / 1e9:.1f} GFLOP/s.",
              "- MFU = model FLOPs per second / matmul rate. Model FLOPs (looplm/tools/bench/flops.py): "
              "2 x matmul weights per token per layer forward plus 4·S·d attention (all S keys counted, "
              "non-causal), x3 for a loop with a graph; 2·d·V per token per read-out forward, x3 in training. "
              "Read-out work beyond that (the recompute read-out's recomputed logits, 2·d·V per token per "
              "read-out; gradients the fused read-out forms but nothing needs) is hardware work only: counted "
              "in HFU, not MFU. "
              "'MFU % (clean)': model FLOPs per second over the clean steps against the best round's matmul rate "
              f"({summary['matmul_rate_best'] / 1e9:.1f} GFLOP/s). The CPU-time basis (per configuration below) "
              "divides model FLOPs per CPU-second by the matmuls' FLOPs per CPU-second "
              f"({summary['matmul_rate_cpu'] / 1e9:.1f} GFLOP/s).",
              "- Step time: zero_grad + forward + loss + backward + AdamW step, synchronised; median and "
              "min–max over all timed steps of all workers (IQR, the min-based ratio and the process CPU "
              "seconds per step are listed per configuration). Occupancy = CPU seconds / (threads x wall seconds) of a step, "
              f"median over steps: about 1 when the worker had its cores; 'clean' statistics use only the "
              f"steps with occupancy >= {CLEAN_OCCUPANCY}. tokens/s = tokens / mean step time (what a run would "
              "see, also for recipes whose work varies per step); time ratios use the medians.",
              "- Peak RSS: ru_maxrss of the worker process (every worker imports the same modules first). "
              + ("Peak CUDA memory: torch.cuda.max_memory_allocated." if meta["device"] == "cuda" else ""),
              f"- {meta['env']}"]
    return "\n".join(lines) + "\n"


def print_rich(summary, configs, meta):
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"looplm.bench — {meta['shape_text']}")
    for c in columns(summary):
        table.add_column(c, justify="left" if c == "config" else "right")
    for r in table_rows(summary, configs):
        table.add_row(*r)
    console = Console()
    console.print(table)
    console.print(f"matmul rate {summary['matmul_rate'] / 1e9:.1f} GFLOP/s (shape mix), "
                  f"square {summary['square_rate'] / 1e9:.1f} GFLOP/s")
    for what, value, bound, op, met, alt in targets(summary["rows"]):
        console.print(f"{'[green]met' if met else '[red]MISSED'}[/] {what}: {value:.3f} (target {op} {bound})"
                      + _alt_text(alt))
