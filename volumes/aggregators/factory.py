"""The aggregator registry: ``@register_aggregator("name")`` on a class, ``build_aggregator("name", ...)``.

The built-in modules register their classes when imported, and they are imported only
when a name is looked up, so ``mean`` never loads torch_geometric. Register your own
aggregator class the same way (its constructor takes ``embed_dim, num_classes, **kwargs``
and its forward ``x [B, D, E], mask, positions, plane_ids -> [B, K]``); bundles then name
it like a built-in one once its module is imported (``"imports": ["$import my_module"]``).
"""

from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from torch import nn

from volumes.errors import ConfigError

__all__ = ["aggregator_names", "build_aggregator", "register_aggregator"]

T = TypeVar("T", bound=type)

_REGISTRY: dict[str, type] = {}
# imported in this order until a name is found: the light ones first
_BUILTIN_MODULES = ("volumes.aggregators.pooling", "volumes.aggregators.transformer", "volumes.aggregators.gnn")


def register_aggregator(name: str) -> Callable[[T], T]:
    """Class decorator: make the class available to :func:`build_aggregator` as ``name``."""

    def register(cls: T) -> T:
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"aggregator {name!r} is registered already ({_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = cls
        return cls

    return register


def _lookup(name: str) -> type | None:
    for module in _BUILTIN_MODULES:
        if name in _REGISTRY:
            break
        importlib.import_module(module)
    return _REGISTRY.get(name)


def aggregator_names() -> tuple[str, ...]:
    """Every registered aggregator name (the built-in ones are imported for this)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return tuple(_REGISTRY)


def build_aggregator(name: str, embed_dim: int, num_classes: int, **kwargs: object) -> nn.Module:
    """Construct the registered aggregator ``name``.

    Args:
        name: ``transformer``, ``gnn``, ``mean``, ``attention_mil`` or a name you registered.
        embed_dim: slice embedding size ``E``.
        num_classes: number of logits ``K``.
        **kwargs: the chosen class's keyword options (e.g. ``depth=2`` for ``transformer``).

    Returns:
        A module mapping ``x [B, D, E]`` (+ ``mask``, ``positions``, ``plane_ids``) to ``[B, K]``.

    Raises:
        ConfigError: ``name`` is unknown, or an option value is not allowed.
        TypeError: an option the class does not take.
    """
    cls = _lookup(name)
    if cls is None:
        raise ConfigError("aggregator", name, list(aggregator_names()))
    return cls(embed_dim, num_classes, **kwargs)
