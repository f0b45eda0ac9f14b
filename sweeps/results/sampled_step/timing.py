"""Seconds per training step of full unroll and sampled-step configurations, interleaved.

    OMP_NUM_THREADS=1 python sweeps/results/sampled_step/timing.py [STEPS] [ROUNDS]

On a shared CPU the wall time of whole runs measures the neighbours as much as the estimator,
so each configuration trains STEPS steps (default model and batch of gin/base.gin, 4-digit
addition) in turn, ROUNDS times, and the minimum per configuration of the process's CPU time
is reported: with one thread (OMP_NUM_THREADS=1) that is the step's uncontended wall time, and
a neighbour that takes the core away does not count (wall-clock minima did: a run next to three
others measured the sampled step at 144% of full unroll). The sampled step's time depends on the loops drawn, so
each round covers the same steps (the same draws) for every configuration.
"""

import sys
import time
from dataclasses import replace

import gin
import torch

from looplm.data import AdditionTask
from looplm.model import LoopLM
from looplm.optim import build_optimizer
from looplm.recipe import ExitWeighted, GateTraining, Recipe, UniformPrior
from looplm.run import parse_config
from variants.priors import NoPrior
from variants.sampled_step import SampledStep

CONFIGS = {
    "full unroll": lambda: Recipe(estimator=ExitWeighted(), prior=UniformPrior(0.1)),
    "sampled step, CE_1 baseline": lambda: Recipe(estimator=SampledStep(baseline="first_loop"),
                                                  prior=UniformPrior(0.1)),
    "sampled step, loops 1..t + CE_1 baseline": lambda: Recipe(
        estimator=SampledStep(readout="run", baseline="first_loop"), prior=UniformPrior(0.1)),
    "sampled step, fixed 1/T (diffusion)": lambda: Recipe(estimator=SampledStep(exit_weights="uniform"),
                                                          prior=NoPrior()),
    "Stage II (gin/stage2_gate.gin: LM frozen, gate only)": lambda: Recipe(estimator=GateTraining(),
                                                                           prior=NoPrior()),
}


def seconds(make_recipe, steps, task, cfg):
    torch.manual_seed(0)
    model = LoopLM(cfg)
    recipe = make_recipe()
    trainable = {id(p) for p in recipe.trainable_parameters(model)}  # as train() freezes
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = build_optimizer(model.named_parameters(), lr=2e-3)  # frozen ones only name-check no_decay
    start = time.process_time()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = recipe.loss(model, task.train_batch(step, 64), step)
        loss.backward()
        recipe.estimator.end_step()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
    return (time.process_time() - start) / steps


def main(steps=40, rounds=3):
    parse_config(["gin/base.gin"], [])  # the default model, whatever base.gin says it is
    task = AdditionTask(n_digits=4, reverse_operands=True)
    cfg = replace(gin.query_parameter("train.model_config").scoped_configurable_fn(), vocab_size=task.vocab_size)
    gin.clear_config()
    print(f"model: {cfg.n_layers} layers x T = {cfg.n_loops}, d_model {cfg.d_model}")
    best = {name: float("inf") for name in CONFIGS}
    for _ in range(rounds):
        for name, make in CONFIGS.items():
            best[name] = min(best[name], seconds(make, steps, task, cfg))
    ref = best["full unroll"]
    print("| configuration | CPU ms per step, one thread (min of rounds) | vs full unroll |\n|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {1000 * s:.1f} | {s / ref:.0%} |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
