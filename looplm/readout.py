"""Fused, chunked LM head + cross-entropy: per-token loss without a whole (tokens x vocab) tensor.

A looped model reads logits out after every loop, so T full-vocabulary float32 logit tensors would
dominate memory (vocab 49152, 4096 tokens: 805 MB each). Two ways to get gradients, both forming
logits `chunk_size` tokens at a time:

- `linear_cross_entropy`: an autograd function that keeps each token's log-sum-exp and recomputes
  a chunk's logits in backward (one extra read-out matmul). Works for any loss built on the CE.
- `weighted_cross_entropy`: when the loss is linear in the per-token CE with coefficients known
  before the read-out (Stage I: p_t / n_tokens, once all gates are known), the gradients w.r.t.
  the hidden states and the head are formed in the same pass, and no logits are recomputed.

Every elementwise step works in place on one (chunk x vocab) buffer: at vocab 49152 a fresh
temporary per operation costs more than the matmuls around it (measured with looplm.bench).
"""

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 256


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in float32 at least (float64 stays float64, for reference tests)."""
    return torch.promote_types(dtype, torch.float32)


def _check_chunk(chunk_size) -> int:
    chunk_size = DEFAULT_CHUNK_TOKENS if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of tokens")
    return chunk_size


class _Chunks:
    """Chunked matmuls of one read-out: logits into a reused buffer, gradients into place."""

    def __init__(self, weight, n, chunk_size, dtype):
        self.w, self.dtype, self.acc = weight.to(dtype), dtype, _accumulate_dtype(dtype)
        self.size, self.n = chunk_size, n
        self.same = dtype == self.acc  # bf16 compute: float32 statistics need a cast copy
        self.buf = torch.empty(min(chunk_size, n), weight.shape[0], dtype=self.acc, device=weight.device) \
            if self.same else None

    def __iter__(self):
        for start in range(0, self.n, self.size):
            yield start, min(start + self.size, self.n)

    def logits(self, hc):
        if self.same:
            return torch.mm(hc, self.w.T, out=self.buf[: hc.shape[0]])
        return torch.mm(hc.to(self.dtype), self.w.T).to(self.acc)

    def grad_h_into(self, g, out):
        if self.same and out.dtype == self.dtype:
            torch.mm(g, self.w, out=out)
        else:
            out.copy_(g.to(self.dtype) @ self.w)

    def add_grad_w(self, grad_w, g, hc):
        if self.same and hc.dtype == self.dtype:
            grad_w.addmm_(g.T, hc)
        else:
            grad_w += (g.to(self.dtype).T @ hc.to(self.dtype)).to(grad_w.dtype)


def _softmax_stats(logits, targets, valid):
    """CE, argmax-correctness and log-sum-exp of one chunk; leaves exp(logits - max) in `logits`
    and returns its row sums."""
    top, idx = logits.max(dim=-1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    target_logit = logits[rows, torch.where(valid, targets, 0)]
    sums = logits.sub_(top[:, None]).exp_().sum(-1)
    lse = top + sums.log()
    return torch.where(valid, lse - target_logit, 0.0), (idx == targets) & valid, lse, sums


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, dtype):
        chunks = _Chunks(weight, h.shape[0], chunk_size, dtype)
        ce = torch.empty(h.shape[0], dtype=chunks.acc, device=h.device)
        lse = torch.empty_like(ce)
        correct = torch.empty(h.shape[0], dtype=torch.bool, device=h.device)
        valid = targets != IGNORE_INDEX
        with torch.autocast(h.device.type, enabled=False):
            for s, e in chunks:
                ce[s:e], correct[s:e], lse[s:e], _ = _softmax_stats(chunks.logits(h[s:e]), targets[s:e], valid[s:e])
        ctx.save_for_backward(h, weight, targets, valid, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        ctx.mark_non_differentiable(correct)
        return ce, correct

    @staticmethod
    def backward(ctx, grad_ce, _grad_correct):
        h, weight, targets, valid, lse = ctx.saved_tensors
        chunks = _Chunks(weight, h.shape[0], ctx.chunk_size, ctx.dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=chunks.acc, device=weight.device) if want_w else None
        scale = torch.where(valid, grad_ce.to(chunks.acc), 0.0)
        safe_targets = torch.where(valid, targets, 0)
        with torch.autocast(h.device.type, enabled=False):
            for s, e in chunks:
                # d ce / d logits = softmax - onehot(target), scaled by the incoming gradient
                g = chunks.logits(h[s:e]).sub_(lse[s:e, None]).exp_()
                g[torch.arange(e - s, device=g.device), safe_targets[s:e]] -= 1.0
                g.mul_(scale[s:e, None])
                if want_h:
                    chunks.grad_h_into(g, grad_h[s:e])
                if want_w:
                    chunks.add_grad_w(grad_w, g, h[s:e])
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None, None


def linear_cross_entropy(h, weight, targets, chunk_size: int | None = None):
    """Per-token `cross_entropy(h @ weight.T, targets)` (0 where target == IGNORE_INDEX) and
    whether the argmax equals the target, both shaped like `targets`.

    Equal in value and gradient (w.r.t. h and weight) to `F.cross_entropy(lm_head(h), targets,
    reduction="none")`; tests check that in float64.
    """
    chunk_size = _check_chunk(chunk_size)
    shape = targets.shape
    ce, correct = _LinearCrossEntropy.apply(
        h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk_size, _compute_dtype(h))
    return ce.view(shape), correct.view(shape)


@torch.no_grad()
def _weighted_ce_and_grads(h, chunks, targets, coeff, grad_w, want_h):
    """CE and argmax-correctness per token, and the gradients of sum(coeff * CE): returns grad_h
    (None unless want_h) and adds grad_W into `grad_w`."""
    ce = torch.empty(h.shape[0], dtype=chunks.acc, device=h.device)
    correct = torch.empty(h.shape[0], dtype=torch.bool, device=h.device)
    grad_h = torch.empty_like(h) if want_h else None
    valid = targets != IGNORE_INDEX
    scale = torch.where(valid, coeff.to(chunks.acc), 0.0)
    safe_targets = torch.where(valid, targets, 0)
    with torch.autocast(h.device.type, enabled=False):
        for s, e in chunks:
            g = chunks.logits(h[s:e])
            ce[s:e], correct[s:e], _, sums = _softmax_stats(g, targets[s:e], valid[s:e])
            g.mul_((scale[s:e] / sums)[:, None])  # exp(logits - max) -> softmax * coefficient
            g[torch.arange(e - s, device=g.device), safe_targets[s:e]] -= scale[s:e]
            if want_h:
                chunks.grad_h_into(g, grad_h[s:e])
            chunks.add_grad_w(grad_w, g, h[s:e])
    return ce, correct, grad_h


def weighted_cross_entropy(states, weight, targets, coeffs, chunk_size: int | None = None):
    """Per-loop CE and correctness (detached), plus a zero-valued tensor whose gradient w.r.t.
    the states and the head weight is that of `sum_t sum_i coeffs[t][i] * CE_t[i]`.

    states: list of (..., d) hidden states; coeffs: list of detached tensors shaped like targets.
    Add the returned tensor to a loss that uses the CE values only as constants (detached); the
    two together have exactly the gradient of the loss with the CE terms differentiated. A state
    that needs no gradient (a no-grad loop of a truncated window) gets none formed.
    """
    chunk_size = _check_chunk(chunk_size)
    flat_targets = targets.reshape(-1)
    chunks = _Chunks(weight, flat_targets.shape[0], chunk_size, _compute_dtype(states[0]))
    grad_w = torch.zeros(weight.shape, dtype=chunks.acc, device=weight.device)
    ces, corrects, carrier = [], [], 0.0
    for h, c in zip(states, coeffs):
        flat_h = h.reshape(-1, h.shape[-1])
        want_h = flat_h.requires_grad
        ce, correct, grad_h = _weighted_ce_and_grads(flat_h, chunks, flat_targets, c.detach().reshape(-1),
                                                     grad_w, want_h)
        ces.append(ce.view(targets.shape))
        corrects.append(correct.view(targets.shape))
        if want_h:
            carrier = carrier + (flat_h * grad_h).sum()
    if weight.requires_grad:
        carrier = carrier + (weight * grad_w.to(weight.dtype)).sum()
    if not isinstance(carrier, torch.Tensor):
        carrier = torch.zeros((), dtype=chunks.acc, device=weight.device)
    return ces, corrects, carrier - carrier.detach()
