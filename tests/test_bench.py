"""looplm.bench (looplm/tools/bench/) end to end on a tiny shape, and the analytic FLOPs against FlopCounterMode."""


import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from looplm.config import ModelConfig
from looplm.tools.bench.cli import main as bench_main
from looplm.tools.bench.flops import llama_step_flops, looplm_plan_flops
from looplm.tools.bench.summary import targets
from looplm.tools.bench.worker import build_step

TINY = ["--vocab", "512", "--hidden", "32", "--ff", "64", "--layers", "2", "--loops", "2",
        "--seq", "32", "--batch", "2", "--threads", "2"]


def tiny_spec(config, **kw):
    shape = {"preset": "bench", "vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
             "n_loops": 3, "batch": 2, "seq": 32}
    return {"config": config, "shape": shape, "device": "cpu", "dtype": "fp32", "threads": 2, "rep": 0,
            "seed": 0} | kw


def _inplace_addmm_flops(self_shape, mat1_shape, mat2_shape, *args, **kwargs) -> int:
    """FlopCounterMode counts addmm but not its in-place form, which the read-out accumulates the
    head gradient with (it passes shapes)."""
    return 2 * mat1_shape[0] * mat1_shape[1] * mat2_shape[1]


@pytest.mark.parametrize("config, injection", [
    ("full", None), ("full_recompute", None), ("full_t1", None), ("sampled", None), ("sampled_seq", None),
    ("truncated", None), ("random_loops", None), ("random_loops_stars", None), ("llama_nxt", None),
    ("full", "concat"), ("truncated", "add")])
def test_flops_match_flop_counter(config, injection):
    """Analytic FLOPs (model + overhead such as the read-out recompute) of the step the bench times, against
    FlopCounterMode. SDPA runs on its math backend so that attention is counted (as bmm)."""
    torch.set_num_threads(2)
    spec = tiny_spec(config)
    spec["shape"]["input_injection"] = injection
    step, _, _ = build_step(spec)
    step(0)  # lazy initialisation outside the counter
    for i in (1, 2):  # sampled plans vary by step
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(
                display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flops}) as counter:
            flops = step(i)
        counted = counter.get_total_flops()
        assert counted > 0
        assert flops.hardware == pytest.approx(counted, rel=0.02), (config, i, flops.parts)
        assert flops.model <= flops.hardware


def test_formulas():
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, d_ff=64, n_loops=3)
    B, S = 2, 32
    f = looplm_plan_flops(cfg, B, S, fused=False)
    assert f.overhead == 2 * 32 * 512 * B * S * 3  # one recomputed read-out forward per loop
    assert f.parts["readout"] == 3 * f.overhead
    assert looplm_plan_flops(cfg, B, S, fused=True).overhead == 0
    llama = llama_step_flops(32, 6, 4, 4, 64, 512, B, S)
    # same body FLOPs as N x T Llama layers; three more read-outs
    assert f.parts["body"] == llama.parts["body"]
    assert f.parts["readout"] == 3 * llama.parts["readout"]


def test_targets_are_evaluated():
    rows = {"full": {"time_x_llama_nxt": 1.5, "rss_x_llama_nxt": 1.1, "tokens_per_s": 10.0, "mfu": 0.7,
                     "clean_time_x_llama_nxt": 2.5, "clean_median_ms": 100.0},
            "sampled": {"tokens_per_s": 25.0, "clean_median_ms": 40.0}}
    got = {what: met for what, _, _, _, met, _ in targets(rows)}
    assert got == {"full-unroll step time / Llama-NxT": True, "full-unroll peak RSS / Llama-NxT": False,
                   "sampled-step tokens/s / full-unroll": True, "full-unroll MFU vs measured matmul rate": True}
    alt = {what: a for what, _, _, _, _, a in targets(rows)}
    assert alt["full-unroll step time / Llama-NxT"] == {"clean": 2.5}
    assert alt["sampled-step tokens/s / full-unroll"] == {"clean": 2.5}


def test_unknown_config_is_an_error():
    with pytest.raises(SystemExit, match="unknown configuration"):
        bench_main(TINY + ["--recipes", "full,nope"])

