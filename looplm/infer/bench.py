"""Decode benchmark: `python -m looplm.infer.bench` (the decode part of `python -m looplm.bench`).

Side by side in one process, on random prompts (greedy, no EOS, every row generates every token):
  1. all-T decode on looplm.infer's preallocated cache against HF LlamaForCausalLM.generate with
     N x T layers of the same width (its own KV cache), per batch size;
  2. the same decode against the core's concatenating KVCache at a long total length, with the share
     of the static decode's time in attention (what bounds that race);
  3. early exit: decode tokens/s and the loops actually computed per decoded token for each exit
     rule (the prefill, which runs every loop, left out), the speed-up over all-T next to the
     ideal T / mean loops and to the lockstep bound (a batch runs a loop while any row needs it);
  4. serving a queue of prompts over a fixed number of slots: lockstep (batches of `slots`) against
     staggered decoding (every row at its own loop, a waiting prompt taking the first free slot),
     each rule's speed-up over all-T lockstep next to the ideal;
  5. the KV-cache memory of each sharing mode.
Each timing is the best process CPU time of --repeats interleaved runs (tokens per CPU second:
on a shared machine wall time also counts other jobs); --threads 1 makes it one core's work.
Without --run the model is untrained, its gate re-drawn (std --gate-std) so that exits spread over
the loops; with --run the trained model of a run folder is used (its vocabulary and shape).
"""

import argparse
import json
import sys
import time

import torch

from looplm.config import PRESETS, ModelConfig, model_config
from looplm.exits import QExit, StateChangeExit
from looplm.infer.cache import MODES
from looplm.infer.generate import generate
from looplm.model import KVCache, LoopLM


SHAPE = {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 688, "n_loops": 4}  # the untrained default


