"""A preallocated KV cache for looped decoding, written in place (no concatenation per step).

Every attention slot ("loop", t, layer) — and the prelude / coda slots — owns one key and one value
buffer of shape (batch, kv_heads, max_len, head_dim), allocated on its first write. Rows are left
padded: row b's tokens start at `start[b]`, and all rows write the same positions, so one length
serves the batch while each row's valid span is [start[b], length).

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
    def __init__(self, batch: int, max_len: int, mode: str = "per_loop", start=None):
        if mode not in MODES:
            raise ValueError(f"cache mode {mode!r}: allowed are {MODES}")
        if batch < 1 or max_len < 1:
            raise ValueError(f"StaticKVCache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        self.batch, self.max_len, self.mode = batch, max_len, mode
        self.start = torch.zeros(batch, dtype=torch.long) if start is None else torch.as_tensor(start)
        self.length = 0  # positions written so far (every row)
        self.buffers: dict = {}  # key -> (keys, values)
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
        if self.mode != "per_loop" and slot[0] in LOOPED_STAGES:
            return slot[0], slot[2]
        return slot

    def write(self, slot: tuple, k: torch.Tensor, v: torch.Tensor, rows) -> tuple:
        """Store k, v (rows, kv_heads, n_new, head_dim) at the step's positions; return every
        row's keys and values of positions [0, end), views of the buffers (not copies)."""
        key = self.key(slot)
        if key not in self.buffers:
            shape = (self.batch, k.shape[1], self.max_len, k.shape[3])
            self.buffers[key] = (k.new_zeros(shape), v.new_zeros(shape))
        kb, vb = self.buffers[key]
        new = slice(self._pos, self._end)
        if rows is None:
            kb[:, :, new], vb[:, :, new] = k, v
        else:
            kb[:, :, new].index_copy_(0, rows, k)
            vb[:, :, new].index_copy_(0, rows, v)
        if self.mode in ("first", "average") and slot[0] in LOOPED_STAGES:
            self._stash_update(key, slot[1], k, v, rows)
        return kb[:, :, :self._end], vb[:, :, :self._end]

    def _stash_update(self, key, loop, k, v, rows) -> None:
        if loop == 0:  # loop 1 runs on every active row of the step
            shape = (self.batch, *k.shape[1:])
            self._stash[key] = (k.new_zeros(shape), v.new_zeros(shape))
        sk, sv = self._stash[key]
        if loop == 0 or self.mode == "average":
            if rows is None:
                sk += k
                sv += v
            else:
                sk.index_add_(0, rows, k)
                sv.index_add_(0, rows, v)

    def finish(self, loops_run: torch.Tensor, n_loops: int) -> None:
        """End the step: `loops_run` (batch,) is how many loops each row computed at the new
        positions (n_loops for a row that ran them all; 0 for a row that sat the step out)."""
        new = slice(self._pos, self._end)
        loops_run = loops_run.to(self.start.device)
        if self.mode == "per_loop":
            self._copy_exit_kv(new, loops_run, n_loops)
        elif self.mode == "first":
            for key, (k, v) in self._stash.items():
                kb, vb = self.buffers[key]
                kb[:, :, new], vb[:, :, new] = k, v
        elif self.mode == "average":
            for key, (k, v) in self._stash.items():
                weight = (n_loops - loops_run).clamp_min(0).to(k.dtype).view(-1, 1, 1, 1)
                kb, vb = self.buffers[key]
                kb[:, :, new] = (k + weight * kb[:, :, new]) / n_loops
                vb[:, :, new] = (v + weight * vb[:, :, new]) / n_loops
        self._stash.clear()
        self.length = self._end

    def _copy_exit_kv(self, new: slice, loops_run: torch.Tensor, n_loops: int) -> None:
        """Deeper loops of an early-exited row repeat its exit loop's keys and values."""
        exited = (loops_run >= 1) & (loops_run < n_loops)
        if not exited.any():
            return
        layers = {(key[0], key[2]) for key in self.buffers if key[0] in LOOPED_STAGES}
        for stage, layer in layers:
            for loop in range(1, n_loops):
                rows = torch.nonzero(exited & (loops_run <= loop)).squeeze(1)
                source = self.buffers.get((stage, loop - 1, layer))
                if source is None or rows.numel() == 0:
                    continue
                if (stage, loop, layer) not in self.buffers:
                    self.buffers[(stage, loop, layer)] = (torch.zeros_like(source[0]), torch.zeros_like(source[1]))
                for src, dst in zip(source, self.buffers[(stage, loop, layer)]):
                    dst[:, :, new].index_copy_(0, rows, src[:, :, new].index_select(0, rows))

    # -- reporting --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(t.numel() * t.element_size() for kv in self.buffers.values() for t in kv)

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
    """The cache seen by a subset of rows: what Attention calls `update(slot, k, v)` on. Its
    `query_runs` (None: the queries are every row) are (first query, end query, first cache row)
    spans of consecutive rows, so that attention reads the live rows' keys in place: gathering
    them would copy every cached key once more, reading all rows would read the exited rows'."""

    def __init__(self, cache: StaticKVCache, rows):
        self.cache, self.rows = cache, rows
        self.query_runs = None if rows is None else runs_of(rows.tolist())

    def update(self, slot, k, v):
        return self.cache.write(slot, k, v, self.rows)


def runs_of(rows: list) -> list:
    """(i, j, r): queries i..j-1 are cache rows r..r+j-i-1, for sorted distinct `rows`."""
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append((start, i, rows[start]))
            start = i
    return runs
