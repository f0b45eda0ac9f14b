"""Gradient statistics of the sampled-step estimators, exact over the draw (no sampling noise).

    OMP_NUM_THREADS=1 python sweeps/results/sampled_step/gradients.py [CHECKPOINT ...]

For one training batch of the 2-digit addition task and a model (random init, or a checkpoint
of a run), every per-batch draw t = 1..T is enumerated: g_t is the estimator's gradient given t,
with probability q_t. Reported per estimator, split into the exit gate's parameters and the body
(everything else): the bias |E g - G| / |G| against the full-unroll gradient G, the relative
variance E|g - E g|^2 / |G|^2, the mean gradient norm (train.grad_clip = 1 scales every
coordinate of a larger one down), and per draw the gradient on the gate's bias (its sign says
which way that draw moves lambda).
"""

import sys

import torch

from looplm.config import model_config
from looplm.data.addition import AdditionTask
from looplm.hooks import Plan, Readouts
from looplm.model import LoopLM
from looplm.recipe import ExitWeighted, Recipe, UniformPrior
from variants.priors import NoPrior
from variants.sampled_step import SampledStep

T = 4
ESTIMATORS = {
    "plain (p_t/q_t CE_t)": (SampledStep(), UniformPrior(0.1)),
    "baseline CE_1": (SampledStep(baseline="first_loop"), UniformPrior(0.1)),
    "loops 1..t (RB)": (SampledStep(readout="run"), UniformPrior(0.1)),
    "loops 1..t + baseline": (SampledStep(readout="run", baseline="first_loop"), UniformPrior(0.1)),
    "detached p (LM term only)": (SampledStep(exit_weights="detached"), NoPrior()),
    "uniform 1/T (diffusion)": (SampledStep(exit_weights="uniform"), NoPrior()),
}


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    flat = {n: (torch.zeros_like(p) if p.grad is None else p.grad).flatten().double()
            for n, p in model.named_parameters()}
    gate = torch.cat([g for n, g in flat.items() if n.startswith("gate.")])
    body = torch.cat([g for n, g in flat.items() if not n.startswith("gate.")])
    return gate, body, float(flat["gate.bias"][0])


def estimator_grads(model, batch, est, prior):
    q = est.proposal.probs(T, 0)
    out = []
    for t in range(1, T + 1):
        plan = Plan(T, t, 1, tuple(range(1, t + 1)), {"q": q, "seed": 0, "step": 0, "t": t})
        traj = model(batch.input_ids, n_loops=t, keep=plan.readout)
        loss, _ = est.loss(Readouts(model, traj, batch, T), plan, prior)
        out.append((float(q[t - 1]), *grads(model, loss)))
    return out


def report(model, batch, label):
    full, _ = Recipe(estimator=ExitWeighted(), prior=UniformPrior(0.1)).loss(model, batch, 0)
    G_gate, G_body, G_bias = grads(model, full)
    print(f"\n## {label}: full unroll |G| gate {G_gate.norm():.3g} body {G_body.norm():.3g}, "
          f"gate-bias grad {G_bias:+.3g}")
    print("| estimator | gate bias | gate rel. var | body bias | body rel. var | mean |g| | "
          "gate-bias grad per draw t=1..4 |\n|---|---|---|---|---|---|---|")
    for name, (est, prior) in ESTIMATORS.items():
        draws = estimator_grads(model, batch, est, prior)
        row = []
        for k, G in ((1, G_gate), (2, G_body)):
            mean = sum(d[0] * d[k] for d in draws)
            var = sum(d[0] * (d[k] - mean).pow(2).sum() for d in draws)
            row += [f"{(mean - G).norm() / G.norm():.2f}", f"{var / G.norm() ** 2:.3g}"]
        norm = sum(d[0] * torch.cat([d[1], d[2]]).norm() for d in draws)
        print(f"| {name} | {' | '.join(row)} | {norm:.3g} | {' '.join(f'{d[3]:+.2g}' for d in draws)} |")


def main(paths):
    torch.manual_seed(0)
    task = AdditionTask(n_digits=2, reverse_operands=True)
    cfg = model_config("tiny", d_model=128, n_layers=2, n_heads=4, d_ff=344, n_loops=T,
                       vocab_size=task.vocab_size)
    batch = task.train_batch(0, 64)
    model = LoopLM(cfg).double()
    report(model, batch, "random init")
    for path in paths:
        model.load_state_dict(torch.load(path, weights_only=False)["model"])
        report(model.double(), batch, path)


if __name__ == "__main__":
    main(sys.argv[1:])
