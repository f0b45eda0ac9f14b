"""Ouro's Huggingface checkpoint layout (REFERENCE section 8) and how looplm's model maps onto it.

Ouro names every projection separately (q/k/v_proj, gate/up_proj) where looplm fuses them (qkv,
gate_up); the mapping only splits and concatenates rows, so tensors round-trip bit for bit. Only
models Ouro's layout can describe are exported: a feature Ouro lacks (prelude/coda layers, input
injection, another norm placement or type, the gate or carried state un-normed) is refused with a
message naming it, never written as a field Ouro's code would silently ignore.
"""

from dataclasses import replace

import torch

from looplm.config import ModelConfig

MODEL_TYPE = "ouro"
# looplm ModelConfig field -> Ouro config.json field
CONFIG_FIELDS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
                 "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
                 "d_ff": "intermediate_size", "n_loops": "total_ut_steps", "rope_base": "rope_theta",
                 "norm_eps": "rms_norm_eps", "tie_head": "tie_word_embeddings",
                 "init_std": "initializer_range"}
# what Ouro's layout fixes: a ModelConfig with another value cannot be exported
OURO_FIXED = {"norm_placement": "sandwich_branch", "norm_type": "rmsnorm", "deepnorm_alpha": 1.0,
              "n_prelude": 0, "n_coda": 0, "gate_on_normed": True, "carry_normed": True,
              "input_injection": None}
# config.json fields that must hold these values for looplm to compute what Ouro's code computes
REQUIRED_VALUES = {"hidden_act": ("silu",), "rope_scaling": (None, {"rope_type": "default"}),
                   "use_sliding_window": (False,), "attention_dropout": (0.0, 0)}
# config.json fields that do not change the function the model computes (metadata, inference knobs)
INERT_FIELDS = {"model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
                "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "max_position_embeddings",
                "early_exit_threshold", "early_exit_step", "chunk_size", "max_window_layers",
                "sliding_window", "_name_or_path", "output_attentions", "head_dim", "layer_types"}


class LayoutError(ValueError):
    """A config or set of tensors that does not fit Ouro's layout or looplm's model."""


def _refuse_unexportable(cfg: ModelConfig) -> None:
    differ = [f"{name}={getattr(cfg, name)!r}" for name, ouro in OURO_FIXED.items() if getattr(cfg, name) != ouro]
    if differ:
        raise LayoutError(f"cannot export to Ouro's layout: {', '.join(differ)} (Ouro's model has "
                          f"{', '.join(f'{k}={v!r}' for k, v in OURO_FIXED.items())}; its config.json has no "
                          "field for these and its code would compute another function)")


def ouro_config(cfg: ModelConfig, exit_threshold: float = 1.0, max_positions: int = 65536) -> dict:
    """config.json of `cfg` in Ouro's field names (refuses features Ouro's layout lacks)."""
    _refuse_unexportable(cfg)
    out = {"model_type": MODEL_TYPE, "architectures": ["OuroForCausalLM"]}
    out |= {ouro: getattr(cfg, ours) for ours, ouro in CONFIG_FIELDS.items()}
    out |= {"num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.n_layers, "layer_types": ["full_attention"] * cfg.n_layers,
            "attention_dropout": 0.0, "early_exit_threshold": exit_threshold,
            "max_position_embeddings": max_positions, "use_cache": True}
    return out


def model_config_from(config: dict, source="config.json") -> ModelConfig:
    """The ModelConfig an Ouro config.json describes; a field looplm does not know, or a value it
    does not support, is a LayoutError naming it. The vocabulary is fixed (vocab_from_task=False):
    the task's tokens must fit the checkpoint's embedding."""
    if config.get("model_type") != MODEL_TYPE:
        raise LayoutError(f"{source}: model_type={config.get('model_type')!r}: allowed is {MODEL_TYPE!r}")
    known = set(CONFIG_FIELDS.values()) | set(REQUIRED_VALUES) | INERT_FIELDS
    unknown = sorted(set(config) - known)
    if unknown:
        raise LayoutError(f"{source}: unsupported field(s) {unknown}: looplm does not know what they do to "
                          f"the model; the fields it reads are {sorted(known)}")
    for name, allowed in REQUIRED_VALUES.items():
        if name in config and config[name] not in allowed:
            raise LayoutError(f"{source}: {name}={config[name]!r} is not supported: allowed are "
                              f"{' or '.join(map(repr, allowed))}")
    missing = [ouro for ours, ouro in CONFIG_FIELDS.items()
               if ouro not in config and ours not in ("tie_head", "init_std", "n_kv_heads")]
    if missing:
        raise LayoutError(f"{source}: lacks {missing}, which fix the model's shape")
    values = {ours: config[ouro] for ours, ouro in CONFIG_FIELDS.items() if ouro in config}
    values.setdefault("tie_head", False)  # Ouro's default (transformers' own default is True)
    try:
        cfg = replace(ModelConfig(), **values, vocab_from_task=False)
    except ValueError as error:
        raise LayoutError(f"{source}: {error}") from None
    if config.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise LayoutError(f"{source}: head_dim={config['head_dim']} is not hidden_size / num_attention_heads "
                          f"= {cfg.head_dim}; looplm supports only that head size")
    types = config.get("layer_types") or []
    if any(kind != "full_attention" for kind in types):
        raise LayoutError(f"{source}: layer_types={sorted(set(types))}: allowed is 'full_attention' only")
    return cfg


