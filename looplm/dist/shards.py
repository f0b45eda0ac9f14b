"""Sharded checkpoint folders, written and read by `torch.distributed.checkpoint` (DCP).

A folder holds tensors only: every rank writes its own shards (`__<rank>_0.distcp`) and rank 0 the
`.metadata` index, and any world size reads them back, each rank the pieces its own shards need.
Non-tensor state (the optimizer's param groups, the run's history) stays in the run's checkpoint
file, read with `weights_only=True`. DCP itself would unpickle `.metadata` and any non-tensor entry
with plain pickle (code could run); `SafeReader` unpickles `.metadata` with an allow-list of DCP's
own metadata classes and torch's dtypes, and a folder with non-tensor entries is refused.
"""

import contextlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta

SEPARATOR = "/"  # joins nested keys ("model/layers.0.attn.q.weight"); parameter names hold dots
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module in _DCP_MODULES and name != "BytesStorageMetadata"):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a sharded checkpoint's "
                                     ".metadata (tensors only; loading it could run code)")


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled through an allow-list."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as error:
            raise ValueError(f"sharded checkpoint {str(path.parent)!r}: unreadable .metadata "
                             f"({type(error).__name__}: {error})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def flatten(nested: dict, prefix: str = "") -> tuple[dict, dict]:
    """(tensor leaves keyed by their joined path, the same nesting with the tensors left out)."""
    tensors, rest = {}, {}
    for key, value in nested.items():
        if not isinstance(key, str) or SEPARATOR in key:
            raise ValueError(f"state key {key!r}: sharded checkpoints need str keys without {SEPARATOR!r}")
        path = prefix + key
        if isinstance(value, torch.Tensor):
            tensors[path] = value
        elif isinstance(value, dict):
            inner, rest[key] = flatten(value, path + SEPARATOR)
            tensors |= inner
        else:
            rest[key] = value
    return tensors, rest


def unflatten(tensors: dict, rest: dict) -> dict:
    """The inverse of `flatten`: `rest` with the tensors put back where their paths say."""
    out = _copy_dicts(rest)
    for path, value in tensors.items():
        *parents, leaf = path.split(SEPARATOR)
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def _copy_dicts(nested: dict) -> dict:
    return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in nested.items()}


@contextlib.contextmanager
def _one_process_is_meant():
    """DCP warns on every call without a process group; here one process is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write(folder: Path, tensors: dict) -> None:
    """Every rank's shards of `tensors` into `folder`, atomically: DCP writes into a temporary
    folder beside it (collective), which rank 0 renames to `folder` once every rank has written."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers (maybe of more ranks)
    _barrier()
    with _one_process_is_meant():
        dcp.save(tensors, storage_writer=FileSystemWriter(tmp), no_dist=not dist.is_initialized())
    if _rank0():  # dcp.save returns once rank 0 has written .metadata after every rank's shards
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    _barrier()


def keys(folder: Path) -> set[str]:
    """The tensor paths a folder holds."""
    return set(SafeReader(folder).read_metadata().state_dict_metadata)


def read(folder: Path, template: dict) -> None:
    """Load `folder` into the tensors of `template` in place (plain, or DTensors sharded however
    this world shards them; collective when a process group is up). Every key must be there."""
    with _one_process_is_meant():
        dcp.load(template, storage_reader=SafeReader(folder), no_dist=not dist.is_initialized())


def read_full(folder: Path) -> dict:
    """Every tensor of `folder` whole, on the CPU, in this process alone (no process group)."""
    metadata = SafeReader(folder).read_metadata().state_dict_metadata
    template = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype) for key, md in metadata.items()}
    with _one_process_is_meant():
        dcp.load(template, storage_reader=SafeReader(folder), no_dist=True)
    return template
