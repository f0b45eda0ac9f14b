"""looplm as a transformers model: `from_pretrained` / `save_pretrained` on an Ouro-layout folder
without remote code, after `import looplm.io`.

LoopLMConfig holds Ouro's config.json fields (model_type "ouro"); LoopLMForCausalLM holds its
parameters under Ouro's tensor names, and its forward runs looplm's own model on them
(torch.func.functional_call on a weightless LoopLM), so the logits are looplm's by construction.
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from looplm.config import ModelConfig
from looplm.io import layout
from looplm.model import LoopLM


class LoopLMConfig(PreTrainedConfig):
    """Ouro's config.json fields, with Ouro's defaults (Ouro-1.4B's sizes)."""

    model_type = layout.MODEL_TYPE
    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    total_ut_steps: int = 4
    early_exit_threshold: float | None = 1.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def looplm_config(self) -> ModelConfig:
        """The ModelConfig, checked as looplm's own import checks a config.json (an unknown field
        or unsupported value is a LayoutError); PreTrainedConfig's generic fields are not Ouro's."""
        generic = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        values = {k: v for k, v in self.to_dict().items() if k not in generic and v is not None}
        return layout.model_config_from(values, f"{self.name_or_path or 'LoopLMConfig'} config")


def _tree(shapes: dict) -> nn.Module:
    """Nested modules whose parameter names are exactly the keys of `shapes`."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(torch.empty(shape)))
    return root


class LoopLMForCausalLM(PreTrainedModel):
    """Ouro's tensors as parameters; forward = looplm's LoopLM over them. `logits` are the last
    loop's (total_ut_steps loops, or `n_loops`); `loop_logits` (one per loop) when asked."""

    config_class = LoopLMConfig
    base_model_prefix = ""
    _tied_weights_keys = {}
    _no_split_modules = []

    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.looplm_config = config.looplm_config()
        shapes = layout.ouro_shapes(self.looplm_config)
        tree = _tree(shapes)
        for name, child in tree.named_children():
            self.add_module(name, child)
        with torch.device("meta"):  # weightless: functional_call supplies every tensor
            object.__setattr__(self, "_skeleton", LoopLM(self.looplm_config))
        self.post_init()

    def _init_weights(self, module):
        for name, param in module.named_parameters(recurse=False):
            with torch.no_grad():
                if name == "bias":
                    param.zero_()
                elif param.dim() == 1:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, self.config.initializer_range)

    def looplm_state(self) -> dict:
        """The parameters in looplm's names (fused projections concatenated: autograd flows)."""
        params = dict(self.named_parameters())
        return layout.from_ouro(self.looplm_config, params.__getitem__, params, type(self).__name__)

    def forward(self, input_ids, attention_mask=None, labels=None, n_loops: int | None = None,
                return_loop_logits: bool = False, use_cache=None, return_dict=None):
        """Logits of the last loop (and, asked for, of every loop); loss when labels are given.
        No KV cache (use_cache is ignored) and no padding: a mask hiding a token is an error."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("LoopLMForCausalLM: attention_mask hides tokens; padded batches are not supported "
                             "(looplm.infer generates with left padding)")
        state = self.looplm_state()
        traj = functional_call(self._skeleton, state, (input_ids,), {"n_loops": n_loops})
        head = state["lm_head.weight"]
        loop_logits = [F.linear(h, head) for h in traj.states] if return_loop_logits else None
        logits = loop_logits[-1] if loop_logits else F.linear(traj.states[-1], head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits)
        if loop_logits is not None:
            out["loop_logits"] = loop_logits
        return out


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM resolve model_type "ouro" to looplm's classes
    (unless transformers ships its own Ouro, which then wins)."""
    try:
        AutoConfig.register(layout.MODEL_TYPE, LoopLMConfig)
    except ValueError:
        return  # "ouro" is already a transformers config: leave it
    AutoModelForCausalLM.register(LoopLMConfig, LoopLMForCausalLM)
