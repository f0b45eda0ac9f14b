"""The model and optimizer in a run's checkpoint, at any world size and parallel mode.

One process writes them into checkpoint.pt as full tensors (read with `weights_only=True`). N
ranks write them as `torch.distributed.checkpoint` shards (looplm.dist.shards): under FSDP each
rank its own shards of every tensor, under DDP each replicated tensor once. The shards go into
one of two folders beside checkpoint.pt, the one checkpoint.pt does not name, and rank 0 then
replaces checkpoint.pt (the rest of the run's state, and the folder's name): that replacement is
the commit, so a crash at any moment leaves the previous checkpoint whole. Either kind resumes at
any world size and mode: shards are read into this run's own (sharded or whole) state dicts,
resharded by DCP; full tensors go through the same state-dict API.
"""

import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from looplm import checkpoint
from looplm.dist import shards
from looplm.dist.parallel import inner_model
from looplm.dist.world import World


class Checkpointer:
    """Writes and restores the checkpoint of one run folder; `state` is the checkpoint the run
    resumes from (None for a fresh run), so every rank knows which shard folder is committed."""

    def __init__(self, run_dir, world: World, state: dict | None = None):
        self.run_dir, self.world = Path(run_dir), world
        self.committed = state.get("shards") if state else None

    def save(self, step_module, optimizer, meta: dict) -> None:
        """Write the checkpoint: model, optimizer and `meta` (the rest of the run's state, plain
        values). Collective: every rank calls it."""
        model = inner_model(step_module)
        if self.world.size == 1:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state, optim_state = _saved_state(model, optimizer, options)
            entry = {"model": model_state, "optimizer": optim_state}
        else:
            folder = next(name for name in checkpoint.SHARD_FOLDERS if name != self.committed)
            model_state, optim_state = _saved_state(model, optimizer, StateDictOptions())  # this rank's shards
            tensors, rest = shards.flatten({"model": model_state, "optimizer": optim_state})
            shards.write(self.run_dir / folder, tensors)
            entry = {"shards": folder, "sharded_rest": rest}
        if self.world.main:
            checkpoint.save(self.run_dir / checkpoint.CHECKPOINT_NAME, {**entry, **meta})
            for path in checkpoint.shard_folders(self.run_dir):
                if path.name != entry.get("shards"):
                    shutil.rmtree(path, ignore_errors=True)  # the previous save's, or a killed one's
        self.committed = entry.get("shards")
        self.world.barrier()

    def restore(self, state: dict, step_module, optimizer) -> None:
        """Load the model and optimizer of `state` (either kind) into this run's modules.
        Collective when the checkpoint is sharded."""
        model = inner_model(step_module)
        if "shards" in state:
            folder = self.run_dir / state["shards"]
            model_state, optim_state = get_state_dict(model, optimizer)  # the layout to fill
            wanted, _ = shards.flatten({"model": model_state, "optimizer": optim_state})
            present = shards.keys(folder)
            lost = [k for k in wanted if k.startswith("model/") and k not in present]
            if lost:
                raise checkpoint.CheckpointError(f"{folder} lacks {len(lost)} model tensors ({', '.join(lost[:4])}"
                                                 "...): it holds another model")
            wanted = {k: v for k, v in wanted.items() if k in present}
            shards.read(folder, wanted)
            loaded = shards.unflatten(wanted, state["sharded_rest"])
            model_state, optim_state, options = loaded["model"], loaded["optimizer"], {}
        else:
            model_state, optim_state, options = state["model"], state["optimizer"], {"full_state_dict": True}
        set_model_state_dict(model, model_state, options=StateDictOptions(**options))
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(**options, strict=False))
        _forget_unsaved(model, optimizer, optim_state)


def _saved_state(model: torch.nn.Module, optimizer, options: StateDictOptions) -> tuple[dict, dict]:
    """get_state_dict's (model, optimizer) state dicts, without the zero AdamW state it makes up
    for the parameters that have none yet (all of them, before the first step)."""
    live = {name for name, param in model.named_parameters() if param in optimizer.state}
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    optim_state["state"] = {name: value for name, value in optim_state["state"].items() if name in live}
    _forget_unsaved(model, optimizer, optim_state)
    return model_state, optim_state


def _forget_unsaved(model: torch.nn.Module, optimizer, optim_state: dict) -> None:
    """A parameter that never had a gradient before the save (the embedding under a truncated
    window) had no AdamW state: it starts without one again, as in the uninterrupted run (the
    state-dict API gives every parameter a zero state when it sets up the optimizer)."""
    saved = set(optim_state.get("state", {}))
    for name, param in model.named_parameters():
        if name not in saved:
            optimizer.state.pop(param, None)
