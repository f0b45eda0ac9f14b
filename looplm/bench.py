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

FLOPs follow looplm.flops (stated there); MFU counts model FLOPs only (a read-out's backward
recompute is overhead, not useful work).

Examples:
    python -m looplm.bench --reps 3 --out bench.md                       # CPU bench shape
    python -m looplm.bench --device cuda --dtype bf16 --preset small --compile --out gpu.md
    python -m looplm.bench --recipes full,llama_nxt --profile            # profile one step
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

RESULT_PREFIX = "@@LOOPLM_BENCH@@ "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # variants/ lives here

DEFAULT_RECIPES = ("full", "full_recompute", "sampled", "sampled_seq", "truncated", "random_loops", "truncated_t8",
                   "truncated_t1", "llama_nxt", "llama_n")
PEERS = ("llama_nxt", "llama_n")
CLEAN_OCCUPANCY = 0.9  # steps at or above it count as uncontended ("clean")


# -- configurations ---------------------------------------------------------------------------
def _variant(module: str, name: str):
    """A plugin class from variants/, imported only when a configuration asks for it."""
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ConfigSpec:
    kind: str  # "looplm" or "llama"
    describe: str
    recipe: object = None  # (ModelConfig) -> looplm.recipe.Recipe
    loops: int | None = None  # override the model's n_loops (T)
    llama_layers: str = ""  # "NxT" or "N"
    flops: object = None  # optional (cfg, batch, seq) -> Flops, for recipes the counter can't see


def _recipe(**parts):
    """A recipe builder: each part is a (ModelConfig) -> plugin callable; the rest are Ouro's."""
    def build(cfg):
        from looplm.recipe import Recipe
        return Recipe(**{k: v(cfg) for k, v in parts.items()})
    return build


def _last_loops(cfg):
    return _variant("variants.truncated", "LastLoops")(k=1)


CONFIGS = {
    "full": ConfigSpec("looplm", "LoopLM Stage I full unroll, Recipe() (fused read-out: grads formed in forward)",
                       _recipe()),
    "full_recompute": ConfigSpec("looplm", "Stage I full unroll, ExitWeighted(readout='recompute')",
                                 _recipe(estimator=lambda cfg: _variant("looplm.recipe", "ExitWeighted")(
                                     readout="recompute"))),
    "full_t1": ConfigSpec("looplm", "Recipe() at T=1", _recipe(), loops=1),
    "sampled": ConfigSpec("looplm", "SampledStep estimator",
                          _recipe(estimator=lambda cfg: _variant("variants.sampled_step", "SampledStep")())),
    "sampled_seq": ConfigSpec("looplm", "SampledStep(per_sequence=True): one loop per row, all T run",
                              _recipe(estimator=lambda cfg: _variant("variants.sampled_step", "SampledStep")(
                                  per_sequence=True))),
    "truncated": ConfigSpec("looplm", "LastLoops(k=1) window (Stage I loss, only the last loop keeps a graph)",
                            _recipe(window=_last_loops)),
    "random_loops": ConfigSpec("looplm", "UniformLoops(1, 2T-1) loop count (mean T), full backprop, Stage I",
                               _recipe(loop_count=lambda cfg: _variant("variants.random_loops", "UniformLoops")(
                                   low=1, high=2 * cfg.n_loops - 1))),
    "random_loops_stars": ConfigSpec("looplm", "LogNormalLoops(mu=1.7, sigma=0.4, 1..16) + LastLoops(k=1)",
                                     _recipe(loop_count=lambda cfg: _variant("variants.random_loops", "LogNormalLoops")(
                                         mu=1.7, sigma=0.4, low=1, high=16), window=_last_loops)),
    "truncated_t8": ConfigSpec("looplm", "LastLoops(k=1) at T=8", _recipe(window=_last_loops), loops=8),
    "truncated_t1": ConfigSpec("looplm", "LastLoops(k=1) at T=1", _recipe(window=_last_loops), loops=1),
    "llama_nxt": ConfigSpec("llama", "LlamaForCausalLM, N x T layers", llama_layers="NxT"),
    "llama_n": ConfigSpec("llama", "LlamaForCausalLM, N layers", llama_layers="N"),
}


