"""One forward step of a looped model over new tokens, on a StaticKVCache, with early exit that
skips compute: after every loop the rows whose exit rule fired leave the batch, and the remaining
loops run on the live rows only (their states compacted, their results scattered back into
full-batch records).

What that saves depends on the batch: a step whose rows have all exited stops (batch 1 saves
nearly T / mean loops), while a loop that still has live rows reads every weight, so on a CPU
at small batches (weight-bandwidth bound) fewer rows cost little less. Attention of the live rows
reads their cached keys in place, one SDPA call per run of consecutive rows (looplm.infer.cache):
no key is copied and no exited row's keys are read.

Rows leave only at single-token (decode) steps: in a prefill the tokens of one row exit at
different loops but later loops still attend to all of them, so a prefill runs every loop and
the rule only selects each token's read-out loop.

Exit rules are looplm.exits' rules, asked loop by loop: a rule is causal (its decision at loop t
reads loops 1..t only), so with loops t+1..T filled by placeholders it exits by loop t exactly
when it would given all T loops (tests/test_infer.py checks this for every default rule).
"""

from dataclasses import dataclass

import torch

from looplm.infer.cache import StaticKVCache
from looplm.model import LoopContext

@dataclass
class StepResult:
    states: torch.Tensor  # (B, S, d) read-out state at each token's exit loop (the LM head's input)
    exit_loops: torch.Tensor  # (B, S) 1-based loop each token's prediction comes from
    loops_run: torch.Tensor  # (B,) loops computed at the step's last position (0 for inactive rows)


def fired_by(rule, gates: torch.Tensor, states: list, t: int, n_loops: int) -> torch.Tensor:
    """(B, S) whether `rule` exits at a loop <= t, from gates (B, S, >= t) and states 1..t."""
    pad = torch.zeros(*gates.shape[:-1], n_loops, dtype=gates.dtype, device=gates.device)
    pad[..., :t] = gates[..., :t]
    return rule.exit_loops(pad, list(states[:t]) + [states[t - 1]] * (n_loops - t)) <= t


def _put(dst: torch.Tensor, rows, src: torch.Tensor) -> None:
    """dst[rows] = src in place (rows None: every row)."""
    if rows is None:
        dst.copy_(src)
    else:
        dst.index_copy_(0, rows, src)


def _rows_context(full: LoopContext, cache: StaticKVCache, rows) -> LoopContext:
    """The context of the computed `rows` (None: all): their RoPE, mask and injection, and the
    cache as they see it."""
    if rows is None:
        return full
    cos, sin = full.rope
    return LoopContext(rope=(cos[rows], sin[rows]), mask=None if full.mask is None else full.mask[rows],
                       cache=cache.view(rows), injected=None if full.injected is None else full.injected[rows])


@torch.no_grad()
def step(model, ids: torch.Tensor, cache: StaticKVCache, n_loops: int, rule=None,
         active: torch.Tensor | None = None, skip: bool = True) -> StepResult:
    """Run `ids` (B, S) through `n_loops` loops, appending their keys and values to `cache`.

    rule: an exit rule (None: every token reads out at loop n_loops). active: indices of the rows
    to compute (None: all); the others sit the step out. skip=False computes every loop for every
    row even with a rule (the rule then only selects, as in Ouro's code)."""
    B, S = ids.shape
    if B != cache.batch:
        raise ValueError(f"ids have {B} rows but the cache was made for {cache.batch}")
    T = n_loops
    cache.begin(S)
    x = model.embed(ids if active is None else ids[active])
    positions = cache.positions(S)
    cos, sin = model.rotary(positions.flatten(), x.dtype)
    rope = (cos.view(B, 1, S, -1), sin.view(B, 1, S, -1))
    full = LoopContext(rope=rope, mask=cache.valid_mask(S), cache=cache.view())
    computed = active  # the rows of x
    ctx = _rows_context(full, cache, computed)
    x = model._run(model.prelude, x, ctx, ("prelude",))
    if model.inject is not None:
        injected_all = x.new_zeros(B, S, x.shape[-1])
        injected_all[slice(None) if computed is None else computed] = x
        full.injected = injected_all
        ctx = _rows_context(full, cache, computed)
        x = torch.zeros_like(x)
    device = ids.device
    exit_loops = torch.full((B, S), T, dtype=torch.long, device=device)
    loops_run = torch.zeros(B, dtype=torch.long, device=device)
    out = x.new_zeros(B, S, x.shape[-1])
    if rule is not None:  # full-batch records: the rule is asked about every row at once
        alive = torch.ones(B, dtype=torch.bool, device=device) if computed is None else \
            torch.zeros(B, dtype=torch.bool, device=device).index_fill_(0, computed, True)
        decided = torch.zeros(B, S, dtype=torch.bool, device=device)
        gates = x.new_zeros(B, S, T, dtype=torch.promote_types(x.dtype, torch.float32))
        history = x.new_zeros(T, B, S, x.shape[-1])  # read-out state of each loop
    for t in range(1, T + 1):
        x, z = model.recurrence(x, ctx, loop=t - 1)
        if rule is None:
            _put(loops_run, computed, torch.full_like(loops_run if computed is None else computed, t))
            if t == T:
                _put(out, computed, model._readout_states(x, z, ctx, t)[0])
            continue
        loops_run.masked_fill_(alive, t)
        h, g = model._readout_states(x, z, ctx, t)
        _put(history[t - 1], computed, h)
        _put(gates[:, :, t - 1], computed, model.exit_logits(g).to(gates.dtype))
        fired = fired_by(rule, gates, list(history[:t]), t, T) if t < T else torch.ones_like(decided)
        new = fired & ~decided & alive[:, None]
        exit_loops.masked_fill_(new, t)
        decided |= new
        out = torch.where(new[..., None], history[t - 1], out)
        if skip and S == 1 and t < T and bool(new.any()):
            alive &= ~new[:, 0]
            live = torch.nonzero(alive).squeeze(1)
            if live.numel() == 0:
                break
            x = x[alive if computed is None else alive[computed]]  # the rows of x stay in order
            computed = live
            ctx = _rows_context(full, cache, computed)
    cache.finish(loops_run, T)
    return StepResult(states=out, exit_loops=exit_loops, loops_run=loops_run)