def race(repeats: int, contenders: dict) -> dict:
    """name -> (seconds, result) for each callable, run in turn `repeats` times (interleaved, so a
    load change hits all alike) and timed by the best process CPU time: on a shared machine the
    wall clock also counts other jobs' time slices, CPU time counts only this process's work."""
    best = {name: (float("inf"), None) for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.process_time()
            result = fn()
            seconds = time.process_time() - t0
            if seconds < best[name][0]:
                best[name] = (seconds, result)
    return best


def random_prompts(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def concat_cache_decode(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decode on the core's KVCache (torch.cat per slot per step), the T-th loop read out."""
    T, cache = model.cfg.n_loops, KVCache()
    traj = model(ids, cache=cache, keep={T})
    out = [model.logits(traj.states[-1][:, -1]).argmax(-1)]
    for _ in range(new_tokens - 1):
        traj = model(out[-1][:, None], cache=cache, keep={T})
        out.append(model.logits(traj.states[-1][:, -1]).argmax(-1))
    return torch.stack(out, 1)


def attention_share(fn) -> float:
    """The share of fn's CPU time in attention kernels (torch.profiler). Concatenating adds one
    read and one write of every cached key per step to attention's one read of it, about 1 + 2 x
    this share of the static cache's time: 3x is within reach only where attention is everything."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / max(total, 1e-9)


def llama_twin(cfg, max_len: int):
    """An HF Llama with N x T layers of looplm's width: the unrolled equivalent of the looped stack."""
    from transformers import LlamaForCausalLM

    from looplm.tools.bench.configs import llama_config

    config = llama_config(cfg, cfg.n_layers * cfg.n_loops, max_len)
    config.use_cache = True
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def hf_decode(llama, ids: torch.Tensor, new_tokens: int):
    return llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def measure(model, args) -> dict:
    cfg, T = model.cfg, model.cfg.n_loops
    report = {"model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                        "d_ff": cfg.d_ff, "n_loops": T, "vocab_size": cfg.vocab_size},
              "threads": torch.get_num_threads(), "decode": [], "long": [], "early_exit": [],
              "serving": [], "memory": []}
    llama = llama_twin(cfg, args.prompt + max(args.new, args.long))
    for batch in args.batches:
        ids = random_prompts(cfg.vocab_size, batch, args.prompt)
        times = race(args.repeats, {"looplm": lambda: generate(model, ids.tolist(), args.new),
                                    "hf": lambda: hf_decode(llama, ids, args.new)})
        (t_new, _), (t_hf, _) = times["looplm"], times["hf"]
        report["decode"].append({"batch": batch, "looplm_tok_s": batch * args.new / t_new,
                                 "hf_llama_tok_s": batch * args.new / t_hf, "ratio": t_hf / t_new})
        print(f"decode batch {batch}: looplm {batch * args.new / t_new:.0f} tok/s, HF Llama "
              f"{cfg.n_layers * T} layers {batch * args.new / t_hf:.0f} tok/s", flush=True)
    for batch in args.long_batches:
        ids = random_prompts(cfg.vocab_size, batch, args.prompt)
        n = args.long - args.prompt
        times = race(args.repeats, {"static": lambda: generate(model, ids.tolist(), n),
                                    "concat": lambda: concat_cache_decode(model, ids, n)})
        (t_new, new), (t_old, old) = times["static"], times["concat"]
        same = torch.equal(torch.tensor(new.tokens), old)
        share = attention_share(lambda: generate(model, ids.tolist(), n))
        report["long"].append({"batch": batch, "total_len": args.long, "static_tok_s": batch * n / t_new,
                               "concat_tok_s": batch * n / t_old, "speedup": t_old / t_new, "same_tokens": same,
                               "attention_share": share})
        print(f"{args.long} tokens batch {batch}: static cache {batch * n / t_new:.0f} tok/s, concatenating "
              f"{batch * n / t_old:.0f} tok/s (same tokens: {same}); attention {share:.0%} of the static "
              f"decode", flush=True)
    for batch in sorted(set(args.exit_batches)):  # batch 1 first: the lockstep bound's fit needs it
        early_exit(model, args, batch, report)
    for slots in args.serve_slots:
        serving(model, args, slots, report)
    prompts = random_prompts(cfg.vocab_size, args.exit_batches[0], args.prompt).tolist()
    for mode in MODES:
        out = generate(model, prompts, args.new, cache=mode)
        report["memory"].append({"mode": mode, "batch": len(prompts), "max_len": args.prompt + args.new,
                                 "bytes": out.cache_bytes})
    return report


def decode_seconds(out) -> float:
    """The decode steps' CPU time: the prefill (every loop, all prompt tokens) left out."""
    return out.cpu_seconds - out.prefill_cpu_seconds


def lockstep_bound(exit_loops: list, fixed: float, per_row: float) -> float:
    """Decode seconds no lockstep batch goes below: a step runs each loop while any of its rows is
    live, a loop costing `fixed` + `per_row` x live rows. exit_loops: per row, its tokens' exit
    loops (the first, from the prefill, left out)."""
    seconds = 0.0
    for token_exits in zip(*(loops[1:] for loops in exit_loops)):
        for t in range(1, max(token_exits) + 1):
            seconds += fixed + per_row * sum(e >= t for e in token_exits)
    return seconds


def early_exit(model, args, batch: int, report: dict) -> None:
    """Each exit rule's decode speed-up over all-T next to the ideal T / mean loops and, once
    batch 1 has run, next to the lockstep bound: one loop's cost as fixed + per-row, fitted to the
    all-T decode of batch 1 and of this batch (what batching in lockstep can save at best)."""
    T = model.cfg.n_loops
    rules = [None, *[QExit(q) for q in args.q], *[StateChangeExit(tau) for tau in args.tau]]
    prompts = random_prompts(model.cfg.vocab_size, batch, args.prompt).tolist()
    names = ["all" if rule is None else f"{rule.label[0]}={rule.label[1]:g}" for rule in rules]
    times = race(args.repeats, {name: (lambda rule=rule: generate(model, prompts, args.new, exit_rule=rule))
                                for name, rule in zip(names, rules)})
    base = decode_seconds(times["all"][1])
    per_loop = report.setdefault("all_t_loop_seconds", {})
    per_loop[batch] = base / ((args.new - 1) * T)  # one loop of one decode step, every row live
    fit = None
    if 1 in per_loop:
        per_row = (per_loop[batch] - per_loop[1]) / (batch - 1) if batch > 1 else 0.0
        fit = (per_loop[1] - per_row, per_row)
    for name in names:
        out = times[name][1]
        seconds, decoded = decode_seconds(out), out.n_tokens - len(out.tokens)
        row = {"rule": name, "batch": batch, "tok_s": decoded / seconds, "mean_loops": out.decode_mean_loops,
               "speedup": base / seconds, "ideal": T / out.decode_mean_loops,
               "lockstep": None if fit is None else base / lockstep_bound(out.exit_loops, *fit)}
        row["efficiency"] = row["speedup"] / row["ideal"]
        report["early_exit"].append(row)
        bound = "" if fit is None else f", lockstep bound {row['lockstep']:.2f}x"
        print(f"exit {name} batch {batch}: {row['tok_s']:.0f} decode tok/s, mean loops {row['mean_loops']:.2f}, "
              f"speed-up {row['speedup']:.2f}x of ideal {row['ideal']:.2f}x{bound}", flush=True)


def serving(model, args, slots: int, report: dict) -> None:
    """--serve-waves x slots prompts through `slots` rows, each exit rule in both schedules: decode
    tokens/s, loops per token, the speed-up over all-T lockstep, and whether the tokens equal
    lockstep's (greedy: they must)."""
    T = model.cfg.n_loops
    prompts = random_prompts(model.cfg.vocab_size, args.serve_waves * slots, args.prompt, seed=1).tolist()
    rules = [None, *[QExit(q) for q in args.q], *[StateChangeExit(tau) for tau in args.tau]]
    names = ["all" if rule is None else f"{rule.label[0]}={rule.label[1]:g}" for rule in rules]
    contenders = {f"{name} {schedule}": (lambda rule=rule, schedule=schedule: generate(
        model, prompts, args.serve_new, exit_rule=rule, schedule=schedule, slots=slots))
        for name, rule in zip(names, rules) for schedule in ("lockstep", "staggered")}
    times = race(args.serve_repeats, contenders)
    base = decode_seconds(times["all lockstep"][1])
    for name in names:
        lockstep = times[f"{name} lockstep"][1]
        for schedule in ("lockstep", "staggered"):
            out = times[f"{name} {schedule}"][1]
            seconds, decoded = decode_seconds(out), out.n_tokens - len(out.tokens)
            row = {"rule": name, "schedule": schedule, "slots": slots, "prompts": len(prompts),
                   "tok_s": decoded / seconds, "mean_loops": out.decode_mean_loops, "speedup": base / seconds,
                   "ideal": T / out.decode_mean_loops, "same_tokens": out.tokens == lockstep.tokens}
            row["efficiency"] = row["speedup"] / row["ideal"]
            report["serving"].append(row)
            print(f"serve {name} {schedule} slots {slots}: {row['tok_s']:.0f} decode tok/s, mean loops "
                  f"{row['mean_loops']:.2f}, speed-up {row['speedup']:.2f}x of ideal {row['ideal']:.2f}x", flush=True)


def table(report: dict) -> str:
    """The report as Markdown tables (what the README quotes)."""
    m = report["model"]
    lines = [f"model: d_model {m['d_model']}, {m['n_layers']} layers x {m['n_loops']} loops, {m['n_heads']} heads, "
             f"d_ff {m['d_ff']}, vocab {m['vocab_size']}; {report['threads']} threads", "",
             "| batch | looplm all-T tok/s | HF Llama N*T tok/s | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['looplm_tok_s']:.0f} | {r['hf_llama_tok_s']:.0f} | {r['ratio']:.2f} |"
              for r in report["decode"]]
    lines += ["", "| batch | total tokens | static cache tok/s | concatenating tok/s | speed-up | same tokens | "
              "attention share of static |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['total_len']} | {r['static_tok_s']:.0f} | {r['concat_tok_s']:.0f} | "
              f"{r['speedup']:.2f} | {r['same_tokens']} | {r['attention_share']:.0%} |" for r in report["long"]]
    lines += ["", "| rule | batch | decode tok/s | mean loops | speed-up | ideal T/mean | speed-up / ideal | "
              "lockstep bound |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['batch']} | {r['tok_s']:.0f} | {r['mean_loops']:.2f} | {r['speedup']:.2f} | "
              f"{r['ideal']:.2f} | {r['efficiency']:.2f} | "
              f"{'-' if r['lockstep'] is None else format(r['lockstep'], '.2f')} |" for r in report["early_exit"]]
    lines += ["", "| rule | schedule | slots | prompts | decode tok/s | mean loops | speed-up | ideal T/mean | "
              "speed-up / ideal | same tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['schedule']} | {r['slots']} | {r['prompts']} | {r['tok_s']:.0f} | "
              f"{r['mean_loops']:.2f} | {r['speedup']:.2f} | {r['ideal']:.2f} | {r['efficiency']:.2f} | "
              f"{r['same_tokens']} |" for r in report["serving"]]
    lines += ["", "| cache mode | batch | max_len | KV memory (MiB) |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['batch']} | {r['max_len']} | {r['bytes'] / 2**20:.2f} |" for r in report["memory"]]
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    """Decode tokens/s against mean loops computed, a panel per batch size: each exit rule's
    points, all-T, the ideal (all-T tokens/s times T / mean loops) dashed, the lockstep bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(dict.fromkeys(r["batch"] for r in report["early_exit"]))
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.4), squeeze=False)
    T = report["model"]["n_loops"]
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in report["early_exit"] if r["batch"] == batch]
        base = next(r for r in rows if r["rule"] == "all")["tok_s"]
        loops = [1 + i * (T - 1) / 50 for i in range(51)]
        ax.plot(loops, [base * T / x for x in loops], "k--", lw=0.8, label="ideal: all-T x T / loops")
        for family in dict.fromkeys(r["rule"].split("=")[0] for r in rows):
            points = sorted((r["mean_loops"], r["tok_s"]) for r in rows if r["rule"].split("=")[0] == family)
            ax.plot(*zip(*points), "o-" if family != "all" else "ks", ms=4, label=family)
        bounds = [(r["mean_loops"], base * r["lockstep"]) for r in rows if r["rule"] != "all" and r["lockstep"]]
        if bounds:
            ax.plot(*zip(*bounds), "x", color="grey", label="lockstep bound")
        ax.set(title=f"batch {batch}", xlabel="mean loops computed per token", ylabel="decode tokens/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.infer.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run folder: bench its trained model (default: an untrained one)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="untrained model shape from looplm.config's presets (the shape flags override it)")
    for name, default in SHAPE.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"untrained model shape (default {default}, or the preset's)")
    parser.add_argument("--vocab", type=int, default=1024, help="untrained model vocabulary (default 1024)")
    parser.add_argument("--gate-std", type=float, default=0.1, help="untrained gate weight std (spreads exits)")
    parser.add_argument("--batches", type=_ints, default=[1, 8, 64])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--long", type=int, default=512, help="total length of the concatenating-cache race")
    parser.add_argument("--long-batches", type=_ints, default=[1, 8, 64])
    parser.add_argument("--exit-batches", type=_ints, default=[1, 8, 64])
    parser.add_argument("--q", type=_floats, default=[0.5, 0.7, 0.9])
    parser.add_argument("--tau", type=_floats, default=[0.25])
    parser.add_argument("--serve-slots", type=_ints, default=[8, 64], help="slots of the serving queue")
    parser.add_argument("--serve-waves", type=int, default=4, help="prompts in the queue per slot")
    parser.add_argument("--serve-new", type=int, default=64, help="new tokens per prompt in the queue")
    parser.add_argument("--serve-repeats", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="write the report to this JSON file")
    parser.add_argument("--plot", help="write tokens/s against mean loops per exit rule to this PNG file")
    args = parser.parse_args(argv)
    bad = [f"--{k}={v} must be >= 1" for k, v in (("prompt", args.prompt), ("new", args.new),
                                                  ("repeats", args.repeats), ("serve-waves", args.serve_waves),
                                                  ("serve-new", args.serve_new),
                                                  ("serve-repeats", args.serve_repeats)) if v < 1]
    lists = (("batches", args.batches), ("long-batches", args.long_batches), ("exit-batches", args.exit_batches),
             ("serve-slots", args.serve_slots))
    bad += [f"--{name}={b} must be >= 1" for name, batches in lists for b in batches if b < 1]
    bad += ["--exit-batches lists no batch (the memory table uses its first)"] if not args.exit_batches else []
    if args.long <= args.prompt:
        bad.append(f"--long={args.long} must exceed --prompt={args.prompt}")
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.run:
        from looplm.infer.load import RunError, load_run
        try:
            model, _ = load_run(args.run)
        except (RunError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        given = {name: getattr(args, name) for name in SHAPE if getattr(args, name) is not None}
        try:
            cfg = model_config(args.preset, vocab_size=args.vocab, **given) if args.preset else \
                ModelConfig(vocab_size=args.vocab, **{**SHAPE, **given})
        except ValueError as error:
            from looplm.run import error_text  # without gin's trailer of the configurables it went through

            print(f"error: {error_text(error)}", file=sys.stderr)
            return 2
        model = LoopLM(cfg).eval()
        with torch.no_grad():
            model.gate.weight.normal_(0, args.gate_std)
    report = measure(model, args)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
