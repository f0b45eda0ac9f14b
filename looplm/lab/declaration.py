"""A sweep declaration: gin files plus a grid of gin bindings times seeds, one task per grid point
and seed.

A sweep is declared in one Python file under sweeps/ that defines `SWEEP = Sweep(...)`:

    SWEEP = Sweep(
        name="prior_ablation",                 # Aim experiment, output folder, Slurm job name
        base=["gin/full_unroll.gin"],          # gin files every task reads
        bind=["import variants.priors"],       # bindings every task gets
        grid={                                 # axis -> values; the grid is their product
            "prior": {                         # a dict: label -> binding(s) or Bundle
                "uniform": "Recipe.prior = @UniformPrior()",
                "geometric_0.5": ["Recipe.prior = @GeometricPrior()", "GeometricPrior.lambda_p = 0.5"],
            },
            "UniformPrior.beta": [0.01, 0.1],  # a list: the axis is one gin parameter
        },
        seeds=[0, 1, 2],
    )

A `Bundle(gin=[...], bind=[...])` value adds gin files (read after `base`) as well as bindings.
Task ids run over the grid points in declaration order (the last axis fastest), seeds innermost:
task i is point i // len(seeds) with seed seeds[i % len(seeds)].

`load` applies the environment overrides that every sweep command reads, so that list, count,
run and collect agree: LOOPLM_SWEEP_GRID (a smaller grid), LOOPLM_SWEEP_SEEDS (other seeds) and
LOOPLM_SWEEP_BIND (extra bindings); see looplm/lab/sweep_cli.py.

`Sweep.id` names the sweep in every task's hparams, so that collect never averages runs of two
declarations that share a name.
"""

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

_LABEL = re.compile(r"[\w.+-]+")


@dataclass(frozen=True)
class Bundle:
    """One grid value that sets several things at once: gin files and bindings."""

    bind: tuple[str, ...] = ()
    gin: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "bind", _strings(self.bind, "Bundle.bind"))
        object.__setattr__(self, "gin", _strings(self.gin, "Bundle.gin"))


@dataclass(frozen=True)
class Value:
    """One value of one axis: its label, what hparams record, and what it sets."""

    label: str
    hparam: object
    gin: tuple[str, ...]
    bind: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    id: int
    name: str  # e.g. "prior=uniform,beta=0.1,seed=0": the run directory's name
    point: str  # e.g. "prior=uniform,beta=0.1": what seeds are grouped by
    grid: dict  # axis -> value (the scalar of a parameter axis, else the label)
    seed: int
    gin: tuple[str, ...]  # the grid point's gin files (after the sweep's base files)
    bind: tuple[str, ...]  # the grid point's bindings


@dataclass
class Sweep:
    name: str
    base: list[str]
    grid: dict
    seeds: list[int] = field(default_factory=lambda: [0])
    bind: list[str] = field(default_factory=list)
    overrides: tuple[str, ...] = ()  # LOOPLM_SWEEP_BIND: after the grid's bindings
    file: Path | None = None  # the declaration, once loaded

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name):
            raise ValueError(f"Sweep.name={self.name!r}: use letters, digits, '_', '.', '-'")
        self.base = list(_strings(self.base, "Sweep.base"))
        self.bind = list(_strings(self.bind, "Sweep.bind"))
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Sweep.seeds={self.seeds}: give at least one seed, each once")
        if not isinstance(self.grid, dict) or not self.grid:
            raise ValueError(f"Sweep {self.name!r}: grid={self.grid!r} is empty: give at least one axis "
                             "(one configuration over seeds: grid={'config': {'base': []}})")
        self.axes = {axis: _axis_values(axis, values) for axis, values in self.grid.items()}
        shorts = [_short(axis) for axis in self.axes]
        if len(set(shorts)) != len(shorts):
            raise ValueError(f"grid axes {list(self.axes)} share a short name {shorts}: rename one")

    @property
    def id(self) -> str:
        """The name and a hash of the declaration's shared settings (base gin files, bindings).
        Not the grid, the seeds or LOOPLM_SWEEP_*, so that tasks run from any selection of one
        sweep, or resumed with a longer TRAIN_STEPS (`run --resume`), keep their id; runs of one
        grid point whose configs differ in more than the seed are refused by collect instead."""
        shared = json.dumps([self.name, self.base, self.bind])
        return f"{self.name}-{hashlib.sha256(shared.encode()).hexdigest()[:8]}"

    def tasks(self) -> list[Task]:
        tasks = []
        for values in itertools.product(*self.axes.values()):
            point = ",".join(f"{_short(a)}={v.label}" for a, v in zip(self.axes, values))
            for seed in self.seeds:
                tasks.append(Task(
                    id=len(tasks), name=f"{point},seed={seed}" if point else f"seed={seed}",
                    point=point or "all", grid={a: v.hparam for a, v in zip(self.axes, values)},
                    seed=seed, gin=tuple(f for v in values for f in v.gin),
                    bind=tuple(b for v in values for b in v.bind)))
        return tasks

    def select(self, spec: str) -> "Sweep":
        """The sweep on a smaller grid: `axis=label,label;axis=label` keeps those labels (labels
        may be separated by spaces instead, which passes through `sbatch --export`)."""
        by_name = {**{_short(a): a for a in self.axes}, **{a: a for a in self.axes}}
        grid = dict(self.grid)
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            name, _, labels = part.partition("=")
            axis = by_name.get(name.strip())
            if axis is None:
                raise ValueError(f"LOOPLM_SWEEP_GRID: no axis {name.strip()!r} in sweep "
                                 f"{self.name!r}; axes: {list(self.axes)}")
            wanted = [label for label in re.split(r"[,\s]+", labels) if label]
            known = {v.label: v for v in self.axes[axis]}
            unknown = [label for label in wanted if label not in known]
            if unknown or not wanted:
                raise ValueError(f"LOOPLM_SWEEP_GRID: axis {axis!r} has no value(s) {unknown or wanted}; "
                                 f"labels: {list(known)}")
            grid[axis] = {label: known[label] for label in wanted}
        return dataclasses.replace(self, grid=grid)


