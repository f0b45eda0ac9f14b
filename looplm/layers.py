"""Transformer building blocks: norms, residual placements, RoPE attention, SwiGLU, one layer,
and the optional input injection of a loop.

Norm types, residual placements and injections are registries so that the STARS norm study
(variants/norms.py) can add its own without touching this file; Ouro's RMSNorm + sandwich_branch
live here.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from looplm.config import ModelConfig
from looplm.registry import Registry

NORMS = Registry("norm type")
PLACEMENTS = Registry("norm placement")
INJECTIONS = Registry("input injection")


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """Ouro's RMSNorm: statistics in float32, cast back, then the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 for float64 input
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    return NORMS.get(cfg.norm_type)(cfg.d_model, eps=cfg.norm_eps)


@PLACEMENTS.register("sandwich_branch")
class SandwichBranch(nn.Module):
    """Ouro: both norms inside the residual branch, `x + norm_out(f(norm_in(x)))`."""

    def __init__(self, cfg: ModelConfig, sublayer: nn.Module):
        super().__init__()
        self.norm_in, self.sublayer, self.norm_out = make_norm(cfg), sublayer, make_norm(cfg)

    def forward(self, x, *args, **kwargs):
        return x + self.norm_out(self.sublayer(self.norm_in(x), *args, **kwargs))


class RotaryEmbedding(nn.Module):
    """Split-half RoPE, `inv_freq = 1 / base**(arange(0, d, 2) / d)` with d = head_dim."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin of shape (S, head_dim) for integer positions (S,).

        The angles are computed here in float32 (float64 for a float64 model), not kept in a
        buffer: `model.to(torch.bfloat16)` would round a buffer's frequencies to bf16 and put the
        rotation angles off by radians at positions in the thousands."""
        work = torch.promote_types(dtype, torch.float32)
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=work) / self.head_dim
        inv_freq = 1.0 / self.base ** exponents
        freqs = torch.outer(positions.to(work), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention through SDPA; no biases, no QK-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, rope, mask, cache=None, slot=None):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # (first query, end query, keys, values, mask) spans: a cache may store keys for several rows
        # or loops apart, and each span of queries attends to its own, in place
        spans = [(0, B, k, v, mask)] if cache is None else cache.update(slot, k, v, mask)
        gqa = self.kv_heads != self.n_heads
        ys = [F.scaled_dot_product_attention(q[i:j], keys, values, attn_mask=m, is_causal=m is None and S > 1,
                                             enable_gqa=gqa) for i, j, keys, values, m in spans]
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))`, no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Layer(nn.Module):
    """One decoder layer: attention then MLP, each wrapped in the configured norm placement."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        placement = PLACEMENTS.get(cfg.norm_placement)
        self.attn = placement(cfg, Attention(cfg))
        self.mlp = placement(cfg, SwiGLU(cfg))

    def forward(self, x, rope, mask, cache=None, slot=None):
        return self.mlp(self.attn(x, rope, mask, cache=cache, slot=slot))


# -- input injection: how the embedding e enters every loop (Ouro: it does not, x_0 = e) --------
@INJECTIONS.register("add")
class AddInjection(nn.Module):
    """Loop input x_{t-1} + e, from x_0 = 0 (looped transformers, Yang et al. 2024)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, x, e):
        return x + e

    @staticmethod
    def matmul_weights(cfg: ModelConfig) -> int:
        """Weights one token multiplies with per loop (for looplm/tools/bench/flops.py)."""
        return 0


@INJECTIONS.register("concat")
class ConcatInjection(nn.Module):
    """Huginn's adapter: loop input W [x_{t-1}; e] with W (d x 2d), no bias, from x_0 = 0 (Huginn
    draws x_0 at random instead)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, e):
        return self.adapter(torch.cat([x, e], dim=-1))

    @staticmethod
    def matmul_weights(cfg: ModelConfig) -> int:
        return 2 * cfg.d_model * cfg.d_model
