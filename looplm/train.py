"""The training loop: one recipe, AdamW, warm-up + cosine, clipping, token-weighted accumulation,
periodic evaluation, atomic checkpoints with exact resume, Aim tracking and a progress bar.

A job that receives SIGUSR1 or SIGTERM (a SLURM pre-emption warning) finishes its step, writes a
checkpoint and exits with PREEMPTED_EXIT_CODE; started again in the same run directory with the
same config it resumes from there and keeps writing into the same Aim run (looplm.rundir). Ctrl-C
does the same and exits with INTERRUPTED_EXIT_CODE. A non-finite loss, gradient or parameter stops
the run at that step with the last good checkpoint untouched (looplm.nonfinite).
"""

import contextlib
import random
import signal
import time
from dataclasses import asdict
from pathlib import Path

import gin
import torch

from looplm import checkpoint, compose, train_args
from looplm import nonfinite as nonfinite_guard
from looplm.config import ModelConfig, sized_for_task
from looplm.dist import world as dist_world
from looplm.dist.parallel import global_grad_norm, unsharded, wrap
from looplm.dist.state import Checkpointer
from looplm.dist.world import World
from looplm.evaluate import evaluate
from looplm.model import LoopLM
from looplm.optim import build_optimizer, lr_multiplier
from looplm.progress import TrainProgress
from looplm.recipe import Recipe
from looplm.rundir import AlreadyComplete, open_run, prepare, run_config, simple, write_summary
from looplm.tracking import Tracker, source_commit

PREEMPTED_EXIT_CODE = 3
NONFINITE_EXIT_CODE = 4
INTERRUPTED_EXIT_CODE = 130  # the shell's code for Ctrl-C
EVALUATIONS = 10  # held-out evaluations per run by default


