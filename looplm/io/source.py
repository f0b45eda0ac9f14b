"""Weight sources for train.init_from: where a run's initial weights and model config come from
when they are not a looplm run of the same shape.

    import looplm.io
    train.init_from = @ouro_checkpoint()
    ouro_checkpoint.path = "ByteDance/Ouro-1.4B"   # a local folder, or a hub id in the local cache
    train.model_config = None   # override (the checkpoint defines the model)

ouro_checkpoint: an Ouro-layout Huggingface folder; its config.json is the model's config,
vocabulary included. weight_source: that, or a looplm run (what `python -m looplm.run --init-from
PATH` binds). upcycled_checkpoint: a smaller model (Ouro folder or looplm run) with its layers
repeated, as Ouro grew its 2.6B (48 layers) from the 1.4B (24).
"""

from dataclasses import asdict, fields, replace
from pathlib import Path

import gin

from looplm.checkpoint import CHECKPOINT_NAME
from looplm.config import ModelConfig, sized_for_task
from looplm.io import folder, layout
from looplm.model import LoopLM

IGNORED_IN_COMPARISON = ("vocab_from_task", "init_std")  # neither changes the weights' meaning
UPCYCLE_ORDERS = ("stack", "interleave")


def _with_overrides(cfg: ModelConfig, overrides: dict, owner: str) -> ModelConfig:
    names = [f.name for f in fields(ModelConfig)]
    for name in overrides:
        if name not in names:
            raise ValueError(f"{owner}.{name}: no such ModelConfig field; the fields are {names}")
    return replace(cfg, **overrides)


class WeightSource:
    """What train() asks of a non-path init_from: the model config and the state dict."""

    config: ModelConfig
    where: str

    def model_config(self, given: ModelConfig | None, task=None) -> ModelConfig:
        """The run's config: the source's. A train.model_config that differs from it is an error
        naming the fields (the checkpoint, not a preset, defines the model)."""
        if given is not None:
            ours, theirs = asdict(given), asdict(self.config)
            ignored = IGNORED_IN_COMPARISON + (("vocab_size",) if given.vocab_from_task else ())
            differ = [f"{k}={ours[k]!r} (the checkpoint has {theirs[k]!r})" for k in ours
                      if k not in ignored and ours[k] != theirs[k]]
            if differ:
                raise ValueError(f"train.model_config differs from {self.where}: {', '.join(differ)}; leave "
                                 "train.model_config unset (None) to use the checkpoint's, and change fields "
                                 f"through {type(self).__name__}'s overrides (e.g. ouro_checkpoint.n_loops)")
        return sized_for_task(self.config, task) if task is not None else self.config

    def state_dict(self) -> dict:
        raise NotImplementedError


class OuroCheckpoint(WeightSource):
    """An Huggingface folder in Ouro's layout, its tensors read one at a time."""

    def __init__(self, path: str, cache_dir: str | None = None, overrides: dict | None = None):
        self.path = path
        self.folder = folder.locate(path, cache_dir)
        self.where = f"{str(self.folder / folder.CONFIG_NAME)!r}"
        self.tensors = folder.LazyTensors(self.folder)
        cfg = layout.model_config_from(folder.read_config(self.folder), str(self.folder / folder.CONFIG_NAME))
        self.config = _with_overrides(cfg, overrides or {}, "ouro_checkpoint")

    def __repr__(self):
        return f"ouro_checkpoint({self.path!r})"

    def state_dict(self) -> dict:
        return layout.from_ouro(self.config, self.tensors, self.tensors.names(), str(self.folder))


class LooplmRun(WeightSource):
    """A looplm run folder or checkpoint file (its recorded model_config and weights); its
    vocabulary is fixed, as a checkpoint's is: a task with more tokens is an error."""

    def __init__(self, path, overrides: dict | None = None):
        from looplm.io.export import run_model
        cfg, self._state, _ = run_model(path)
        self.config = _with_overrides(replace(cfg, vocab_from_task=False), overrides or {}, "weight_source")
        self.where = f"the model_config of {str(path)!r}"

    def state_dict(self) -> dict:
        return self._state


