"""Model configuration and the named presets (Ouro's exact sizes, plus CPU-sized ones)."""

from dataclasses import dataclass, replace

import gin


@gin.configurable
@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LoopLM. Defaults follow Ouro (REFERENCE section 1) except the sizes."""

    vocab_size: int = 49152
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many KV heads as query heads (Ouro)
    d_ff: int = 688
    n_loops: int = 4  # T used for training and, by default, evaluation
    rope_base: float = 1e6
    norm_eps: float = 1e-6
    norm_placement: str = "sandwich_branch"  # see looplm.layers.PLACEMENTS
    norm_type: str = "rmsnorm"  # see looplm.layers.NORMS
    deepnorm_alpha: float = 1.0  # residual scale for norm_placement="deepnorm"
    n_prelude: int = 0  # un-shared layers run once before the loop (STARS)
    n_coda: int = 0  # un-shared layers run once after the last loop (STARS)
    gate_on_normed: bool = True  # the gate reads the final-normed state (Ouro)
    carry_normed: bool = True  # the final-normed state is carried into the next loop (Ouro)
    input_injection: str | None = None  # None: e enters loop 1 only (Ouro); see looplm.layers.INJECTIONS
    tie_head: bool = False  # Ouro's LM head is untied
    init_std: float = 0.02

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size > 0,
            "d_model": self.d_model > 0,
            "n_layers": self.n_layers > 0,
            "n_heads": self.n_heads > 0 and self.d_model % self.n_heads == 0,
            "d_ff": self.d_ff > 0,
            "n_loops": self.n_loops >= 1,
            "rope_base": self.rope_base > 1,
            "norm_eps": self.norm_eps > 0,
            "n_prelude": self.n_prelude >= 0,
            "n_coda": self.n_coda >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid "
                                 f"(d_model={self.d_model}, n_heads={self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


PRESETS = {
    # fast CPU tests
    "tiny": ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, n_loops=3),
    # Ouro's "small": 6 layers, hidden 768, 12 heads, T = 4 (~118M with the 49152 vocabulary)
    "small": ModelConfig(d_model=768, n_layers=6, n_heads=12, d_ff=2112, n_loops=4),
    # ~410M: hidden 1024, 24 layers
    "medium": ModelConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=2816, n_loops=4),
    # Ouro-1.4B and its upcycled 2.6B (48 layers), exact values from the released configs
    "ouro_1_4b": ModelConfig(d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=5632,
                             n_loops=4, rope_base=1e6, norm_eps=1e-6),
    "ouro_2_6b": ModelConfig(d_model=2048, n_layers=48, n_heads=16, n_kv_heads=16, d_ff=5632,
                             n_loops=4, rope_base=1e6, norm_eps=1e-6),
}


@gin.configurable
def model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """A preset with field overrides, e.g. `model_config(preset="small", vocab_size=14)`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)
