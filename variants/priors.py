"""Exit priors beyond Ouro's uniform one (EXIT_PRIORS).

    GeometricPrior(beta, lambda_p)   beta * KL(p || pi), pi the truncated geometric (PonderNet)
    NoPrior()                        no penalty (beta = 0), e.g. for Stage II gate training

A prior contributes `beta * sum_t loop_terms(log_p, T)[..., t]` per token. The terms here are the
explicit *forward* KL, `p_t (log p_t - log pi_t)`: one public PonderNet implementation computes
`KL(pi || p)` by passing its arguments to `kl_div` the wrong way round; this one does not.

With pi uniform the KL reduces exactly to Ouro's penalty: `sum_t p_t log p_t + log T = -H(p) +
log T`, i.e. `looplm.recipe.UniformPrior` up to the constant `log T` (tests check both).
"""

import math

import torch

from looplm.config import is_number
from looplm.hooks import EXIT_PRIORS, ExitPrior


def geometric_log_prior(lambda_p: float, n_loops: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """log pi_t, t = 1..n_loops, for `pi_t ∝ lambda_p (1 - lambda_p)^(t-1)` truncated to n_loops
    steps and renormalised (in float64, then cast)."""
    if not (is_number(lambda_p) and 0.0 < lambda_p < 1.0):
        raise ValueError(f"lambda_p={lambda_p!r} must be a number in (0, 1)")
    t = torch.arange(n_loops, dtype=torch.float64, device=device)
    log_unnorm = math.log(lambda_p) + t * math.log1p(-lambda_p)
    return (log_unnorm - torch.logsumexp(log_unnorm, 0)).to(dtype)


def kl_terms(log_p: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """Per-loop terms `p_t (log p_t - log pi_t)` of KL(p || pi); log_pi broadcasts over the
    leading dims and may be longer than log_p (a prefix of loops uses the first entries)."""
    n = log_p.shape[-1]
    return log_p.exp() * (log_p - log_pi[..., :n].to(log_p.dtype))


@EXIT_PRIORS.register("geometric")
class GeometricPrior(ExitPrior):
    """PonderNet's prior: `beta * KL(p || pi)`, pi the geometric distribution with success
    probability lambda_p, truncated to the step's T loops and renormalised.

    `loop_terms(log_p, T)` accepts log p for a prefix of the T loops (a sampled-step estimator
    reads loop t only): the terms always use the full-T pi, so each term is the one of the full
    sum. Ouro's ablation found the uniform prior better than lambda_p in 0.1..0.9."""

    properties = frozenset({"stateless"})

    def __init__(self, beta: float = 0.1, lambda_p: float = 0.5):
        if not (is_number(beta) and beta >= 0):
            raise ValueError(f"GeometricPrior.beta={beta!r} must be a finite number >= 0")
        if not (is_number(lambda_p) and 0.0 < lambda_p < 1.0):
            raise ValueError(f"GeometricPrior.lambda_p={lambda_p!r} must be a number in (0, 1) (the per-loop "
                             "exit probability of the geometric prior)")
        self.beta, self.lambda_p = beta, lambda_p

    def loop_terms(self, log_p, n_loops):
        if log_p.shape[-1] > n_loops:
            raise ValueError(f"log_p holds {log_p.shape[-1]} loops but n_loops={n_loops}")
        log_pi = geometric_log_prior(self.lambda_p, n_loops, log_p.dtype, log_p.device)
        return kl_terms(log_p, log_pi)

    def describe(self):
        return f"GeometricPrior(beta={self.beta}, lambda_p={self.lambda_p})"


@EXIT_PRIORS.register("none")
class NoPrior(ExitPrior):
    """No exit prior: beta = 0 and zero terms."""

    properties = frozenset({"stateless"})

    beta = 0.0

    def loop_terms(self, log_p, n_loops):
        return torch.zeros_like(log_p)
