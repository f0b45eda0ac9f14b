"""The battery's data-parallel check: the plugin's recipe at 2 gloo ranks computes what one process
computes. Two forked processes (so a plugin defined anywhere, even inside a test, needs no
pickling or import) each take one row of the battery batch and train through the trainer's own
step (`looplm.train.train_step` under DDP, token-weighted over the ranks); every step's loss, the
all-reduced gradient and the recipe's state must equal the one-process run's on the whole batch.
A plugin fails it when its random draws depend on the rank (the global RNG, a draw shaped like
the rank's rows), when it learns state from its own rows without summing over the ranks
(`looplm.hooks.sum_over_ranks`), or when one rank skips a collective the other runs (a timeout).
"""

import contextlib
import io
import math
import multiprocessing
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist

from looplm.dist.parallel import StepModule, wrap
from looplm.dist.world import World
from looplm.train import train_step
from looplm.tools.conformance.harness import (BATCH_SHAPE, LR, SEED, battery_batch, build_model, build_recipe,
                                              failure_site, model_cfg)

RANKS = 2
TIMEOUT_S = 60  # a rank waiting longer in a collective: the other never joined it
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4  # float32 sums in another order; a wrong draw is off by far more


class _RanksInTurn:
    """One process standing in for the ranks: the i-th micro-batch of a step is rank i's rows."""

    def __init__(self, model, recipe, batch_size: int):
        self.shares = [StepModule(model, recipe, rows, batch_size) for rows in _rows(batch_size)]
        self.calls = 0

    def __call__(self, batch, step):
        self.calls += 1
        return self.shares[(self.calls - 1) % RANKS](batch, step)


def _rows(batch_size: int) -> list[slice]:
    return [World(rank=r, size=RANKS).rows(batch_size) for r in range(RANKS)]


