"""Fused, chunked LM head + cross-entropy: per-token loss without a whole (tokens x vocab) tensor.

A looped model reads logits out after every loop, so T full-vocabulary float32 logit tensors would
dominate memory (vocab 49152, 4096 tokens: 805 MB each). Two ways to get gradients, both forming
logits `chunk_size` tokens at a time:

- `linear_cross_entropy`: an autograd function that keeps each token's log-sum-exp and recomputes
  a chunk's logits in backward (one extra read-out matmul). Works for any loss built on the CE.
- `weighted_cross_entropy`: when the loss is linear in the per-token CE with coefficients known
  before the read-out (Stage I: p_t / n_tokens, once all gates are known), the gradients w.r.t.
  the hidden states and the head are formed in the same pass, and no logits are recomputed.
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


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, dtype):
        w = weight.to(dtype)
        n = h.shape[0]
        acc = _accumulate_dtype(dtype)
        ce = torch.zeros(n, dtype=acc, device=h.device)
        lse = torch.zeros(n, dtype=acc, device=h.device)
        correct = torch.zeros(n, dtype=torch.bool, device=h.device)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        with torch.autocast(h.device.type, enabled=False):
            for s, e in _chunks(n, chunk_size):
                logits = (h[s:e].to(dtype) @ w.T).to(acc)
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, safe_targets[s:e, None]).squeeze(1)
                ce[s:e] = torch.where(valid[s:e], lse[s:e] - target_logit, 0.0)
                correct[s:e] = (logits.argmax(dim=-1) == targets[s:e]) & valid[s:e]
        ctx.save_for_backward(h, weight, safe_targets, valid, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        ctx.mark_non_differentiable(correct)
        return ce, correct

    @staticmethod
    def backward(ctx, grad_ce, _grad_correct):
        h, weight, safe_targets, valid, lse = ctx.saved_tensors
        dtype = ctx.dtype
        w = weight.to(dtype)
        acc = _accumulate_dtype(dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        scale = torch.where(valid, grad_ce.to(acc), 0.0)
        with torch.autocast(h.device.type, enabled=False):
            for s, e in _chunks(h.shape[0], ctx.chunk_size):
                hc = h[s:e].to(dtype)
                # d ce / d logits = softmax - onehot(target), scaled by the incoming gradient
                g = torch.exp((hc @ w.T).to(acc) - lse[s:e, None])
                g[torch.arange(e - s, device=g.device), safe_targets[s:e]] -= 1.0
                g = (g * scale[s:e, None]).to(dtype)
                if want_h:
                    grad_h[s:e] = (g @ w).to(h.dtype)
                if want_w:
                    grad_w += (g.T @ hc).to(acc)
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None, None


def linear_cross_entropy(h, weight, targets, chunk_size: int | None = None):
    """Per-token `cross_entropy(h @ weight.T, targets)` (0 where target == IGNORE_INDEX) and
    whether the argmax equals the target, both shaped like `targets`.

    Equal in value and gradient (w.r.t. h and weight) to `F.cross_entropy(lm_head(h), targets,
    reduction="none")`; tests check that in float64.
    """
    chunk_size = DEFAULT_CHUNK_TOKENS if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of tokens")
    shape = targets.shape
    ce, correct = _LinearCrossEntropy.apply(
        h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk_size, _compute_dtype(h))
    return ce.view(shape), correct.view(shape)


@torch.no_grad()
def _weighted_ce_and_grads(h, weight, targets, coeff, chunk_size, dtype, grad_w):
    """CE and argmax-correctness per token, and the gradients of sum(coeff * CE): returns grad_h
    and adds grad_W into `grad_w`."""
    w = weight.to(dtype)
    n, acc = h.shape[0], _accumulate_dtype(dtype)
    ce = torch.zeros(n, dtype=acc, device=h.device)
    correct = torch.zeros(n, dtype=torch.bool, device=h.device)
    grad_h = torch.empty_like(h)
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0)
    scale = torch.where(valid, coeff.to(acc), 0.0)
    with torch.autocast(h.device.type, enabled=False):
        for s, e in _chunks(n, chunk_size):
            hc = h[s:e].to(dtype)
            logits = (hc @ w.T).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(e - s, device=h.device)
            ce[s:e] = torch.where(valid[s:e], lse - logits[rows, safe_targets[s:e]], 0.0)
            correct[s:e] = (logits.argmax(dim=-1) == targets[s:e]) & valid[s:e]
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[rows, safe_targets[s:e]] -= 1.0
            g = g.mul_(scale[s:e, None]).to(dtype)
            grad_h[s:e] = (g @ w).to(h.dtype)
            grad_w += (g.T @ hc).to(grad_w.dtype)
    return ce, correct, grad_h


def weighted_cross_entropy(states, weight, targets, coeffs, chunk_size: int | None = None):
    """Per-loop CE and correctness (detached), plus a zero-valued tensor whose gradient w.r.t.
    the states and the head weight is that of `sum_t sum_i coeffs[t][i] * CE_t[i]`.

    states: list of (..., d) hidden states; coeffs: list of detached tensors shaped like targets.
    Add the returned tensor to a loss that uses the CE values only as constants (detached); the
    two together have exactly the gradient of the loss with the CE terms differentiated.
    """
    chunk_size = DEFAULT_CHUNK_TOKENS if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of tokens")
    flat_targets = targets.reshape(-1)
    dtype = _compute_dtype(states[0])
    grad_w = torch.zeros(weight.shape, dtype=_accumulate_dtype(dtype), device=weight.device)
    ces, corrects, surrogate = [], [], 0.0
    for h, c in zip(states, coeffs):
        flat_h = h.reshape(-1, h.shape[-1])
        ce, correct, grad_h = _weighted_ce_and_grads(flat_h, weight, flat_targets, c.detach().reshape(-1),
                                                     chunk_size, dtype, grad_w)
        ces.append(ce.view(targets.shape))
        corrects.append(correct.view(targets.shape))
        surrogate = surrogate + (flat_h * grad_h).sum()
    surrogate = surrogate + (weight * grad_w.to(weight.dtype)).sum()
    return ces, corrects, surrogate - surrogate.detach()
