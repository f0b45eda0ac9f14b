"""Batched generation from a LoopLM: left-padded prompts of any lengths, one StaticKVCache,
sampling (greedy, temperature, top-k, top-p), per-row stop at EOS, and per-token early exit that
skips the loops after each token's exit (looplm.infer.step).

Finished rows sit out the remaining steps (they are not computed). Each generated token records
the loop its prediction came from; `loops_computed` counts the loops run for it up to its exit (a
prefill runs all T, so the first token of every row counts T).
"""

import time
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from looplm.config import is_integer
from looplm.infer.cache import MODES, StaticKVCache
from looplm.infer.step import step


@dataclass
class Generation:
    tokens: list  # per row, the new tokens (the EOS included when it came)
    exit_loops: list  # per row, the loop each new token was read out at
    loops_computed: int = 0  # loops run for the new tokens, summed over rows
    seconds: float = 0.0  # wall clock, prefill included
    cpu_seconds: float = 0.0  # this process's CPU time, prefill included
    prefill_seconds: float = 0.0
    prefill_cpu_seconds: float = 0.0
    cache_bytes: int = 0
    prefill_loops: int = 0  # loops the prefill counted for the rows' first tokens

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def mean_loops(self) -> float:
        """Loops actually computed per generated token."""
        return self.loops_computed / max(self.n_tokens, 1)

    @property
    def decode_mean_loops(self) -> float:
        """Loops computed per token of the decode steps (the prefill's first tokens left out)."""
        rows = len(self.tokens)
        return (self.loops_computed - self.prefill_loops) / max(self.n_tokens - rows, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("inf")


def _check(model, prompts, max_new_tokens, n_loops, cache, temperature, top_k, top_p, eos):
    vocab = model.cfg.vocab_size
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not is_integer(t) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token {bad[0]!r}: allowed are integers 0..{vocab - 1}")
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not is_integer(n_loops) or n_loops < 1:
        raise ValueError(f"n_loops={n_loops!r} must be an integer >= 1")
    if cache not in MODES:
        raise ValueError(f"cache={cache!r}: allowed are {MODES}")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 is greedy)")
    if top_k is not None and (not is_integer(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be None or in (0, 1]")
    if eos is not None and (not is_integer(eos) or not 0 <= eos < vocab):
        raise ValueError(f"eos={eos!r} must be None or a token id in 0..{vocab - 1}")


def sampler(temperature: float, top_k, top_p, generator=None):
    """next-token function of (B, V) logits: argmax at temperature 0, else a draw from the
    temperature / top-k / top-p warped distribution (transformers' warpers)."""
    if temperature == 0:
        return lambda logits: logits.argmax(-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1 else []))

    def draw(logits):
        scores = warpers(None, logits.float())
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)

    return draw


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, exit_rule=None, n_loops: int | None = None,
             cache: str = "per_loop", temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos: int | None = None, generator=None,
             skip: bool = True) -> Generation:
    """Generate up to `max_new_tokens` after each prompt (lists of token ids).

    exit_rule: a looplm.exits rule deciding each token's exit loop (None: all n_loops, default
    cfg.n_loops). skip=False computes every loop even with a rule (select only)."""
    T = model.cfg.n_loops if n_loops is None else n_loops
    _check(model, prompts, max_new_tokens, T, cache, temperature, top_k, top_p, eos)
    was_training = model.training
    model.eval()
    try:
        device = model.embed.weight.device
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max())
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
        kv = StaticKVCache(len(prompts), width + max_new_tokens, cache, start=(width - lengths).to(device))
        pick = sampler(temperature, top_k, top_p, generator)
        t0, c0 = time.perf_counter(), time.process_time()
        result = step(model, ids.to(device), kv, T, exit_rule, skip=skip)
        loops = result.loops_run.clone()
        prefill = int(loops.sum())
        nxt = pick(model.logits(result.states[:, -1]))
        t1, c1 = time.perf_counter(), time.process_time()
        out_tokens, out_loops = [[] for _ in prompts], [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for n in range(max_new_tokens):
            if n:  # the next token of the rows still going (finished rows sit the step out)
                active = None if not done.any() else torch.nonzero(~done).squeeze(1)
                result = step(model, nxt[:, None], kv, T, exit_rule, active=active, skip=skip)
                loops += result.loops_run
                nxt = pick(model.logits(result.states[:, -1]))
            tokens, exits = nxt.tolist(), result.exit_loops[:, -1].tolist()  # one device sync a step
            for i in torch.nonzero(~done).squeeze(1).tolist():
                out_tokens[i].append(tokens[i])
                out_loops[i].append(exits[i])
            if eos is not None:
                done |= nxt == eos
                if done.all():
                    break
        return Generation(out_tokens, out_loops, loops_computed=int(loops.sum()),
                          seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                          prefill_seconds=t1 - t0, prefill_cpu_seconds=c1 - c0, cache_bytes=kv.nbytes,
                          prefill_loops=prefill)
    finally:
        model.train(was_training)
