"""The exit gate trained apart from the LM term in a sampled step: Ouro's Stage II target from
the loops that ran (SampledStep gate_target="stage2").

When loop t was drawn, loops 1..t ran and were read out, so the improvements
I_s = max(0, CE_{s-1} - CE_s) of s = 2..t are known. Each pair's BCE term (REFERENCE 3, Stage II)
is importance-weighted by 1 / Q_s = 1 / P(t >= s), so its expectation over t ~ q is Ouro's
Stage II loss over all T loops. The gate reads its inputs detached: this term trains the gate
only, as Stage II does with the LM frozen, while the LM term trains the body.
"""

import torch
import torch.nn.functional as F

from looplm.objectives import token_mean

STAGE2_K, STAGE2_GAMMA = 50.0, 0.005  # Ouro's sharpness and improvement threshold


def stage2_gate_term(ro, ce: torch.Tensor, ratio: torch.Tensor, run: int, n_loops: int) -> torch.Tensor:
    """Token mean of `sum_{s=2..run} ratio_s BCE_s / T`; ce (B, S, run) holds loops 1..run
    (detached), ratio (B, 1, run) the importance ratios 1{t >= s} / Q_s of those loops."""
    if run < 2:
        return ce.new_zeros(())
    g = torch.stack([ro.model.exit_logits(ro.traj.gate_inputs[s].detach()) for s in range(1, run)], -1)
    x = STAGE2_K * ((ce[..., :-1] - ce[..., 1:]).clamp_min(0) - STAGE2_GAMMA)
    bce = -(torch.sigmoid(x) * F.logsigmoid(-g) + torch.sigmoid(-x) * F.logsigmoid(g))  # (B, S, run - 1)
    return token_mean((ratio[..., 1:] * bce).sum(-1), ro.mask) / n_loops
