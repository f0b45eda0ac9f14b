"""looplm.readout: the fused chunked LM head + cross-entropy against plain F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from looplm.config import model_config
from looplm.model import LoopLM
from looplm.readout import IGNORE_INDEX, linear_cross_entropy

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def problem(N=37, d=12, V=23, n_ignored=6, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype)
    w = torch.randn(V, d, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = IGNORE_INDEX
    upstream = torch.randn(N, generator=g, dtype=dtype)  # a non-uniform incoming gradient
    return h, w, targets, upstream


def plain(h, w, targets):
    return F.cross_entropy(h @ w.T, targets, reduction="none", ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk_size", [1, 8, 36, 37, 100, None])
def test_value_and_gradients_equal_plain_cross_entropy(chunk_size):
    """37 tokens: chunks of 8 leave a ragged last chunk, 1 is one token at a time, 100 > N."""
    h, w, targets, upstream = problem()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ce, correct = linear_cross_entropy(h1, w1, targets, chunk_size=chunk_size)
    (ce * upstream).sum().backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = plain(h2, w2, targets)
    (want * upstream).sum().backward()
    assert ce.dtype == F64 and ce.shape == targets.shape
    torch.testing.assert_close(ce, want, **TIGHT)
    torch.testing.assert_close(h1.grad, h2.grad, **TIGHT)
    torch.testing.assert_close(w1.grad, w2.grad, **TIGHT)
    ignored = targets == IGNORE_INDEX
    assert (ce[ignored] == 0).all() and (h1.grad[ignored] == 0).all()


def test_correct_is_argmax_on_valid_positions_only():
    h, w, targets, _ = problem(N=50, V=5, n_ignored=10)  # small vocabulary: many hits
    logits = h @ w.T
    _, correct = linear_cross_entropy(h, w, targets, chunk_size=7)
    valid = targets != IGNORE_INDEX
    want = (logits.argmax(-1) == targets) & valid
    assert correct.dtype == torch.bool
    assert torch.equal(correct, want)
    assert 0 < int(correct.sum()) < int(valid.sum())
    # IGNORE_INDEX positions whose argmax is 0 (the safe stand-in target) are still not correct
    assert (logits.argmax(-1)[~valid] == 0).any()
    assert not correct[~valid].any()


def test_batched_shapes_and_partial_requires_grad():
    h, w, targets, upstream = problem(N=24)
    h3, t3, u3 = h.view(2, 12, -1), targets.view(2, 12), upstream.view(2, 12)
    # only the weight needs a gradient
    w1 = w.clone().requires_grad_()
    ce, correct = linear_cross_entropy(h3, w1, t3, chunk_size=5)
    assert ce.shape == correct.shape == (2, 12)
    (ce * u3).sum().backward()
    w2 = w.clone().requires_grad_()
    (plain(h, w2, targets) * upstream).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, **TIGHT)
    # only the hidden states need one
    h1 = h3.clone().requires_grad_()
    ce, _ = linear_cross_entropy(h1, w, t3, chunk_size=5)
    (ce * u3).sum().backward()
    h2 = h.clone().requires_grad_()
    (plain(h2, w, targets) * upstream).sum().backward()
    torch.testing.assert_close(h1.grad.view(24, -1), h2.grad, **TIGHT)


def test_gradcheck():
    h, w, targets, _ = problem(N=7, d=4, V=5, n_ignored=2)
    h.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, targets, chunk_size=3)[0],
                                    (h, w), eps=1e-6, atol=1e-8)


def test_large_logits_stay_finite():
    """Logits of +-1e4: log-sum-exp, not exp then log."""
    h, w, targets, _ = problem(N=9, n_ignored=0)
    h = h * 300.0
    ce, _ = linear_cross_entropy(h, w, targets, chunk_size=4)
    assert torch.isfinite(ce).all()
    torch.testing.assert_close(ce, plain(h, w, targets), rtol=1e-10, atol=1e-8)


def test_float32_agrees_with_float64():
    h, w, targets, upstream = problem(dtype=torch.float32)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ce, _ = linear_cross_entropy(h1, w1, targets, chunk_size=8)
    (ce * upstream).sum().backward()
    assert ce.dtype == torch.float32 and h1.grad.dtype == w1.grad.dtype == torch.float32
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    (plain(h2, w2, targets) * upstream.double()).sum().backward()
    torch.testing.assert_close(ce.double(), plain(h.double(), w.double(), targets), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_bf16_logits():
    """Under autocast the matmul runs in bf16 while the log-sum-exp stays in float32."""
    h, w, targets, _ = problem(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, _ = linear_cross_entropy(h, w, targets, chunk_size=8)
    assert ce.dtype == torch.float32
    want = F.cross_entropy((h.bfloat16() @ w.bfloat16().T).float(), targets, reduction="none")
    torch.testing.assert_close(ce, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_chunk_size_raises(bad):
    h, w, targets, _ = problem(N=5)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, targets, chunk_size=bad)


def test_model_token_loss_equals_plain_logits():
    torch.manual_seed(0)
    model = LoopLM(model_config("tiny")).double()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    targets = ids.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    state = model(ids, n_loops=1).states[0]
    ce, _ = model.token_loss(state, targets, chunk_size=4)
    want = F.cross_entropy(model.logits(state).transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(ce, want, **TIGHT)
    ce.sum().backward()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad()
    state = model(ids, n_loops=1).states[0]
    F.cross_entropy(model.logits(state).transpose(1, 2), targets, reduction="none").sum().backward()
    torch.testing.assert_close(got, model.lm_head.weight.grad, **TIGHT)
