"""Properties a plugin may declare about itself (`properties = {...}`), each with its check:
unbiased_for_stage1 (exact enumeration in float64), stateless, bounded_state."""

import math

import torch

from looplm.hooks import LossEstimator, Plan, Readouts
from looplm.recipe import ExitWeighted
from looplm.tools.conformance.harness import (BATCH_SHAPE, BATTERY_CONFIG, SEED, Run, battery_batch, build_model,
                                              model_cfg, probe_steps)
from looplm.tools.conformance.plugins import STRUCTURE_FAMILIES, Candidate, partners

RTOL64 = 1e-9  # float64 comparisons (exact enumeration): float64 must stay float64 throughout


def _prop_unbiased(cand: Candidate, base: dict) -> str | None:
    est = cand.fresh()
    if not isinstance(est, LossEstimator):
        return "unbiased_for_stage1 is a property of loss estimators"
    T, (B, _) = BATTERY_CONFIG.n_loops, BATCH_SHAPE
    step = 3
    if hasattr(est, "plan_outcomes"):
        outcomes = list(est.plan_outcomes(T, step, SEED, B))
    else:
        plans = {repr(est.plan(T, step, s, B)) for s in range(5)}
        if len(plans) > 1:
            return ("declares unbiased_for_stage1 but its plan depends on the seed and it has no "
                    "plan_outcomes(n_loops, step, seed, batch_size) to enumerate its draws")
        outcomes = [(1.0, est.plan(T, step, SEED, B))]
    total = sum(float(p) for p, _ in outcomes)
    if abs(total - 1) > 1e-9:
        return f"plan_outcomes probabilities sum to {total}, not 1"
    model = build_model(model_cfg(base), dtype=torch.float64)
    with torch.no_grad():  # make the gates and the head matter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.3)
    batch = battery_batch(step)
    params = list(model.parameters())
    for prior_cand in partners("prior"):
        prior = prior_cand.fresh()
        ref = ExitWeighted(readout="recompute")
        traj = model(batch.input_ids, n_loops=T, doc_ids=batch.doc_ids)
        want, _ = ref.loss(Readouts(model, traj, batch, T), Plan(T, T, 1, tuple(range(1, T + 1)), {}), prior)
        want_g = torch.autograd.grad(want, params, allow_unused=True)
        want = want.item()
        got, got_g = 0.0, [torch.zeros_like(p) for p in params]
        for prob, (run, readout, extra) in outcomes:
            e = cand.fresh()
            plan = Plan(n_loops=T, run_loops=run, first_grad_loop=1, readout=tuple(readout), extra=extra)
            traj = model(batch.input_ids, n_loops=run, doc_ids=batch.doc_ids, keep=plan.readout)
            loss, _ = e.loss(Readouts(model, traj, batch, T), plan, prior)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            got = got + float(prob) * loss.item()
            got_g = [a + float(prob) * (g if g is not None else 0) for a, g in zip(got_g, grads)]
        if not math.isclose(got, want, rel_tol=RTOL64, abs_tol=1e-12):
            return f"with {prior.describe()}: E[loss] = {got!r} but the Stage I loss is {want!r}"
        for (name, _), a, w in zip(model.named_parameters(), got_g, want_g):
            w = torch.zeros_like(a) if w is None else w
            if float((a - w).norm()) > RTOL64 * float(w.norm()) + 1e-12:
                return (f"with {prior.describe()}: E[grad] of {name} differs from the Stage I gradient "
                        f"(relative error {float((a - w).norm() / w.norm().clamp_min(1e-30)):.3g})")
    return None


def _prop_stateless(cand: Candidate, base: dict) -> str | None:
    if cand.family in STRUCTURE_FAMILIES:
        return None
    torch.manual_seed(SEED)
    run = Run(base)
    for s in probe_steps(base, 3):
        run.step(s)
        for part in [run.recipe.parts()[k] for k in run.recipe.parts()]:
            if type(part) is type(cand.proto) and part.state_dict():
                return f"declares stateless but state_dict() = {part.state_dict()!r} after step {s}"
    return None


def _prop_bounded_state(cand: Candidate, base: dict) -> str | None:
    if cand.family != "norm_placement":
        return "bounded_state is a property of norm placements"
    model = build_model(model_cfg(base, carry_normed=False))
    ids = battery_batch(0).input_ids
    ctx = model.context(ids.shape[1])
    rms = []
    with torch.no_grad():
        x = model.embed(ids)
        for t in range(64):
            x, _ = model.recurrence(x, ctx, t)
            rms.append(float(x.float().pow(2).mean().sqrt()))
    if not all(math.isfinite(r) for r in rms) or max(rms) > 2 * rms[0] + 1e-6:
        return f"carried-state RMS over 64 loops (carry_normed=False) grows: loop 1 {rms[0]:.4g}, max {max(rms):.4g}"
    return None


PROPERTIES = {
    "unbiased_for_stage1": _prop_unbiased,
    "stateless": _prop_stateless,
    "bounded_state": _prop_bounded_state,
}


def declared_properties(obj) -> set:
    props = getattr(obj, "properties", None)
    if props is None:
        return set()
    if isinstance(props, str):
        return {props}
    return set(props)
