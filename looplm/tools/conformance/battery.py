"""The battery: every check on every example of a plugin, collected into a Report."""

import contextlib
import copy
import time

import torch

from looplm.tools.conformance.checks import check_checkpoint, check_interface, first_difference, same_results
from looplm.tools.conformance.compose import check_compose, find_base
from looplm.tools.conformance.harness import SEED, Run, StepFailure, failure_site, probe_steps
from looplm.tools.conformance.plugins import (FAMILIES, HOOK_FAMILIES, STRUCTURE_FAMILIES, BuildError, Candidate,
                                              examples, family_of, import_variants)
from looplm.tools.conformance.properties import PROPERTIES, declared_properties
from looplm.tools.conformance.ranks import check_data_parallel
from looplm.tools.conformance.report import ConformanceError, Report


def _candidates_of(plugin, family: str | None) -> tuple[str, list[Candidate]]:
    if isinstance(plugin, str):
        if ":" not in plugin:
            raise ValueError(f"{plugin!r}: name a registered plugin as 'family:name' (families {list(FAMILIES)})")
        family, name = plugin.split(":", 1)
        reg = HOOK_FAMILIES[family][0] if family in HOOK_FAMILIES else STRUCTURE_FAMILIES.get(family)
        if reg is None:
            raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILIES)}")
        plugin = reg.get(name)
    if isinstance(plugin, type):
        family = family or family_of(plugin)
        return f"{family}:{getattr(plugin, 'registry_name', plugin.__name__)} ({plugin.__module__}." \
               f"{plugin.__qualname__})", examples(plugin, family)
    family = family or family_of(plugin)
    if family in STRUCTURE_FAMILIES:
        raise ValueError("pass a norm type or placement as its class or 'family:name', not an instance")
    return f"{family}: {plugin.describe()} (instance of {type(plugin).__module__}.{type(plugin).__qualname__})", \
        [Candidate(family, f"{family}:<{plugin.describe()}>", copy.deepcopy(plugin))]


@contextlib.contextmanager
def _quiet_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def check_plugin(plugin, *, family: str | None = None, compose: bool = True, variants: bool = True,
                 raise_on_failure: bool = True) -> Report:
    """Run the battery on a plugin: an instance, a class (each of its examples) or 'family:name'.

    compose: check the composition with every registered plugin of the other families (the
    slowest part). variants: import the in-tree variants package first (more partners).
    Returns the Report; raises ConformanceError if a check failed and raise_on_failure."""
    t0 = time.perf_counter()
    if variants:
        import_variants()
    try:
        target, cands = _candidates_of(plugin, family)
    except BuildError as e:
        name = plugin if isinstance(plugin, str) else getattr(plugin, "__name__", repr(plugin))
        report = Report(str(name))
        report.add("build", False, str(e))
        return _finish(report, t0, raise_on_failure)
    report = Report(target)
    report.add("build", True, f"{len(cands)} example(s)")
    with _quiet_torch():
        for cand in cands:
            _check_candidate(report, cand, compose, prefix="" if len(cands) == 1 else f"[{cand.describe()}] ")
    return _finish(report, t0, raise_on_failure)


def _finish(report, t0, raise_on_failure):
    report.seconds = time.perf_counter() - t0
    if raise_on_failure and not report.ok:
        raise ConformanceError("\n" + str(report))
    return report


def _check_candidate(report: Report, cand: Candidate, compose: bool, prefix: str = ""):
    def add(check, problem, ok_detail=""):
        report.add(prefix + check, problem is None, ok_detail if problem is None else problem)

    try:
        problems = check_interface(cand)
        add("interface", "; ".join(problems) if problems else None)
    except Exception as e:  # noqa: BLE001
        add("interface", f"raised {type(e).__name__}: {e}  [{failure_site(e)}]")
    base, why = find_base(cand)
    if base is None:
        add("base", f"no recipe accepts it: {why}")
        return
    if why:
        report.notes.append(prefix + why)
    steps = probe_steps(base, 4)
    try:
        torch.manual_seed(SEED)
        run = Run(base)
        first = run.steps(steps)
        add("base", None if run.learned else f"no gradient reached any trainable parameter in steps {steps}",
            f"steps {steps}, losses {[round(v, 4) for v, _ in first]}")
    except StepFailure as e:
        add("base", str(e))
        return
    try:
        torch.manual_seed(SEED)
        Run(base).step(steps[0], precision="bf16")
        add("bf16", None)
    except StepFailure as e:
        add("bf16", str(e))
    try:
        torch.manual_seed(SEED)
        second = Run(base).steps(steps)
        add("determinism", None if same_results(first, second) else
            "the same seed gave different results: " + first_difference(first, second))
    except StepFailure as e:
        add("determinism", str(e))
    try:
        add("checkpoint", check_checkpoint(base, cand, steps))
    except StepFailure as e:
        add("checkpoint", str(e))
    try:
        add("data_parallel", check_data_parallel(base, steps))
    except Exception as e:  # noqa: BLE001
        add("data_parallel", f"one process: {type(e).__name__}: {e}  [{failure_site(e)}]")
    if compose:
        check_compose(add, cand, base)
    props = declared_properties(cand.proto if cand.family in HOOK_FAMILIES else
                                dict(STRUCTURE_FAMILIES[cand.family].items())[cand.proto[cand.family]])
    for name in sorted(props):
        check = PROPERTIES.get(name)
        if check is None:
            add(f"property:{name}", f"unknown property {name!r}; known: {sorted(PROPERTIES)}")
            continue
        try:
            add(f"property:{name}", check(cand, base))
        except Exception as e:  # noqa: BLE001
            add(f"property:{name}", f"raised {type(e).__name__}: {e}  [{failure_site(e)}]")
