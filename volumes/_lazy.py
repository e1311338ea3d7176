"""Public names of a package resolved on first use, so importing it stays light (no torch at ``volumes --help``)."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable, Iterable, Mapping


def lazy_names(package: str, names: Mapping[str, str], submodules: Iterable[str] = ()
               ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``: ``names`` maps a public name to its module.

    A resolved name is kept in the package's globals (the next access is a plain lookup);
    ``submodules`` are importable by attribute too (``volumes.inference``).
    """
    namespace = sys.modules[package].__dict__
    children = set(submodules)

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(import_module(names[name]), name)
            namespace[name] = value
            return value
        if name in children:
            return import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(namespace.get("__all__", names))

    return __getattr__, __dir__
