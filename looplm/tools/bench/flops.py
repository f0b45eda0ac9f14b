"""Analytic FLOPs of one training step: a LoopLM recipe step and a Llama peer step.

Conventions (one multiply-add = 2 FLOPs; elementwise work, norms, RoPE, softmax, the loss and
the optimizer count 0, as in the 6N convention and in torch.utils.flop_counter):

* Body, per token per layer, forward: 2 * (weights of the layer's matmuls)
  = 2 * (d*(h + 2*kv)*hd + h*hd*d + 3*d*ff), plus attention scores and values
  2 * 2 * S * h*hd. Attention is counted over all S keys (non-causal), the PaLM/Megatron
  convention and what FlopCounterMode counts; the causal half that is actually useful is
  not subtracted. A loop that keeps a graph costs 3x its forward (backward = input grads +
  weight grads = 2x forward); a loop run under no_grad costs 1x.
* Read-out (LM head), per token per read-out: 2*d*V forward; backward 2*d*V for the grad of
  the state (when it requires grad) plus 2*d*V for the grad of the head weight.
  Hardware work beyond that is `overhead`, NOT model work: MFU uses `model` FLOPs only
  (6N-style). Two read-out paths (looplm.readout):
  - `linear_cross_entropy` (autograd, any loss): recomputes the logits in backward, one more
    2*d*V per token per read-out, counted as overhead.
  - `weighted_cross_entropy` (Stage I "fused": gradients formed in the forward pass with the
    exit probabilities as coefficients): no recompute; it forms grad_h only for states that
    require grad and grad_W only when the head does, so it does exactly the model work.
* Exit gate: 2*d per token per gate read, same 3x rule. Prelude layers run once per step,
  coda layers once per read-out loop. An input injection adds its own matmul per loop (Huginn's
  concat adapter: 2 * 2d*d per token), counted with the loop.
* Llama peer: L layers, one read-out over all S tokens (HF forms the whole logit tensor, no
  recompute); HF's rotary `inv_freq @ positions` matmul (2*B*S*hd/2 FLOPs) is ignored.

`tests/test_bench.py` checks model + overhead against FlopCounterMode for one LoopLM step and one
Llama step (SDPA forced to the math backend there, so attention shows up as bmm).
"""

from dataclasses import dataclass, field


@dataclass
class Flops:
    """FLOPs of one step, split into model work (for MFU) and overhead (recompute, unused grads)."""

    model: float = 0.0
    overhead: float = 0.0
    parts: dict = field(default_factory=dict)  # model FLOPs by component (body, readout, gate)

    @property
    def hardware(self) -> float:
        return self.model + self.overhead

    def add(self, part: str, model: float, overhead: float = 0.0) -> None:
        self.model += model
        self.overhead += overhead
        self.parts[part] = self.parts.get(part, 0.0) + model


def layer_forward_flops_per_token(d: int, n_heads: int, kv_heads: int, head_dim: int, d_ff: int,
                                  seq_len: int) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one decoder layer's forward, per token."""
    matmul_weights = d * (n_heads + 2 * kv_heads) * head_dim + n_heads * head_dim * d + 3 * d * d_ff
    attention = 2 * 2 * seq_len * n_heads * head_dim
    return 2.0 * matmul_weights, float(attention)


def _layer(cfg, seq_len):
    mm, att = layer_forward_flops_per_token(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim,
                                            cfg.d_ff, seq_len)
    return mm + att


def _injection(cfg) -> float:
    """Forward FLOPs per token per loop of the input injection (0 without one)."""
    if not cfg.input_injection:
        return 0.0
    from looplm.layers import INJECTIONS
    return 2.0 * INJECTIONS.get(cfg.input_injection).matmul_weights(cfg)


@dataclass
class ReadoutCall:
    """One LM-head read-out (or exit-gate read) as it happened in a step."""

    tokens: int
    input_grad: bool  # the state it reads requires grad
    weight_grad: bool  # the head (gate) weight requires grad
    fused: bool = False  # weighted_cross_entropy: gradients formed in forward, no recompute


