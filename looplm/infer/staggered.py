"""Staggered decoding: every row of a batch at its own loop of its own token.

Lockstep early exit (looplm.infer.step) runs a token's loop t while any row still needs it, so a
batch saves only what its rows skip together. But a looped model's loops share one stack of
weights and a batch's rows are independent sequences: nothing ties row b's loop to row c's. Here
every tick applies the stack once to every live row, each at its own loop t_b of its own token;
a row whose rule fires reads out, picks its next token, and starts it at loop 1 on the next tick.
With more prompts than slots, a waiting prompt is prefilled and copied into the first slot that
frees. While the queue keeps the slots full, every tick is a full batch of needed work: the ticks
approach total loops / slots, where lockstep runs, for every token, as many loops as its slowest row.

What differs between rows is the cache slot (loop t_b's keys and values) and the position. The
queries are kept sorted by (loop, row): each loop's rows form one block, which writes its keys
into that loop's buffer at each row's own position and attends to it in place, in runs of
consecutive cache rows, masked to each row's own tokens. A row's keys at its deeper loops are
settled when it exits, as in lockstep (StaticKVCache.settle), so a row never waits for another.

The prefill runs in lockstep (looplm.infer.step); rows then decode on their own. Greedy tokens
and exit loops equal lockstep's (tests/test_infer_staggered.py).
"""

import torch

from looplm.infer.cache import LOOPED_STAGES, StaticKVCache, runs_of
from looplm.model import LoopContext


class TickRows:
    """The cache as one tick's queries see it: query i is cache row rows[i] at 0-based loop
    loops[i], writing position positions[i]; queries are sorted by (loop, row). A looped slot's
    loop index is each query's own (the one Attention passes is ignored); prelude slots have none."""

    def __init__(self, cache: StaticKVCache, stash: dict, rows: torch.Tensor, loops: list, positions: torch.Tensor):
        self.cache, self.stash, self.rows, self.positions = cache, stash, rows, positions
        self.depths = torch.tensor(loops, dtype=torch.long, device=rows.device)
        self.blocks = []  # [loop, i, j]: queries i..j-1 are at `loop`
        for i, loop in enumerate(loops):
            if i and loop == loops[i - 1]:
                self.blocks[-1][2] = i + 1
            else:
                self.blocks.append([loop, i, i + 1])
        rows_list, pos_list = rows.tolist(), positions.tolist()
        starts = cache.start[rows]
        start_list = starts.tolist()
        kv = torch.arange(max(pos_list) + 1, device=rows.device)
        masks = (kv >= starts[:, None]) & (kv <= positions[:, None])  # each query's own tokens
        self.spans = []  # (loop, i, j, first cache row, end, mask) for each run of a block
        for loop, i, j in self.blocks:
            for a, b, r in runs_of(rows_list[i:j]):
                a, b = a + i, b + i
                end = max(pos_list[a:b]) + 1
                whole = min(pos_list[a:b]) == end - 1 and not any(start_list[a:b])
                self.spans.append((loop, a, b, r, end, None if whole else masks[a:b, None, None, :end]))

    def update(self, slot, k, v, mask=None) -> list:
        stack, _ = self.cache.key(slot)
        keys, values = self.cache.stack(stack, k)
        looped = slot[0] in LOOPED_STAGES
        per_loop = looped and self.cache.mode == "per_loop"  # else one buffer for every loop
        at = (self.depths if per_loop else 0, self.rows, slice(None), self.positions)
        keys[at], values[at] = k[:, :, 0], v[:, :, 0]
        if looped and self.cache.mode in ("first", "average"):
            self.cache.stash_update(self.stash, stack, k[:, :, 0], v[:, :, 0], self.rows)
        return [(a, b, keys[loop if per_loop else 0, r:r + b - a, :, :end],
                 values[loop if per_loop else 0, r:r + b - a, :, :end], m) for loop, a, b, r, end, m in self.spans]


class RowRule:
    """An exit rule asked for rows at different loops. Each row keeps the gates and states of its
    current token so far; like LoopByLoop, the loops after a row's own are filled by placeholders
    (zero gates, its current state), which a causal rule does not read, so a row exits at t
    exactly when the rule given all T loops says t."""

    def __init__(self, rule, n_loops: int, batch: int):
        self.rule, self.T, self.batch, self.gates, self.states = rule, n_loops, batch, None, None
        self.needs_gate = rule is not None and rule.loop_by_loop(n_loops).needs_gate

    def fired(self, rows, loops, state, gate) -> torch.Tensor:
        """(n,) bool: whether each query row exits at its loop `loops` (1-based, (n,))."""
        last = loops == self.T
        if self.rule is None:
            return last
        if self.states is None:
            self.states = state.new_zeros(self.batch, self.T, state.shape[-1])
            self.gates = state.new_zeros(self.batch, self.T, dtype=torch.float32 if gate is None else gate.dtype)
        self.states[rows, loops - 1] = state[:, 0]
        if gate is not None:
            self.gates[rows, loops - 1] = gate[:, 0]
        cols = torch.arange(self.T, device=rows.device)
        own = torch.minimum(cols[None], (loops - 1)[:, None])  # loop t's state repeated after t
        states = self.states[rows[:, None], own]
        gates = self.gates[rows].masked_fill(cols[None] >= loops[:, None], 0.0)
        exits = self.rule.exit_loops(gates[:, None], list(states[:, None].unbind(2)))[:, 0]
        return (exits <= loops) | last


