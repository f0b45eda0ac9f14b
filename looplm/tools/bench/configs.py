"""The bench's configurations (LoopLM recipes and the two Llama peers) and its model shape.

A configuration builds its recipe from the model config, so variants/ is imported only when a
configuration asks for it. `register_config` adds one (e.g. from a `--plugin` module:
prototypes outside the package).
"""

import importlib
from dataclasses import dataclass, replace

DEFAULT_RECIPES = ("full", "full_recompute", "sampled", "sampled_seq", "truncated", "random_loops", "truncated_t8",
                   "truncated_t1", "llama_nxt", "llama_n")
PEERS = ("llama_nxt", "llama_n")


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
    checkpointing: str = "none"  # LoopLM activation checkpointing (looplm.model.CHECKPOINTING)


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
    # activation checkpointing (train.activation_checkpointing): memory against T, and its time
    "full_t16": ConfigSpec("looplm", "Recipe() at T=16", _recipe(), loops=16),
    "ckpt_loop": ConfigSpec("looplm", "Recipe(), each loop recomputed in backward", _recipe(),
                            checkpointing="loop"),
    "ckpt_loop_t16": ConfigSpec("looplm", "Recipe() at T=16, each loop recomputed in backward", _recipe(),
                                loops=16, checkpointing="loop"),
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