def _strings(value, what: str) -> tuple[str, ...]:
    values = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{what}={value!r}: expected strings")
    return values


def _short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def gin_literal(value) -> str:
    """A gin (Python) literal, strings in double quotes so that a shell line quotes it cleanly."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{gin_literal(k)}: {gin_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(gin_literal, value)) + "]"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    raise ValueError(f"grid value {value!r} has no gin literal: use a string binding instead")


def _binding_value(value) -> str:
    if isinstance(value, str) and value[:1] in "@%":  # a configurable reference or macro
        return value
    return gin_literal(value)


def _axis_values(axis: str, values) -> list[Value]:
    """A list makes `axis` a gin parameter (`UniformPrior.beta: [0.01, 0.1]`); a dict maps each
    label to a binding, a list of bindings, or a Bundle."""
    if isinstance(values, dict):
        out = []
        for label, value in values.items():
            if isinstance(value, Value):  # already normalised (a selected sweep)
                out.append(value)
                continue
            bundle = value if isinstance(value, Bundle) else Bundle(bind=_strings(value, f"grid[{axis!r}]"))
            out.append(Value(str(label), label, bundle.gin, bundle.bind))
    elif isinstance(values, (list, tuple)):
        if "." not in axis:
            raise ValueError(f"grid axis {axis!r} has a list of values, so it must be a gin parameter "
                             "such as 'UniformPrior.beta'; give a dict {label: bindings} otherwise")
        out = [Value(v if isinstance(v, str) else repr(v), v, (), (f"{axis} = {_binding_value(v)}",))
               for v in values]
    else:
        raise ValueError(f"grid axis {axis!r}: give a list of values or a dict of labelled values")
    if not out:
        raise ValueError(f"grid axis {axis!r} has no values, so the grid is empty: give it at least one")
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels) or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"grid axis {axis!r}: labels {labels} must be distinct, non-empty, and made of "
                         "letters, digits, '_', '.', '+', '-'")
    return out


def _line_of(err: BaseException, path: Path) -> str:
    """', line N' of the declaration where `err` was raised (or could not be parsed), else ''."""
    frames = [f.lineno for f in traceback.extract_tb(err.__traceback__) if f.filename == str(path)]
    line = frames[-1] if frames else getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
    return f", line {line}" if line else ""


def load(path: str | Path, env=None) -> Sweep:
    """The sweep declared in `path` (its SWEEP), with the LOOPLM_SWEEP_* overrides of `env`."""
    env = os.environ if env is None else env
    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(f"_looplm_sweep_{path.stem}", path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"sweep file {str(path)!r} not found")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001  (a declaration is user code: any error is a bad declaration)
        raise ValueError(f"{path}{_line_of(err, path)}: "
                         + (str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")) from None
    sweep = getattr(module, "SWEEP", None)
    if not isinstance(sweep, Sweep):
        raise ValueError(f"{path} must define SWEEP = looplm.lab.Sweep(...)")
    if env.get("LOOPLM_SWEEP_GRID"):
        sweep = sweep.select(env["LOOPLM_SWEEP_GRID"])
    if env.get("LOOPLM_SWEEP_SEEDS"):
        seeds = [int(s) for s in re.split(r"[,\s]+", env["LOOPLM_SWEEP_SEEDS"]) if s]
        sweep = dataclasses.replace(sweep, seeds=seeds)
    overrides = tuple(b.strip() for b in re.split(r"[;\n]", env.get("LOOPLM_SWEEP_BIND", "")) if b.strip())
    return dataclasses.replace(sweep, overrides=overrides, file=path)