def train_steps(setup: dict, steps: list[int], world: World, in_turn: bool = False) -> list[tuple]:
    """(loss, {name: gradient}, recipe state) after each of `steps`, this rank's share of every
    battery batch trained by the trainer's step, then plain SGD as in the battery's other checks.
    in_turn: one process trains every rank's share as its micro-batches (`_RanksInTurn`)."""
    torch.manual_seed(SEED)
    model, recipe = build_model(model_cfg(setup)), build_recipe(setup)
    ids = {id(p) for p in recipe.trainable_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    B = BATCH_SHAPE[0]
    if in_turn:
        step_module, shares = _RanksInTurn(model, recipe, B), _rows(B)
    elif world.size > 1:
        step_module, shares = wrap(model, recipe, "ddp", "cpu", world.rows(B), B), [world.rows(B)]
    else:
        step_module, shares = wrap(model, recipe, "none", "cpu"), [slice(None)]
    out = []
    for step in steps:
        for _, p in named:
            p.grad = None
        batch = battery_batch(step, model.cfg.vocab_size)
        loss, _, _ = train_step(step_module, recipe, [batch[rows] for rows in shares], step,
                                contextlib.nullcontext(), [p for _, p in named], math.inf, world)
        out.append((loss, {n: p.grad.detach().clone() for n, p in named if p.grad is not None},
                    recipe.state_dict()))
        with torch.no_grad():
            for _, p in named:
                if p.grad is not None:
                    p.sub_(LR * p.grad)
    return out


def _rank(rank: int, setup: dict, steps: list[int], store: str, conn) -> None:
    """A forked rank: join the group, train, send the results (or the error) and leave at once
    (never returning into the parent's stack, e.g. pytest's)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # DDP's C++ warnings; errors go through conn
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS,
                                timeout=timedelta(seconds=TIMEOUT_S))
        buffer = io.BytesIO()  # plain bytes: torch would share tensors through this process's fds
        torch.save(train_steps(setup, steps, World(rank=rank, size=RANKS)), buffer)
        conn.send(("ok", buffer.getvalue()))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"rank {rank}: {type(e).__name__}: {str(e)[:300]}  [{failure_site(e)}]"))
    finally:
        os._exit(0)


def _at_ranks(setup: dict, steps: list[int]) -> list:
    import torch._dynamo  # noqa: F401  DDP imports it when first built: here once, not in every fork

    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="looplm-ranks-") as tmp:
        procs, pipes = [], []
        for rank in range(RANKS):
            receive, send = context.Pipe(duplex=False)
            proc = context.Process(target=_rank, args=(rank, setup, steps, f"{tmp}/store", send), daemon=True)
            proc.start()
            procs.append(proc)
            pipes.append(receive)
        try:
            results = []
            for rank, receive in enumerate(pipes):
                if not receive.poll(TIMEOUT_S + 30):
                    return [("error", f"rank {rank} sent nothing in {TIMEOUT_S + 30}s")]
                status, value = receive.recv()
                # checkpointable state is weights_only-loadable (looplm.checkpoint)
                results.append((status, torch.load(io.BytesIO(value), weights_only=True) if status == "ok" else value))
            return results
        finally:
            for proc in procs:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()


def _state_difference(a, b, where: str = "state") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        if sorted(a) != sorted(b):
            return f"{where} keys {sorted(a)} vs {sorted(b)}"
        return next((d for k in a if (d := _state_difference(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _state_difference(x, y, f"{where}[{i}]"))),
                    None)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
        return None if torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-8) else f"{where} differs at the rank"
    if isinstance(a, float) and isinstance(b, (int, float)):
        return None if math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8) else f"{where}: {b!r} at the rank vs {a!r}"
    return None if a == b else f"{where}: {b!r} at the rank vs {a!r}"


def rank_local_parts(setup: dict) -> list[str]:
    """The recipe's parts that declare `rank_local = True`: under data parallelism each rank
    computes their term over its own rows (random probes shaped like them, a mean over all its
    positions), so the ranks' token-weighted mean of it is not the one-process value."""
    return [part.describe() for part in build_recipe(setup).parts().values() if getattr(part, "rank_local", False)]


def check_data_parallel(setup: dict, steps: list[int]) -> str | None:
    """None if 2 ranks compute what one process computes at every step, else what differs. With
    a rank-local part (`rank_local_parts`), one process computes every rank's rows in turn instead of
    the whole batch: all that may depend on the rank is then the rows it holds."""
    local = rank_local_parts(setup)
    one = train_steps(setup, steps, World(), in_turn=bool(local))
    against = f"one process taking each rank's rows in turn ({', '.join(local)}: rank-local)" if local \
        else "one process"
    for rank, (status, result) in enumerate(_at_ranks(setup, steps)):
        if status != "ok":
            return f"at {RANKS} ranks: {result}"
        for i, ((loss, grads, state), (loss_r, grads_r, state_r)) in enumerate(zip(one, result)):
            at = f"step #{i} (step {steps[i]}), rank {rank} of {RANKS}"
            if not math.isclose(loss_r, loss, rel_tol=LOSS_RTOL, abs_tol=1e-7):
                return f"{at}: loss {loss_r!r}, {against} {loss!r} (a draw or a statistic per rank?)"
            for name in sorted(set(grads) | set(grads_r)):
                g, g_r = grads.get(name), grads_r.get(name)
                g, g_r = (g if g is not None else torch.zeros_like(g_r)), (g_r if g_r is not None else torch.zeros_like(g))
                if (g_r - g).norm() > GRAD_RTOL * g.norm() + 1e-7:
                    return (f"{at}: the gradient of {name} differs from {against}'s by "
                            f"{float((g_r - g).norm() / max(g.norm(), 1e-12)):.2e} (relative)")
            problem = _state_difference(state, state_r)
            if problem:
                return f"{at}: the recipe's {problem}, {against} (state learned from a rank's rows alone?)"
    return None
