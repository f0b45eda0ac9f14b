"""`python -m looplm.bench`: whole training steps of LoopLM recipes next to two Llama peers.

Each (configuration, repetition) runs in a fresh worker process (`python -m looplm.bench --worker
SPEC`), which builds the model, runs `--warmup` untimed steps and then times `--steps` steps
(zero_grad, forward of every loop the recipe asks for, loss, backward, AdamW step; the device is
synchronised around each step) and prints its result as one JSON line. Repetitions are interleaved
round-robin across configurations (A1 B1 C1 ... A2 B2 C2 ...) so that machine noise spreads over
all of them. A `_matmul` worker in every round times the bench's own dense matmul shapes (fp32,
bf16 with --dtype bf16) to give the rate MFU is measured against.

Peers, both `transformers.LlamaForCausalLM` with the same hidden size, heads, SwiGLU width,
vocabulary, untied head, RMSNorm eps and RoPE theta, SDPA attention, trained with `labels` (the
standard HF loss, whole logit tensor): `llama_nxt` with N x T layers (the body FLOPs of a T-loop
LoopLM, one read-out) and `llama_n` with N layers.

Every worker imports the same modules (torch, transformers, looplm, the variants it can find)
before it records its baseline RSS, so peak RSS (ru_maxrss) is comparable across rows.

On a shared CPU machine other processes inflate wall times (with OpenMP threads, by far more than
their share: every parallel op waits for a descheduled thread). Workers therefore also record
each step's CPU time; steps whose occupancy, CPU / (threads x wall), is >= CLEAN_OCCUPANCY count
as clean, and the report gives clean medians and ratios next to the plain ones.

FLOPs follow flops.py (stated there); MFU counts model FLOPs only (a read-out's backward
recompute is overhead, not useful work).

Examples:
    python -m looplm.bench --reps 3 --out bench.md                       # CPU bench shape
    python -m looplm.bench --device cuda --dtype bf16 --preset small --compile --out gpu.md
    python -m looplm.bench --recipes full,llama_nxt --profile            # profile one step
    python -m looplm.bench decode --run runs/full_unroll                 # the decode part (looplm.infer.bench)
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from looplm.tools.bench.configs import CONFIGS, DEFAULT_RECIPES, model_config
from looplm.tools.bench.report import markdown, print_rich
from looplm.tools.bench.summary import CLEAN_OCCUPANCY, summarise
from looplm.tools.bench.worker import RESULT_PREFIX, profile, run_worker

REPO_ROOT = str(Path(__file__).resolve().parents[3])  # variants/ lives here


def _spawn(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    env.setdefault("MKL_NUM_THREADS", str(spec["threads"]))
    extra = [p for p in spec.get("pythonpath", ()) if p]
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(extra + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "looplm.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"config": spec["config"], "rep": spec["rep"], "error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"config": spec["config"], "rep": spec["rep"], "error": f"exit {proc.returncode}: " + "\n".join(tail)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m looplm.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The decode part (KV cache, early exit, HF generate): "
                                       "python -m looplm.bench decode --help")
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                   help=f"comma-separated configurations; known: {', '.join(CONFIGS)}")
    p.add_argument("--preset", default="bench", help="model preset (looplm.config.PRESETS) or 'bench'")
    p.add_argument("--vocab", type=int, dest="vocab_size")
    p.add_argument("--hidden", type=int, dest="d_model")
    p.add_argument("--layers", type=int, dest="n_layers")
    p.add_argument("--heads", type=int, dest="n_heads")
    p.add_argument("--ff", type=int, dest="d_ff")
    p.add_argument("--loops", type=int, dest="n_loops")
    p.add_argument("--injection", dest="input_injection", help="model input injection (looplm.layers.INJECTIONS)")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default fp32 (bf16 autocast on cuda)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="worker processes per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker")
    p.add_argument("--chunk", type=int, default=None, help="read-out chunk (tokens); default: looplm.readout's")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (nn.Module.compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--plugin", action="append", default=[],
                   help="module imported in every worker first (may register_config extra configurations)")
    p.add_argument("--out", help="write the Markdown report here")
    p.add_argument("--json", help="write raw results and the summary here")
    p.add_argument("--profile", action="store_true",
                   help="instead of benchmarking, profile each configuration in-process (torch.profiler)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(RESULT_PREFIX + json.dumps(run_worker(spec)), flush=True)
        return None
    for plugin in args.plugin:
        importlib.import_module(plugin)
    configs = [c.strip() for c in args.recipes.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {sorted(CONFIGS)}")
    cuda = args.device == "cuda"
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    shape = {"preset": args.preset, "vocab_size": args.vocab_size, "d_model": args.d_model,
             "n_layers": args.n_layers, "n_heads": args.n_heads, "d_ff": args.d_ff, "n_loops": args.n_loops,
             "input_injection": args.input_injection, "batch": args.batch or (8 if cuda else 4), "seq": args.seq or (1024 if cuda else 256)}
    cfg = model_config(shape)
    base = {"shape": shape, "device": args.device, "dtype": dtype, "threads": args.threads,
            "warmup": args.warmup, "steps": args.steps, "compile": args.compile, "seed": args.seed,
            "chunk": args.chunk, "plugins": args.plugin, "pythonpath": [REPO_ROOT, os.getcwd()]}
    shape_text = (f"hidden {cfg.d_model}, {cfg.n_layers} layers x T={cfg.n_loops}, {cfg.n_heads} heads, "
                  f"SwiGLU {cfg.d_ff}, vocab {cfg.vocab_size}, batch {shape['batch']} x seq {shape['seq']}, "
                  f"{dtype} on {args.device}" + (f", {args.threads} threads" if not cuda else "")
                  + (f", {cfg.input_injection} injection" if cfg.input_injection else "")
                  + (", compiled" if args.compile else ""))
    if args.profile:
        reports = [profile(base | {"config": c, "rep": 0}) for c in configs]
        text = "\n\n".join(reports)
        print(text)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text + "\n")
        return None

    from rich.console import Console
    console = Console(stderr=True)
    results = []
    order = configs + ["_matmul"]
    t_start = time.time()
    for rep in range(args.reps):
        for name in order:
            t0 = time.time()
            r = _spawn(base | {"config": name, "rep": rep}, args.timeout)
            results.append(r)
            status = ("[red]error[/] " + r["error"].splitlines()[-1]) if "error" in r else (
                f"{1e3 * statistics.median(r['times']):.1f} ms/step" if "times" in r
                else f"{r['mix_rate'] / 1e9:.1f} GFLOP/s")
            console.print(f"rep {rep + 1}/{args.reps} {name:14s} {status}  ({time.time() - t0:.0f}s)")
    summary = summarise(results, configs)
    import torch
    import platform
    env = (f"torch {torch.__version__}, python {platform.python_version()}, "
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; "
           f"{args.reps} workers x ({args.warmup} warm-up + {args.steps} timed) "
           f"steps per configuration; total {time.time() - t_start:.0f}s")
    command = "python -m looplm.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"shape_text": shape_text, "command": command,
            "device": args.device, "env": env,
            "square_n": next((r["square_n"] for r in results if r.get("config") == "_matmul" and "square_n" in r), "")}
    busy = [n for n, r in summary["rows"].items() if "error" not in r and r["occupancy"] < CLEAN_OCCUPANCY]
    if busy:
        meta["warning"] = (f"the machine was busy: median occupancy < {CLEAN_OCCUPANCY} for {', '.join(busy)}; "
                           "wall-clock medians include time other processes took; read the 'clean' columns")
        console.print(f"[yellow]warning:[/] {meta['warning']}")
    print_rich(summary, configs, meta)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(markdown(summary, configs, meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "summary": summary, "results": results}, fh, indent=1)
    return summary
