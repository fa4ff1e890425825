"""Installed versions of the packages a result depends on, for benchmark rows and run configs.

Read from the installed distributions' metadata, not from `module.__version__`: ffcv 1.0.2 reports
"0.0.3rc1" there, and DALI's distribution name depends on its CUDA build."""

from __future__ import annotations

import importlib.metadata as md
import platform

_DISTRIBUTIONS = {"dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120")}


def versions(*packages: str) -> dict[str, str]:
    """{"python": ..., package: version} for each name ("dali" finds either CUDA build); "n/a" when a
    package is not installed."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        out[pkg] = "n/a"
        for dist in _DISTRIBUTIONS.get(pkg, (pkg,)):
            try:
                out[pkg] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return out


def versions_text(v: dict[str, str]) -> str:
    """'python=3.11.7 torch=2.13.0 ...', one CSV cell."""
    return " ".join(f"{k}={x}" for k, x in v.items())
