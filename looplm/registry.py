"""Name -> class registries: how plugins are found by name (timm's register_model, per family),
and the close names suggested when a name is mistyped."""

import difflib
import importlib.util
import inspect
import re
from pathlib import Path

import gin

IMPORT_HINT = "a plugin registers when its module is imported, e.g. an `import variants.norms` line in the gin file"


def close_names(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the choices close to a mistyped name, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class Registry:
    """One family of interchangeable components, e.g. norm types or loss estimators.

    `@REG.register("name")` records a class under a name and makes it gin-configurable, so a
    gin file can select it as `@ClassName()`; `REG.get("name")` gives a clear error for typos.
    """

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, type] = {}

    def register(self, name: str):
        def decorate(cls):
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.family} {name!r} is already registered by "
                                 f"{self._entries[name].__module__}.{self._entries[name].__name__}")
            self._entries[name] = cls
            cls.registry_name = name
            return gin.configurable(cls, module=cls.__module__)
        return decorate

    def get(self, name: str) -> type:
        if name not in self._entries:
            raise ValueError(f"unknown {self.family} {name!r}{close_names(name, self._entries)}; "
                             f"registered: {sorted(self._entries)} ({IMPORT_HINT})")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self):
        return sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        return name in self._entries


# -- gin's unknown names ------------------------------------------------------------------------
_UNKNOWN_CONFIGURABLE = re.compile(r"No configurable matching (?:reference )?'@?([\w./]+?)(\(\))?'")
_UNKNOWN_PARAMETER = re.compile(r"Configurable '([\w./]+)' doesn't have a parameter named '(\w+)'")


def _configurables() -> dict[str, object]:
    """Every gin-configurable registered in this process: short name -> the wrapped callable."""
    return {c.name: c.wrapped for _, c in gin.config._REGISTRY.items()}  # gin has no public listing


def _defined_in_variants(name: str) -> str | None:
    """The variants module whose source defines `name`, found by reading (not importing) it."""
    spec = importlib.util.find_spec("variants")
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None:
        return None
    pattern = re.compile(rf"^(class|def) {re.escape(name)}\b", re.MULTILINE)
    for path in sorted(folder.glob("*.py")):
        if pattern.search(path.read_text(encoding="utf-8")):
            return f"variants.{path.stem}"
    return None


def gin_name_hint(message: str) -> str:
    """A hint for gin's unknown-name errors: the registered names close to an unknown
    `@Name()` or binding target, the module to import when the name is a plugin not imported yet,
    or the close parameter names of a misspelled parameter. '' when `message` is none of those."""
    unknown = _UNKNOWN_CONFIGURABLE.search(message)
    if unknown:
        name, call = unknown.group(1).split("/")[-1], unknown.group(2) or ""
        known = _configurables()
        close = difflib.get_close_matches(name.split(".")[-1], list(known), n=3, cutoff=0.6)
        if close:
            return "did you mean " + " or ".join(f"'@{c}{call}'" if call else f"'{c}'" for c in close) + "?"
        module = _defined_in_variants(name.split(".")[-1])
        if module:
            return f"{name} is defined in {module}: add `import {module}` to the gin file"
        return f"no configurable of that name is registered ({IMPORT_HINT})"
    misspelled = _UNKNOWN_PARAMETER.search(message)
    if misspelled:
        target, parameter = misspelled.groups()
        try:
            signature = inspect.signature(gin.get_configurable(target))
        except (ValueError, TypeError):
            return ""
        names = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
        return f"{target} takes {names}" + close_names(parameter, names)
    return ""
