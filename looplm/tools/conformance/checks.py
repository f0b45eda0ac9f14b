"""The battery's checks of one plugin in its own slot: the family's interface (without a model),
determinism, and a checkpoint round trip into fresh instances."""

import io
import math

import torch

from looplm import checkpoint
from looplm.objectives import log_exit_probs
from looplm.tools.conformance.harness import BATCH_SHAPE, MODEL_SEED, SEED, Run, build_model, model_cfg
from looplm.tools.conformance.plugins import STRUCTURE_FAMILIES, Candidate


def check_interface(cand: Candidate) -> list[str]:
    """Family contract without a model; returns problems."""
    fam, p = cand.family, cand.fresh()
    problems = []
    if fam in STRUCTURE_FAMILIES:
        return problems
    if not isinstance(p.describe(), str):
        problems.append("describe() must return a str")
    if not isinstance(p.state_dict(), dict):
        problems.append("state_dict() must return a dict")
    if fam == "loop_count":
        for n in (1, 3, 8):
            for s in range(0, 60, 3):
                T = p.sample(s, n, SEED)
                if isinstance(T, bool) or not isinstance(T, int) or T < 1:
                    problems.append(f"sample(step={s}, n_loops={n}) = {T!r}: must be an int >= 1")
                    return problems
    elif fam == "window":
        for n in range(1, 9):
            for s in (0, 1, 10, 100, 10_000):
                f = p.first_grad_loop(s, n)
                if isinstance(f, bool) or not isinstance(f, int) or not 1 <= f <= n + 1:
                    problems.append(f"first_grad_loop(step={s}, n_loops={n}) = {f!r}: must be an int in [1, {n + 1}]")
                    return problems
    elif fam == "estimator":
        if p.trains not in ("all", "gate"):
            problems.append(f"trains={p.trains!r}: must be 'all' or 'gate'")
        for n in (1, 2, 3):
            for s in (0, 1, 5):
                try:
                    run, readout, extra = p.plan(n, s, SEED, BATCH_SHAPE[0])
                except ValueError:
                    continue  # it may reject a T (say so at run time)
                if isinstance(run, bool) or not isinstance(run, int) or run < 1:
                    problems.append(f"plan(n_loops={n}) runs {run!r} loops: must be an int >= 1")
                elif not all(isinstance(t, int) and 1 <= t <= run for t in readout):
                    problems.append(f"plan(n_loops={n}) reads out {readout!r}: must be loops in 1..{run}")
                if not isinstance(extra, dict):
                    problems.append(f"plan(n_loops={n}) extra={extra!r} must be a dict")
                if problems:
                    return problems
    elif fam == "prior":
        if not (isinstance(p.beta, (int, float)) and p.beta >= 0 and math.isfinite(p.beta)):
            problems.append(f"beta={p.beta!r}: must be a finite number >= 0")
        g = torch.Generator().manual_seed(0)
        for T in (1, 2, 5):
            gates = torch.randn(3, 4, T, generator=g) * 3
            full = p.loop_terms(log_exit_probs(gates), T)
            if full.shape != gates.shape or not torch.isfinite(full).all():
                problems.append(f"loop_terms(log_p, {T}) must be finite and shaped like log_p {tuple(gates.shape)}")
                return problems
            for t in range(1, T):
                prefix = p.loop_terms(log_exit_probs(gates[..., :t], T), T)
                if not torch.allclose(prefix, full[..., :t], rtol=1e-5, atol=1e-6):
                    problems.append(f"loop_terms is not loop-local: the terms of loops 1..{t} of T={T} differ "
                                    "from the first terms of all T (a sampled-step estimator reads one term)")
                    return problems
    return problems


def same_results(a, b) -> bool:
    """Bit-identical losses and metrics (lists of (loss, metrics))."""
    return repr(a) == repr(b)


def first_difference(a, b) -> str:
    for i, ((la, ma), (lb, mb)) in enumerate(zip(a, b)):
        if repr(la) != repr(lb):
            return f"step #{i}: loss {la!r} vs {lb!r}"
        for k in sorted(set(ma) | set(mb)):
            if repr(ma.get(k)) != repr(mb.get(k)):
                return f"step #{i}: metric {k}: {ma.get(k)!r} vs {mb.get(k)!r}"
    return "different number of steps"


def _roundtrip_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def check_checkpoint(setup: dict, cand: Candidate, steps: list[int]) -> str | None:
    half = len(steps) // 2
    torch.manual_seed(SEED)
    a = Run(setup)
    a.steps(steps[:half])
    saved = _roundtrip_bytes({"recipe": a.recipe.state_dict(), "model": a.model.state_dict(),
                              "rng": checkpoint.rng_state()})
    b = Run(setup, model=build_model(model_cfg(setup), seed=MODEL_SEED + 1))
    try:
        b.model.load_state_dict(saved["model"])
        b.recipe.load_state_dict(saved["recipe"])
    except Exception as e:  # noqa: BLE001
        return f"load_state_dict on a fresh instance raised {type(e).__name__}: {e}"
    restored = repr(b.recipe.state_dict()), repr(a.recipe.state_dict())
    if restored[0] != restored[1]:
        return f"state after load differs: {restored[0]} vs saved {restored[1]}"
    checkpoint.set_rng_state(saved["rng"])
    rest_a = a.steps(steps[half:])
    checkpoint.set_rng_state(saved["rng"])
    rest_b = b.steps(steps[half:])
    if not same_results(rest_a, rest_b):
        return ("the resumed copy behaves differently (state missing from state_dict?): "
                + first_difference(rest_a, rest_b))
    if repr(a.recipe.state_dict()) != repr(b.recipe.state_dict()):
        return "state_dicts differ after the resumed steps"
    return None
