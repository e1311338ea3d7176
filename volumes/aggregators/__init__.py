"""Aggregators: slice embeddings ``[B, D, E]`` (+ mask, positions, plane ids) -> logits ``[B, K]``.

Names resolve on first use so that importing this package pulls in neither torch
models nor torch_geometric until an aggregator is asked for.
"""

from __future__ import annotations

from volumes._lazy import lazy_names

# public name -> module that defines it
_LAZY = {
    "SliceTransformer": "volumes.aggregators.transformer",
    "sinusoidal_encoding": "volumes.aggregators.transformer",
    "centre_positions": "volumes.aggregators.transformer",
    "SliceGNN": "volumes.aggregators.gnn",
    "build_slice_graph": "volumes.aggregators.gnn",
    "MeanPool": "volumes.aggregators.pooling",
    "AttentionMIL": "volumes.aggregators.pooling",
    "concat_planes": "volumes.aggregators.pooling",
    "aggregator_names": "volumes.aggregators.factory",
    "register_aggregator": "volumes.aggregators.factory",
    "SliceAggregator": "volumes.aggregators.base",
    "build_aggregator": "volumes.aggregators.factory",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
