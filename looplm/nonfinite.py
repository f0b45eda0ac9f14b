"""Non-finite values stop a run at the step they appear, naming what went non-finite.

A NaN loss that keeps training writes NaN weights over the last good checkpoint and a result that
looks like a run. The trainer asks `diagnose` after every backward pass and `nonfinite_parameters`
before every checkpoint; `train.nonfinite = "skip"` skips such steps instead (counted, logged) and
stops after `train.max_skipped_steps` in a row.
"""

import math

MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss, gradient or parameter; the message names it."""


def _is_finite(value) -> bool:
    return math.isfinite(value) if isinstance(value, (int, float)) else True


def nonfinite_terms(metrics: dict) -> list[str]:
    """Names of the non-finite metrics of a step, per loop for per-loop lists (e.g. `ce at loop 3
    = nan`): the per-loop CE, the exit distribution, the prior's entropy, each regularizer."""
    found = []
    for name, value in metrics.items():
        if isinstance(value, (list, tuple, dict)):
            per_loop = dict(value) if isinstance(value, dict) else dict(enumerate(value, start=1))
            bad = [t for t, v in per_loop.items() if not _is_finite(v)]
            if bad:
                found.append(f"{name} at loop{'s' * (len(bad) > 1)} {', '.join(map(str, bad))} = "
                             f"{per_loop[bad[0]]}")
        elif not _is_finite(value):
            found.append(f"{name} = {value}")
    return found


def nonfinite_gradients(named_parameters) -> list[str]:
    """Parameters whose gradient holds a NaN or inf."""
    return [name for name, p in named_parameters
            if p.grad is not None and not p.grad.isfinite().all()]


def nonfinite_parameters(named_parameters) -> list[str]:
    return [name for name, p in named_parameters if not p.isfinite().all()]


def diagnose(loss: float, grad_norm: float, metrics: dict, named_parameters) -> str | None:
    """None when the step is finite; otherwise what went non-finite, most specific first."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    terms = [t for t in nonfinite_terms(metrics) if not t.startswith("loss ")]
    if terms:
        return f"non-finite {what} ({loss=}, {grad_norm=}): {'; '.join(terms)}"
    grads = nonfinite_gradients(named_parameters)
    shown = ", ".join(grads[:5]) + (f" and {len(grads) - 5} more" if len(grads) > 5 else "")
    where = f"non-finite gradient in {shown}" if grads else "every per-loop term is finite"
    return f"non-finite {what} ({loss=}, {grad_norm=}): {where}"
