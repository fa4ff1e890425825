"""Method registry. Each module in this package defines one Method subclass with a `name`; adding a
method is one new file here (every module is imported on first lookup). Modules elsewhere are added
with INFOVIEW_METHODS=module.path[,other.module]."""

from __future__ import annotations

import importlib
import os
import pkgutil

from .. import config
from ..config import Config
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}


def _load() -> dict[str, type[Method]]:
    if not _REGISTRY:
        for mod in pkgutil.iter_modules(__path__):
            if mod.name != "base":
                importlib.import_module(f"{__name__}.{mod.name}")
        # Methods outside this package (a user's own, a test's): INFOVIEW_METHODS=pkg.mod,other.mod
        for name in filter(None, os.environ.get("INFOVIEW_METHODS", "").split(",")):
            importlib.import_module(name.strip())
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


def catalog() -> list[type[Method]]:
    return [get_method(n) for n in known()]


def build_config(values: dict) -> Config:
    """config.build for the method `values` names (default: simclr), with its defaults and keys."""
    return config.build(values, get_method(values.get("method", config.RunConfig().method)), catalog())


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """The pretraining CLI (+ --config file) for the chosen method: see train.config.parse."""
    return config.parse(argv, get_method, catalog(), description)


def config_from_dict(d: dict) -> Config:
    """Reload RUN_DIR/config.json."""
    return config.from_dict(d, get_method(d.get("run", {}).get("method", config.RunConfig().method)), catalog())


__all__ = ["Method", "get_method", "known", "catalog", "build_config", "parse_config", "config_from_dict"]
