"""DDP and FSDP2 around one training step.

The read-outs use the LM head and the gate outside `LoopLM.forward` (the fused read-out forms
their gradients itself), so what DDP and FSDP wrap is the whole step: `StepModule.forward` is the
recipe's loss. For FSDP2 every shared decoder layer (and prelude/coda layer) is one `fully_shard`
unit, wrapped once however many loops reuse it, and the step module is the root, which owns the
embedding, final norm, gate and head.
"""

import contextlib

from torch import nn


class StepModule(nn.Module):
    """The model with the recipe's loss as its forward; `rows` are this rank's rows of the global
    batch, so per-row random draws (per-sequence sampled step) match one process's."""

    def __init__(self, model, recipe, rows: slice | None = None, global_batch: int | None = None):
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.rows, self.global_batch = rows, global_batch

    def forward(self, batch, step: int):
        return self.recipe.loss(self.model, batch, step, rows=self.rows, global_batch=self.global_batch)


def wrap(model, recipe, parallel: str, device: str, rows: slice | None = None,
         global_batch: int | None = None):
    """The module whose forward computes a micro-batch's (loss, metrics), for `parallel`."""
    step = StepModule(model, recipe, rows, global_batch)
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # some recipes leave parameters without a gradient (a truncated window, Stage II's frozen
        # LM): DDP must look for them instead of waiting for their reduction
        return DistributedDataParallel(step, device_ids=[device] if device.startswith("cuda") else None,
                                       find_unused_parameters=True)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        needs = [r.describe() for r in recipe.regularizers if r.backward_in_loss]
        if needs:
            raise ValueError(f"train.parallel='fsdp' cannot train {', '.join(needs)}: it takes a VJP inside "
                             "the loss, a backward pass in the forward that FSDP2's hooks cannot run (they "
                             "reshard the parameters it used); its forward-mode form trains under FSDP "
                             "(PowerIterationJacobian.mode = 'jvp' with iterations = 1, or "
                             "HutchinsonJacobian.mode = 'jvp'), or use train.parallel='ddp'")

        for layer in [*model.prelude, *model.layers, *model.coda]:
            fully_shard(layer)
        fully_shard(step)
    return step


@contextlib.contextmanager
def unsharded(step_module):
    """Whole parameters outside the step's forward (evaluation reads the head and the gate
    directly); a no-op unless FSDP shards them."""
    if hasattr(step_module, "unshard") and hasattr(step_module, "reshard"):
        step_module.unshard()
        try:
            yield
        finally:
            step_module.reshard()
    else:
        yield


def inner_model(step_module) -> nn.Module:
    """The LoopLM inside a step module, however it is wrapped (DDP holds it as .module)."""
    return getattr(step_module, "module", step_module).model


def global_grad_norm(norm) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor under FSDP)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