def looplm_step_flops(cfg, batch: int, seq_len: int, run_loops: int, first_grad_loop: int,
                      keep, readouts, gates=()) -> Flops:
    """FLOPs of one LoopLM training step.

    run_loops, first_grad_loop, keep: what the recipe passed to LoopLM.forward (keep None: all).
    readouts / gates: ReadoutCall per `token_loss` / `exit_logits` call of the step.
    Body backward runs for the graph-keeping loops up to the last loop whose state feeds a
    read-out with grad (later loops' graphs are never reached by backward).
    """
    f = Flops()
    tokens = batch * seq_len
    d, V = cfg.d_model, cfg.vocab_size
    per_layer = _layer(cfg, seq_len)
    kept = set(range(1, run_loops + 1)) if keep is None else {t for t in keep if 1 <= t <= run_loops}
    reads_grad = any(r.input_grad for r in list(readouts) + list(gates))
    last_bwd = max(kept) if (kept and reads_grad) else 0
    bwd_loops = max(0, last_bwd - first_grad_loop + 1)
    loop_fwd = tokens * (cfg.n_layers * per_layer + _injection(cfg))
    f.add("body", run_loops * loop_fwd + 2 * bwd_loops * loop_fwd)
    if cfg.n_prelude:
        mult = 3 if (first_grad_loop == 1 and bwd_loops) else 1
        f.add("body", mult * tokens * cfg.n_prelude * per_layer)
    if cfg.n_coda:  # coda runs per kept loop; its backward where that loop keeps a graph
        for t in kept:
            mult = 3 if (first_grad_loop <= t <= last_bwd) else 1
            f.add("body", mult * tokens * cfg.n_coda * per_layer)
    for r in readouts:
        fwd = 2.0 * d * V * r.tokens
        bwd = fwd * (int(r.input_grad) + int(r.weight_grad))
        if r.fused:  # the needed grads are formed in the forward pass: no overhead
            f.add("readout", fwd + bwd)
        else:  # logits recomputed in backward, when there is a backward
            f.add("readout", fwd + bwd, overhead=fwd if (r.input_grad or r.weight_grad) else 0.0)
    for g in gates:
        fwd = 2.0 * d * g.tokens
        f.add("gate", fwd * (1 + int(g.input_grad) + int(g.weight_grad)))
    return f


def looplm_plan_flops(cfg, batch: int, seq_len: int, loops: int | None = None, fused: bool = True) -> Flops:
    """Stage I full unroll (every loop read out and gated, all with grad): the common case."""
    T = loops or cfg.n_loops
    n = batch * seq_len
    reads = [ReadoutCall(n, True, True, fused) for _ in range(T)]
    gates = [ReadoutCall(n, True, True) for _ in range(T)]
    return looplm_step_flops(cfg, batch, seq_len, T, 1, None, reads, gates)


def llama_step_flops(d: int, n_layers: int, n_heads: int, kv_heads: int, d_ff: int, vocab: int,
                     batch: int, seq_len: int) -> Flops:
    """FLOPs of one LlamaForCausalLM training step (untied head, labels over all S positions)."""
    f = Flops()
    tokens = batch * seq_len
    mm, att = layer_forward_flops_per_token(d, n_heads, kv_heads, d // n_heads, d_ff, seq_len)
    f.add("body", 3.0 * tokens * n_layers * (mm + att))
    f.add("readout", 3.0 * 2.0 * d * vocab * tokens)
    return f


def linear_shapes(cfg, batch: int, seq_len: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, calls) of the dense matmuls of one Stage I full-unroll training step, forward and
    backward, as the model issues them: the shape mix the MFU denominator is measured on.

    A linear y = x W^T with x (M, K) and W (N, K) runs (M,K)@(K,N) forward, (M,N)@(N,K) for the
    input grad and (N,M)@(M,K) for the weight grad. The chunked read-out runs the same three per
    chunk (the fused Stage I read-out, no recompute). Attention (SDPA) is not a plain matmul and
    is left out.
    """
    n = batch * seq_len
    d, h, kv, hd, ff, V, T = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff,
                              cfg.vocab_size, cfg.n_loops)
    layers = cfg.n_layers * T
    shapes = []
    for k_in, n_out in [(d, (h + 2 * kv) * hd), (h * hd, d), (d, 2 * ff), (ff, d)]:
        shapes += [(n, k_in, n_out, layers), (n, n_out, k_in, layers), (n_out, n, k_in, layers)]
    n_chunks, tail = divmod(n, chunk)
    for m, count in [(chunk, n_chunks), (tail, 1 if tail else 0)]:
        if count:
            shapes += [(m, d, V, count * T), (m, V, d, count * T), (V, m, d, count * T)]
    return shapes
