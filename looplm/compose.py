"""Reading gin files so that a run is what its files say.

gin applies files in order and a later binding silently replaces an earlier one. With variant files
that each include a base, that loses choices: `include 'random_loops.gin'` then
`include 'jacobian.gin'` re-read `full_unroll.gin` inside the second and set the loop count back to
fixed loops. Two rules make composition safe:

- **Each file is read once.** An `include` of a file already read in this config is skipped, so a
  diamond of includes composes (both variants keep their choices on one shared base).
- **A binding may replace a value only knowingly**: the file that sets it includes (directly or
  not) the file whose value it replaces, or its line ends in `# override`, or it is a `--bind` on
  the command line (always wins, reported). Anything else fails, naming both files and the binding.
  `train.run_dir` is exempt: every variant file names its own folder.

Also caught: `train.steps` bound to a number while `TRAIN_STEPS` (the knob the README names)
still drives a schedule such as a curriculum's total steps.
"""

import contextlib
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import gin
import gin.config as gin_config

from looplm.registry import close_names

COMMAND_LINE = "--bind"
FREE_KEYS = frozenset({"train.run_dir"})  # naming, not semantics: each variant names its folder
OVERRIDE_MARK = re.compile(r"#\s*override\b")


class CompositionError(ValueError):
    """Gin files that would silently replace each other's choices."""


@dataclass
class Binding:
    key: str  # as written: "Recipe.loop_count", "scope/LastLoops.k" or a macro "TRAIN_STEPS"
    value: str  # gin's spelling of the value, e.g. "@LogNormalLoops()"
    source: str  # the file that set it, or COMMAND_LINE
    marked: bool = False  # the line carries `# override`


@dataclass
class Replacement:
    new: Binding
    old: Binding
    why: str  # "refines", "override", "command line", "free"


@dataclass
class Composition:
    """What reading a config did: files in reading order, includes, every binding applied."""

    files: list = field(default_factory=list)
    includes: dict = field(default_factory=dict)  # file -> files it includes (directly)
    skipped: list = field(default_factory=list)  # (including file, file already read)
    bindings: list = field(default_factory=list)
    replacements: list = field(default_factory=list)

    def includes_transitively(self, outer: str, inner: str) -> bool:
        seen, todo = set(), [outer]
        while todo:
            f = todo.pop()
            for g in self.includes.get(f, ()):
                if g == inner:
                    return True
                if g not in seen:
                    seen.add(g)
                    todo.append(g)
        return False


def _display(path: str) -> str:
    p = Path(path)
    with contextlib.suppress(ValueError):
        return str(p.relative_to(Path.cwd()))
    return str(p)


def _key(binding_key) -> tuple[tuple, str]:
    """(identity, spelling) of a binding: one identity however the selector is written."""
    pbk = gin_config.ParsedBindingKey.parse(binding_key)
    if pbk.complete_selector == "gin.macro":
        return pbk.config_key, pbk.scope
    scope = f"{pbk.scope}/" if pbk.scope else ""
    return (pbk.config_key, pbk.arg_name), f"{scope}{pbk.given_selector}.{pbk.arg_name}"


def _marked_keys(path: Path) -> set[str]:
    """Keys whose binding line in `path` ends in `# override`."""
    marked = set()
    for line in path.read_text().splitlines():
        if OVERRIDE_MARK.search(line) and "=" in line:
            marked.add(line.split("=", 1)[0].strip())
    return marked


class _Reader:
    """Wraps gin's file reader and binder for one config read (they are module globals that
    gin's own `include` handling calls, so every nested include passes through here)."""

    def __init__(self, search_dirs: list[Path]):
        self.search_dirs = search_dirs
        self.comp = Composition()
        self.stack: list[str] = []
        self.marks: dict[str, set] = {}
        self.current: dict = {}  # identity -> Binding in force
        self.conflicts: list[str] = []
        self._parse_file, self._bind = gin_config.parse_config_file, gin_config.bind_parameter

    def resolve(self, name: str) -> Path:
        here = [Path(self.stack[-1]).parent] if self.stack else []
        candidates = [Path(name)] if Path(name).is_absolute() else [
            d / name for d in [*here, *self.search_dirs, Path.cwd()]]
        for c in candidates:
            if c.is_file():
                return c.resolve()
        where = f" (included from {_display(self.stack[-1])})" if self.stack else ""
        raise FileNotFoundError(f"gin file {name!r} not found{where}; looked in "
                                f"{', '.join(_display(str(c.parent)) for c in candidates)}")

    def parse_file(self, config_file, skip_unknown=False, print_includes_and_imports=False):
        path = str(self.resolve(config_file))
        if self.stack:
            self.comp.includes.setdefault(self.stack[-1], []).append(path)
        if path in self.comp.files:
            self.comp.skipped.append((self.stack[-1] if self.stack else COMMAND_LINE, path))
            return gin_config.ParsedConfigFileIncludesAndImports(path, [], [])
        self.comp.files.append(path)
        self.marks[path] = _marked_keys(Path(path))
        self.stack.append(path)
        try:
            return self._parse_file(path, skip_unknown)
        finally:
            self.stack.pop()

    def bind(self, binding_key, value):
        identity, spelled = _key(binding_key)
        source = self.stack[-1] if self.stack else COMMAND_LINE
        new = Binding(spelled, repr(value), source, spelled in self.marks.get(source, ()))
        self.comp.bindings.append(new)
        old = self.current.get(identity)
        self.current[identity] = new
        if old is not None and old.value != new.value:
            why = ("command line" if source == COMMAND_LINE else "override" if new.marked
                   else "free" if spelled in FREE_KEYS
                   else "refines" if self.comp.includes_transitively(source, old.source) else None)
            if why is None:
                self.conflicts.append(
                    f"{_display(source)} sets {spelled} = {new.value}, replacing {old.value} set by "
                    f"{_display(old.source)}, which {_display(source)} does not include")
            else:
                self.comp.replacements.append(Replacement(new, old, why))
        return self._bind(binding_key, value)

    @contextlib.contextmanager
    def installed(self):
        gin_config.parse_config_file, gin_config.bind_parameter = self.parse_file, self.bind
        try:
            yield self
        finally:
            gin_config.parse_config_file, gin_config.bind_parameter = self._parse_file, self._bind


