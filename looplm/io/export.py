"""A looplm run folder -> an Ouro-layout Huggingface folder (config.json, safetensors, tokenizer)."""

from dataclasses import fields
from pathlib import Path

import torch

from looplm import checkpoint
from looplm.config import ModelConfig
from looplm.io import folder, layout
from looplm.io.tokenizer import save_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_model(run_dir) -> tuple[ModelConfig, dict, dict]:
    """(model config, looplm state dict, the whole checkpoint) of a run folder or checkpoint file."""
    source = checkpoint.resolve(run_dir)
    state = checkpoint.load(source, require=("model", "model_config"))
    if state is None:
        raise FileNotFoundError(f"{str(run_dir)!r}: no looplm checkpoint there ({checkpoint.CHECKPOINT_NAME})")
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(state["model_config"]) - names)
    if unknown:
        raise checkpoint.CheckpointError(f"{str(source)!r} records model_config fields {unknown} this looplm "
                                         "does not have")
    return ModelConfig(**state["model_config"]), state["model"], state


def export_run(run_dir, out_dir, max_shard_size: int | str = "5GB", dtype: str = "float32",
               exit_threshold: float = 1.0, max_positions: int = 65536, tokenizer: bool = True) -> dict:
    """Write the run's model to out_dir in Ouro's layout; returns what was written."""
    cfg, state, whole = run_model(run_dir)
    task = whole.get("config", {}).get("task") if tokenizer else None
    return export_model(cfg, state, out_dir, task, max_shard_size, dtype, exit_threshold, max_positions)


def export_model(cfg: ModelConfig, state: dict, out_dir, task_record: str | None = None,
                 max_shard_size: int | str = "5GB", dtype: str = "float32", exit_threshold: float = 1.0,
                 max_positions: int = 65536) -> dict:
    """Write a model (its config and looplm state dict) to out_dir in Ouro's layout, with the
    tokenizer of the task the trainer recorded as `task_record` (none when None)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed are {sorted(DTYPES)}")
    config = layout.ouro_config(cfg, exit_threshold, max_positions) | {"torch_dtype": dtype}
    tensors = {name: t.to(DTYPES[dtype]).contiguous() for name, t in layout.to_ouro(cfg, state).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"tokenizer": save_tokenizer(task_record, out) if task_record else None}
    if written["tokenizer"]:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(out)
        config |= {key: getattr(tok, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    written["weights"] = folder.write(out, config, tensors, max_shard_size)
    return written
