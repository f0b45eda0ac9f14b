"""A preallocated KV cache for looped decoding, written in place (no concatenation per step).

Every attention slot ("loop", t, layer) — and the prelude / coda slots — owns one key and one value
buffer of shape (batch, kv_heads, max_len, head_dim). A layer's loops are one stacked tensor
(loops, batch, kv_heads, max_len, head_dim), allocated on its first write, so that rows at
different loops (looplm.infer.staggered) write, and settle their deeper loops, in one operation.
Rows are left padded: row b's tokens start at `start[b]`, and all rows write the same positions,
so one length serves the batch while each row's valid span is [start[b], length).

Sharing across loops (Ouro Table 14, REFERENCE 2): "per_loop" keeps a buffer per (loop, layer);
"last", "first" and "average" keep one buffer per layer for all loops. A loop of a new token then
attends to the shared keys of earlier tokens plus its own keys at the new positions; when the
step ends the new positions keep the last loop's keys, the first loop's, or their mean. During
prefill every loop attends to its own keys, so sharing changes only what later tokens see.

A row that exits early (looplm.infer.step) computes no keys for its later loops: they are taken
to repeat its exit loop's keys, i.e. copied into the deeper slots ("per_loop"), kept as the
last write ("last"), or counted (T - exit) more times in the mean ("average").
"""

import torch

MODES = ("per_loop", "last", "first", "average")
LOOPED_STAGES = ("loop", "coda")  # slots (stage, loop, layer); "prelude" slots are (stage, layer)


