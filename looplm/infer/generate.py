"""Batched generation from a LoopLM: left-padded prompts of any lengths on a StaticKVCache,
sampling (greedy, temperature, top-k, top-p), per-row stop at EOS, and per-token early exit that
skips the loops after each token's exit.

Two schedules: "lockstep" (looplm.infer.step) decodes one token of every row per step, finished
rows sitting out; "staggered" (looplm.infer.staggered) lets every row run its own loops of its
own tokens, and with `slots` fewer than the prompts, a waiting prompt takes the first free slot.
Each generated token records the loop its prediction came from; `loops_computed` counts the loops
run for it up to its exit (a prefill runs all T, so the first token of every row counts T).
"""

import time
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from looplm.config import is_integer
from looplm.infer.cache import MODES, StaticKVCache
from looplm.infer.staggered import serve
from looplm.infer.step import step

SCHEDULES = ("lockstep", "staggered")


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


def _check_ids(seqs, what: str, why_not_empty: str, vocab: int) -> None:
    """Each of `seqs` is a non-empty list of token ids in 0..vocab-1."""
    for i, seq in enumerate(seqs):
        if len(seq) == 0:
            raise ValueError(f"{what} {i} is empty: {why_not_empty}")
        bad = [t for t in seq if not is_integer(t) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} {i} holds token {bad[0]!r}: allowed are integers 0..{vocab - 1}")


