"""The forward-gradient read-out (no logit recompute) against plain autograd, in float64."""

import pytest
import torch
import torch.nn.functional as F

from looplm.config import model_config
from looplm.data import Batch
from looplm.model import LoopLM
from looplm.readout import IGNORE_INDEX, weighted_cross_entropy
from looplm.recipe import ExitWeighted, Recipe


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_weighted_cross_entropy_matches_autograd(chunk):
    g = torch.Generator().manual_seed(chunk)
    V, d = 23, 6
    W = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(3, 7, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    targets = torch.randint(0, V, (3, 7), generator=g)
    targets[1, 2:5] = IGNORE_INDEX
    coeffs = [torch.rand(3, 7, generator=g, dtype=torch.float64) for _ in range(2)]

    ces, corrects, carrier = weighted_cross_entropy(states, W, targets, coeffs, chunk_size=chunk)
    carrier.backward()
    fused = [W.grad.clone()] + [h.grad.clone() for h in states]

    W.grad = None
    for h in states:
        h.grad = None
    ref = 0.0
    for h, c, ce, correct in zip(states, coeffs, ces, corrects):
        logits = h @ W.T
        ref_ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none",
                                 ignore_index=IGNORE_INDEX).view_as(targets)
        torch.testing.assert_close(ce, ref_ce.detach(), rtol=0, atol=1e-12)
        valid = targets != IGNORE_INDEX
        assert torch.equal(correct, (logits.argmax(-1) == targets) & valid)
        ref = ref + (c * ref_ce).sum()
    ref.backward()
    assert carrier.item() == 0.0
    for got, want in zip(fused, [W.grad] + [h.grad for h in states]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_exit_weighted_fused_and_recompute_give_the_same_loss_and_gradient():
    torch.manual_seed(0)
    model = LoopLM(model_config("tiny", vocab_size=50)).double()
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = IGNORE_INDEX
    batch = Batch(torch.randint(0, 50, (3, 11)), targets)
    results = []
    for mode in ("fused", "recompute"):
        model.zero_grad()
        loss, _ = Recipe(estimator=ExitWeighted(readout=mode)).loss(model, batch, 0)
        (0.37 * loss).backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_f, grads_f), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-14, atol=0)
    for a, b in zip(grads_f, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_exit_weighted_rejects_unknown_readout():
    with pytest.raises(ValueError, match="readout='fast'"):
        ExitWeighted(readout="fast")
