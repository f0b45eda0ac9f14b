"""variants.truncated: the last-k-loops backprop window, checked against loops run by hand."""

import pytest
import torch
import torch.nn.functional as F

from looplm.config import model_config
from looplm.data.batch import IGNORE_INDEX, Batch
from looplm.model import LoopLM
from looplm.recipe import ExitWeighted, FixedLoops, FullBackprop, Recipe, UniformPrior
from variants.truncated import LastLoops, RampedLastLoops


def tiny(**overrides):
    torch.manual_seed(0)
    return LoopLM(model_config("tiny", **overrides))


def batch(B=2, S=12, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    targets = torch.randint(0, vocab, (B, S), generator=g)
    targets[:, :3] = IGNORE_INDEX
    return Batch(ids, targets)


def hand_loss(model, b, T, k, beta=0.1):
    """Loops 1..T-k under no_grad, the rest with grad from the detached state; Stage I loss
    with CE from F.cross_entropy and p_t from the survival product written out."""
    ctx = model.context(b.input_ids.shape[1])
    x = model.embed(b.input_ids)
    for layer in model.prelude:
        x = layer(x, ctx.rope, ctx.mask)
    states = []
    for t in range(1, T + 1):
        if t <= T - k:
            with torch.no_grad():
                x, _ = model.recurrence(x, ctx, t - 1)
        else:
            x, _ = model.recurrence(x.detach() if t == T - k + 1 > 1 else x, ctx, t - 1)
        states.append(x)
    mask = b.targets != IGNORE_INDEX
    ce = torch.stack([F.cross_entropy(model.lm_head(h).transpose(1, 2), b.targets,
                                      ignore_index=IGNORE_INDEX, reduction="none") for h in states], -1)
    lam = torch.stack([torch.sigmoid(model.gate(h).squeeze(-1)) for h in states], -1).double()
    p, stay = [], torch.ones_like(lam[..., 0])
    for t in range(T):
        p.append(stay * lam[..., t] if t < T - 1 else stay)
        stay = stay * (1 - lam[..., t])
    p = torch.stack(p, -1)
    per_token = (p * ce.double()).sum(-1) + beta * (p * p.log()).sum(-1)
    return (per_token * mask).sum() / mask.sum()


def grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("T,k", [(4, 1), (4, 3), (3, 3), (1, 1)])
def test_gradient_equals_hand_truncated_unroll(T, k):
    model, b = tiny(), batch()
    recipe = Recipe(loop_count=FixedLoops(T), window=LastLoops(k), estimator=ExitWeighted(),
                    prior=UniformPrior(0.1))
    loss, _ = recipe.loss(model, b, step=0)
    loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    ref = hand_loss(model, b, T, k)
    ref.backward()
    want = grads(model)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for name in want:
        if want[name] is None:
            assert got[name] is None or not got[name].any(), name  # T=1: the gate is unused
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_gradient_through_no_grad_loops():
    """Embedding and prelude sit before loop 1: with loop 1 under no_grad they get none."""
    model, b = tiny(n_prelude=1), batch()
    recipe = Recipe(loop_count=FixedLoops(4), window=LastLoops(1))
    recipe.loss(model, b, step=0)[0].backward()
    assert model.embed.weight.grad is None
    assert all(p.grad is None for p in model.prelude.parameters())
    assert all(p.grad is not None for p in model.layers.parameters())
    # and the full window does train them
    model.zero_grad(set_to_none=True)
    Recipe(loop_count=FixedLoops(4), window=LastLoops(4)).loss(model, b, step=0)[0].backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while fn runs."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_memory_does_not_grow_with_loops():
    model, b = tiny(), batch(B=2, S=16)

    def run(T, window):
        recipe = Recipe(loop_count=FixedLoops(T), window=window)
        return saved_bytes(lambda: recipe.loss(model, b, step=0))

    one, eight = run(1, LastLoops(1)), run(8, LastLoops(1))
    # the exit-weighted loss still reads out every loop (detached states), hence a little growth
    assert eight <= 1.15 * one, (one, eight)
    assert run(8, FullBackprop()) > 5 * one  # the window is what keeps it flat


def test_first_grad_loop_and_ramp():
    assert LastLoops(1).first_grad_loop(0, 4) == 4
    assert LastLoops(8).first_grad_loop(0, 4) == 1
    assert LastLoops(8).first_grad_loop(0, 32) == 25
    ramp = RampedLastLoops(k_start=1, k_end=5, ramp_steps=100)
    assert [ramp.k(s) for s in (0, 25, 50, 100, 10_000)] == [1, 2, 3, 5, 5]
    assert ramp.first_grad_loop(0, 8) == 8 and ramp.first_grad_loop(100, 8) == 4
    assert RampedLastLoops(4, 1, 3).k(3) == 1  # shrinking windows are allowed


@pytest.mark.parametrize("make", [lambda: LastLoops(0), lambda: LastLoops(1.5),
                                  lambda: RampedLastLoops(0, 2, 10), lambda: RampedLastLoops(1, 2, 0)])
def test_bad_arguments(make):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        make()