@torch.no_grad()
def serve(model, prompts: list, slots: int, prefill, n_loops: int, rule, pick, max_new_tokens: int, eos,
          tokens: list, exit_loops: list) -> tuple:
    """Generate for every prompt with `slots` rows decoding at once: a prompt waits for a free
    slot, is prefilled (in lockstep, `prefill(prompts, max_len)` -> cache, first tokens, their
    exit loops) and copied into it. Appends to `tokens` / `exit_loops` (per prompt, empty lists);
    returns the decode's loops computed and the cache's bytes."""
    T, max_len = n_loops, max(len(p) for p in prompts) + max_new_tokens
    cache, first, first_exits = prefill(prompts[:slots], max_len)
    B, device = cache.batch, first.device
    serving = list(range(B))  # the prompt each slot serves
    waiting = list(range(B, len(prompts)))[::-1]
    positions = torch.full((B,), cache.length, dtype=torch.long, device=device)
    stash, asked, injected = {}, RowRule(rule, T, B), None

    def context(rows, loops: list):
        at = positions[rows]
        cos, sin = model.rotary(at - cache.start[rows], model.embed.weight.dtype)
        return LoopContext(rope=(cos[:, None, None], sin[:, None, None]), mask=None,
                           cache=TickRows(cache, stash, rows, loops, at),
                           injected=None if injected is None else injected[rows])

    def enter(rows, new_tokens):
        """Loop 1's input for each row's next token: its embedding through the prelude."""
        nonlocal injected
        x = model._run(model.prelude, model.embed(new_tokens[:, None]), context(rows, [0] * len(rows)), ("prelude",))
        if model.inject is None:
            return x
        if injected is None:
            injected = x.new_zeros(B, 1, x.shape[-1])
        injected[rows] = x
        return torch.zeros_like(x)

    def record(rows: list, picked: list, exits: list) -> list:
        """Append each slot's new token; the slots whose prompt goes on."""
        going = []
        for r, token, e in zip(rows, picked, exits):
            tokens[serving[r]].append(token)
            exit_loops[serving[r]].append(e)
            if len(tokens[serving[r]]) < max_new_tokens and (eos is None or token != eos):
                going.append(r)
        return going

    def admit(free: list) -> tuple:
        """Prefill waiting prompts into free slots: the slots that decode on, their first tokens."""
        rows, firsts = [], []
        while free and waiting:
            take = [waiting.pop() for _ in range(min(len(free), len(waiting)))]
            new, picked, exits = prefill([prompts[i] for i in take], max_len)
            into, free = free[:len(take)], free[len(take):]
            index = torch.tensor(into, device=device)
            for stack, tensors in new.stacks.items():
                for src, dst in zip(tensors, cache.stack(stack, tensors[0][0])):
                    dst[:, index, :, :new.length] = src[:, :, :, :new.length]
            cache.start[index], positions[index] = new.start.to(cache.start.device), new.length
            for slot, i, token, e in zip(into, take, picked.tolist(), exits.tolist()):
                serving[slot] = i
                if record([slot], [token], [e]):
                    rows.append(slot)
                    firsts.append(token)
                else:  # done at its first token: the slot takes the next prompt
                    free.append(slot)
        return rows, firsts

    going = record(list(range(B)), first.tolist(), first_exits.tolist())
    rows = torch.tensor(going, dtype=torch.long, device=device)
    admitted, admitted_first = admit([r for r in range(B) if r not in going])
    rows = torch.cat([rows, torch.tensor(admitted, dtype=torch.long, device=device)])
    firsts = torch.cat([first[going], torch.tensor(admitted_first, dtype=torch.long, device=device)])
    order = torch.argsort(rows)
    rows, x = rows[order], enter(rows[order], firsts[order]) if rows.numel() else None
    loops = torch.ones_like(rows)
    computed = 0
    while rows.numel():
        ctx = context(rows, (loops - 1).tolist())
        x, z = model.recurrence(x, ctx)
        computed += rows.numel()
        if rule is None:  # only the rows at loop T read out (and run the coda), as in lockstep
            which = torch.nonzero(loops == T).squeeze(1)
            if which.numel() == 0:
                loops = loops + 1
                continue
            h, _ = model._readout_states(x[which], z[which], context(rows[which], [T - 1] * len(which)), T)
        else:  # every row reads out; the coda's loop is each row's own (TickRows)
            h, g = model._readout_states(x, z, ctx, 1)
            fired = asked.fired(rows, loops, h, model.exit_logits(g) if asked.needs_gate else None)
            which = torch.nonzero(fired).squeeze(1)
            if which.numel() == 0:
                loops = loops + 1
                continue
            h = h[which]
        fired = torch.zeros_like(loops, dtype=torch.bool).index_fill_(0, which, True)
        out_rows, out_loops = rows[which], loops[which]
        picked = pick(model.logits(h[:, 0]))
        cache.settle(out_rows, positions[out_rows], out_loops, T, stash)
        out_list, picked_list = out_rows.tolist(), picked.tolist()
        on = record(out_list, picked_list, out_loops.tolist())
        going = set(on)
        new_tokens = [t for r, t in zip(out_list, picked_list) if r in going]
        positions[torch.tensor(on, dtype=torch.long, device=device)] += 1
        admitted, admitted_first = admit([r for r in out_list if r not in going])
        new_rows = torch.tensor(on + admitted, dtype=torch.long, device=device)
        stay = ~fired
        x, rows, loops = x[stay], rows[stay], loops[stay] + 1
        if new_rows.numel():
            x = torch.cat([x, enter(new_rows, torch.tensor(new_tokens + admitted_first, device=device))])
            rows = torch.cat([rows, new_rows])
            loops = torch.cat([loops, torch.ones_like(new_rows)])
        order = torch.argsort(loops * B + rows)
        rows, loops, x = rows[order], loops[order], x[order]
    return computed, cache.nbytes
