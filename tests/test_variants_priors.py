"""variants.priors: the geometric prior's KL against an independent float64 formula."""

import math

import pytest
import torch

from looplm.config import model_config
from looplm.data.batch import IGNORE_INDEX, Batch
from looplm.model import LoopLM
from looplm.objectives import log_exit_probs, stage1_loss
from looplm.recipe import FixedLoops, GateTraining, Recipe, UniformPrior
from variants.priors import GeometricPrior, NoPrior, geometric_log_prior, kl_terms


def random_log_p(shape=(3, 5), T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return log_exit_probs(3 * torch.randn(*shape, T, generator=g))


def reference_kl(p, lambda_p):
    """KL(p || pi) per token with plain float64 python, pi built by hand."""
    T = len(p)
    w = [lambda_p * (1 - lambda_p) ** t for t in range(T)]
    pi = [x / sum(w) for x in w]
    return sum(pt * (math.log(pt) - math.log(qt)) for pt, qt in zip(p, pi) if pt > 0)


@pytest.mark.parametrize("lambda_p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("T", [1, 2, 4, 7])
def test_geometric_kl_matches_float64_formula(lambda_p, T):
    log_p = random_log_p(T=T).double()
    got = GeometricPrior(beta=0.1, lambda_p=lambda_p).loop_terms(log_p, T).sum(-1)
    want = torch.tensor([[reference_kl(row.exp().tolist(), lambda_p) for row in tok] for tok in log_p],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got >= -1e-12).all()  # a KL, not its reverse with the sign slipped


def test_forward_not_reverse_kl():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    pi = geometric_log_prior(0.3, 3, torch.float64).exp()
    forward = (p * (p / pi).log()).sum()
    reverse = (pi * (pi / p).log()).sum()
    got = GeometricPrior(lambda_p=0.3).loop_terms(p.log(), 3).sum()
    torch.testing.assert_close(got, forward)
    assert not torch.isclose(got, reverse)


def test_prefix_terms_use_full_T_pi():
    log_p = random_log_p(T=5).double()
    prior = GeometricPrior(lambda_p=0.4)
    full = prior.loop_terms(log_p, 5)
    for t in range(1, 6):
        torch.testing.assert_close(prior.loop_terms(log_p[..., :t], 5), full[..., :t])


def test_uniform_pi_reduces_to_negative_entropy_plus_log_T():
    T = 6
    log_p = random_log_p(T=T).double()
    uniform = torch.full((T,), -math.log(T), dtype=torch.float64)
    kl_uniform = kl_terms(log_p, uniform).sum(-1)
    neg_h = (log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(kl_uniform, neg_h + math.log(T))
    # Ouro's UniformPrior terms are exactly that up to log T
    torch.testing.assert_close(UniformPrior().loop_terms(log_p, T).sum(-1) + math.log(T), kl_uniform)
    # and the geometric prior tends to the uniform one as lambda_p -> 0
    torch.testing.assert_close(GeometricPrior(lambda_p=1e-9).loop_terms(log_p, T).sum(-1), kl_uniform,
                               rtol=1e-6, atol=1e-7)


def test_geometric_log_prior_normalised_and_decreasing():
    pi = geometric_log_prior(0.3, 8, torch.float64).exp()
    torch.testing.assert_close(pi.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(pi[1:] / pi[:-1], torch.full((7,), 0.7, dtype=torch.float64))


def test_no_prior():
    log_p = random_log_p()
    assert NoPrior().beta == 0 and not NoPrior().loop_terms(log_p, 4).any()


def test_recipe_end_to_end_with_geometric_prior():
    torch.manual_seed(0)
    model = LoopLM(model_config("tiny"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    targets = torch.randint(0, 64, (2, 8), generator=g)
    targets[0, :2] = IGNORE_INDEX
    b = Batch(ids, targets)
    prior = GeometricPrior(beta=0.2, lambda_p=0.3)
    loss, metrics = Recipe(loop_count=FixedLoops(3), prior=prior).loss(model, b, 0)
    loss.backward()
    assert model.gate.weight.grad.abs().sum() > 0
    # the same loss from stage1_loss with the prior's terms
    with torch.no_grad():
        traj = model(ids, n_loops=3)
        ce = torch.stack([model.token_loss(h, targets)[0] for h in traj.states], -1)
        gates = torch.stack([model.exit_logits(h) for h in traj.states], -1)
        want, _ = stage1_loss(ce, gates, targets != IGNORE_INDEX, 0.2, prior.loop_terms)
    torch.testing.assert_close(loss.detach(), want)
    # NoPrior is what Stage II asks for
    Recipe(estimator=GateTraining(), prior=NoPrior())


@pytest.mark.parametrize("kwargs", [{"lambda_p": 0.0}, {"lambda_p": 1.0}, {"lambda_p": -0.5}, {"beta": -1.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must be"):
        GeometricPrior(**kwargs)
