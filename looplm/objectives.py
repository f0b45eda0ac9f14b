"""The exit distribution and Ouro's two training objectives (REFERENCE sections 2-3).

Everything here is computed in float32 from gate logits `g_t` (lambda_t = sigmoid(g_t)) in log
space, so extreme gates neither overflow nor round the CDF to 1 early.
"""

import torch
import torch.nn.functional as F


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 for bf16/fp16/fp32 inputs; float64 stays float64 (reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log_exit_probs(gate_logits: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
    """log p_t for the loops given in the last dim, out of a total of `n_loops` (default: all).

    p_t = lambda_t * prod_{j<t} (1 - lambda_j) for t < T, and p_T = prod_{j<T} (1 - lambda_j):
    the last loop takes the remaining mass, so the T probabilities sum to 1 exactly. Loop t's
    probability needs only gates 1..t, which lets a sampled-step estimator stop at loop t.
    """
    g = at_least_float32(gate_logits)
    n = g.shape[-1]
    T = n if n_loops is None else n_loops
    if n > T:
        raise ValueError(f"got gate logits for {n} loops but n_loops={T}")
    log_exit, log_stay = F.logsigmoid(g), F.logsigmoid(-g)
    # sum_{j<t} log(1 - lambda_j) as an exclusive cumulative sum: subtracting log_stay back out of
    # an inclusive one loses the small terms next to a saturated gate (g = 1e4: 1e-4 of the mass)
    survive_before = torch.cat([torch.zeros_like(log_stay[..., :1]),
                                torch.cumsum(log_stay[..., :-1], dim=-1)], dim=-1)
    log_p = log_exit + survive_before
    if n == T:
        log_p = torch.cat([log_p[..., :-1], survive_before[..., -1:]], dim=-1)
    # a saturated gate can drive the survival sum to -inf; keep it finite so p log p is 0, not NaN
    return log_p.clamp_min(torch.finfo(log_p.dtype).min)


def exit_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    return log_exit_probs(gate_logits).exp()


def exit_cdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """CDF(n) = 1 - prod_{j<=n} (1 - lambda_j) for n < T, and CDF(T) = 1."""
    cdf = -torch.expm1(torch.cumsum(F.logsigmoid(-at_least_float32(gate_logits)), dim=-1))
    cdf[..., -1] = 1.0
    return cdf


def q_exit_loop(gate_logits: torch.Tensor, q: float) -> torch.Tensor:
    """Ouro's Q-exit: the first loop n (1-based) with CDF(n) >= q, per token."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q={q} must be in [0, 1]")
    reached = exit_cdf(gate_logits) >= q
    return reached.float().argmax(dim=-1) + 1


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).sum(-1)


def neg_entropy_terms(log_p: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
    """Per-loop p_t log p_t: they sum to -H(p), Ouro's uniform-prior penalty."""
    return log_p.exp() * log_p


def stage1_loss(ce: torch.Tensor, gate_logits: torch.Tensor, mask: torch.Tensor, beta: float,
                prior_terms=neg_entropy_terms):
    """Ouro Stage I: token mean of `sum_t p_t CE_t - beta * H(p)`.

    ce, gate_logits: (B, S, T); mask: (B, S) true where a target exists. `prior_terms(log_p, T)`
    swaps the uniform prior for another (variants.priors). Returns the loss and log p.
    """
    T = gate_logits.shape[-1]
    log_p = log_exit_probs(gate_logits)
    per_token = (log_p.exp() * at_least_float32(ce)).sum(-1) + beta * prior_terms(log_p, T).sum(-1)
    return token_mean(per_token, mask), log_p


def stage2_loss(ce: torch.Tensor, gate_logits: torch.Tensor, mask: torch.Tensor,
                k: float = 50.0, gamma: float = 0.005):
    """Ouro Stage II: train the gate to exit once the loss stops improving.

    I_t = max(0, CE_{t-1} - CE_t) (detached), continue-target w_t = sigmoid(k (I_t - gamma)),
    L_t = -mean_tokens[w_t log(1 - lambda_t) + (1 - w_t) log lambda_t], L = sum_{t>=2} L_t / T.
    """
    T = ce.shape[-1]  # T = 1 has no pair of loops to compare: the empty sum, 0
    ce = at_least_float32(ce.detach())
    improvement = (ce[..., :-1] - ce[..., 1:]).clamp_min(0)
    x = k * (improvement - gamma)
    w_continue, w_exit = torch.sigmoid(x), torch.sigmoid(-x)  # not 1 - w: no cancellation near 1
    g = at_least_float32(gate_logits[..., 1:])
    bce = -(w_continue * F.logsigmoid(-g) + w_exit * F.logsigmoid(g))  # (B, S, T-1)
    return token_mean(bce.sum(-1), mask) / T


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is true; per_token is (B, S)."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)

