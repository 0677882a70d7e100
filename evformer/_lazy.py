"""Lazy package exports: a package lists ``{public name: submodule}`` and imports a
submodule only when one of its names is first used (keeps ``import evformer.events``
free of torch, and every package import fast)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, table: Mapping[str, str]) -> Callable[[str], object]:
    """Return a module ``__getattr__`` resolving ``table`` names from ``package``'s submodules."""

    def __getattr__(name: str) -> object:
        mod = table.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{mod}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    return __getattr__
