"""Loss weightings w_t for the sampled-step loss (WEIGHTINGS; variants.sampled_step).

**A weighting changes the objective.** With Min-SNR weights the expectation is
`sum_t w_t p_t CE_t + beta * prior`: by design no longer the plain Stage I loss (it reweights
the loops, like Min-SNR-gamma does for diffusion time steps). Only `NoWeighting` is unbiased for
Stage I. Stateful weightings learn from `observe(loop, ce)`, called once per optimizer step.
"""

import math

import torch

from looplm.hooks import Plugin
from looplm.registry import Registry

WEIGHTINGS = Registry("step weighting")


class Weighting(Plugin):
    def weights(self, q: torch.Tensor, n_loops: int) -> torch.Tensor:
        """w_t for t = 1..n_loops (float64), normalised so that sum_t q_t w_t = 1."""
        raise NotImplementedError

    def observe(self, loop: int, ce: float) -> None:
        """The detached token-mean CE of a sampled loop over one optimizer step (after its weight
        was used)."""


@WEIGHTINGS.register("none")
class NoWeighting(Weighting):
    """w_t = 1: the estimator is unbiased for the Stage I loss."""

    def weights(self, q, n_loops):
        return torch.ones(n_loops, dtype=torch.float64)


@WEIGHTINGS.register("min_snr")
class MinSNRWeighting(Weighting):
    """Min-SNR-gamma (Hang et al. 2023) mapped to loops; looplm's own definition (REFERENCE 5):

        snr="ema":      SNR_t = 1 / ema(CE_t)   (EMA of loop t's detached token-mean CE, nats)
        snr="schedule": SNR_t = s0 * t          (deeper loops are cleaner)
        raw_t = min(SNR_t, gamma) / SNR_t,  w_t = raw_t / sum_t' q_t' raw_t'  (so E_q[w] = 1)

    The EMA of a loop starts at its first observed CE and is updated, `ema <- d*ema + (1-d)*CE`,
    only when that loop is sampled, after its weight was used. A loop not yet observed has no SNR
    and gets raw weight 1 (uncapped). The EMAs are saved in state_dict. The weighted loss is by
    design no longer the plain Stage I objective."""

    def __init__(self, gamma: float = 5.0, snr: str = "ema", s0: float = 1.0, ema_decay: float = 0.99):
        if not gamma > 0:
            raise ValueError(f"MinSNRWeighting.gamma={gamma} must be > 0")
        if snr not in ("ema", "schedule"):
            raise ValueError(f"MinSNRWeighting.snr={snr!r}; choose 'ema' (1/EMA of each loop's CE) or "
                             "'schedule' (s0 * t)")
        if not s0 > 0:
            raise ValueError(f"MinSNRWeighting.s0={s0} must be > 0")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"MinSNRWeighting.ema_decay={ema_decay} must be in [0, 1)")
        self.gamma, self.snr, self.s0, self.ema_decay = float(gamma), snr, float(s0), float(ema_decay)
        self.ema: dict[int, float] = {}

    def snr_values(self, n_loops: int) -> list:
        """SNR_t for t = 1..n_loops (None where a loop's EMA has no observation yet)."""
        if self.snr == "schedule":
            return [self.s0 * t for t in range(1, n_loops + 1)]
        return [1.0 / max(self.ema[t], 1e-12) if t in self.ema else None for t in range(1, n_loops + 1)]

    def weights(self, q, n_loops):
        raw = torch.tensor([1.0 if s is None else min(s, self.gamma) / s for s in self.snr_values(n_loops)],
                           dtype=torch.float64)
        return raw / (q.to(torch.float64) * raw).sum()

    def observe(self, loop, ce):
        if self.snr != "ema":
            return
        ce = float(ce)
        if not math.isfinite(ce):
            return
        old = self.ema.get(loop)
        self.ema[loop] = ce if old is None else self.ema_decay * old + (1 - self.ema_decay) * ce

    def state_dict(self):
        return {"ema": dict(self.ema)} if self.snr == "ema" else {}

    def load_state_dict(self, state):
        self.ema = {int(k): float(v) for k, v in state.get("ema", {}).items()}

    def describe(self):
        return f"MinSNRWeighting(gamma={self.gamma}, snr={self.snr!r})"
