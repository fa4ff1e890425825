"""Method registry. Each module in this package defines one Method subclass with a `name`; adding a
method is one new file here (every module is imported on first lookup)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Method

_REGISTRY: dict[str, type[Method]] = {}


def _load() -> dict[str, type[Method]]:
    if not _REGISTRY:
        for mod in pkgutil.iter_modules(__path__):
            if mod.name != "base":
                importlib.import_module(f"{__name__}.{mod.name}")
        stack = list(Method.__subclasses__())
        while stack:
            cls = stack.pop()
            stack += cls.__subclasses__()
            if cls.name:
                if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
                    raise RuntimeError(f"two methods named {cls.name!r}")
                _REGISTRY[cls.name] = cls
    return _REGISTRY


def known() -> list[str]:
    return sorted(_load())


def get_method(name: str) -> type[Method]:
    reg = _load()
    if name not in reg:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(reg))}")
    return reg[name]


def method_defaults(name: str) -> dict:
    """The method's default config keys (for config.parse); the method name is checked here."""
    return dict(get_method(name).defaults)


def method_reads(name: str) -> frozenset:
    """The `method` section keys the method uses (for config.parse)."""
    return get_method(name).reads


__all__ = ["Method", "get_method", "known", "method_defaults", "method_reads"]
