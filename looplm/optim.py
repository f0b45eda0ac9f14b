"""AdamW with Ouro's defaults and a warm-up + cosine schedule."""

import math

import gin
import torch


@gin.configurable
def build_optimizer(params, lr: float = 3e-4, betas=(0.9, 0.95), weight_decay: float = 0.1,
                    eps: float = 1e-8, fused: bool = True):
    """AdamW; matrices decay, vectors (norm weights, biases such as the gate's) do not.

    fused: torch's fused AdamW kernel (CPU and CUDA); on the CPU bench shape it steps 28M
    parameters in 18 ms against 100 ms for the default implementation."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused)


@gin.configurable
def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 100, min_ratio: float = 0.1) -> float:
    """Linear warm-up to the peak, then cosine decay to `min_ratio` of it at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