def register_config(name: str, spec: ConfigSpec) -> None:
    """Add a configuration (e.g. from a `--plugin` module: prototypes outside the package)."""
    CONFIGS[name] = spec


# -- shapes -----------------------------------------------------------------------------------
# The CPU bench shape (the issue's): stated here, not taken from ModelConfig's defaults.
BENCH_SHAPE = dict(vocab_size=49152, d_model=256, n_layers=4, n_heads=4, d_ff=688, n_loops=4)


def model_config(shape: dict):
    """The ModelConfig of a bench shape: preset "bench" (BENCH_SHAPE) or a looplm.config preset,
    with the flags' overrides."""
    from looplm.config import PRESETS, ModelConfig
    base = ModelConfig(**BENCH_SHAPE) if shape["preset"] == "bench" else PRESETS[shape["preset"]]
    overrides = {k: shape[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "n_loops",
                                       "input_injection")
                 if shape.get(k) is not None}
    return replace(base, **overrides)


def llama_config(cfg, n_layers: int, seq_len: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                       num_hidden_layers=n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
                       tie_word_embeddings=False, max_position_embeddings=max(seq_len, 2048),
                       initializer_range=cfg.init_std, attn_implementation="sdpa", use_cache=False)


# -- worker ------------------------------------------------------------------------------------
def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads. CPU / (threads x wall) of a step is
    its occupancy: about 1 when the worker had its cores, lower when other processes took them."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _import_everything():
    """Same imports in every worker, so baseline RSS is the same for LoopLM and Llama rows."""
    importlib.import_module("transformers")
    importlib.import_module("transformers.models.llama.modeling_llama")
    importlib.import_module("looplm.model")
    importlib.import_module("looplm.recipe")
    for mod in ("variants.sampled_step", "variants.truncated", "variants.random_loops"):
        with contextlib.suppress(Exception):
            importlib.import_module(mod)


