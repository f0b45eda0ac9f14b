"""Fused, chunked LM head + cross-entropy: per-token loss without a whole (tokens x vocab) tensor.

A looped model reads logits out after every loop, so T full-vocabulary float32 logit tensors would
dominate memory (vocab 49152, 4096 tokens: 805 MB each). This forms the logits `chunk_size` tokens
at a time, keeps only each token's log-sum-exp, and recomputes a chunk's logits in backward.
"""

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 256


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, dtype):
        w = weight.to(dtype)
        n = h.shape[0]
        ce = torch.zeros(n, dtype=torch.float32, device=h.device)
        lse = torch.zeros(n, dtype=torch.float32, device=h.device)
        correct = torch.zeros(n, dtype=torch.bool, device=h.device)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        with torch.autocast(h.device.type, enabled=False):
            for s, e in _chunks(n, chunk_size):
                logits = (h[s:e].to(dtype) @ w.T).float()
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
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        scale = torch.where(valid, grad_ce.float(), 0.0)
        with torch.autocast(h.device.type, enabled=False):
            for s, e in _chunks(h.shape[0], ctx.chunk_size):
                hc = h[s:e].to(dtype)
                # d ce / d logits = softmax - onehot(target), scaled by the incoming gradient
                g = torch.exp((hc @ w.T).float() - lse[s:e, None])
                g[torch.arange(e - s, device=g.device), safe_targets[s:e]] -= 1.0
                g = (g * scale[s:e, None]).to(dtype)
                if want_h:
                    grad_h[s:e] = (g @ w).to(h.dtype)
                if want_w:
                    grad_w += (g.T @ hc).float()
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None, None


def linear_cross_entropy(h, weight, targets, chunk_size: int | None = None):
    """Per-token `cross_entropy(h @ weight.T, targets)` (0 where target == IGNORE_INDEX) and
    whether the argmax equals the target, both shaped like `targets`.

    Equal in value and gradient (w.r.t. h and weight) to `F.cross_entropy(lm_head(h), targets,
    reduction="none")`; tests check that in float64.
    """
    chunk_size = chunk_size or DEFAULT_CHUNK_TOKENS
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens")
    shape = targets.shape
    ce, correct = _LinearCrossEntropy.apply(
        h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk_size, _compute_dtype(h))
    return ce.view(shape), correct.view(shape)
