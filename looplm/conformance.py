"""Conformance battery: check that a plugin honours its family's contract and composes with the rest.

    from looplm.conformance import check_plugin
    def test_mine():
        check_plugin(MyEstimator())            # an instance, a class, or "estimator:sampled_step"

    python -m looplm.conformance my_module.MyEstimator     # one plugin (class or instance)
    python -m looplm.conformance --import my_module        # every plugin my_module registers
    python -m looplm.conformance --all                     # every registered plugin
    python -m looplm.conformance --list                    # what is registered, and buildable

A plugin is run on a tiny LoopLM (`BATTERY_CONFIG`: d_model 16, one layer, T = 3) with a fixed
batch per step (two rows of 6 tokens, the second packing two documents, one ignored target), in
the slot of its family, the other families at Ouro's defaults. The checks, each reported by name:

    build         example instances can be made (see "Examples" below)
    interface     the family's contract, without a model: a loop count returns an int >= 1;
                  a window's first grad loop is in [1, T + 1]; an estimator's plan runs >= 1
                  loop and reads out loops among those it runs; a prior's beta is >= 0 and its
                  loop terms are finite, shaped like log p and loop-local (terms of a prefix of
                  the loops equal the first terms of the whole: the sampled-step estimator
                  relies on it)
    base          a few training steps (forward, backward, SGD): the loss is a finite scalar, every
                  trainable gradient is finite, and some step gives some parameter a non-zero one
    bf16          one step under CPU bfloat16 autocast: finite loss and gradients
    determinism   two fresh runs from the same seed give bit-identical losses and metrics
    checkpoint    run some steps; torch.save the recipe state (and the model, and the RNG, as the
                  trainer does), torch.load it into *fresh* instances (deep copies of the pristine
                  example) through load_state_dict; both continue for more steps: bit-identical
                  losses and metrics, and equal state_dicts at the end
    compose       with every example of every registered plugin of every other family (and, for a
                  regularizer, stacked with every other regularizer): either `Recipe(...)` rejects
                  the combination with a ValueError whose message says why, or two steps run with
                  finite loss and gradients. Steps are picked where the loop count draws its
                  smallest T (often T = 1) and its smallest T >= 2 among the first 200 steps, so
                  a combination that only breaks at an edge of the loop-count range is caught
                  without running 100-loop steps. A failure at run time of a combination the
                  recipe accepted is a conformance failure (DESIGN: "a combination that cannot
                  work fails when the config is read").
    property:*    each property the plugin declares (below)

Model structure (ModelConfig.norm_type / norm_placement / input_injection, registries NORMS,
PLACEMENTS and INJECTIONS) is checked the same way, the "plugin" being a model built with it; its
checkpoint check round-trips the model's state_dict.

Examples (how the battery builds a plugin). For a class it calls the optional classmethod
`conformance_examples()`, which returns a list of instances (for norm types and placements: a
list of dicts of extra ModelConfig overrides, e.g. `[{"deepnorm_alpha": 1.5}]`); without it the
battery calls `cls()`. A class that needs arguments and offers no examples is reported as "cannot
be built by name" (a failed `build` check). Examples should be cheap: the battery runs each one
many times on a 3-loop model, so e.g. a curriculum should get a short `total_steps`.

Declared properties: a plugin may declare claims about itself as a set of names in an attribute
`properties` (a class attribute, or a property when the claim depends on the instance's
arguments). A plugin without the attribute declares nothing and only the family contract is
checked. An unknown name is an error (typos do not pass silently). Known names:

    unbiased_for_stage1  (loss estimators) the expectation over the estimator's random draws of its
                         loss and of its gradient equals the full-unroll Stage I loss with the same
                         prior (`ExitWeighted`), checked by exact enumeration in float64 (relative
                         error <= 1e-9, so a plugin must keep float64 inputs in float64) for every
                         registered prior example. The estimator enumerates its draws with a method
                         `plan_outcomes(n_loops, step, seed, batch_size)` yielding
                         `(probability, (run_loops, readout, extra))`, one per possible draw, where
                         the triple is what `plan` would return for that draw (extra may pin the
                         draw, e.g. {"t": 2}); an estimator whose plan does not depend on the seed
                         may omit it (one outcome, probability 1).
    stateless            (any hook plugin) state_dict() stays empty during training
    bounded_state        (norm placements) without the between-loop final norm
                         (carry_normed=False), the carried state's RMS over 64 loops at random
                         initialisation stays within 2x its RMS after loop 1 (pre_norm, whose
                         residual stream grows every loop, cannot declare it)

The battery never edits a plugin; it deep-copies the example it was given before every use.
`check_plugin` returns a `Report` and, by default, raises `ConformanceError` (an AssertionError,
so pytest shows the report) when a check fails. Partners for the composition check are every
plugin registered when it runs; by default it first imports every module of the in-tree
`variants` package (if importable), so an out-of-tree plugin is checked against all of them.
"""

