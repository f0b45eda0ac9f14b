"""An Ouro-layout folder as the starting point of a run: its config.json is the model's config
(vocabulary included) and its safetensors are the initial weights.

In a gin file:
    import looplm.io
    train.init_from = @ouro_checkpoint()
    ouro_checkpoint.path = "ByteDance/Ouro-1.4B"   # a local folder, or a hub id in the local cache
    train.model_config = None   # override (the folder defines the model)
"""

from dataclasses import asdict, fields, replace

import gin

from looplm.config import ModelConfig, sized_for_task
from looplm.io import folder, layout
from looplm.model import LoopLM

IGNORED_IN_COMPARISON = ("vocab_from_task", "init_std")  # neither changes the weights' meaning


class OuroCheckpoint:
    """train.init_from's weight source for a Huggingface folder in Ouro's layout."""

    def __init__(self, path: str, cache_dir: str | None = None, overrides: dict | None = None):
        self.path = path
        self.folder = folder.locate(path, cache_dir)
        self.tensors = folder.LazyTensors(self.folder)
        cfg = layout.model_config_from(folder.read_config(self.folder), str(self.folder / folder.CONFIG_NAME))
        names = [f.name for f in fields(ModelConfig)]
        for name in overrides or {}:
            if name not in names:
                raise ValueError(f"ouro_checkpoint.{name}: no such ModelConfig field; the fields are {names}")
        self.config = replace(cfg, **(overrides or {}))

    def __repr__(self):
        return f"ouro_checkpoint({self.path!r})"

    def model_config(self, given: ModelConfig | None, task=None) -> ModelConfig:
        """The run's config: the folder's. A train.model_config that differs from it is an
        error naming the fields (the folder, not the preset, defines the model)."""
        if given is not None:
            ours, theirs = asdict(given), asdict(self.config)
            ignored = IGNORED_IN_COMPARISON + (("vocab_size",) if given.vocab_from_task else ())
            differ = [f"{k}={ours[k]!r} (the folder has {theirs[k]!r})" for k in ours
                      if k not in ignored and ours[k] != theirs[k]]
            if differ:
                raise ValueError(f"train.model_config differs from {str(self.folder)!r}'s config.json: "
                                 f"{', '.join(differ)}; leave train.model_config unset (None) to use the "
                                 "folder's, and change fields through ouro_checkpoint (e.g. ouro_checkpoint.n_loops)")
        return sized_for_task(self.config, task) if task is not None else self.config

    def state_dict(self) -> dict:
        """The folder's tensors in looplm's names, read one at a time."""
        return layout.from_ouro(self.config, self.tensors, self.tensors.names(), str(self.folder))


@gin.configurable
def ouro_checkpoint(path: str = gin.REQUIRED, cache_dir: str | None = None, **overrides) -> OuroCheckpoint:
    """An Ouro-layout folder (or hub id in the local cache) for train.init_from; keyword
    overrides change config fields that keep the tensors' shapes, e.g. n_loops=8."""
    return OuroCheckpoint(path, cache_dir, overrides)


def load_model(path: str, cache_dir: str | None = None) -> LoopLM:
    """A LoopLM with the config and weights of an Ouro-layout folder."""
    source = OuroCheckpoint(path, cache_dir)
    model = LoopLM(source.config)
    model.load_state_dict(source.state_dict())
    return model
