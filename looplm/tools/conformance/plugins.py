"""The plugins the battery knows: the families (hook registries and model-structure registries),
every registered plugin, and the example instances it builds of a plugin class."""

import contextlib
import copy
import importlib
import pkgutil
from dataclasses import dataclass

import torch

from looplm.hooks import (BACKPROP_WINDOWS, ESTIMATORS, EXIT_PRIORS, INJECTIONS, LOOP_COUNTS, NORMS, PLACEMENTS,
                          REGULARIZERS, BackpropWindow, ExitPrior, LoopCount, LossEstimator, Regularizer)
from looplm.recipe import ExitWeighted, FixedLoops, FullBackprop, UniformPrior

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


class BuildError(Exception):
    """A plugin could not be built (no default arguments and no conformance_examples())."""


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


def default_candidate(family: str) -> Candidate:
    d = DEFAULTS[family]
    if family in STRUCTURE_FAMILIES:
        return Candidate(family, _label(family, d, 0), {family: d}, cacheable=True)
    return examples(d, family)[0]
