"""Model configuration and the named presets (Ouro's exact sizes, plus CPU-sized ones)."""

import math
from dataclasses import dataclass, fields, replace
from numbers import Real

import gin

from looplm.registry import close_names


def is_integer(value) -> bool:
    """An int and not a bool (True is an int to Python, never a count to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite real number (int or float, not bool, not a string such as "1e-3")."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


@gin.configurable
@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LoopLM. Defaults follow Ouro (REFERENCE section 1) except the sizes.

    vocab_from_task: the trainer sets vocab_size to the task's vocabulary (the presets' vocab_size
    is then only the size of a model built on its own). False fixes vocab_size, e.g. to match a
    tokenizer or a checkpoint: the task's tokens must then fit in it. `model_config(vocab_size=N)`
    sets it False."""

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
    vocab_from_task: bool = False

    def __post_init__(self):
        rules = {  # field -> (is the value allowed, what is allowed)
            "vocab_size": (is_integer(self.vocab_size) and self.vocab_size >= 1, "integers >= 1"),
            "d_model": (is_integer(self.d_model) and self.d_model >= 1, "integers >= 1"),
            "n_layers": (is_integer(self.n_layers) and self.n_layers >= 1, "integers >= 1"),
            "n_heads": (is_integer(self.n_heads) and self.n_heads >= 1, "integers >= 1"),
            "n_kv_heads": (self.n_kv_heads is None or is_integer(self.n_kv_heads) and self.n_kv_heads >= 1,
                           "None (as many as n_heads) or integers >= 1"),
            "d_ff": (is_integer(self.d_ff) and self.d_ff >= 1, "integers >= 1"),
            "n_loops": (is_integer(self.n_loops) and self.n_loops >= 1, "integers >= 1"),
            "rope_base": (is_number(self.rope_base) and self.rope_base > 1, "finite numbers > 1"),
            "norm_eps": (is_number(self.norm_eps) and self.norm_eps > 0, "finite numbers > 0"),
            "norm_placement": (isinstance(self.norm_placement, str), "names of looplm.layers.PLACEMENTS"),
            "norm_type": (isinstance(self.norm_type, str), "names of looplm.layers.NORMS"),
            "deepnorm_alpha": (is_number(self.deepnorm_alpha) and self.deepnorm_alpha > 0, "finite numbers > 0"),
            "n_prelude": (is_integer(self.n_prelude) and self.n_prelude >= 0, "integers >= 0"),
            "n_coda": (is_integer(self.n_coda) and self.n_coda >= 0, "integers >= 0"),
            "gate_on_normed": (isinstance(self.gate_on_normed, bool), "True, False"),
            "carry_normed": (isinstance(self.carry_normed, bool), "True, False"),
            "input_injection": (self.input_injection is None or isinstance(self.input_injection, str),
                                "None or names of looplm.layers.INJECTIONS"),
            "tie_head": (isinstance(self.tie_head, bool), "True, False"),
            "init_std": (is_number(self.init_std) and self.init_std > 0, "finite numbers > 0"),
            "vocab_from_task": (isinstance(self.vocab_from_task, bool), "True, False"),
        }
        for name, (ok, allowed) in rules.items():
            if not ok:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: allowed are {allowed}")
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} must divide d_model={self.d_model} "
                             f"(allowed: {divisors[:12]}{' ...' if len(divisors) > 12 else ''})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim = d_model / n_heads = {self.d_model} / {self.n_heads} "
                             f"= {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            divisors = [h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]
            raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                             f"(allowed: {divisors} or None)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


def sized_for_task(cfg: ModelConfig, task) -> ModelConfig:
    """The config the trainer builds for `task`: vocab_size set to the task's vocabulary, or, when
    the config fixes it (vocab_from_task=False), checked to hold every token of the task."""
    if cfg.vocab_from_task:
        return replace(cfg, vocab_size=task.vocab_size)
    if task.vocab_size > cfg.vocab_size:
        raise ValueError(f"model_config.vocab_size={cfg.vocab_size} is fixed but {type(task).__name__} "
                         f"has {task.vocab_size} tokens: allowed are vocab_size >= {task.vocab_size}, or "
                         "leave vocab_size unset (model_config) to size it to the task")
    return cfg


PRESETS = {  # vocab_from_task: a preset's vocabulary is replaced by the task's when training
    # fast CPU tests
    "tiny": ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, n_loops=3,
                        vocab_from_task=True),
    # Ouro's "small": 6 layers, hidden 768, 12 heads, T = 4 (~118M with the 49152 vocabulary)
    "small": ModelConfig(d_model=768, n_layers=6, n_heads=12, d_ff=2112, n_loops=4, vocab_from_task=True),
    # ~410M: hidden 1024, 24 layers
    "medium": ModelConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=2816, n_loops=4, vocab_from_task=True),
    # Ouro-1.4B and its upcycled 2.6B (48 layers), exact values from the released configs
    "ouro_1_4b": ModelConfig(d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=5632,
                             n_loops=4, rope_base=1e6, norm_eps=1e-6, vocab_from_task=True),
    "ouro_2_6b": ModelConfig(d_model=2048, n_layers=48, n_heads=16, n_kv_heads=16, d_ff=5632,
                             n_loops=4, rope_base=1e6, norm_eps=1e-6, vocab_from_task=True),
}


@gin.configurable
def model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """A preset with field overrides, e.g. `model_config(preset="small", vocab_size=14)` (giving
    vocab_size fixes it: see ModelConfig.vocab_from_task)."""
    if preset not in PRESETS:
        raise ValueError(f"model_config.preset={preset!r}: allowed are {sorted(PRESETS)}"
                         f"{close_names(str(preset), PRESETS)}")
    names = [f.name for f in fields(ModelConfig)]
    for name in overrides:
        if name not in names:
            raise ValueError(f"model_config.{name}: no such ModelConfig field{close_names(name, names)}; "
                             f"the fields are {names}")
    if "vocab_size" in overrides:
        overrides.setdefault("vocab_from_task", False)
    return replace(PRESETS[preset], **overrides)
