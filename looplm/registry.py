"""Name -> class registries: how plugins are found by name (timm's register_model, per family)."""

import gin


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
            raise ValueError(f"unknown {self.family} {name!r}; registered: {sorted(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self):
        return sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        return name in self._entries

