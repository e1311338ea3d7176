"""Build an aggregator by name (for configs and the CLI)."""

from __future__ import annotations

import importlib

from torch import nn

from volumes.errors import ConfigError

AGGREGATORS = ("transformer", "gnn", "mean", "attention_mil")

# name -> (module, class); imported on demand so "mean" never loads torch_geometric
_CLASSES = {
    "transformer": ("volumes.aggregators.transformer", "SliceTransformer"),
    "gnn": ("volumes.aggregators.gnn", "SliceGNN"),
    "mean": ("volumes.aggregators.pooling", "MeanPool"),
    "attention_mil": ("volumes.aggregators.pooling", "AttentionMIL"),
}


def build_aggregator(name: str, embed_dim: int, num_classes: int, **kwargs: object) -> nn.Module:
    """Construct the aggregator ``name`` (one of :data:`AGGREGATORS`).

    Args:
        name: ``transformer``, ``gnn``, ``mean`` or ``attention_mil``.
        embed_dim: slice embedding size ``E``.
        num_classes: number of logits ``K``.
        **kwargs: the chosen class's keyword options (e.g. ``depth=2`` for ``transformer``).

    Returns:
        A module mapping ``x [B, D, E]`` (+ ``mask``, ``positions``, ``plane_ids``) to ``[B, K]``.

    Raises:
        ConfigError: ``name`` is unknown, or an option value is not allowed.
        TypeError: an option the class does not take.
    """
    if name not in _CLASSES:
        raise ConfigError("aggregator", name, AGGREGATORS)
    module, cls_name = _CLASSES[name]
    cls = getattr(importlib.import_module(module), cls_name)
    return cls(embed_dim, num_classes, **kwargs)
