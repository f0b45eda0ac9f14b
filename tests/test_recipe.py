"""looplm.recipe: the training step a recipe defines, against the objective written out by hand
(plain logits + F.cross_entropy, gates as Linear(h), the float64 references of tests/reference.py)."""

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from looplm.config import model_config
from looplm.data.batch import Batch
from looplm.hooks import ExitPrior, Regularizer
from looplm.model import LoopLM
from looplm.readout import IGNORE_INDEX
from looplm.recipe import ExitWeighted, FixedLoops, FullBackprop, GateTraining, Recipe, UniformPrior

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


class ZeroPrior(ExitPrior):
    """No exit prior (beta = 0): what Stage II needs."""

    beta = 0.0

    def loop_terms(self, log_p, n_loops):
        return torch.zeros_like(log_p)


class AddConstant(Regularizer):
    def apply(self, loss, model, traj, batch, step, seed):
        return loss + 1.0, {"const": 1.0}


def make_model(seed=0):
    torch.manual_seed(seed)
    model = LoopLM(model_config("tiny", vocab_size=40)).double()
    with torch.no_grad():
        model.gate.bias.fill_(-0.4)
        model.gate.weight.mul_(20)  # spread-out gates, so p_t differ across tokens and loops
    return model


def make_batch(V=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 10), generator=g)
    targets = torch.randint(0, V, (2, 10), generator=g)
    targets[0, :3] = IGNORE_INDEX
    targets[1, 6] = IGNORE_INDEX
    doc_ids = torch.tensor([[0] * 5 + [1] * 5, [0] * 10])
    return Batch(ids, targets, doc_ids)


def by_hand(model, batch, T):
    """Per-loop CE (B, S, T) from plain logits and gate logits (B, S, T) from Linear(h)."""
    traj = model(batch.input_ids, n_loops=T, doc_ids=batch.doc_ids)
    ce = torch.stack([F.cross_entropy(model.logits(h).transpose(1, 2), batch.targets, reduction="none",
                                      ignore_index=IGNORE_INDEX) for h in traj.states], -1)
    gates = torch.stack([(h @ model.gate.weight.T).squeeze(-1) + model.gate.bias for h in traj.states], -1)
    return ce, gates, batch.targets != IGNORE_INDEX


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


@pytest.mark.parametrize("readout", ["fused", "recompute"])
def test_default_recipe_is_stage1_with_uniform_prior(readout):
    model, batch = make_model(), make_batch()
    recipe = Recipe() if readout == "fused" else Recipe(estimator=ExitWeighted(readout=readout))
    assert isinstance(recipe.estimator, ExitWeighted) and recipe.prior.beta == 0.1
    loss, metrics = recipe.loss(model, batch, step=0)
    loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    ce, gates, mask = by_hand(model, batch, model.cfg.n_loops)
    want = ref.stage1(ce, gates, mask, beta=0.1)
    want.backward()
    torch.testing.assert_close(loss, want, **TIGHT)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, **TIGHT, msg=lambda m, name=name: f"{name}: {m}")
    # the per-loop metrics are the masked means of the same CE
    want_ce = [ce[..., t][mask].mean().item() for t in range(model.cfg.n_loops)]
    assert metrics["ce"] == pytest.approx(want_ce, rel=1e-9)
    assert sum(metrics["exit_p"]) == pytest.approx(1.0, abs=1e-9)
    assert metrics["n_loops"] == model.cfg.n_loops


def test_gradient_reaches_every_parameter():
    model, batch = make_model(), make_batch()
    loss, _ = Recipe().loss(model, batch, step=0)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_loss_without_grad_equals_loss_with_grad():
    model, batch = make_model(), make_batch()
    with_grad, _ = Recipe().loss(model, batch, step=0)
    with torch.no_grad():
        without, _ = Recipe().loss(model, batch, step=0)
    torch.testing.assert_close(with_grad.detach(), without, **TIGHT)


def test_fixed_loops_beyond_the_configured_depth():
    model, batch = make_model(), make_batch()
    T = model.cfg.n_loops + 2
    loss, metrics = Recipe(loop_count=FixedLoops(T)).loss(model, batch, step=0)
    ce, gates, mask = by_hand(model, batch, T)
    assert metrics["n_loops"] == T and len(metrics["ce"]) == T
    torch.testing.assert_close(loss, ref.stage1(ce, gates, mask, beta=0.1), **TIGHT)


def test_stage2_trains_only_the_gate():
    model, batch = make_model(), make_batch()
    recipe = Recipe(estimator=GateTraining(), prior=ZeroPrior())
    loss, _ = recipe.loss(model, batch, step=0)
    loss.backward()
    gate_params = {id(p) for p in model.gate.parameters()}
    for name, p in model.named_parameters():
        if id(p) in gate_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name
    trainable = recipe.trainable_parameters(model)
    assert [id(p) for p in trainable] == [id(p) for p in model.gate.parameters()]
    # the value is Ouro's Stage II formula on the frozen model's losses and gates
    got_gate_grads = [p.grad.clone() for p in model.gate.parameters()]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ce, _, mask = by_hand(model, batch, model.cfg.n_loops)
        states = model(batch.input_ids, doc_ids=batch.doc_ids).states
    gates = torch.stack([(h @ model.gate.weight.T).squeeze(-1) + model.gate.bias for h in states], -1)
    want = ref.stage2(ce, gates, mask, k=50.0, gamma=0.005)
    want.backward()
    torch.testing.assert_close(loss, want, **TIGHT)
    for got, p in zip(got_gate_grads, model.gate.parameters()):
        torch.testing.assert_close(got, p.grad, **TIGHT)


def test_stage2_with_an_active_prior_is_rejected():
    with pytest.raises(ValueError, match="prior"):
        Recipe(estimator=GateTraining())  # default uniform prior, beta 0.1
    with pytest.raises(ValueError, match="prior"):
        Recipe(estimator=GateTraining(), prior=UniformPrior(beta=0.05))
    with pytest.raises(ValueError, match="regularizers"):
        Recipe(estimator=GateTraining(), prior=ZeroPrior(), regularizers=[AddConstant()])
    Recipe(estimator=GateTraining(), prior=UniformPrior(beta=0.0))  # beta 0 is allowed


@pytest.mark.parametrize("field,wrong", [("loop_count", FullBackprop()), ("window", FixedLoops()),
                                         ("estimator", UniformPrior()), ("prior", ExitWeighted())])
def test_wrong_type_for_a_family_names_it(field, wrong):
    with pytest.raises(ValueError, match=f"Recipe.{field}"):
        Recipe(**{field: wrong})


def test_wrong_regularizer_type_names_it():
    with pytest.raises(ValueError, match="Recipe.regularizer0"):
        Recipe(regularizers=[FixedLoops()])


def test_invalid_plugin_arguments_raise():
    with pytest.raises(ValueError):
        FixedLoops(0)
    with pytest.raises(ValueError):
        UniformPrior(beta=-0.1)


def test_regularizer_is_applied():
    model, batch = make_model(), make_batch()
    base, _ = Recipe().loss(model, batch, step=0)
    with_reg, metrics = Recipe(regularizers=[AddConstant()]).loss(model, batch, step=0)
    torch.testing.assert_close(with_reg, base + 1.0, **TIGHT)
    assert metrics["const"] == 1.0