def _check(model, prompts, max_new_tokens, n_loops, cache, temperature, top_k, top_p, eos, skip, schedule, slots):
    vocab = model.cfg.vocab_size
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    _check_ids(prompts, "prompt", "every prompt needs at least one token", vocab)
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not is_integer(n_loops) or n_loops < 1:
        raise ValueError(f"n_loops={n_loops!r} must be an integer >= 1")
    if cache not in MODES:
        raise ValueError(f"cache={cache!r}: allowed are {MODES}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: allowed are {SCHEDULES}")
    if schedule == "staggered" and not skip:
        raise ValueError("schedule='staggered' runs each row's loops up to its exit only: it needs skip=True")
    if slots is not None and (not is_integer(slots) or slots < 1):
        raise ValueError(f"slots={slots!r} must be None or an integer >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 is greedy)")
    if top_k is not None and (not is_integer(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be None or in (0, 1]")
    if eos is not None and (not is_integer(eos) or not 0 <= eos < vocab):
        raise ValueError(f"eos={eos!r} must be None or a token id in 0..{vocab - 1}")


def _check_forced(model, prompts, forced, schedule):
    if forced is None:
        return
    if schedule != "lockstep":
        raise ValueError(f"forced continuations (teacher forcing) run on schedule='lockstep', not {schedule!r}")
    if not isinstance(forced, (list, tuple)) or len(forced) != len(prompts):
        raise ValueError(f"forced must be a list of one continuation per prompt ({len(prompts)})")
    _check_ids(forced, "forced continuation", "every row predicts at least one token", model.cfg.vocab_size)


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


def lockstep_decode(model, kv, nxt, n_loops, rule, pick, max_new_tokens, eos, tokens, exit_loops, skip,
                    forced=None) -> int:
    """Decode one token of every unfinished row per step (finished rows sit out), after a
    prefill whose tokens `nxt` are recorded in `tokens` / `exit_loops`. With `forced` (per row,
    the true continuation), step k feeds the row's k-th true token instead of its prediction, and a
    row is done after len(forced[row]) predictions. Returns the loops computed."""
    if forced is None:
        done = torch.zeros_like(nxt, dtype=torch.bool) if eos is None else nxt == eos
    else:
        lengths = torch.tensor([len(f) for f in forced], device=nxt.device)
        truth = pad_sequence([torch.tensor(f) for f in forced], batch_first=True).to(nxt.device)
        done = lengths <= 1
    computed = 0
    for k in range(1, max_new_tokens):
        if done.all():
            break
        active = None if not done.any() else torch.nonzero(~done).squeeze(1)
        fed = nxt if forced is None else truth[:, k - 1]
        result = step(model, fed[:, None], kv, n_loops, rule, active=active, skip=skip)
        computed += int(result.loops_run.sum())
        nxt = pick(model.logits(result.states[:, -1]))
        new, exits = nxt.tolist(), result.exit_loops[:, -1].tolist()  # one device sync a step
        for i in torch.nonzero(~done).squeeze(1).tolist():
            tokens[i].append(new[i])
            exit_loops[i].append(exits[i])
        if forced is not None:
            done |= lengths <= k + 1
        elif eos is not None:
            done |= nxt == eos
    return computed


class Prefill:
    """Runs and times a generation's prefills: left-padded prompts through every loop, the rule
    selecting each token's read-out loop, and the first new token picked."""

    def __init__(self, model, n_loops, rule, mode, pick):
        self.model, self.n_loops, self.rule, self.mode, self.pick = model, n_loops, rule, mode, pick
        self.seconds = self.cpu_seconds = 0.0
        self.loops = 0

    def __call__(self, prompts: list, max_len: int) -> tuple:
        """(StaticKVCache holding the prompts, first tokens (B,), their exit loops (B,))."""
        t0, c0 = time.perf_counter(), time.process_time()
        device = self.model.embed.weight.device
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max())
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
        kv = StaticKVCache(len(prompts), max_len, self.mode, start=(width - lengths).to(device), n_loops=self.n_loops)
        # skip=False: a prompt of one token is a prefill too, every loop run (its keys all computed)
        result = step(self.model, ids.to(device), kv, self.n_loops, self.rule, skip=False)
        first = self.pick(self.model.logits(result.states[:, -1]))
        self.loops += int(result.loops_run.sum())
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        return kv, first, result.exit_loops[:, -1]


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, exit_rule=None, n_loops: int | None = None,
             cache: str = "per_loop", temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos: int | None = None, generator=None,
             skip: bool = True, schedule: str = "lockstep", slots: int | None = None,
             forced: list | None = None) -> Generation:
    """Generate up to `max_new_tokens` after each prompt (lists of token ids).

    exit_rule: a looplm.exits rule deciding each token's exit loop (None: all n_loops, default
    cfg.n_loops). skip=False computes every loop even with a rule (select only). slots: rows
    decoding at once (default: every prompt). schedule: "lockstep" decodes one token of every
    row per step, its loop t while any row needs it, `slots` prompts at a time; "staggered" runs
    each row's own loops of its own tokens, and a waiting prompt takes a slot as soon as one
    frees (looplm.infer.staggered). forced: per prompt, its true continuation (teacher forcing,
    lockstep only): each step feeds the true token, the tokens returned are the predictions of
    each next one, and a row stops after its continuation's length (or max_new_tokens)."""
    T = model.cfg.n_loops if n_loops is None else n_loops
    _check(model, prompts, max_new_tokens, T, cache, temperature, top_k, top_p, eos, skip, schedule, slots)
    _check_forced(model, prompts, forced, schedule)
    slots = len(prompts) if slots is None else min(slots, len(prompts))
    was_training = model.training
    model.eval()
    try:
        pick = sampler(temperature, top_k, top_p, generator)
        prefill = Prefill(model, T, exit_rule, cache, pick)
        tokens, exit_loops = [[] for _ in prompts], [[] for _ in prompts]
        t0, c0 = time.perf_counter(), time.process_time()
        if schedule == "staggered":
            decoded, cache_bytes = serve(model, list(prompts), slots, prefill, T, exit_rule, pick, max_new_tokens,
                                         eos, tokens, exit_loops)
        else:
            decoded = cache_bytes = 0
            for lo in range(0, len(prompts), slots):
                chunk = prompts[lo:lo + slots]
                kv, first, exits = prefill(chunk, max(len(p) for p in chunk) + max_new_tokens)
                for i, token, e in zip(range(lo, lo + len(chunk)), first.tolist(), exits.tolist()):
                    tokens[i], exit_loops[i] = [token], [e]
                decoded += lockstep_decode(model, kv, first, T, exit_rule, pick, max_new_tokens, eos,
                                           tokens[lo:lo + slots], exit_loops[lo:lo + slots], skip=skip,
                                           forced=None if forced is None else forced[lo:lo + slots])
                cache_bytes = max(cache_bytes, kv.nbytes)
        return Generation(tokens, exit_loops, loops_computed=prefill.loops + decoded,
                          seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                          prefill_seconds=prefill.seconds, prefill_cpu_seconds=prefill.cpu_seconds,
                          cache_bytes=cache_bytes, prefill_loops=prefill.loops)
    finally:
        model.train(was_training)