def read(gin_files: list[str], bindings: list[str], search_dirs: list[Path]) -> Composition:
    """Parse `gin_files` then `bindings` into gin's global config, checking the rules above.

    Raises CompositionError (a ValueError) listing every silent replacement."""
    for f in gin_files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"gin file {f!r} not found (files in {_display(str(search_dirs[0]))}: "
                                    f"{sorted(p.name for p in search_dirs[0].glob('*.gin'))})")
    reader = _Reader(search_dirs)
    with reader.installed():
        for f in gin_files:
            reader.parse_file(str(Path(f).resolve()))
        for binding in bindings:  # one at a time: an error names the --bind that failed
            try:
                gin.parse_config(binding)
            except (SyntaxError, tokenize.TokenError) as error:
                reason = error.msg if isinstance(error, SyntaxError) else error.args[0]
                raise ValueError(f"--bind {binding!r} does not parse ({reason}); a binding reads "
                                 "'name.parameter = value', e.g. 'TRAIN_STEPS = 500'") from None
    if reader.conflicts:
        raise CompositionError(
            "gin files replace each other's choices silently:\n  " + "\n  ".join(reader.conflicts)
            + "\nCompose them in a file that includes both and sets the value, end the line with "
              "'# override', or pass --bind on the command line.")
    _check_steps_macro(reader.current)
    _check_macros(reader.current)
    return reader.comp


def _check_macros(current: dict) -> None:
    """A value `%NAME` whose macro nothing binds (gin's own error names neither)."""
    bound = {b.key for b in current.values()}
    for b in current.values():
        for name in re.findall(r"%([\w.]+)", b.value):
            if name not in bound:
                raise CompositionError(
                    f"{b.key} = {b.value} ({_display(b.source)}) uses the macro %{name}, which nothing binds"
                    f"{close_names(name, [k for k in bound if k.isupper()])}; bind it, e.g. --bind '{name} = ...'")


def _check_steps_macro(current: dict) -> None:
    """`--bind train.steps=N` leaves schedules written as %TRAIN_STEPS at the old length."""
    by_key = {b.key: b for b in current.values()}
    steps, macro = by_key.get("train.steps"), by_key.get("TRAIN_STEPS")
    if steps is None or macro is None or steps.value == "%TRAIN_STEPS" or steps.value == macro.value:
        return
    users = sorted(b.key for b in current.values() if b.value == "%TRAIN_STEPS")
    if users:
        raise CompositionError(
            f"train.steps = {steps.value} but TRAIN_STEPS = {macro.value} still drives "
            f"{', '.join(users)}; set the length with TRAIN_STEPS (e.g. --bind 'TRAIN_STEPS = "
            f"{steps.value}') so the schedules follow it")


def report(comp: Composition) -> list[str]:
    """Lines saying which files were read and which values were replaced, and why that is allowed."""
    lines = ["files read: " + " -> ".join(_display(f) for f in comp.files)]
    lines += [f"skipped include of {_display(inner)} in {_display(outer)} (already read)"
              for outer, inner in comp.skipped]
    for r in comp.replacements:
        if r.why in ("command line", "override"):
            lines.append(f"{r.why}: {r.new.key} = {r.new.value} (was {r.old.value} from "
                         f"{_display(r.old.source)})")
    return lines


def _parse_config_text(text: str) -> dict[str, str]:
    """`key -> value` of a gin config string as gin writes it (continuation lines joined)."""
    out, key = {}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or line.startswith(("import ", "from ")):
            key = None
        elif line[0].isspace() and key is not None:
            out[key] = (out[key].removesuffix("\\").rstrip() + " " + line.strip()).strip()
        elif " = " in line:
            key, value = line.split(" = ", 1)
            out[key] = value.strip()
    return out


def bindings_in_force() -> dict[str, str]:
    """Every binding gin holds now (files and --bind resolved), `key -> value` as gin spells it."""
    return _parse_config_text(gin.config_str(max_line_length=10**6))


def unused_bindings() -> list[str]:
    """Bindings set but never passed to a configurable that ran: they have no effect on this run
    (e.g. `LastLoops.k` in a recipe without LastLoops). Macros are used through references."""
    used = _parse_config_text(gin.operative_config_str(max_line_length=10**6))
    return [k for k in bindings_in_force() if "." in k and k not in used]  # a macro has no "."


def operative_config_text() -> str:
    """config.gin of a run folder: the bindings the run was given, re-runnable with --gin,
    with the ones that had no effect named at the top."""
    unused = unused_bindings()
    header = ["# The config this run was given: its gin files and --bind lines resolved into one.",
              "# Re-run it with: python -m looplm.run --gin <this file>"]
    if unused:
        header.append(f"# Set but unused by this run (no effect): {', '.join(unused)}")
    return "\n".join(header) + "\n\n" + gin.config_str() + "\n"
