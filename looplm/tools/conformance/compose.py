"""The composition check: a plugin with every example of every registered plugin of the other
families, each combination either rejected when the recipe is built (with a message) or run."""

import torch

from looplm.tools.conformance.harness import (BATTERY_CONFIG, SEED, Run, StepFailure, build_recipe, default_setup,
                                              describe_setup, probe_steps, setup_key, with_candidate)
from looplm.tools.conformance.plugins import FAMILIES, HOOK_FAMILIES, Candidate, partners

_COMPOSE_CACHE: dict = {}


def clear_cache():
    _COMPOSE_CACHE.clear()


def _compose_one(setup: dict) -> tuple[str, str]:
    """("rejected" | "ok" | "fail", detail) for one combination."""
    key = setup_key(setup)
    if key is not None and key in _COMPOSE_CACHE:
        return _COMPOSE_CACHE[key]
    try:
        recipe = build_recipe(setup)
        result = None
    except ValueError as e:
        msg = str(e).strip()
        result = (("rejected", msg) if len(msg) >= 15 else
                  ("fail", f"rejected with an unclear ValueError message {msg!r}"))
    except Exception as e:  # noqa: BLE001
        result = ("fail", f"Recipe(...) raised {type(e).__name__} (not ValueError): {e}")
    if result is None:
        steps = probe_steps(setup, 2)
        try:
            torch.manual_seed(SEED)
            run = Run(setup, recipe=recipe)
            for s in steps:
                run.step(s)
            result = ("ok", "")
        except StepFailure as e:
            T = setup["loop_count"].fresh().sample(s, BATTERY_CONFIG.n_loops, SEED)
            result = ("fail", f"accepted at config time but step {s} (T={T}) failed: {e}")
        except Exception as e:  # noqa: BLE001  (building the model, e.g.)
            result = ("fail", f"{type(e).__name__}: {e}")
    if key is not None:
        _COMPOSE_CACHE[key] = result
    return result


def _accepted(setup: dict, keep: set) -> tuple[dict | None, str, str]:
    """(setup, change, first error): the setup if the recipe accepts it, else the first accepted
    change of one hook family not in `keep` to another registered example (regularizers are
    never added); (None, "", error) if none is accepted."""
    try:
        build_recipe(setup)
        return setup, "", ""
    except ValueError as e:
        first = str(e).split("\n")[0]
    for fam in HOOK_FAMILIES:
        if fam in keep or fam == "regularizer":
            continue
        for other in partners(fam):
            alt = with_candidate(setup, other)
            try:
                build_recipe(alt)
                return alt, f"{fam}={other.describe()}", first
            except ValueError:
                continue
    return None, "", first


def find_base(cand: Candidate) -> tuple[dict | None, str]:
    """A setup with the candidate in its slot that the recipe accepts: the defaults, or the first
    accepted one-family change of them."""
    setup, change, first = _accepted(with_candidate(default_setup(), cand), {cand.family})
    if setup is None:
        return None, first
    return setup, (f"the defaults were rejected ({first}); the base uses {change}" if change else "")


def check_compose(add, cand: Candidate, base: dict):
    n_ok, rejected, failures = 0, [], []
    for fam in FAMILIES:
        if fam == cand.family and fam != "regularizer":
            continue
        for other in partners(fam):
            if fam == "regularizer" and cand.family == "regularizer" and other.label == cand.label:
                continue
            setup = with_candidate(base, other)
            status, detail = _compose_one(setup)
            if status == "rejected":  # perhaps by a third part of the base (the prior, say): change it
                alt, change, _ = _accepted(setup, {cand.family, fam})
                if alt is not None and change:
                    setup = alt
                    status, detail = _compose_one(setup)
            if status == "ok":
                n_ok += 1
            elif status == "rejected":
                rejected.append(f"{other.label}")
            else:
                failures.append(f"with {describe_setup(setup)}: {detail}")
    summary = f"{n_ok} combinations ran, {len(rejected)} rejected at config time"
    if rejected:
        summary += f" ({', '.join(rejected)})"
    add("compose", "; ".join(failures) + f"  [{summary}]" if failures else None, summary)
