"""The STARS norm study: residual placements and norm types (PLACEMENTS and NORMS, looplm.layers).

Placements wrap one sublayer f (attention or MLP) of every decoder layer; N is a norm of the
configured type (`ModelConfig.norm_type`), each placement owning its own norms:

    pre_norm        x + f(N(x))
    post_norm       N(x + f(x))
    sandwich_dual   N2(x + f(N1(x)))            Huginn
    deepnorm        N(alpha * x + f(x))         DeepNorm, alpha = ModelConfig.deepnorm_alpha
    (sandwich_branch, x + N2(f(N1(x))), Ouro's default, lives in looplm.layers)

Norm types (`ModelConfig.norm_type`), statistics always in float32, cast back before the affine
part (as Ouro's RMSNorm):

    layernorm       (x - mean) / sqrt(var + eps) * weight + bias  (nn.LayerNorm's formula)
    simplenorm      x / sqrt(mean(x^2) + eps), no affine weight (RMS normalisation only)
    (rmsnorm, Ouro's, lives in looplm.layers)

Select them in gin with `import variants.norms` and e.g. `model_config.norm_placement =
"pre_norm"`, `model_config.norm_type = "layernorm"`. The type applies to every norm of the model,
the final norm included (with simplenorm the final norm has no weight either).

Notes:
- DeepNorm proper also down-scales the initialisation of the MLP and the attention value/output
  projections by beta = (8N)^(-1/4) and uses alpha = (2N)^(1/4) (decoder-only). Only alpha is
  here: set `deepnorm_alpha`; the initialisation is `LoopLM._init_weights`' (core) and a
  placement cannot change it because the model re-initialises all Linear layers after building
  them. With alpha = 1 deepnorm is post_norm.
- In Ouro's architecture the final norm is applied after every loop and the normed state is
  carried (`carry_normed=True`), so the carried state has unit RMS whatever the placement; the
  placements differ in what happens inside the stack, and across loops only with
  `carry_normed=False` (tests record that).
"""

import torch
import torch.nn as nn

from looplm.config import is_number
from looplm.layers import NORMS, PLACEMENTS, make_norm


# -- norm types -------------------------------------------------------------------------------
@NORMS.register("layernorm")
class LayerNorm(nn.Module):
    """nn.LayerNorm's formula with float32 statistics: `(x - mean) / sqrt(var + eps)` (biased
    variance), cast back to x's dtype, then `* weight + bias`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        if not (is_number(eps) and eps > 0):
            raise ValueError(f"LayerNorm.eps={eps!r} must be a finite number > 0")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x32 = x.float()
        centred = x32 - x32.mean(-1, keepdim=True)
        normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight + self.bias


@NORMS.register("simplenorm")
class SimpleNorm(nn.Module):
    """RMS normalisation with no affine weight: `x / sqrt(mean(x^2) + eps)`, float32 statistics."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        if not (is_number(eps) and eps > 0):
            raise ValueError(f"SimpleNorm.eps={eps!r} must be a finite number > 0")
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


# -- placements -------------------------------------------------------------------------------
@PLACEMENTS.register("pre_norm")
class PreNorm(nn.Module):
    """`x + f(N(x))`: the residual stream itself is never normalised."""

    def __init__(self, cfg, sublayer: nn.Module):
        super().__init__()
        self.norm, self.sublayer = make_norm(cfg), sublayer

    def forward(self, x, *args, **kwargs):
        return x + self.sublayer(self.norm(x), *args, **kwargs)


@PLACEMENTS.register("post_norm")
class PostNorm(nn.Module):
    """`N(x + f(x))` (the original Transformer)."""

    properties = frozenset({"bounded_state"})

    def __init__(self, cfg, sublayer: nn.Module):
        super().__init__()
        self.sublayer, self.norm = sublayer, make_norm(cfg)

    def forward(self, x, *args, **kwargs):
        return self.norm(x + self.sublayer(x, *args, **kwargs))


@PLACEMENTS.register("sandwich_dual")
class SandwichDual(nn.Module):
    """Huginn: `N2(x + f(N1(x)))`, a norm on the branch input and one on the residual sum."""

    properties = frozenset({"bounded_state"})

    def __init__(self, cfg, sublayer: nn.Module):
        super().__init__()
        self.norm_in, self.sublayer, self.norm_out = make_norm(cfg), sublayer, make_norm(cfg)

    def forward(self, x, *args, **kwargs):
        return self.norm_out(x + self.sublayer(self.norm_in(x), *args, **kwargs))


@PLACEMENTS.register("deepnorm")
class DeepNorm(nn.Module):
    """`N(alpha * x + f(x))`, alpha = cfg.deepnorm_alpha (post-norm with an up-weighted residual;
    DeepNet uses alpha = (2N)^(1/4) for decoders; its init scaling is not applied, see module)."""

    properties = frozenset({"bounded_state"})

    @classmethod
    def conformance_examples(cls):
        """Model-config overrides the battery builds this placement with."""
        return [{"deepnorm_alpha": 1.5}]

    def __init__(self, cfg, sublayer: nn.Module):
        super().__init__()
        if not cfg.deepnorm_alpha > 0:
            raise ValueError(f"ModelConfig.deepnorm_alpha={cfg.deepnorm_alpha} must be > 0")
        self.alpha = float(cfg.deepnorm_alpha)
        self.sublayer, self.norm = sublayer, make_norm(cfg)

    def forward(self, x, *args, **kwargs):
        return self.norm(self.alpha * x + self.sublayer(x, *args, **kwargs))
