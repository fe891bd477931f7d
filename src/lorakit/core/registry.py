"""One registry class, several instances: methods, initialisers, mergers, strategies.

Registration is a decorator beside the definition, and being registered is what puts a thing under the
conformance suite (``tests/conformance`` parametrises over ``names()``).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator


class Registry:
    """A named table of implementations with errors that list what exists."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        """Decorator: register the object under ``name`` (default: its ``name`` attribute)."""

        def deco(obj: Any) -> Any:
            key = name or getattr(obj, "name", None)
            if not key:
                raise ValueError(f"{self.kind} {obj!r} has no name to register under")
            self._add(key, obj)
            return obj

        return deco

    def _add(self, key: str, obj: Any) -> None:
        if key in self._items and self._items[key] is not obj:
            raise ValueError(f"{self.kind} '{key}' is already registered ({self._items[key]!r})")
        self._items[key] = obj

    def get(self, name: str) -> Any:
        """The entry called ``name``; a KeyError that lists the registered names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} '{name}'.{hint} Registered: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


class Method:
    """A registered adapter method: its config class and one adapter class per layer kind."""

    def __init__(self, name: str, config_class: type):
        self.name = name
        self.config_class = config_class
        self.adapter_classes: list[type] = []

    def adapter_class_for(self, layer: Any) -> type | None:
        """The adapter class that wraps ``layer``, or None if this method has none for its type."""
        for cls in self.adapter_classes:
            if cls.can_wrap(layer):
                return cls
        return None

    @property
    def capabilities(self):
        """The method's declared ``Capabilities`` (None if its adapter classes declare none or disagree)."""
        found = {cls.capabilities for cls in self.adapter_classes}
        return found.pop() if len(found) == 1 else None

    @property
    def layer_types(self) -> tuple[type, ...]:
        return tuple(t for cls in self.adapter_classes for t in cls.layer_types)

    def __repr__(self) -> str:
        return f"Method({self.name!r}, {[c.__name__ for c in self.adapter_classes]})"


class MethodRegistry(Registry):
    """Methods: registering an adapter class adds it to the method named by its ``name``."""

    def register(self, name: str | None = None) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            key = name or cls.name
            method = self._items.get(key)
            if method is None:
                method = Method(key, cls.config_class)
                self._items[key] = method
            elif method.config_class is not cls.config_class:
                raise ValueError(f"method '{key}': {cls.__name__} uses another config class")
            method.adapter_classes.append(cls)
            return cls

        return deco


METHODS = MethodRegistry("method")
INITIALIZERS = Registry("initialiser")


def initializer_for(init_lora_weights: Any) -> Any:
    """The registered initialiser that handles an ``init_lora_weights`` value, or None (True, False, "gaussian")."""
    if not isinstance(init_lora_weights, str):
        return None
    for name in INITIALIZERS:
        entry = INITIALIZERS.get(name)
        if entry.accepts(init_lora_weights):
            return entry
    return None
