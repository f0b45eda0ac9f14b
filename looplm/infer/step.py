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

Exit rules are looplm.exits' rules, asked after every loop through rule.loop_by_loop(T): a rule
is causal (its exit at t reads loops 1..t only), so asked at t it exits exactly when it would
given all T loops (tests/test_infer.py checks this for every default rule, also after rows left).
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


def _put(dst: torch.Tensor, rows, src: torch.Tensor) -> None:
    """dst[rows] = src in place (rows None: every row)."""
    if rows is None:
        dst.copy_(src)
    else:
        dst.index_copy_(0, rows, src)


def _record(out: torch.Tensor, exit_loops: torch.Tensor, rows, new: torch.Tensor, h: torch.Tensor, t: int) -> None:
    """Full-batch records: out takes h and exit_loops t where `new` (over `rows`; None: all) is set."""
    if rows is None:
        out.copy_(torch.where(new[..., None], h, out))
        exit_loops.masked_fill_(new, t)
    else:
        out.index_copy_(0, rows, torch.where(new[..., None], h, out.index_select(0, rows)))
        exit_loops.index_copy_(0, rows, exit_loops.index_select(0, rows).masked_fill(new, t))


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
    out = x.new_zeros(B, S, x.shape[-1])
    first = computed  # the rows of loop 1: the step's computed rows
    leave = rule is not None and skip and S == 1  # rows leave the batch at their exit
    asked = None if rule is None else rule.loop_by_loop(T)
    decided = None if rule is None or leave else torch.zeros(x.shape[:2], dtype=torch.bool, device=device)
    for t in range(1, T + 1):
        x, z = model.recurrence(x, ctx, loop=t - 1)
        if rule is None:
            if t == T:
                _put(out, computed, model._readout_states(x, z, ctx, t)[0])
            continue
        h, g = model._readout_states(x, z, ctx, t)
        fired = asked.fired(t, h, model.exit_logits(g) if asked.needs_gate else None)
        new = fired if decided is None else fired & ~decided  # over the rows of x
        if not bool(new.any()):
            continue
        _record(out, exit_loops, computed, new, h, t)
        if decided is not None:  # the rows stay: later loops attend to every token
            decided |= new
            continue
        stay = ~new[:, 0]
        if not bool(stay.any()):
            break
        x = x[stay]  # the rows of x stay in order
        asked.keep(stay)
        computed = (torch.arange(B, device=device) if computed is None else computed)[stay]
        ctx = _rows_context(full, cache, computed)
    loops_run = torch.zeros(B, dtype=torch.long, device=device)
    if leave:  # a row ran the loops up to its exit
        _put(loops_run, first, exit_loops[:, 0] if first is None else exit_loops[first, 0])
    else:
        _put(loops_run, first, torch.full_like(loops_run if first is None else first, T))
    cache.finish(loops_run, T)
    return StepResult(states=out, exit_loops=exit_loops, loops_run=loops_run)