def _layer_pairs(cfg: ModelConfig, i: int) -> list[tuple[str, str]]:
    """(looplm name, Ouro name) for the one-to-one tensors of layer i."""
    ours, ouro = f"layers.{i}.", f"model.layers.{i}."
    return [(ours + "attn.norm_in.weight", ouro + "input_layernorm.weight"),
            (ours + "attn.norm_out.weight", ouro + "input_layernorm_2.weight"),
            (ours + "attn.sublayer.o_proj.weight", ouro + "self_attn.o_proj.weight"),
            (ours + "mlp.norm_in.weight", ouro + "post_attention_layernorm.weight"),
            (ours + "mlp.norm_out.weight", ouro + "post_attention_layernorm_2.weight"),
            (ours + "mlp.sublayer.down.weight", ouro + "mlp.down_proj.weight")]


def _fused(cfg: ModelConfig, i: int) -> list[tuple[str, list[tuple[str, int]]]]:
    """(looplm fused name, [(Ouro name, rows)]) in the order the rows are stacked."""
    ours, ouro = f"layers.{i}.", f"model.layers.{i}."
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return [(ours + "attn.sublayer.qkv.weight", [(ouro + "self_attn.q_proj.weight", q),
                                                  (ouro + "self_attn.k_proj.weight", kv),
                                                  (ouro + "self_attn.v_proj.weight", kv)]),
            (ours + "mlp.sublayer.gate_up.weight", [(ouro + "mlp.gate_proj.weight", cfg.d_ff),
                                                     (ouro + "mlp.up_proj.weight", cfg.d_ff)])]


def _global_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("final_norm.weight", "model.norm.weight"),
             ("gate.weight", "model.early_exit_gate.weight"), ("gate.bias", "model.early_exit_gate.bias")]
    return pairs if cfg.tie_head else [*pairs, ("lm_head.weight", "lm_head.weight")]


def ouro_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of Ouro's layout for `cfg`, with its shape (written from Ouro's module
    definitions, not from looplm's model: the independent table the tests check against)."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "model.early_exit_gate.weight": (1, d), "model.early_exit_gate.bias": (1,)}
    if not cfg.tie_head:
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + n: (d,) for n in ("input_layernorm.weight", "input_layernorm_2.weight",
                                          "post_attention_layernorm.weight", "post_attention_layernorm_2.weight")}
        shapes |= {p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)}
    return shapes


def to_ouro(cfg: ModelConfig, state: dict) -> dict[str, torch.Tensor]:
    """looplm state dict -> Ouro-named tensors (contiguous, as safetensors stores them)."""
    _refuse_unexportable(cfg)
    out = {ouro: state[ours] for ours, ouro in _global_pairs(cfg)}
    for i in range(cfg.n_layers):
        out |= {ouro: state[ours] for ours, ouro in _layer_pairs(cfg, i)}
        for ours, parts in _fused(cfg, i):
            out |= dict(zip([name for name, _ in parts], state[ours].split([rows for _, rows in parts])))
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def from_ouro(cfg: ModelConfig, get, names, source) -> dict[str, torch.Tensor]:
    """Ouro-named tensors -> looplm state dict. `get(name)` reads one tensor (lazily, e.g. from a
    safetensors shard) and `names` lists those the checkpoint holds. A missing or unexpected
    tensor or a wrong shape is a LayoutError naming it, raised before any tensor is read."""
    expected, present = ouro_shapes(cfg), set(names)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = [f"{label} {len(items)}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected)) if items]
        raise LayoutError(f"{source} does not hold the tensors its config.json describes: {'; '.join(parts)}")
    tensors = {}
    for name, shape in expected.items():
        tensor = get(name)
        if tuple(tensor.shape) != shape:
            raise LayoutError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config.json "
                              f"describes {shape}")
        tensors[name] = tensor
    state = {ours: tensors[ouro] for ours, ouro in _global_pairs(cfg)}
    if cfg.tie_head:
        state["lm_head.weight"] = state["embed.weight"]
    for i in range(cfg.n_layers):
        state |= {ours: tensors[ouro] for ours, ouro in _layer_pairs(cfg, i)}
        for ours, parts in _fused(cfg, i):
            state[ours] = torch.cat([tensors[name] for name, _ in parts])
    return state
