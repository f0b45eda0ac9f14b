"""The LoopLM: one shared stack of N layers applied T times, read out after every loop (Ouro).

    x_0 = embed(ids)                         (not scaled; optional un-shared prelude layers)
    z_t = stack(x_{t-1})                     the same N layers every loop
    h_t = final_norm(z_t)                    what the LM head and the exit gate read
    x_t = h_t                                the normed state is carried into the next loop

With `input_injection` (not Ouro) the embedding e feeds every loop instead: x_0 = 0 and
z_t = stack(inject(x_{t-1}, e)), e.g. x_{t-1} + e, so truncated backprop still trains e.

The forward pass returns the trajectory of states; reading them out (LM head + cross-entropy,
exit gate) is the objective's job, so a recipe forms only the logits it needs.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from looplm.config import ModelConfig
from looplm.layers import INJECTIONS, Layer, RotaryEmbedding, make_norm
from looplm.objectives import at_least_float32
from looplm.readout import linear_cross_entropy, weighted_cross_entropy

CHECKPOINTING = ("none", "loop", "layer")  # activation checkpointing of LoopLM.forward


@dataclass
class Trajectory:
    """What one forward pass produced. Lists are indexed by loop - 1 and hold None for loops the
    caller did not keep."""

    n_loops: int
    states: list  # h_t: input of the LM head
    gate_inputs: list  # input of the exit gate (h_t for Ouro; z_t when gate_on_normed=False)
    final_state: torch.Tensor | None = None  # detached x_T: where a Jacobian regulariser probes
    last_state: torch.Tensor | None = None  # x_T with its graph (data parallelism ties loss to it)
    context: "LoopContext | None" = None


@dataclass
class LoopContext:
    """Per-call constants shared by every loop: RoPE tables, attention mask, KV cache."""

    rope: tuple
    mask: torch.Tensor | None
    cache: "KVCache | None" = None
    injected: torch.Tensor | None = None  # e, the input every loop sees under input injection


@dataclass
class KVCache:
    """One key/value slot per (stage, loop, layer). The looped slots follow Ouro's index
    `loop * N + layer`; prelude and coda layers get their own."""

    slots: dict = field(default_factory=dict)

    def update(self, slot, k, v, mask=None) -> list:
        """Append the new keys and values of `slot`; return the attention spans (first query,
        end query, keys, values, mask): here one, every query over every key so far."""
        if slot in self.slots:
            k = torch.cat([self.slots[slot][0], k], dim=2)
            v = torch.cat([self.slots[slot][1], v], dim=2)
        self.slots[slot] = (k, v)
        return [(0, k.shape[0], k, v, mask)]

    @property
    def length(self) -> int:
        return next(iter(self.slots.values()))[0].shape[2] if self.slots else 0


def attention_mask(doc_ids: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, q, kv) mask: causal, and within one document when doc_ids is given.

    None means plain causal attention, which SDPA handles without materialising a mask."""
    if doc_ids is None and q_len == kv_len:
        return None
    offset = kv_len - q_len
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=offset)
    if doc_ids is None:
        return causal[None, None]
    if q_len != kv_len:
        raise ValueError("document masks are supported for full sequences only, not with a KV cache")
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


class LoopLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prelude = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_prelude))
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.coda = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_coda))
        self.final_norm = make_norm(cfg)
        self.gate = nn.Linear(cfg.d_model, 1, bias=True)
        self.inject = INJECTIONS.get(cfg.input_injection)(cfg) if cfg.input_injection else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_base)
        self.checkpointing = "none"  # CHECKPOINTING: recompute a loop or a layer in backward
        self.apply(self._init_weights)
        if cfg.tie_head:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- the loop ---------------------------------------------------------------------------
    def context(self, seq_len: int, doc_ids=None, cache: KVCache | None = None, dtype=torch.float32):
        start = cache.length if cache is not None else 0
        device = self.embed.weight.device
        positions = torch.arange(start, start + seq_len, device=device)
        mask = attention_mask(doc_ids, seq_len, start + seq_len, device)
        return LoopContext(rope=self.rotary(positions, dtype), mask=mask, cache=cache)

    def _run(self, layers, x, ctx: LoopContext, slot_prefix):
        recompute = self.checkpointing == "layer" and torch.is_grad_enabled() and ctx.cache is None
        for i, layer in enumerate(layers):
            if recompute:
                x = checkpoint(layer, x, ctx.rope, ctx.mask, use_reentrant=False)
            else:
                x = layer(x, ctx.rope, ctx.mask, cache=ctx.cache, slot=(*slot_prefix, i))
        return x

    def _loop(self, x, ctx: LoopContext, loop: int):
        """One loop, stored for backward or (checkpointing="loop") recomputed there: memory then
        grows by one state per loop instead of every layer's activations."""
        if self.checkpointing == "loop" and torch.is_grad_enabled() and ctx.cache is None:
            return checkpoint(self.recurrence, x, ctx, loop, use_reentrant=False)
        return self.recurrence(x, ctx, loop)

    def recurrence(self, x, ctx: LoopContext, loop: int = 0):
        """One application of the shared stack plus the final norm: the map x_{t-1} -> x_t whose
        Jacobian the STARS regulariser penalises. Returns (carried state x_t, raw output z_t)."""
        if self.inject is not None:
            if ctx.injected is None:
                raise ValueError(f"input_injection={self.cfg.input_injection!r} needs the loop input e in "
                                 "LoopContext.injected (LoopLM.forward sets it)")
            x = self.inject(x, ctx.injected)
        z = self._run(self.layers, x, ctx, ("loop", loop))
        return (self.final_norm(z) if self.cfg.carry_normed else z), z

    def forward(self, input_ids, n_loops: int | None = None, doc_ids=None, first_grad_loop: int = 1,
                keep=None, cache: KVCache | None = None) -> Trajectory:
        """Run `n_loops` loops (default cfg.n_loops; more is depth extrapolation).

        first_grad_loop: loops before it run under torch.no_grad() (truncated backprop); their
            states are kept detached. keep: 1-based loops whose states to return (default all).
        """
        T = self.cfg.n_loops if n_loops is None else n_loops
        if T < 1:
            raise ValueError(f"n_loops={T} must be >= 1")
        if not 1 <= first_grad_loop <= T + 1:
            raise ValueError(f"first_grad_loop={first_grad_loop} must be in [1, {T + 1}]")
        keep = set(range(1, T + 1)) if keep is None else set(keep)
        x = self.embed(input_ids)
        ctx = self.context(input_ids.shape[1], doc_ids, cache, x.dtype)
        prelude_grad = first_grad_loop == 1 or self.inject is not None  # injection: e feeds every loop
        with torch.set_grad_enabled(torch.is_grad_enabled() and prelude_grad):
            x = self._run(self.prelude, x, ctx, ("prelude",))
        if self.inject is not None:
            ctx.injected, x = x, torch.zeros_like(x)
        traj = Trajectory(n_loops=T, states=[None] * T, gate_inputs=[None] * T, context=ctx)
        for t in range(1, T + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= first_grad_loop):
                x, z = self._loop(x, ctx, t - 1)
                if t in keep:
                    traj.states[t - 1], traj.gate_inputs[t - 1] = self._readout_states(x, z, ctx, t)
        traj.final_state, traj.last_state = x.detach(), x
        return traj

    def _readout_states(self, x, z, ctx, t):
        cfg = self.cfg
        if cfg.n_coda:
            r = self._run(self.coda, z, ctx, ("coda", t - 1))
            h = self.final_norm(r)
            return h, (h if cfg.gate_on_normed else r)
        h = x if cfg.carry_normed else self.final_norm(z)
        return h, (h if cfg.gate_on_normed else z)

    # -- read-outs --------------------------------------------------------------------------
    def exit_logits(self, gate_input) -> torch.Tensor:
        """Gate logit per token in float32 (at least), under bf16 autocast too: lambda_t =
        sigmoid(logit), and the exit distribution multiplies (1 - lambda) over the loops, where
        a bf16 logit's rounding (3 significant digits) would compound."""
        with torch.autocast(gate_input.device.type, enabled=False):
            x = at_least_float32(gate_input)
            return nn.functional.linear(x, self.gate.weight.to(x.dtype), self.gate.bias.to(x.dtype)).squeeze(-1)

    def logits(self, state) -> torch.Tensor:
        return self.lm_head(state)

    def token_loss(self, state, targets, chunk_size: int | None = None):
        """Per-token cross-entropy and argmax-correctness of one loop, without forming the whole
        logit tensor (see looplm.readout)."""
        return linear_cross_entropy(state, self.lm_head.weight, targets, chunk_size=chunk_size)

    def weighted_token_loss(self, states, targets, coeffs, chunk_size: int | None = None):
        """Per-loop CE/correctness (detached) and a zero-valued carrier of the gradient of
        `sum_t sum_i coeffs[t][i] CE_t[i]`, formed in the forward read-out (no recompute)."""
        return weighted_cross_entropy(states, self.lm_head.weight, targets, coeffs, chunk_size=chunk_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