import argparse
import contextlib
import copy
import importlib
import io
import math
import pkgutil
import sys
import time
import traceback
from dataclasses import dataclass, field, replace

import torch

from looplm import checkpoint
from looplm.config import model_config
from looplm.data.batch import IGNORE_INDEX, Batch
from looplm.hooks import (BACKPROP_WINDOWS, ESTIMATORS, EXIT_PRIORS, INJECTIONS, LOOP_COUNTS, NORMS,
                          PLACEMENTS, REGULARIZERS, BackpropWindow, ExitPrior, LossEstimator, LoopCount, Plan, Readouts,
                          Regularizer)
from looplm.model import LoopLM
from looplm.objectives import log_exit_probs
from looplm.recipe import ExitWeighted, FixedLoops, FullBackprop, Recipe, UniformPrior

BATTERY_CONFIG = model_config("tiny", d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=32, n_loops=3)
BATCH_SHAPE = (2, 6)
SEED = 7  # Recipe.seed of every run
MODEL_SEED = 0
LR = 0.05  # plain SGD between the battery's steps, so stateful plugins see a changing model
SCAN_STEPS = 200  # steps scanned for the loop count's smallest draws
RTOL64 = 1e-9  # float64 comparisons (exact enumeration): float64 must stay float64 throughout

HOOK_FAMILIES = {  # Recipe argument -> (registry, interface)
    "loop_count": (LOOP_COUNTS, LoopCount),
    "window": (BACKPROP_WINDOWS, BackpropWindow),
    "estimator": (ESTIMATORS, LossEstimator),
    "prior": (EXIT_PRIORS, ExitPrior),
    "regularizer": (REGULARIZERS, Regularizer),
}
STRUCTURE_FAMILIES = {"norm_type": NORMS, "norm_placement": PLACEMENTS,  # ModelConfig field -> registry
                      "input_injection": INJECTIONS}
FAMILIES = (*HOOK_FAMILIES, *STRUCTURE_FAMILIES)
DEFAULTS = {"loop_count": FixedLoops, "window": FullBackprop, "estimator": ExitWeighted, "prior": UniformPrior,
            "norm_type": "rmsnorm", "norm_placement": "sandwich_branch", "input_injection": None}


class ConformanceError(AssertionError):
    """A plugin failed the battery; the message is the whole report."""


class BuildError(Exception):
    """A plugin could not be built (no default arguments and no conformance_examples())."""


