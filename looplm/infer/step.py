"""One forward step of a looped model over new tokens, on a StaticKVCache, with early exit that
skips compute: after every loop the rows whose exit rule fired leave the batch, and the remaining
loops run on the live rows only (gathered, then their results scattered back).

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


def _rows_context(full: LoopContext, cache: StaticKVCache, rows) -> LoopContext:
    if rows is None:
        return full
    cos, sin = full.rope
    return LoopContext(rope=(cos[rows], sin[rows]), mask=full.mask[rows], cache=cache.view(rows),
                       injected=None if full.injected is None else full.injected[rows])


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
    live = active
    ctx = _rows_context(full, cache, live)
    x = model._run(model.prelude, x, ctx, ("prelude",))
    if model.inject is not None:
        injected_all = x.new_zeros(B, S, x.shape[-1])
        injected_all[slice(None) if live is None else live] = x
        full.injected = injected_all
        ctx = _rows_context(full, cache, live)
        x = torch.zeros_like(x)
    keep_history = rule is not None
    exit_loops = torch.full((B, S), T, dtype=torch.long, device=ids.device)
    decided = torch.zeros(B, S, dtype=torch.bool, device=ids.device)
    loops_run = torch.zeros(B, dtype=torch.long, device=ids.device)
    out = x.new_zeros(B, S, x.shape[-1])
    gates = x.new_zeros(B, S, T, dtype=torch.promote_types(x.dtype, torch.float32)) if keep_history else None
    history = []  # per loop, (B, S, d) read-out states of the rows that ran it
    for t in range(1, T + 1):
        rows = torch.arange(B, device=ids.device) if live is None else live
        x, z = model.recurrence(x, ctx, loop=t - 1)
        loops_run[rows] = t
        if not keep_history:
            if t == T:
                out[rows] = model._readout_states(x, z, ctx, t)[0]
            continue
        h, g = model._readout_states(x, z, ctx, t)
        history.append(out.new_zeros(B, S, h.shape[-1]).index_copy_(0, rows, h))
        gates[rows, :, t - 1] = model.exit_logits(g).to(gates.dtype)
        fired = fired_by(rule, gates[rows], [s[rows] for s in history], t, T) if t < T else \
            torch.ones(len(rows), S, dtype=torch.bool, device=ids.device)
        new = fired & ~decided[rows]
        exit_loops[rows] = torch.where(new, t, exit_loops[rows])
        decided[rows] |= fired
        out[rows] = torch.where(new[..., None], h, out[rows])
        if skip and S == 1 and t < T and fired.any():
            stay = ~fired[:, 0]
            live, x = rows[stay], x[stay]
            if live.numel() == 0:
                break
            ctx = _rows_context(full, cache, live)
    cache.finish(loops_run, T)
    return StepResult(states=out, exit_loops=exit_loops, loops_run=loops_run)
