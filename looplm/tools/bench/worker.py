"""One bench worker: build a configuration, time its training steps (wall and CPU time, peak RSS),
or time the dense matmul shapes of a step (the rate MFU is measured against); and the in-process
profile of a configuration."""

import contextlib
import importlib
import resource
import statistics
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

import looplm.readout
from looplm.tools.bench.configs import CONFIGS, llama_config, model_config
from looplm.tools.bench.counting import CountingModel
from looplm.tools.bench.flops import linear_shapes, llama_step_flops

RESULT_PREFIX = "@@LOOPLM_BENCH@@ "  # the line of a worker's stdout that holds its result (JSON)


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


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device, dtype):
    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_step(spec: dict):
    """(step(i) -> Flops of that step, parameter count, model) for one configuration: the step runs
    zero_grad, the forward/loss (Recipe.loss, or the HF loss with labels), backward and AdamW
    (torch's default implementation, the same settings for every row)."""
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
    model.checkpointing = conf.checkpointing
    if spec.get("compile"):
        model.compile()
    recipe = conf.recipe(cfg)
    counting = CountingModel(model)
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
    torch.set_num_threads(spec["threads"])
    if spec.get("chunk"):
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
    step, n_params, _ = build_step(spec)
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
    """Time the dense matmul shapes of one full-unroll step (flops.linear_shapes) back to
    back, and one large square matmul; rates in FLOP/s."""
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


def profile(spec: dict, top: int = 30) -> str:
    """Profile `spec["steps"]` steps of one configuration in this process (after warm-up)."""
    torch.set_num_threads(spec["threads"])
    if spec.get("chunk"):
        looplm.readout.DEFAULT_CHUNK_TOKENS = spec["chunk"]
    step, _, _ = build_step(spec)
    for i in range(spec["warmup"]):
        step(i)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec["device"] == "cuda" else [])
    with torch_profile(activities=acts, record_shapes=True) as prof:
        for i in range(spec["steps"]):
            step(spec["warmup"] + i)
            _sync(spec["device"])
    key = "self_cuda_time_total" if spec["device"] == "cuda" else "self_cpu_time_total"
    text = [f"## profile: {spec['config']} ({spec['steps']} steps)", "",
            prof.key_averages().table(sort_by=key, row_limit=top),
            prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=top)]
    return "\n".join(text)