class RunControl:
    """Shared with the caller: whether training has started (an error before that is a config
    error), and the stop signal received, which the loop checks between steps. A second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.started = False
        self.raised = None

    def __call__(self, signum, frame):
        self.raised = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again quits without saving)",
                  flush=True)

    def install(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self)


def _autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _weighted_mean(metric_dicts: list[dict], weights: list[float], world: World) -> dict:
    """Token-weighted mean of the micro-batches' metrics over all ranks (each rank holds the same
    keys, per-loop list lengths and {loop: value} keys, so the sums travel as one flat vector)."""
    def parts(v):
        return list(v.values()) if isinstance(v, dict) else v if isinstance(v, list) else [v]

    first = metric_dicts[0]
    flat = [0.0] * (1 + sum(len(parts(v)) for v in first.values()))
    for m, w in zip(metric_dicts, weights):
        values = [x for key in first for x in parts(m[key])]
        flat = [a + w * float(v) for a, v in zip(flat, [1.0, *values])]
    flat = world.sum(flat)
    total, values, out = flat[0] or 1.0, iter(flat[1:]), {}
    for key, v in first.items():
        picked = [next(values) / total for _ in parts(v)]
        out[key] = (dict(zip(v, picked)) if isinstance(v, dict) else picked if isinstance(v, list)
                    else picked[0])
    return out


def train_step(step_module, recipe, batches, step, autocast, trainable, grad_clip, world=World()):
    """Forward and backward over this rank's micro-batches of one optimizer step, each weighted by
    its share of the supervised tokens of all ranks, so the gradient is the full global batch's
    (DDP and FSDP average over ranks, hence the factor world.size). Returns the global (loss,
    metrics, grad norm); the optimizer has not stepped yet."""
    tokens = [max(b.n_targets, 1) for b in batches]
    total = world.sum([sum(tokens)])[0]
    micro_metrics = []
    for batch, n in zip(batches, tokens):
        with autocast:
            loss, metrics = step_module(batch, step)
        (loss * (n * world.size / total)).backward()
        micro_metrics.append({"loss": loss.item(), **metrics})
    for part in recipe.parts().values():
        part.end_step()  # state learned from the step changes once, from all its micro-batches
    grad_norm = global_grad_norm(torch.nn.utils.clip_grad_norm_(trainable, grad_clip))
    metrics = _weighted_mean(micro_metrics, tokens, world)
    return metrics["loss"], metrics, grad_norm


@gin.configurable(denylist=["control", "existing", "dry_run", "run_name"])
def train(task=gin.REQUIRED, model_config: ModelConfig | None = None, recipe: Recipe | None = None,
          run_dir: str = "runs/default", steps: int = 1000, batch_size: int = 64, grad_accum: int = 1,
          grad_clip: float = 1.0, precision: str = "fp32", device: str = "cpu", seed: int = 0,
          eval_every: int | None = None, eval_max_loops: int | None = None, eval_batch_size: int = 256,
          eval_max_batches: int | None = None, checkpoint_every: int = 250,
          init_from: str | None = None, log_every: int = 50, compile: bool = False,
          nonfinite: str = "stop", max_skipped_steps: int = 10, parallel: str = "none",
          activation_checkpointing: str = "none",
          tracker: Tracker | None = None, progress: bool = True, hparams: dict | None = None,
          control: RunControl | None = None, existing: str = "resume", dry_run: bool = False,
          run_name: str | None = None) -> dict:
    """Train and return a summary: final train metrics, the last evaluation and the loss history.

    init_from: a checkpoint file or run directory whose model weights start this run (e.g. Stage
    II gate training on a Stage I model). eval_max_loops: deepest loop count evaluated (2T).
    eval_every: None evaluates EVALUATIONS times a run (a curve, not a point).
    existing: what to do with a run already in run_dir (looplm.rundir). nonfinite: "stop" or
    "skip" (looplm.nonfinite). parallel: "none", "ddp" or "fsdp" under torchrun/srun
    (looplm.dist); batch_size is the global batch. activation_checkpointing: "none", "loop" or
    "layer" (recompute in backward instead of storing). dry_run: build and validate everything,
    return it, train nothing.
    """
    if eval_every is None:
        eval_every = max(1, steps // EVALUATIONS) if isinstance(steps, int) else 1
    train_args.check(locals())
    settings = {k: v for k, v in locals().items()
                if simple(v) and k not in ("existing", "dry_run", "control", "tracker", "hparams", "run_name")}
    control = control or RunControl()
    control.install()  # before anything slow: a pre-emption during start-up is not lost
    started_at = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    autocast = _autocast(device, precision)

    if init_from is not None and not isinstance(init_from, str):  # a weight source (looplm.io's
        cfg = init_from.model_config(model_config, task)  # ouro_checkpoint): its config is the model's
    else:
        cfg = sized_for_task(model_config or ModelConfig(vocab_from_task=True), task)
    recipe = recipe or Recipe()
    recipe.check_model(cfg)
    recipe.seed = seed
    if dry_run:
        return {"model": cfg, "recipe": recipe, "task": task, "settings": settings}
    world, device = dist_world.init(parallel, device)
    if batch_size % world.size:
        raise ValueError(f"train.batch_size={batch_size} (the global batch) must be divisible by "
                         f"the {world.size} ranks")
    model = LoopLM(cfg).to(device)
    model.checkpointing = activation_checkpointing
    if isinstance(init_from, str) and init_from:
        source = checkpoint.resolve(init_from)
        state = checkpoint.load(source, require=("model",))
        if state is None:
            raise FileNotFoundError(f"train.init_from={init_from!r}: no checkpoint there (a Huggingface "
                                    "folder loads through `import looplm.io` and @ouro_checkpoint())")
    elif init_from is not None:
        source, state = init_from, {"model": init_from.state_dict()}
    if init_from:
        checkpoint.check_model_state(model, state, source)
        model.load_state_dict(state["model"])
    trainable_ids = {id(p) for p in recipe.trainable_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    if compile:
        for layer in model.layers:
            layer.compile()
    rows = world.rows(batch_size)
    step_module = wrap(model, recipe, parallel, device, rows if world.size > 1 else None,
                       batch_size)  # FSDP swaps in sharded parameters
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]
    optimizer = build_optimizer(model.named_parameters())  # frozen ones only name-check no_decay
    lr_multiplier(0, steps)  # a bad warm-up is a config error: raise it before training starts
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    run_dir = Path(run_dir)
    config = run_config(settings, cfg, recipe, task)
    bar = TrainProgress(steps, 0, log_every, enabled=progress and world.main)
    if world.main:
        prepare(run_dir, existing)
    world.barrier()
    try:
        state = open_run(run_dir, config, steps, existing, say=bar.note)
    except AlreadyComplete as done:
        bar.note(f"{run_dir} holds this run, complete at step {done.state['step']}: nothing to "
                 "train (--resume with a larger TRAIN_STEPS continues it, --overwrite starts over)")
        return {"step": done.state["step"], "train": {}, "history": done.state["history"],
                "eval": done.state["last_eval"], "run_dir": str(run_dir),
                "wall_time": done.state["wall_time"], "preempted": None, "status": "complete"}
    start_step, history, last_eval, wall_before, skipped = 0, [], {}, 0.0, 0
    checkpointer = Checkpointer(run_dir, world, state)
    if state is not None:
        checkpointer.restore(state, step_module, optimizer)
        recipe.load_state_dict(state["recipe"])
        checkpoint.set_rng_state(state["rng"])
        start_step, history, last_eval = state["step"], state["history"], state["last_eval"]
        wall_before, skipped = state["wall_time"], state.get("skipped_steps", 0)
    tracker = (tracker or Tracker(enabled=False)) if world.main else Tracker(enabled=False)
    config_text = compose.operative_config_text()
    run_hash = tracker.open({"gin": compose.bindings_in_force(), "recipe": recipe.describe(),
                             "model": asdict(cfg), "seed": seed, "steps": steps,
                             "batch_size": batch_size, "n_params": model.num_params(),
                             "run_dir": str(run_dir.resolve()), "world_size": world.size,
                             "commit": source_commit(), **(hparams or {})},
                            run_hash=state.get("run_hash") if state else None,
                            name=f"{run_name or run_dir.name} seed={seed}", config_text=config_text)
    if world.main:
        (run_dir / "config.gin").write_text(config_text)

    def wall_time():
        """Seconds this run has trained, summed over its starts (requeues)."""
        return wall_before + time.perf_counter() - started_at

    last_saved = start_step if state is not None else None

    def save(step):
        nonlocal last_saved
        bad = nonfinite_guard.nonfinite_parameters(named_trainable)
        if world.any(bool(bad)):  # never write non-finite weights over the last good checkpoint
            raise nonfinite_guard.NonFiniteError(f"step {step}: parameters became non-finite after "
                                                 f"the update ({', '.join(bad[:5])}); checkpoint not written")
        checkpointer.save(step_module, optimizer, {  # collective: sharded over the ranks
            "recipe": recipe.state_dict(), "rng": checkpoint.rng_state(), "step": step,
            "history": history, "last_eval": last_eval, "run_hash": run_hash, "config": config,
            "model_config": asdict(cfg), "wall_time": wall_time(), "skipped_steps": skipped,
            "world_size": world.size})
        last_saved = step

    control.started = True
    eval_loops = eval_max_loops or 2 * cfg.n_loops
    model.train()
    step, metrics, status, in_a_row, stopping = start_step, {}, "running", 0, False
    bar.start_at(start_step)
    try:
        with bar:
            if start_step:
                bar.note(f"resumed from {run_dir / checkpoint.CHECKPOINT_NAME} at step {start_step}")
            while step < steps and not stopping:
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                batches = [task.train_batch(step * grad_accum + micro, batch_size)[rows].to(device)
                           for micro in range(grad_accum)]
                loss, metrics, grad_norm = train_step(step_module, recipe, batches, step, autocast,
                                                      trainable, grad_clip, world)
                if step == start_step:
                    _warn_untrained(named_trainable, bar)
                problem = nonfinite_guard.diagnose(loss, grad_norm, metrics, named_trainable)
                if problem:
                    in_a_row += 1
                    if nonfinite == "stop" or in_a_row > max_skipped_steps:
                        raise nonfinite_guard.NonFiniteError(f"step {step}: {problem}" + (
                            f" ({in_a_row} steps in a row)" if in_a_row > 1 else ""))
                    skipped += 1
                    bar.note(f"step {step}: skipped ({problem}); {in_a_row} in a row")
                    tracker.log({"skipped_steps": skipped}, step, {"subset": "train"})
                else:
                    in_a_row = 0
                    lr = [base * lr_multiplier(step, steps) for base in base_lrs]
                    for group, group_lr in zip(optimizer.param_groups, lr):
                        group["lr"] = group_lr
                    optimizer.step()
                    metrics.update(grad_norm=grad_norm, lr=lr[0], wall_time=wall_time(),
                                   tokens_per_s=world.size * sum(b.input_ids.numel() for b in batches)
                                   / (time.perf_counter() - t0))
                    tracker.log(metrics, step, {"subset": "train"})
                    bar.update(step, metrics)
                history.append(loss)
                step += 1
                stopping = world.any(control.raised is not None)  # every rank stops at one step
                if step % eval_every == 0 or step == steps:
                    with unsharded(step_module):
                        last_eval = _evaluate(model, task, eval_loops, eval_batch_size,
                                              eval_max_batches, step, cfg.n_loops, tracker, bar)
                if step % checkpoint_every == 0 or step == steps or stopping:
                    save(step)
            if stopping and step == start_step:
                save(step)  # stopped before its first step: the next start reopens this Aim run
        status = "preempted" if stopping else "complete"
    except nonfinite_guard.NonFiniteError as err:
        status = "nonfinite"
        err.args = (f"{err.args[0]}\nstopped; the last good checkpoint "
                    + (f"is {run_dir / checkpoint.CHECKPOINT_NAME} (step {last_saved}), untouched"
                       if last_saved is not None else "does not exist (no checkpoint was written)"),)
        raise
    finally:
        tracker.close()
        summary = {"step": step, "train": metrics if step > start_step else {}, "history": history,
                   "eval": last_eval, "run_dir": str(run_dir), "wall_time": wall_time(),
                   "preempted": control.raised or ("another rank" if stopping else None),
                   "status": status, "skipped_steps": skipped, "world_size": world.size}
        if world.main:
            write_summary(run_dir, {k: v for k, v in summary.items() if k != "history"})
        if status in ("complete", "preempted"):  # states every rank reaches at the same step:
            world.barrier()  # none exits before rank 0 has written (srun --kill-on-bad-exit)
    if status == "complete":
        bar.summary(last_eval, cfg.n_loops)
    return summary


def _warn_untrained(named_trainable, bar) -> None:
    """A trainable parameter without a gradient after the first step is frozen in effect (e.g.
    the embedding under truncated backprop without input injection): say so once."""
    idle = [n for n, p in named_trainable if p.grad is None]
    if idle:
        bar.note(f"warning: {len(idle)} trainable parameter(s) received no gradient at the first "
                 f"step and will not train: {', '.join(idle[:6])}{' ...' if len(idle) > 6 else ''}")


def _evaluate(model, task, loops, batch_size, max_batches, step, n_loops, tracker, bar) -> dict:
    scores = evaluate(model, task, loops, batch_size, max_batches)
    logged = dict(scores)
    tracker.log_frontier(logged.pop("exit_frontier"), step)
    tracker.log(logged, step, {"subset": "eval"})
    em = scores["exact_match"][n_loops - 1]
    bar.note(f"eval @ {step}: exact match at T={n_loops}: {em:.2%}, "
             f"per loop {' '.join(f'{v:.2f}' for v in scores['exact_match'])}")
    return scores