class StaticKVCache:
    def __init__(self, batch: int, max_len: int, mode: str = "per_loop", start=None, n_loops: int = 1):
        if mode not in MODES:
            raise ValueError(f"cache mode {mode!r}: allowed are {MODES}")
        if batch < 1 or max_len < 1 or n_loops < 1:
            raise ValueError(f"StaticKVCache needs batch, max_len and n_loops >= 1, got {batch}, {max_len}, {n_loops}")
        self.batch, self.max_len, self.mode, self.n_loops = batch, max_len, mode, n_loops
        self.start = torch.zeros(batch, dtype=torch.long) if start is None else torch.as_tensor(start)
        self.length = 0  # positions written so far (every row)
        self.stacks: dict = {}  # (stage, layer) -> (keys, values), each (depth, batch, kv_heads, max_len, head_dim)
        self._stash: dict = {}  # key -> what "first" / "average" restore at the end of a step
        self._pos = self._end = 0

    # -- one step: begin, the layers' update() calls through a view, finish --------------------
    def begin(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"the cache holds max_len={self.max_len} positions; {self.length} are "
                             f"written and {n_new} more do not fit")
        self._pos, self._end = self.length, self.length + n_new

    def view(self, rows: torch.Tensor | None = None) -> "CacheRows":
        """What a LoopContext carries: the cache as seen by `rows` (sorted indices; None: every
        row), which store their keys and values and attend to their own rows of the buffers."""
        return CacheRows(self, rows)

    def key(self, slot: tuple) -> tuple:
        """(stack, depth index) of a slot: a looped slot's loop in "per_loop", else 0."""
        stage, layer = slot[0], slot[-1]
        return (stage, layer), (slot[1] if self.mode == "per_loop" and stage in LOOPED_STAGES else 0)

    def stack(self, stack: tuple, like: torch.Tensor) -> tuple:
        """The (keys, values) stack of (stage, layer), allocated (zeros) on first use in `like`'s dtype."""
        if stack not in self.stacks:
            depth = self.n_loops if self.mode == "per_loop" and stack[0] in LOOPED_STAGES else 1
            shape = (depth, self.batch, like.shape[1], self.max_len, like.shape[-1])
            self.stacks[stack] = (like.new_zeros(shape), like.new_zeros(shape))
        return self.stacks[stack]

    def buffer(self, slot: tuple, like: torch.Tensor) -> tuple:
        """The (keys, values) buffers (batch, kv_heads, max_len, head_dim) of a slot."""
        stack, depth = self.key(slot)
        keys, values = self.stack(stack, like)
        if depth >= keys.shape[0]:
            raise ValueError(f"slot {slot} is past the {keys.shape[0]} loops this cache was made for (n_loops)")
        return keys[depth], values[depth]

    def write(self, slot: tuple, k: torch.Tensor, v: torch.Tensor, rows) -> tuple:
        """Store k, v (rows, kv_heads, n_new, head_dim) at the step's positions; return every
        row's keys and values of positions [0, end), views of the buffers (not copies)."""
        kb, vb = self.buffer(slot, k)
        new = slice(self._pos, self._end)
        if rows is None:
            kb[:, :, new], vb[:, :, new] = k, v
        else:
            kb[:, :, new].index_copy_(0, rows, k)
            vb[:, :, new].index_copy_(0, rows, v)
        if self.mode in ("first", "average") and slot[0] in LOOPED_STAGES:
            self.stash_update(self._stash, self.key(slot)[0], k, v, rows)
        return kb[:, :, :self._end], vb[:, :, :self._end]

    def stash_update(self, stash: dict, stack, k, v, rows) -> None:
        """What "first" / "average" keep of a position's loops: the first keys written there since
        it was settled (loop 1's; the coda's first read-out), or their sum, and how many."""
        if stack not in stash:
            stash[stack] = (k.new_zeros(self.batch, *k.shape[1:]), v.new_zeros(self.batch, *v.shape[1:]),
                            torch.zeros(self.batch, dtype=torch.long, device=k.device))
        sk, sv, count = stash[stack]
        rows = torch.arange(self.batch, device=k.device) if rows is None else rows
        fresh = (count[rows] == 0).view(-1, *[1] * (k.dim() - 1))
        for kept, new in ((sk, k), (sv, v)):
            old = kept[rows]
            kept[rows] = torch.where(fresh, new, old if self.mode == "first" else old + new)
        count[rows] += 1

    def finish(self, loops_run: torch.Tensor, n_loops: int) -> None:
        """End the step: `loops_run` (batch,) is how many loops each row computed at the new
        positions (n_loops for a row that ran them all; 0 for a row that sat the step out)."""
        computed = torch.nonzero(loops_run.to(self.start.device) > 0).squeeze(1)
        self.settle(computed, slice(self._pos, self._end), loops_run[computed], n_loops, self._stash)
        self._stash.clear()
        self.length = self._end

    def settle(self, rows, at, exits, n_loops: int, stash: dict) -> None:
        """Give positions `at` (a slice: the step's; a tensor: one per row) of `rows`, which exited
        at loops `exits`, the keys later tokens see: deeper loops repeat the exit loop's
        ("per_loop"); the shared buffer keeps the last write ("last"), loop 1's ("first"), or
        the mean with the exit loop counted for the loops not run ("average")."""
        if rows.numel() == 0:
            return
        if self.mode == "per_loop":
            self._repeat_exit_kv(rows, at, exits, n_loops)
        elif self.mode in ("first", "average"):
            for stack, (sk, sv, count) in stash.items():
                written = count[rows]
                for buf, kept in zip(self.stacks[stack], (sk[rows], sv[rows])):
                    if self.mode == "average":  # the exit loop's keys stand in for the loops not run
                        shape = (-1, *[1] * (kept.dim() - 1))
                        weight = (n_loops - exits).clamp_min(0).to(kept.dtype).view(shape)
                        kept = (kept + weight * buf[0][rows, :, at]) / (written.to(kept.dtype).view(shape) + weight)
                    buf[0][rows, :, at] = kept
                count[rows] = 0

    def _repeat_exit_kv(self, rows, at, exits, n_loops: int) -> None:
        """One indexed copy per stack: (loop l, row) <- (exit loop, row) for every l past the exit."""
        pairs = [(i, loop) for i, e in enumerate(exits.tolist()) for loop in range(e, n_loops)]
        if not pairs:
            return
        which, deeper = (torch.tensor(c, device=rows.device) for c in zip(*pairs))
        rows_of, source = rows[which], exits[which] - 1
        positions = at if isinstance(at, slice) else at[which]
        for stack, tensors in self.stacks.items():
            if stack[0] in LOOPED_STAGES:
                for buf in tensors:
                    buf[deeper, rows_of, :, positions] = buf[source, rows_of, :, positions]

    # -- reporting --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(t.numel() * t.element_size() for kv in self.stacks.values() for t in kv)

    def valid_mask(self, n_new: int) -> torch.Tensor | None:
        """(batch, 1, n_new, end) boolean attention mask of the next step: causal, within each
        row's tokens. A left-pad query sees only itself, so its (unused) output stays finite.
        None when no row is padded and the step is a prefill or one token: attention is then
        plain causal (SDPA's fast path), or, for one new token, sees every position."""
        pos, end = self.length, self.length + n_new
        if not bool(self.start.any()) and (pos == 0 or n_new == 1):
            return None
        kv = torch.arange(end, device=self.start.device)
        q = torch.arange(pos, end, device=self.start.device)
        mask = (kv[None, None, :] >= self.start[:, None, None]) & (kv[None, :] <= q[:, None])[None]
        return (mask | (kv[None, :] == q[:, None])[None])[:, None]

    def positions(self, n_new: int) -> torch.Tensor:
        """(batch, n_new) RoPE positions of the next step's tokens, counted from each row's start."""
        pos = torch.arange(self.length, self.length + n_new, device=self.start.device)
        return (pos[None, :] - self.start[:, None]).clamp_min(0)


class CacheRows:
    """The cache seen by a subset of rows: what Attention calls `update(slot, k, v, mask)` on.
    Its spans are runs of consecutive rows, so that attention reads the live rows' keys in place:
    gathering them would copy every cached key once more, reading all rows would read the
    exited rows'."""

    def __init__(self, cache: StaticKVCache, rows):
        self.cache, self.rows = cache, rows
        self.runs = None if rows is None else runs_of(rows.tolist())

    def update(self, slot, k, v, mask=None) -> list:
        keys, values = self.cache.write(slot, k, v, self.rows)
        if self.runs is None:
            return [(0, k.shape[0], keys, values, mask)]
        return [(i, j, keys[r:r + j - i], values[r:r + j - i], None if mask is None else mask[i:j])
                for i, j, r in self.runs]


def runs_of(rows: list) -> list:
    """(i, j, r): queries i..j-1 are cache rows r..r+j-i-1, for sorted distinct `rows`."""
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append((start, i, rows[start]))
            start = i
    return runs