class _Counting:
    """Stands in for the LoopLM in Recipe.loss and records what the step ran (for its FLOPs)."""

    def __init__(self, model):
        self._model = model
        self.forwards, self.readouts, self.gates = [], [], []

    def reset(self):
        self.forwards, self.readouts, self.gates = [], [], []

    def __call__(self, input_ids, n_loops=None, doc_ids=None, first_grad_loop=1, keep=None, cache=None):
        T = self._model.cfg.n_loops if n_loops is None else n_loops
        self.forwards.append((T, first_grad_loop, None if keep is None else tuple(keep)))
        return self._model(input_ids, n_loops=n_loops, doc_ids=doc_ids, first_grad_loop=first_grad_loop,
                           keep=keep, cache=cache)

    def token_loss(self, state, targets, chunk_size=None):
        from looplm.flops import ReadoutCall
        import torch
        w = self._model.lm_head.weight
        self.readouts.append(ReadoutCall(targets.numel(), state.requires_grad,
                                         w.requires_grad and torch.is_grad_enabled()))
        return self._model.token_loss(state, targets, chunk_size=chunk_size)

    def weighted_token_loss(self, states, targets, coeffs, chunk_size=None):
        from looplm.flops import ReadoutCall
        import torch
        w = self._model.lm_head.weight
        for state in states:
            self.readouts.append(ReadoutCall(targets.numel(), state.requires_grad,
                                             w.requires_grad and torch.is_grad_enabled(), fused=True))
        return self._model.weighted_token_loss(states, targets, coeffs, chunk_size=chunk_size)

    def exit_logits(self, gate_input):
        from looplm.flops import ReadoutCall
        import torch
        self.gates.append(ReadoutCall(gate_input.numel() // gate_input.shape[-1], gate_input.requires_grad,
                                      self._model.gate.weight.requires_grad and torch.is_grad_enabled()))
        return self._model.exit_logits(gate_input)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def step_flops(self, batch: int, seq_len: int):
        from looplm.flops import Flops, looplm_step_flops
        total = Flops()
        for i, (T, first, keep) in enumerate(self.forwards):
            # read-outs belong to the forward they follow; recipes run one forward per step
            reads = self.readouts if i == len(self.forwards) - 1 else []
            gates = self.gates if i == len(self.forwards) - 1 else []
            f = looplm_step_flops(self._model.cfg, batch, seq_len, T, first, keep, reads, gates)
            total.model += f.model
            total.overhead += f.overhead
            for k, v in f.parts.items():
                total.parts[k] = total.parts.get(k, 0.0) + v
        return total


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device, dtype):
    import torch
    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _build(spec: dict):
    """(step(i) -> Flops of that step, parameter count, model) for one configuration: the step runs
    zero_grad, the forward/loss (Recipe.loss, or the HF loss with labels), backward and AdamW
    (torch's default implementation, the same settings for every row)."""
    import torch
    from looplm.flops import llama_step_flops
    shape, device, dtype = spec["shape"], spec["device"], spec["dtype"]
    conf = CONFIGS[spec["config"]]
    cfg = model_config(shape)
    if conf.loops is not None:
        cfg = replace(cfg, n_loops=conf.loops)
    B, S = shape["batch"], shape["seq"]
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    torch.manual_seed(spec.get("seed", 0))
    amp = lambda: _autocast(device, dtype)  # noqa: E731

    if conf.kind == "llama":
        from transformers import LlamaForCausalLM
        layers = cfg.n_layers * (cfg.n_loops if conf.llama_layers == "NxT" else 1)
        model = LlamaForCausalLM(llama_config(cfg, layers, S)).to(device).train()
        if spec.get("compile"):
            model.compile()
        ids_d = ids.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        flops = llama_step_flops(cfg.d_model, layers, cfg.n_heads, cfg.kv_heads, cfg.d_ff, cfg.vocab_size, B, S)

        def step(i):
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = model(input_ids=ids_d, labels=ids_d, use_cache=False).loss
            loss.backward()
            opt.step()
            return flops
        return step, sum(p.numel() for p in model.parameters()), model

    from looplm.data.batch import Batch
    from looplm.model import LoopLM
    model = LoopLM(cfg).to(device).train()
    if spec.get("compile"):
        model.compile()
    recipe = conf.recipe(cfg)
    counting = _Counting(model)
    batch = Batch(ids, targets).to(device)
    opt = torch.optim.AdamW(recipe.trainable_parameters(model), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(i):
        counting.reset()
        opt.zero_grad(set_to_none=True)
        with amp():
            loss, _ = recipe.loss(counting, batch, i)
        loss.backward()
        opt.step()
        return conf.flops(cfg, B, S) if conf.flops else counting.step_flops(B, S)
    return step, model.num_params(), model


def run_worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    if spec.get("chunk"):
        import looplm.readout
        looplm.readout.DEFAULT_CHUNK_TOKENS = spec["chunk"]
    for plugin in spec.get("plugins", ()):
        importlib.import_module(plugin)
    _import_everything()
    if spec["config"] == "_matmul":
        return run_matmul_worker(spec)
    device = spec["device"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    step, n_params, _ = _build(spec)
    first = spec["rep"] * 1000  # each repetition sees different steps (sampled plans differ)
    times, cpu_times, model_flops, hw_flops, parts = [], [], [], [], {}
    for i in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        c0, t0 = _cpu_s(), time.perf_counter()
        f = step(first + i)
        _sync(device)
        dt, dc = time.perf_counter() - t0, _cpu_s() - c0
        if i >= spec["warmup"]:
            times.append(dt)
            cpu_times.append(dc)
            model_flops.append(f.model)
            hw_flops.append(f.hardware)
            for k, v in f.parts.items():
                parts[k] = parts.get(k, 0.0) + v / spec["steps"]
    out = {"config": spec["config"], "rep": spec["rep"], "times": times, "cpu_times": cpu_times,
           "model_flops": model_flops,
           "hardware_flops": hw_flops, "flop_parts": parts, "params": n_params,
           "tokens_per_step": spec["shape"]["batch"] * spec["shape"]["seq"],
           "peak_rss_mb": _rss_mb(), "baseline_rss_mb": base_rss, "threads": torch.get_num_threads(),
           "device": device}
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_matmul_worker(spec: dict) -> dict:
    """Time the dense matmul shapes of one full-unroll step (looplm.flops.linear_shapes) back to
    back, and one large square matmul; rates in FLOP/s."""
    import torch
    import looplm.readout
    from looplm.flops import linear_shapes
    device = spec["device"]
    dt = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    cfg = model_config(spec["shape"])
    B, S = spec["shape"]["batch"], spec["shape"]["seq"]
    chunk = spec.get("chunk") or looplm.readout.DEFAULT_CHUNK_TOKENS
    reps = 5 if device == "cpu" else 20

    def timed(M, K, N):
        a = torch.randn(M, K, device=device, dtype=dt)
        b = torch.randn(K, N, device=device, dtype=dt)
        out = torch.empty(M, N, device=device, dtype=dt)
        torch.mm(a, b, out=out)
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        inner = max(1, min(1000, int(0.02 / max(time.perf_counter() - t0, 1e-7))))  # >= ~20 ms a sample
        samples, cpu = [], []
        for _ in range(reps):
            _sync(device)
            c0, t0 = _cpu_s(), time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=out)
            _sync(device)
            samples.append((time.perf_counter() - t0) / inner)
            cpu.append((_cpu_s() - c0) / inner)
        return statistics.median(samples), statistics.median(cpu)

    per_shape, total_flops, total_time, total_cpu = [], 0.0, 0.0, 0.0
    for M, K, N, calls in linear_shapes(cfg, B, S, chunk):
        t, c = timed(M, K, N)
        per_shape.append({"shape": [M, K, N], "calls": calls, "gflops_per_s": 2 * M * K * N / t / 1e9})
        total_flops += 2.0 * M * K * N * calls
        total_time += t * calls
        total_cpu += c * calls
    n = 2048 if device == "cpu" else 8192
    t, c = timed(n, n, n)
    return {"config": "_matmul", "rep": spec["rep"], "mix_rate": total_flops / total_time,
            "mix_rate_cpu": total_flops / max(total_cpu, 1e-12), "square_rate": 2.0 * n**3 / t,
            "square_n": n, "per_shape": per_shape}


# -- orchestration -----------------------------------------------------------------------------
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


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(results: list[dict], configs: list[str]) -> dict:
    """Per-configuration statistics, ratios to the peers and the matmul rate."""
    mm = [r for r in results if r["config"] == "_matmul" and "error" not in r]
    rate = statistics.median(r["mix_rate"] for r in mm) if mm else float("nan")
    square = statistics.median(r["square_rate"] for r in mm) if mm else float("nan")
    rate_cpu = statistics.median(r.get("mix_rate_cpu", float("nan")) for r in mm) if mm else float("nan")
    best_rate = max(r["mix_rate"] for r in mm) if mm else float("nan")  # the least contended round
    rows = {}
    for name in configs:
        runs = [r for r in results if r["config"] == name]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows[name] = {"error": runs[0]["error"] if runs else "not run"}
            continue
        times = [t for r in ok for t in r["times"]]
        mflops = [f for r in ok for f in r["model_flops"]]
        hflops = [f for r in ok for f in r["hardware_flops"]]
        total_t = sum(times)
        # occupancy: CPU seconds / (threads x wall seconds) of a step. About 1 when the worker's
        # threads had the cores to themselves; well below 1 when other processes took them.
        # (on a GPU the host thread mostly waits: every step counts as clean there)
        gpu = ok[0].get("device") == "cuda"
        occupancy = [] if gpu else [c / (r.get("threads", 1) * t) for r in ok
                                    for t, c in zip(r["times"], r.get("cpu_times", []))]
        clean_steps = [(t, f) for r in ok for t, c, f in zip(r["times"], r.get("cpu_times", []), r["model_flops"])
                       if gpu or c / (r.get("threads", 1) * t) >= CLEAN_OCCUPANCY]
        clean = [t for t, _ in clean_steps]
        row = {
            "n_steps": len(times), "n_reps": len(ok),
            "median_ms": 1e3 * statistics.median(times),
            "p25_ms": 1e3 * _quantile(times, 0.25), "p75_ms": 1e3 * _quantile(times, 0.75),
            "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "cpu_s_median": statistics.median(c for r in ok for c in r.get("cpu_times", [float("nan")])),
            "cpu_s_mean": statistics.fmean(c for r in ok for c in r.get("cpu_times", [float("nan")])),
            "occupancy": statistics.median(occupancy) if occupancy else float("nan"),
            "n_clean": len(clean),
            "clean_median_ms": 1e3 * statistics.median(clean) if clean else float("nan"),
            "mean_ms": 1e3 * total_t / len(times),
            "tokens_per_s": ok[0]["tokens_per_step"] * len(times) / total_t,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
            "baseline_rss_mb": statistics.median(r["baseline_rss_mb"] for r in ok),
            "model_gflop": statistics.fmean(mflops) / 1e9,
            "hardware_gflop": statistics.fmean(hflops) / 1e9,
            "model_flops_per_s": sum(mflops) / total_t,
            "hardware_flops_per_s": sum(hflops) / total_t,
            "params": ok[0]["params"],
            "flop_parts_gflop": {k: v / 1e9 for k, v in ok[0]["flop_parts"].items()},
            "failed_reps": len(runs) - len(ok),
        }
        row["mfu"] = row["model_flops_per_s"] / rate
        row["hfu"] = row["hardware_flops_per_s"] / rate
        row["mfu_square"] = row["model_flops_per_s"] / square
        cpu_total = sum(c for r in ok for c in r.get("cpu_times", []))
        # the same ratio per CPU-second: step and matmuls both measured in process CPU time
        row["mfu_cpu"] = (sum(mflops) / cpu_total) / rate_cpu if cpu_total else float("nan")
        # uncontended steps against the best round's matmul rate
        row["mfu_clean"] = (sum(f for _, f in clean_steps) / sum(clean) / best_rate) if clean else float("nan")
        if "cuda_peak_mb" in ok[0]:
            row["cuda_peak_mb"] = max(r["cuda_peak_mb"] for r in ok)
        rows[name] = row
    for name, row in rows.items():
        for peer in PEERS:
            p = rows.get(peer)
            if "error" in row or not p or "error" in p:
                continue
            row[f"time_x_{peer}"] = row["median_ms"] / p["median_ms"]
            row[f"min_time_x_{peer}"] = row["min_ms"] / p["min_ms"]
            row[f"cpu_x_{peer}"] = row["cpu_s_median"] / p["cpu_s_median"]
            row[f"clean_time_x_{peer}"] = row["clean_median_ms"] / p["clean_median_ms"]
            row[f"tps_x_{peer}"] = row["tokens_per_s"] / p["tokens_per_s"]
            row[f"rss_x_{peer}"] = row["peak_rss_mb"] / p["peak_rss_mb"]
            if "cuda_peak_mb" in row:
                row[f"cuda_x_{peer}"] = row["cuda_peak_mb"] / p["cuda_peak_mb"]
    return {"rows": rows, "matmul_rate": rate, "matmul_rate_cpu": rate_cpu, "matmul_rate_best": best_rate,
            "square_rate": square,
            "matmul_shapes": mm[0]["per_shape"] if mm else []}


def targets(rows: dict) -> list[tuple[str, float, float, str, bool, dict]]:
    """The issue's targets that this run can evaluate: (what, value, bound, op, met, other bases).
    `met` is judged on the wall-clock value, as the issue states them; the other bases ("CPU":
    process CPU time, "clean": uncontended steps only) are given for a shared machine."""
    out = []

    def get(name, key):
        r = rows.get(name, {})
        return r.get(key) if "error" not in r else None

    def ratio(a, b):
        return a / b if a and b else None

    checks = [
        ("full-unroll step time / Llama-NxT", get("full", "time_x_llama_nxt"), 2.0, "<=",
         {"CPU": get("full", "cpu_x_llama_nxt"), "clean": get("full", "clean_time_x_llama_nxt")}),
        ("full-unroll peak RSS / Llama-NxT", get("full", "rss_x_llama_nxt"), 1.0, "<=", {}),
        ("sampled-step tokens/s / full-unroll", ratio(get("sampled", "tokens_per_s"), get("full", "tokens_per_s")),
         2.0, ">=", {"CPU": ratio(get("full", "cpu_s_mean"), get("sampled", "cpu_s_mean")),
                     "clean": ratio(get("full", "clean_median_ms"), get("sampled", "clean_median_ms"))}),
        ("truncated T=8 peak RSS / T=1", ratio(get("truncated_t8", "peak_rss_mb"), get("truncated_t1", "peak_rss_mb")),
         1.15, "<=", {}),
        ("full-unroll MFU vs measured matmul rate", get("full", "mfu"), 0.60, ">=",
         {"CPU": get("full", "mfu_cpu"), "clean": get("full", "mfu_clean")}),
    ]
    if any("cuda_peak_mb" in r for r in rows.values()):
        checks.append(("truncated T=8 peak CUDA memory / T=1",
                       ratio(get("truncated_t8", "cuda_peak_mb"), get("truncated_t1", "cuda_peak_mb")), 1.15, "<=",
                       {}))
    for what, value, bound, op, alt in checks:
        if value is not None:
            alt = {k: v for k, v in alt.items() if v is not None and math.isfinite(v)}
            out.append((what, value, bound, op, value <= bound if op == "<=" else value >= bound, alt))
    return out


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
              f"of the dense matmul shapes of one full-unroll step (looplm.flops.linear_shapes), timed back to "
              f"back in a `_matmul` worker each round (median over rounds); a {meta.get('square_n', '')}³ square "
              f"matmul ran at {summary['square_rate'] / 1e9:.1f} GFLOP/s.",
              "- MFU = model FLOPs per second / matmul rate. Model FLOPs (looplm.flops): 2 x matmul weights "
              "per token per layer forward plus 4·S·d attention (all S keys counted, non-causal), x3 for a loop "
              "with a graph; 2·d·V per token per read-out forward, x3 in training. Read-out work beyond that "
              "(the recompute read-out's recomputed logits, 2·d·V per token per read-out; gradients the fused "
              "read-out forms but nothing needs) is hardware work only: counted in HFU, not MFU. "
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


def profile(spec: dict, top: int = 30) -> str:
    """Profile `spec["steps"]` steps of one configuration in this process (after warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile
    torch.set_num_threads(spec["threads"])
    if spec.get("chunk"):
        import looplm.readout
        looplm.readout.DEFAULT_CHUNK_TOKENS = spec["chunk"]
    step, _, _ = _build(spec)
    for i in range(spec["warmup"]):
        step(i)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec["device"] == "cuda" else [])
    with tprofile(activities=acts, record_shapes=True) as prof:
        for i in range(spec["steps"]):
            step(spec["warmup"] + i)
            _sync(spec["device"])
    key = "self_cuda_time_total" if spec["device"] == "cuda" else "self_cpu_time_total"
    text = [f"## profile: {spec['config']} ({spec['steps']} steps)", "",
            prof.key_averages().table(sort_by=key, row_limit=top),
            prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=top)]
    return "\n".join(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m looplm.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    # run the importable module's main, so plugins that `register_config` on looplm.bench
    # register into the CONFIGS that main reads (not into a second copy named __main__)
    from looplm.bench import main as _main
    _main()
