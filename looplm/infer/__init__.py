"""Inference for looped models: a preallocated KV cache with loop-sharing modes, batched
generation whose early exit skips the loops it saves, run loading, evaluation by exit rule,
an lm-evaluation-harness adapter and a decode benchmark. The core does not import this package."""

from looplm.infer.cache import MODES, StaticKVCache
from looplm.infer.generate import Generation, generate
from looplm.infer.step import StepResult, step

__all__ = ["MODES", "Generation", "StaticKVCache", "StepResult", "generate", "step"]
