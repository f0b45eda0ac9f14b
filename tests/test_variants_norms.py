"""variants.norms: each placement and norm type against its formula written by hand, and every
(placement, type) pair through a forward/backward pass. The state-growth observation across
loops per placement is recorded in tests/test_properties.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import variants.norms  # noqa: F401  (registers the placements and types)
from looplm.config import model_config
from looplm.data.batch import Batch
from looplm.layers import NORMS, PLACEMENTS, RMSNorm
from looplm.model import LoopLM
from looplm.recipe import FixedLoops, Recipe
from variants.norms import DeepNorm, LayerNorm, PostNorm, PreNorm, SandwichDual, SimpleNorm


class Branch(nn.Module):
    """A stand-in sublayer f(x, scale, shift=...) that also checks the extra arguments arrive."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, scale, shift=0.0):
        return torch.tanh(self.lin(x)) * scale + shift


def rms(x, w=None, eps=1e-6):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("name", ["pre_norm", "post_norm", "sandwich_dual", "deepnorm", "sandwich_branch"])
def test_placement_matches_formula(name):
    cfg = model_config("tiny", d_model=8, norm_placement=name, deepnorm_alpha=1.7)
    f = Branch(8)
    block = randomise(PLACEMENTS.get(name)(cfg, f))  # random norm weights tell N1 from N2 apart
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    got = block(x, 0.5, shift=0.1)
    fx = lambda v: torch.tanh(v @ f.lin.weight.T + f.lin.bias) * 0.5 + 0.1  # noqa: E731
    norms = [m.weight for m in block.modules() if isinstance(m, RMSNorm)]
    if name == "pre_norm":
        want = x + fx(rms(x, norms[0]))
    elif name == "post_norm":
        want = rms(x + fx(x), norms[0])
    elif name == "deepnorm":
        want = rms(1.7 * x + fx(x), norms[0])
    elif name == "sandwich_dual":
        want = rms(x + fx(rms(x, block.norm_in.weight)), block.norm_out.weight)
    else:
        want = x + rms(fx(rms(x, block.norm_in.weight)), block.norm_out.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_layernorm_matches_torch_and_keeps_float32_stats():
    norm = randomise(LayerNorm(16, eps=1e-5))
    x = 3 + 2 * torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(norm(x), F.layer_norm(x, (16,), norm.weight, norm.bias, eps=1e-5))
    # bf16 input: statistics in float32, cast back, then the affine part in bf16
    xb = x.bfloat16()
    want = (F.layer_norm(xb.float(), (16,), eps=1e-5).bfloat16() * norm.weight.bfloat16()) + norm.bias.bfloat16()
    got = randomise(LayerNorm(16, eps=1e-5)).bfloat16()(xb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_simplenorm_has_no_weight_and_unit_rms():
    norm = SimpleNorm(16)
    assert list(norm.parameters()) == []
    x = 5 * torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = norm(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, rms(x).to(torch.float32).to(torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.pow(2).mean(-1).sqrt(), torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("placement", ["pre_norm", "post_norm", "sandwich_dual", "deepnorm", "sandwich_branch"])
@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm", "simplenorm"])
def test_model_trains_with_every_pair(placement, norm_type):
    torch.manual_seed(0)
    model = LoopLM(model_config("tiny", norm_placement=placement, norm_type=norm_type, deepnorm_alpha=1.5))
    expected = {"pre_norm": PreNorm, "post_norm": PostNorm, "sandwich_dual": SandwichDual,
                "deepnorm": DeepNorm}.get(placement)
    if expected:
        assert isinstance(model.layers[0].attn, expected)
    assert isinstance(model.final_norm, NORMS.get(norm_type))
    b = Batch(torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 6)))
    loss, _ = Recipe(loop_count=FixedLoops(2)).loss(model, b, 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.layers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="deepnorm_alpha=0"):
        LoopLM(model_config("tiny", norm_placement="deepnorm", deepnorm_alpha=0.0))
    with pytest.raises(ValueError, match="eps=0"):
        LayerNorm(8, eps=0)
    with pytest.raises(ValueError, match="unknown norm placement"):
        LoopLM(model_config("tiny", norm_placement="peri_norm"))