# -- discovering plugins and their examples ---------------------------------------------------------
def import_variants(package: str = "variants") -> list[str]:
    """Import every module of the in-tree variants package (registering its plugins); [] if absent."""
    try:
        pkg = importlib.import_module(package)
    except ModuleNotFoundError:
        return []
    names = [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    for name in names:
        importlib.import_module(name)
    return names


def registered_plugins() -> list[tuple[str, str, type]]:
    """(family, registered name, class) for every plugin of every family, in a stable order."""
    out = []
    for fam, (reg, _) in HOOK_FAMILIES.items():
        out += [(fam, name, cls) for name, cls in reg.items()]
    for fam, reg in STRUCTURE_FAMILIES.items():
        out += [(fam, name, cls) for name, cls in reg.items()]
    return out


def family_of(obj) -> str:
    """The family of a plugin instance or class (raises ValueError if it belongs to none)."""
    cls = obj if isinstance(obj, type) else type(obj)
    for fam, (_, interface) in HOOK_FAMILIES.items():
        if issubclass(cls, interface):
            return fam
    for fam, reg in STRUCTURE_FAMILIES.items():
        if any(c is cls for _, c in reg.items()):
            return fam
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        raise ValueError(f"{cls.__name__} is not registered: a norm type, placement or input injection must "
                         "be registered (@NORMS / @PLACEMENTS / @INJECTIONS.register(name)) for a ModelConfig "
                         "to select it")
    raise ValueError(f"{cls.__name__} is not a plugin of any family: subclass one of "
                     f"{[i.__name__ for _, i in HOOK_FAMILIES.values()]} (looplm.hooks) or register a norm "
                     "type / placement")


@dataclass(frozen=True)
class Candidate:
    """One example of one plugin: a prototype deep-copied for every use (hook families), or the
    ModelConfig overrides that select it (structure families)."""

    family: str
    label: str
    proto: object
    cacheable: bool = False  # built by the battery from a registered class: same label, same thing

    def fresh(self):
        return copy.deepcopy(self.proto)

    def describe(self) -> str:
        if self.family in STRUCTURE_FAMILIES:
            return ", ".join(f"{k}={v!r}" for k, v in self.proto.items())
        return self.proto.describe()


def _label(family, name, i):
    return f"{family}:{name}#{i}"


def examples(cls, family: str | None = None) -> list[Candidate]:
    """Example candidates of a plugin class: `cls.conformance_examples()`, else `cls()`.

    Raises BuildError, saying what to add, when the class cannot be built by name."""
    family = family or family_of(cls)
    name = getattr(cls, "registry_name", cls.__name__)
    registered = any(c is cls for f, _, c in registered_plugins() if f == family)
    hook = family in HOOK_FAMILIES
    if hasattr(cls, "conformance_examples"):
        try:
            made = list(cls.conformance_examples())
        except Exception as e:  # noqa: BLE001  (reported, not raised)
            raise BuildError(f"{cls.__name__}.conformance_examples() raised {e!r}") from e
        if not made:
            raise BuildError(f"{cls.__name__}.conformance_examples() returned no example")
        for ex in made:
            ok = isinstance(ex, cls) if hook else isinstance(ex, dict)
            if not ok:
                want = f"instances of {cls.__name__}" if hook else "dicts of ModelConfig overrides"
                raise BuildError(f"{cls.__name__}.conformance_examples() must return {want}, got {ex!r}")
    elif hook:
        try:
            made = [cls()]
        except Exception as e:  # noqa: BLE001
            raise BuildError(f"cannot be built by name: {cls.__name__}() raised {type(e).__name__}: {e}; "
                             "give it default arguments or a classmethod conformance_examples() returning "
                             "example instances") from e
    else:
        made = [{}]
    out = []
    for i, ex in enumerate(made):
        proto = ex if hook else {family: name, **ex}
        out.append(Candidate(family, _label(family, name, i), proto, cacheable=registered))
    return out


def partners(family: str) -> list[Candidate]:
    """Every buildable example of every registered plugin of a family (unbuildable ones skipped)."""
    out = []
    for fam, _, cls in registered_plugins():
        if fam == family:
            with contextlib.suppress(BuildError):
                out += examples(cls, fam)
    return out


def _default(family: str) -> Candidate:
    d = DEFAULTS[family]
    if family in STRUCTURE_FAMILIES:
        return Candidate(family, _label(family, d, 0), {family: d}, cacheable=True)
    return examples(d, family)[0]


# -- one setup: a recipe and a model ----------------------------------------------------------------
def _setup_key(setup: dict):
    labels = []
    for fam, c in setup.items():
        for cand in (c if fam == "regularizer" else (c,)):
            if not cand.cacheable:
                return None
            cls = type(cand.proto) if fam in HOOK_FAMILIES else None
            labels.append((cand.label, id(cls)))
    return tuple(sorted(labels))


def _describe_setup(setup: dict) -> str:
    parts = []
    for fam, c in setup.items():
        if fam == "regularizer":
            if c:
                parts.append(f"regularizers=[{', '.join(r.describe() for r in c)}]")
        elif c.label != _default(fam).label:
            parts.append(c.describe() if fam in STRUCTURE_FAMILIES else f"{fam}={c.describe()}")
    return "; ".join(parts) or "defaults"


def _default_setup() -> dict:
    setup = {fam: _default(fam) for fam in FAMILIES if fam != "regularizer"}
    setup["regularizer"] = ()
    return setup


def _with(setup: dict, cand: Candidate) -> dict:
    out = dict(setup)
    if cand.family == "regularizer":
        out["regularizer"] = (*setup["regularizer"], cand)
    else:
        out[cand.family] = cand
    return out


def build_recipe(setup: dict, instances: dict | None = None) -> Recipe:
    """Recipe of a setup (fresh instances unless given); raises what Recipe raises."""
    inst = instances or _instantiate(setup)
    return Recipe(loop_count=inst["loop_count"], window=inst["window"], estimator=inst["estimator"],
                  prior=inst["prior"], regularizers=inst["regularizer"], seed=SEED)


def _instantiate(setup: dict) -> dict:
    inst = {fam: setup[fam].fresh() for fam in HOOK_FAMILIES if fam != "regularizer"}
    inst["regularizer"] = [c.fresh() for c in setup["regularizer"]]
    return inst


def model_cfg(setup: dict, **extra):
    overrides = {}
    for fam in STRUCTURE_FAMILIES:
        overrides.update(setup[fam].proto)
    return replace(BATTERY_CONFIG, **overrides, **extra)


def build_model(cfg, seed: int = MODEL_SEED, dtype=torch.float32) -> LoopLM:
    torch.manual_seed(seed)
    return LoopLM(cfg).to(dtype)


def battery_batch(step: int, vocab_size: int = BATTERY_CONFIG.vocab_size) -> Batch:
    """The batch of a step: a function of the step alone; row 1 packs two documents."""
    B, S = BATCH_SHAPE
    g = torch.Generator().manual_seed(10_000 + step)
    ids = torch.randint(0, vocab_size, (B, S), generator=g)
    targets = torch.randint(0, vocab_size, (B, S), generator=g)
    targets[0, 0] = IGNORE_INDEX
    doc_ids = torch.zeros(B, S, dtype=torch.long)
    doc_ids[1, S // 2:] = 1
    return Batch(ids, targets, doc_ids)


class StepFailure(Exception):
    pass


class Run:
    """A model and a recipe trained by the battery: forward, backward, finite checks, SGD."""

    def __init__(self, setup: dict, recipe: Recipe | None = None, model: LoopLM | None = None):
        self.setup = setup
        self.recipe = recipe if recipe is not None else build_recipe(setup)
        self.model = model if model is not None else build_model(model_cfg(setup))
        self.model.train()
        trainable = self.recipe.trainable_parameters(self.model)
        ids = {id(p) for p in trainable}
        self.named = [(n, p) for n, p in self.model.named_parameters() if id(p) in ids]
        for p in self.model.parameters():
            p.requires_grad_(id(p) in ids)
        self.learned = False  # whether some step gave some trainable parameter a non-zero gradient

    def step(self, step: int, precision: str = "fp32"):
        """(loss, metrics) of one step; raises StepFailure on an exception or a non-finite value."""
        for _, p in self.named:
            p.grad = None
        batch = battery_batch(step, self.model.cfg.vocab_size)
        cast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
        try:
            with cast:
                loss, metrics = self.recipe.loss(self.model, batch, step)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise StepFailure(f"the loss must be a scalar tensor, got {loss!r}")
            if not torch.isfinite(loss):
                raise StepFailure(f"non-finite loss {float(loss)}")
            loss.backward()
        except StepFailure:
            raise
        except Exception as e:  # noqa: BLE001
            raise StepFailure(f"{type(e).__name__}: {e}  [{_where(e)}]") from e
        bad = [n for n, p in self.named if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise StepFailure(f"non-finite gradient in {bad}")
        self.learned = self.learned or any(p.grad is not None and p.grad.any() for _, p in self.named)
        with torch.no_grad():
            for _, p in self.named:
                if p.grad is not None:
                    p.sub_(LR * p.grad)
        return loss.detach().item(), metrics

    def steps(self, steps, precision="fp32"):
        return [self.step(s, precision) for s in steps]


def _where(e: BaseException) -> str:
    """file:line of the innermost frame of an exception (where a step failed)."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return "?"
    f = tb[-1]
    return f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno}"


def probe_steps(setup: dict, k: int = 2) -> list[int]:
    """k steps (ascending) where the setup's loop count draws its smallest T among the first
    SCAN_STEPS steps; the smallest T >= 2 is always among them when k >= 2 and it exists."""
    lc = setup["loop_count"].fresh()
    draws = [(lc.sample(s, BATTERY_CONFIG.n_loops, SEED), s) for s in range(SCAN_STEPS)]
    if len({T for T, _ in draws}) == 1:
        return list(range(k))
    ranked = sorted(draws)
    chosen = [ranked[0][1]]
    at_least_2 = [s for T, s in ranked if T >= 2]
    if k >= 2 and at_least_2 and ranked[0][0] < 2:
        chosen.append(at_least_2[0])
    for _, s in ranked:
        if len(chosen) >= k:
            break
        if s not in chosen:
            chosen.append(s)
    return sorted(chosen)


# -- the report -------------------------------------------------------------------------------------
@dataclass
class Result:
    check: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    target: str
    results: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.ok]

    def add(self, check, ok, detail=""):
        self.results.append(Result(check, ok, detail))

    def __str__(self):
        lines = [f"{'PASS' if self.ok else 'FAIL'} {self.target} ({self.seconds:.1f}s)"]
        for r in self.results:
            lines.append(f"  [{'ok' if r.ok else 'FAIL'}] {r.check}" + (f": {r.detail}" if r.detail else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- the checks -------------------------------------------------------------------------------------
def _check_interface(cand: Candidate) -> list[str]:
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


def _same(a, b) -> bool:
    """Bit-identical losses and metrics (lists of (loss, metrics))."""
    return repr(a) == repr(b)


def _first_difference(a, b) -> str:
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


def _check_checkpoint(setup: dict, cand: Candidate, steps: list[int]) -> str | None:
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
    if not _same(rest_a, rest_b):
        return ("the resumed copy behaves differently (state missing from state_dict?): "
                + _first_difference(rest_a, rest_b))
    if repr(a.recipe.state_dict()) != repr(b.recipe.state_dict()):
        return "state_dicts differ after the resumed steps"
    return None


_COMPOSE_CACHE: dict = {}


def clear_cache():
    _COMPOSE_CACHE.clear()


def _compose_one(setup: dict) -> tuple[str, str]:
    """("rejected" | "ok" | "fail", detail) for one combination."""
    key = _setup_key(setup)
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
            alt = _with(setup, other)
            try:
                build_recipe(alt)
                return alt, f"{fam}={other.describe()}", first
            except ValueError:
                continue
    return None, "", first


def _find_base(cand: Candidate) -> tuple[dict | None, str]:
    """A setup with the candidate in its slot that the recipe accepts: the defaults, or the first
    accepted one-family change of them."""
    setup, change, first = _accepted(_with(_default_setup(), cand), {cand.family})
    if setup is None:
        return None, first
    return setup, (f"the defaults were rejected ({first}); the base uses {change}" if change else "")


# -- declared properties ----------------------------------------------------------------------------
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


# -- the battery ------------------------------------------------------------------------------------
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
        problems = _check_interface(cand)
        add("interface", "; ".join(problems) if problems else None)
    except Exception as e:  # noqa: BLE001
        add("interface", f"raised {type(e).__name__}: {e}  [{_where(e)}]")
    base, why = _find_base(cand)
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
        add("determinism", None if _same(first, second) else
            "the same seed gave different results: " + _first_difference(first, second))
    except StepFailure as e:
        add("determinism", str(e))
    try:
        add("checkpoint", _check_checkpoint(base, cand, steps))
    except StepFailure as e:
        add("checkpoint", str(e))
    if compose:
        _check_compose(add, cand, base)
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
            add(f"property:{name}", f"raised {type(e).__name__}: {e}  [{_where(e)}]")


def _check_compose(add, cand: Candidate, base: dict):
    n_ok, rejected, failures = 0, [], []
    for fam in FAMILIES:
        if fam == cand.family and fam != "regularizer":
            continue
        for other in partners(fam):
            if fam == "regularizer" and cand.family == "regularizer" and other.label == cand.label:
                continue
            setup = _with(base, other)
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
                failures.append(f"with {_describe_setup(setup)}: {detail}")
    summary = f"{n_ok} combinations ran, {len(rejected)} rejected at config time"
    if rejected:
        summary += f" ({', '.join(rejected)})"
    add("compose", "; ".join(failures) + f"  [{summary}]" if failures else None, summary)


# -- command line -----------------------------------------------------------------------------------
def _resolve(target: str):
    if ":" in target and "." not in target.split(":", 1)[0]:
        return target
    module, _, attr = target.rpartition(".")
    if not module:
        raise ValueError(f"{target!r}: give module.Name, or family:name for a registered plugin")
    return getattr(importlib.import_module(module), attr)


def _plugins_of_module(module: str) -> list:
    importlib.import_module(module)
    return [cls for _, _, cls in registered_plugins()
            if cls.__module__ == module or cls.__module__.startswith(module + ".")]


def buildability() -> list[tuple[str, str, int | None, str]]:
    """(family, name, number of examples or None, reason) for every registered plugin."""
    out = []
    for fam, name, cls in registered_plugins():
        try:
            out.append((fam, name, len(examples(cls, fam)), ""))
        except BuildError as e:
            out.append((fam, name, None, str(e)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m looplm.conformance",
                                 description="Run the looplm plugin conformance battery.")
    ap.add_argument("targets", nargs="*", help="module.Class or module.instance, or family:name")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE and check every plugin it registers")
    ap.add_argument("--all", action="store_true", help="check every registered plugin")
    ap.add_argument("--list", action="store_true", help="list registered plugins and whether they can be built")
    ap.add_argument("--no-compose", action="store_true", help="skip the (slow) composition check")
    ap.add_argument("--no-variants", action="store_true", help="do not import the in-tree variants package")
    args = ap.parse_args(argv)
    if not args.no_variants:
        import_variants()
    if "" not in sys.path:
        sys.path.insert(0, "")  # plugins in the current directory, as `python -m` users expect
    try:
        targets = [_resolve(t) for t in args.targets]
        for module in args.imports:
            found = _plugins_of_module(module)
            if not found:
                print(f"error: importing {module} registered no plugin", file=sys.stderr)
                return 2
            targets += found
    except (ImportError, AttributeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.all:
        targets += [cls for _, _, cls in registered_plugins()]
    if args.list:
        for fam, name, n, reason in buildability():
            print(f"{fam:15s} {name:20s} " + (f"{n} example(s)" if n is not None else f"CANNOT BE BUILT: {reason}"))
        if not targets:
            return 0
    if not targets:
        ap.print_usage(sys.stderr)
        print("error: name a plugin, --import a module, or --all", file=sys.stderr)
        return 2
    failed = 0
    for t in targets:
        try:
            report = check_plugin(t, compose=not args.no_compose, variants=False, raise_on_failure=False)
        except ValueError as e:
            print(f"FAIL {t}: {e}")
            failed += 1
            continue
        print(report, flush=True)
        failed += not report.ok
    print(f"{len(targets) - failed}/{len(targets)} plugins conform")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