class UpcycledCheckpoint(WeightSource):
    """A smaller model's layers repeated `repeats` times: "stack" runs the whole stack again
    (layers 0..N-1, 0..N-1), "interleave" repeats each layer in place (0, 0, 1, 1, ...). Every
    other tensor is copied."""

    def __init__(self, source: WeightSource, repeats: int = 2, order: str = "stack", overrides: dict | None = None):
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"upcycled_checkpoint.repeats={repeats!r}: allowed are integers >= 1")
        if order not in UPCYCLE_ORDERS:
            raise ValueError(f"upcycled_checkpoint.order={order!r}: allowed are {UPCYCLE_ORDERS}")
        self.source, self.repeats, self.order = source, repeats, order
        self.where = f"{source.where} upcycled x{repeats}"
        small = source.config.n_layers
        self.config = _with_overrides(replace(source.config, n_layers=small * repeats), overrides or {},
                                      "upcycled_checkpoint")
        if self.config.n_layers != small * repeats:
            raise ValueError(f"upcycled_checkpoint: n_layers={self.config.n_layers} is fixed by upcycling "
                             f"({small} layers x {repeats})")

    def origin(self, layer: int) -> int:
        """The small model's layer that layer `layer` of the upcycled model copies."""
        return layer % self.source.config.n_layers if self.order == "stack" else layer // self.repeats

    def state_dict(self) -> dict:
        small = self.source.state_dict()
        state = {name: t for name, t in small.items() if not name.startswith("layers.")}
        for i in range(self.config.n_layers):
            prefix = f"layers.{self.origin(i)}."
            state |= {f"layers.{i}.{name[len(prefix):]}": t.clone() for name, t in small.items()
                      if name.startswith(prefix)}
        return state


KINDS = ("a looplm run folder or checkpoint file, an Ouro-layout Huggingface folder (config.json and "
         "safetensors), or a hub id 'org/name' in the local Huggingface cache")


def _source(path: str, cache_dir: str | None, overrides: dict | None = None) -> WeightSource:
    """A looplm run (folder with checkpoint.pt, or the file) or else an Ouro-layout folder."""
    local = Path(path).expanduser()
    if local.is_file() or (local / CHECKPOINT_NAME).is_file():
        return LooplmRun(local, overrides)
    if local.is_dir() and not (local / folder.CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path!r} is a folder with neither {CHECKPOINT_NAME} nor {folder.CONFIG_NAME}: "
                                f"allowed are {KINDS}")
    if not local.exists() and (path.startswith(("/", ".", "~")) or path.count("/") != 1):
        raise FileNotFoundError(f"{path!r}: no such file or folder; allowed are {KINDS}")
    try:
        return OuroCheckpoint(path, cache_dir, overrides)
    except FileNotFoundError as error:
        if local.exists():
            raise
        raise FileNotFoundError(f"{error}; nor is {path!r} a local file or folder") from None  # 'org/name' mistyped


@gin.configurable
def weight_source(path: str = gin.REQUIRED, cache_dir: str | None = None, **overrides) -> WeightSource:
    """Whatever `path` holds, for train.init_from: a looplm run or checkpoint, an Ouro-layout
    folder, or a hub id in the local cache. Its config is the model's; keyword overrides change
    fields that keep the tensors' shapes, e.g. n_loops=8. `python -m looplm.run --init-from`."""
    return _source(path, cache_dir, overrides)


def init_from_bindings(path: str) -> list[str]:
    """The gin bindings `--init-from PATH` stands for: the checkpoint gives the weights and the
    model config (a gin file's model_config is not used)."""
    return ["train.init_from = @weight_source()", f"weight_source.path = {str(path)!r}",
            "train.model_config = None"]


@gin.configurable
def ouro_checkpoint(path: str = gin.REQUIRED, cache_dir: str | None = None, **overrides) -> OuroCheckpoint:
    """An Ouro-layout folder (or hub id in the local cache) for train.init_from; keyword
    overrides change config fields that keep the tensors' shapes, e.g. n_loops=8."""
    return OuroCheckpoint(path, cache_dir, overrides)


@gin.configurable
def upcycled_checkpoint(path: str = gin.REQUIRED, repeats: int = 2, order: str = "stack",
                        cache_dir: str | None = None, **overrides) -> UpcycledCheckpoint:
    """A looplm run or Ouro-layout folder with its layers repeated, for train.init_from."""
    return UpcycledCheckpoint(_source(path, cache_dir), repeats, order, overrides)


def load_model(path: str, cache_dir: str | None = None) -> LoopLM:
    """A LoopLM with the config and weights of an Ouro-layout folder."""
    source = OuroCheckpoint(path, cache_dir)
    model = LoopLM(source.config)
    model.load_state_dict(source.state_dict())
    return model
