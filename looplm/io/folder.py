"""A Huggingface model folder on disk: config.json plus model.safetensors, or shards listed by
model.safetensors.index.json. Read lazily (one tensor at a time, memory-mapped by safetensors),
found as a local folder or as a hub id already in the local Huggingface cache (never downloaded)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def locate(path_or_id: str, cache_dir: str | None = None) -> Path:
    """The folder of `path_or_id`: a local folder, or a hub id ("org/name") already downloaded to
    the Huggingface cache (looked up offline: nothing is fetched)."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        if not (local / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{str(local)!r} is a folder without {CONFIG_NAME}: not a Huggingface model folder")
        return local
    if local.exists() or path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{path_or_id!r}: no such Huggingface model folder (a local folder holding "
                                f"{CONFIG_NAME}, or a hub id 'org/name' in the local Huggingface cache)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(path_or_id, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as error:
        raise FileNotFoundError(f"{path_or_id!r} is not in the local Huggingface cache ({type(error).__name__}); "
                                "looplm never downloads weights: download it yourself (e.g. `hf download "
                                f"{path_or_id}`) or pass a local folder") from None


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(folder / CONFIG_NAME)!r} is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(folder / CONFIG_NAME)!r} holds a {type(config).__name__}, not a JSON object")
    return config


class LazyTensors:
    """The tensors of a folder's safetensors file(s) by name, each read only when asked for."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{str(index)!r} has no weight_map object")
            self.shard_of = weight_map
        elif (folder / WEIGHTS_NAME).is_file():
            with safe_open(folder / WEIGHTS_NAME, framework="pt") as f:
                self.shard_of = {name: WEIGHTS_NAME for name in f.keys()}
        else:
            raise FileNotFoundError(f"{str(folder)!r} holds neither {WEIGHTS_NAME} nor {INDEX_NAME} "
                                    "(looplm reads weights through safetensors only, never pickles)")
        for shard in sorted(set(self.shard_of.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{str(folder / INDEX_NAME)!r} lists shard {shard!r}, which is missing")
        self._open = {}

    def names(self) -> list[str]:
        return sorted(self.shard_of)

    def __call__(self, name: str) -> torch.Tensor:
        shard = self.shard_of[name]
        if shard not in self._open:
            self._open[shard] = safe_open(self.folder / shard, framework="pt")
        return self._open[shard].get_tensor(name)


def write(folder: Path, config: dict, tensors: dict, max_shard_size: int | str = "5GB") -> list[str]:
    """config.json and the tensors as safetensors, sharded with an index above max_shard_size;
    returns the weight files written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for stale in [folder / WEIGHTS_NAME, folder / INDEX_NAME, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)
