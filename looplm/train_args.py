"""The trainer's own arguments checked before anything is built: one clear error naming the value
and what is allowed, instead of a traceback (or a silently different run) later."""

from pathlib import Path

import torch

from looplm.config import is_integer, is_number
from looplm.model import CHECKPOINTING
from looplm.nonfinite import MODES as NONFINITE_MODES
from looplm.recipe import Recipe

COUNTS = ("steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "log_every",
          "eval_batch_size", "max_skipped_steps")
CHOICES = {"precision": ("fp32", "bf16"), "nonfinite": NONFINITE_MODES,
           "activation_checkpointing": CHECKPOINTING}


def check_device(device) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"train.device={device!r} is not a torch device: allowed are e.g. 'cpu', 'cuda', "
                         "'cuda:1'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r} but CUDA is not available here (torch "
                         f"{torch.__version__}); allowed is 'cpu'")


def check(args: dict) -> None:
    """`args`: train()'s arguments by name. Raises ValueError on the first bad one."""
    for name in COUNTS:
        if not (is_integer(args[name]) and args[name] >= 1):
            raise ValueError(f"train.{name}={args[name]!r}: allowed are integers >= 1")
    for name in ("eval_max_loops", "eval_max_batches"):
        if args[name] is not None and not (is_integer(args[name]) and args[name] >= 1):
            raise ValueError(f"train.{name}={args[name]!r}: allowed are None or integers >= 1")
    if not (is_number(args["grad_clip"]) and args["grad_clip"] > 0):
        raise ValueError(f"train.grad_clip={args['grad_clip']!r}: allowed are finite numbers > 0")
    if not is_integer(args["seed"]):
        raise ValueError(f"train.seed={args['seed']!r}: allowed are integers")
    for name in ("compile", "progress"):
        if not isinstance(args[name], bool):
            raise ValueError(f"train.{name}={args[name]!r}: allowed are True, False")
    for name, allowed in CHOICES.items():
        if args[name] not in allowed:
            raise ValueError(f"train.{name}={args[name]!r}; choose one of {allowed}")
    if not callable(getattr(args["task"], "train_batch", None)):
        raise ValueError(f"train.task={args['task']!r}: allowed are tasks such as @AdditionTask()")
    if not isinstance(args["recipe"], (Recipe, type(None))):
        raise ValueError(f"train.recipe={args['recipe']!r}: allowed are None or @Recipe()")
    if not isinstance(args["hparams"], (dict, type(None))):
        raise ValueError(f"train.hparams={args['hparams']!r}: allowed are None or a dict")
    check_device(args["device"])
    if Path(args["run_dir"]).exists() and not Path(args["run_dir"]).is_dir():
        raise ValueError(f"train.run_dir={args['run_dir']!r} is a file; allowed is a folder (made if missing)")
