"""Interoperability: Ouro's Huggingface checkpoint layout in and out (REFERENCE section 8).

`python -m looplm.export RUN_DIR OUT_DIR` writes one; `train.init_from = @ouro_checkpoint()`
(after `import looplm.io` in a gin file) starts a run from one, `@upcycled_checkpoint()` from a
smaller model with its layers repeated. Importing this package registers
looplm's transformers classes for model_type "ouro". The core never imports it.
"""

from looplm.io.hf import LoopLMConfig, LoopLMForCausalLM, register
from looplm.io.layout import LayoutError
from looplm.io.source import OuroCheckpoint, UpcycledCheckpoint, ouro_checkpoint, upcycled_checkpoint

register()

__all__ = ["LayoutError", "LoopLMConfig", "LoopLMForCausalLM", "OuroCheckpoint", "UpcycledCheckpoint", "ouro_checkpoint",
           "register", "upcycled_checkpoint"]
