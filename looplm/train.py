"""The training loop: one recipe, AdamW, warm-up + cosine, clipping, accumulation, periodic
evaluation, atomic checkpoints with exact resume, Aim tracking and a progress bar.

A job that receives SIGUSR1 or SIGTERM (a SLURM pre-emption warning) finishes its step, writes a
checkpoint and exits with PREEMPTED_EXIT_CODE; started again in the same run directory it resumes
from there and keeps writing into the same Aim run.
"""

import contextlib
import json
import random
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import gin
import torch

from looplm import checkpoint
from looplm.config import ModelConfig
from looplm.evaluate import evaluate
from looplm.model import LoopLM
from looplm.optim import build_optimizer, lr_multiplier
from looplm.progress import TrainProgress
from looplm.recipe import Recipe
from looplm.tracking import Tracker

PREEMPTED_EXIT_CODE = 3


class RunControl:
    """Shared with the caller: whether training has started (an error before that is a config
    error), and the pre-emption signal received, which the loop checks between steps."""

    def __init__(self):
        self.started = False
        self.raised = None

    def __call__(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def install(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self)


def _average(metric_dicts: list[dict]) -> dict:
    out = {}
    for key in metric_dicts[0]:
        values = [m[key] for m in metric_dicts]
        out[key] = ([sum(v) / len(v) for v in zip(*values)] if isinstance(values[0], list)
                    else sum(values) / len(values))
    return out


def _autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision={precision!r}; choose 'fp32' or 'bf16'")


@gin.configurable(denylist=["control"])
def train(task=gin.REQUIRED, model_config: ModelConfig | None = None, recipe: Recipe | None = None,
          run_dir: str = "runs/default", steps: int = 1000, batch_size: int = 64, grad_accum: int = 1,
          grad_clip: float = 1.0, precision: str = "fp32", device: str = "cpu", seed: int = 0,
          eval_every: int = 250, eval_max_loops: int | None = None, eval_batch_size: int = 256,
          eval_max_batches: int | None = None, checkpoint_every: int = 250, resume: bool = True,
          init_from: str | None = None, log_every: int = 50, compile: bool = False,
          tracker: Tracker | None = None, progress: bool = True, hparams: dict | None = None,
          control: RunControl | None = None) -> dict:
    """Train and return a summary: final train metrics, the last evaluation and the loss history.

    init_from: a checkpoint file or run directory whose model weights start this run (e.g. Stage
    II gate training on a Stage I model). eval_max_loops: deepest loop count evaluated (2T).
    """
    for name, value in {"steps": steps, "batch_size": batch_size, "grad_accum": grad_accum,
                        "eval_every": eval_every, "checkpoint_every": checkpoint_every,
                        "log_every": log_every}.items():
        if value < 1:
            raise ValueError(f"train.{name}={value} must be >= 1")
    control = control or RunControl()
    control.install()  # before anything slow: a pre-emption during start-up is not lost
    started_at = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    random.seed(seed)
    autocast = _autocast(device, precision)

    cfg = replace(model_config or ModelConfig(), vocab_size=task.vocab_size)
    model = LoopLM(cfg).to(device)
    recipe = recipe or Recipe()
    recipe.seed = seed
    if init_from:
        source = Path(init_from)
        state = checkpoint.load(source / checkpoint.CHECKPOINT_NAME if source.is_dir() else source)
        if state is None:
            raise FileNotFoundError(f"train.init_from={init_from!r}: no checkpoint there")
        model.load_state_dict(state["model"])
    trainable = recipe.trainable_parameters(model)
    trainable_ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    optimizer = build_optimizer(trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, steps))
    if compile:
        for layer in model.layers:
            layer.compile()

    tracker = tracker or Tracker(enabled=False)
    state = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME) if resume else None
    start_step, history, last_eval, wall_before = 0, [], {}, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        recipe.load_state_dict(state["recipe"])
        checkpoint.set_rng_state(state["rng"])
        start_step, history, last_eval = state["step"], state["history"], state["last_eval"]
        wall_before = state["wall_time"]
    # everything is built by now, so the operative config is complete: the values the run uses
    operative = gin.operative_config_str()
    run_hash = tracker.open({"gin": operative, "recipe": recipe.describe(), "model": asdict(cfg),
                             "seed": seed, "steps": steps, "batch_size": batch_size,
                             "n_params": model.num_params(), **(hparams or {})},
                            run_hash=state.get("run_hash") if state else None)
    (run_dir / "config.gin").write_text(operative)

    def wall_time():
        """Seconds this run has trained, summed over its starts (requeues)."""
        return wall_before + time.perf_counter() - started_at

    def save(step):
        checkpoint.save(run_dir / checkpoint.CHECKPOINT_NAME, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "recipe": recipe.state_dict(),
            "rng": checkpoint.rng_state(), "step": step, "history": history,
            "last_eval": last_eval, "run_hash": run_hash, "model_config": asdict(cfg),
            "wall_time": wall_time()})

    control.started = True
    eval_loops = eval_max_loops or 2 * cfg.n_loops
    model.train()
    step = start_step
    with TrainProgress(steps, start_step, log_every, enabled=progress) as bar:
        if start_step:
            bar.note(f"resumed from {run_dir / checkpoint.CHECKPOINT_NAME} at step {start_step}")
        while step < steps and control.raised is None:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            micro_metrics, n_tokens = [], 0
            for micro in range(grad_accum):
                batch = task.train_batch(step * grad_accum + micro, batch_size).to(device)
                with autocast:
                    loss, metrics = recipe.loss(model, batch, step)
                (loss / grad_accum).backward()
                micro_metrics.append({"loss": loss.item(), **metrics})
                n_tokens += batch.input_ids.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            optimizer.step()
            scheduler.step()
            metrics = _average(micro_metrics)
            metrics.update(grad_norm=grad_norm.item(), lr=scheduler.get_last_lr()[0],
                           tokens_per_s=n_tokens / (time.perf_counter() - t0), wall_time=wall_time())
            history.append(metrics["loss"])
            tracker.log(metrics, step, {"subset": "train"})
            bar.update(step, metrics)
            step += 1
            if step % eval_every == 0 or step == steps:
                last_eval = evaluate(model, task, eval_loops, eval_batch_size, eval_max_batches)
                scores = dict(last_eval)
                tracker.log_frontier(scores.pop("exit_frontier"), step, {"subset": "eval"})
                tracker.log(scores, step, {"subset": "eval"})
                em = last_eval["exact_match"][cfg.n_loops - 1]
                bar.note(f"eval @ {step}: exact match at T={cfg.n_loops}: {em:.2%}, "
                         f"per loop {' '.join(f'{v:.2f}' for v in last_eval['exact_match'])}")
            if step % checkpoint_every == 0 or step == steps or control.raised:
                save(step)
        if control.raised and step == start_step:
            save(step)  # stopped before its first step: the next start reopens this Aim run
    tracker.close()
    summary = {"step": step, "train": metrics if step > start_step else {}, "history": history,
               "eval": last_eval, "run_dir": str(run_dir), "wall_time": wall_time(),
               "preempted": control.raised}
    (run_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    if control.raised is None:
        bar.summary(last_eval, cfg.n_loops)
    return summary
