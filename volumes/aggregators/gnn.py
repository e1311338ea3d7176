"""SliceGNN: a graph network over the slices of a volume (after Kiechle et al. 2024).

One node per valid slice, its embedding as node feature. Edges (all undirected):

- ``chain``: consecutive valid slices of the same plane (slice order = index order).
- ``chain_knn``: chain + each slice's ``k`` nearest other slices of the same volume by
  cosine similarity of the input embeddings (fixed by the data, not learned).
- ``chain_star``: chain + one virtual node per volume joined to all of its slices, a
  one-hop shortcut between any two slices. The virtual node starts from a learned
  vector and is left out of the readout, so logits and importance are about slices only.

Readout ``attention``: softmax-gated sum of node states; importance = those weights.
Readout ``mean``: mean of node states, then a single linear head, so the logits decompose
exactly into per-slice terms ``W z_i / n`` (plus the bias); importance = the L2 norm (over
classes) of each slice's term, normalised to sum to 1. It says how much a slice moves the
logits, not in which direction, and needs no gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch_geometric.nn import GATConv, GCNConv, SAGEConv, global_add_pool, global_mean_pool
from torch_geometric.utils import coalesce, softmax, to_undirected

from volumes.aggregators.pooling import (
    check_choice,
    check_dropout,
    check_positive,
    normalise_importance,
    resolve_mask,
    zero_padding,
)
from volumes.aggregators.base import SliceAggregator
from volumes.aggregators.factory import register_aggregator
from volumes.errors import ConfigError

CONVS = ("sage", "gat", "gcn")
GRAPHS = ("chain", "chain_knn", "chain_star")
READOUTS = ("mean", "attention")
GAT_HEADS = 4
PLANE_EMBED_DIM = 16


@dataclass
class SliceGraph:
    """A batch of slice graphs in torch_geometric's layout.

    Attributes:
        edge_index: ``[2, M]`` (source, target) over all nodes; undirected (both directions), sorted.
        batch: volume of each node, ``[N + V]``.
        num_slices: ``N``, the number of slice nodes; they come first, in ``x[mask]`` order.
        num_virtual: ``V``, virtual star nodes after the slices (node ``N + b`` belongs to volume ``b``).
    """

    edge_index: torch.Tensor
    batch: torch.Tensor
    num_slices: int
    num_virtual: int


def _chain_edges(mask: torch.Tensor, plane_ids: torch.Tensor) -> torch.Tensor:
    """Directed edges slice -> next valid slice of the same volume and plane, ``[2, M]``."""
    batch_size, depth = mask.shape
    planes = int(plane_ids.max().item()) + 1 if plane_ids.numel() else 1
    group = (torch.arange(batch_size, device=mask.device).unsqueeze(1) * planes + plane_ids)[mask]
    # Stable sort by (volume, plane) keeps index order inside each group.
    order = torch.argsort(group, stable=True)
    same = group[order[1:]] == group[order[:-1]]
    return torch.stack((order[:-1][same], order[1:][same]))


def _knn_edges(features: torch.Tensor, mask: torch.Tensor, node_id: torch.Tensor, k: int) -> torch.Tensor:
    """Directed edges neighbour -> slice for each slice's ``k`` most cosine-similar slices, ``[2, M]``."""
    depth = mask.shape[1]
    kk = min(k, depth - 1)
    if kk < 1:
        return torch.empty(2, 0, dtype=torch.long, device=mask.device)
    unit = nn.functional.normalize(features.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # [B, D, D]
    allowed = mask.unsqueeze(2) & mask.unsqueeze(1)
    allowed &= ~torch.eye(depth, dtype=torch.bool, device=mask.device)
    similarity = similarity.masked_fill(~allowed, float("-inf"))
    values, neighbours = similarity.topk(kk, dim=-1)  # [B, D, kk]
    keep = torch.isfinite(values)  # fewer than k other valid slices: drop the -inf picks
    batch_index = torch.arange(mask.shape[0], device=mask.device).view(-1, 1, 1).expand_as(neighbours)
    slice_index = torch.arange(depth, device=mask.device).view(1, -1, 1).expand_as(neighbours)
    source = node_id[batch_index, neighbours][keep]
    target = node_id[batch_index, slice_index][keep]
    return torch.stack((source, target))


def build_slice_graph(
    mask: torch.Tensor,
    graph: str = "chain",
    *,
    k: int = 4,
    features: torch.Tensor | None = None,
    plane_ids: torch.Tensor | None = None,
) -> SliceGraph:
    """Build the batched, undirected slice graph of ``B`` padded volumes.

    Args:
        mask: valid slices, ``[B, D]`` bool.
        graph: ``chain``, ``chain_knn`` or ``chain_star`` (see the module docstring).
        k: neighbours per slice for ``chain_knn`` (fewer when a volume has fewer slices).
        features: slice embeddings ``[B, D, E]``; needed for ``chain_knn``.
        plane_ids: plane of each slice ``[B, D]`` long; chain edges stay inside a plane.

    Returns:
        A :class:`SliceGraph`; slice node ``i`` is the ``i``-th ``True`` of ``mask`` in
        row-major order.
    """
    check_choice("graph", graph, GRAPHS)
    mask = mask.bool()
    if plane_ids is None:
        plane_ids = torch.zeros_like(mask, dtype=torch.long)
    batch_size = mask.shape[0]
    num_slices = int(mask.sum().item())
    node_id = mask.flatten().long().cumsum(0).view_as(mask) - 1  # valid (b, d) -> node index
    batch = torch.arange(batch_size, device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    parts = [_chain_edges(mask, plane_ids)]
    num_virtual = 0
    if graph == "chain_knn":
        if features is None:
            raise ValueError("graph='chain_knn' needs the slice features")
        parts.append(_knn_edges(zero_padding(features, mask), mask, node_id, k))
    elif graph == "chain_star":
        num_virtual = batch_size
        parts.append(torch.stack((torch.arange(num_slices, device=mask.device), num_slices + batch)))
        batch = torch.cat((batch, torch.arange(batch_size, device=mask.device)))
    total = num_slices + num_virtual
    edge_index = to_undirected(torch.cat(parts, dim=1), num_nodes=total)
    edge_index = coalesce(edge_index, num_nodes=total)
    return SliceGraph(edge_index=edge_index, batch=batch, num_slices=num_slices, num_virtual=num_virtual)


@register_aggregator("gnn")
class SliceGNN(SliceAggregator):
    """Graph network over slice embeddings, one node per slice.

    Args:
        embed_dim: slice embedding size ``E``.
        num_classes: number of logits ``K``.
        hidden: node state size (a multiple of 4 for ``gat``, which uses 4 heads).
        layers: number of graph convolutions (each residual, pre-norm).
        conv: ``sage`` (GraphSAGE), ``gat`` (GAT) or ``gcn`` (GCN).
        graph: ``chain``, ``chain_knn`` or ``chain_star`` (see the module docstring).
        k: feature-space neighbours per slice for ``chain_knn``.
        readout: ``mean`` or ``attention`` over slice nodes.
        dropout: dropout after each convolution and before the head.
        planes: number of slice planes in one stream; with ``planes > 1`` a learned plane
            embedding is concatenated to each node's features and chain edges stay
            within a plane.

    ``forward(x [B, D, E], mask [B, D] | None, positions, plane_ids [B, D] | None) -> logits [B, K]``.
    ``positions`` is accepted for the common signature and ignored: the graph encodes
    slice order, not distance.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        hidden: int = 256,
        layers: int = 2,
        conv: str = "sage",
        graph: str = "chain",
        k: int = 4,
        readout: str = "mean",
        dropout: float = 0.1,
        planes: int = 1,
    ):
        super().__init__()
        check_positive("embed_dim", embed_dim)
        check_positive("num_classes", num_classes)
        check_positive("hidden", hidden)
        check_positive("layers", layers)
        check_choice("conv", conv, CONVS)
        check_choice("graph", graph, GRAPHS)
        check_positive("k", k)
        check_choice("readout", readout, READOUTS)
        check_dropout("dropout", dropout)
        check_positive("planes", planes)
        if conv == "gat" and hidden % GAT_HEADS:
            raise ConfigError("hidden", hidden, f"multiples of {GAT_HEADS} for conv='gat'")
        self.graph = graph
        self.k = k
        self.readout = readout
        self.planes = planes

        self.plane_embedding = nn.Embedding(planes, PLANE_EMBED_DIM) if planes > 1 else None
        in_dim = embed_dim + (PLANE_EMBED_DIM if planes > 1 else 0)
        self.project = nn.Linear(in_dim, hidden)
        self.virtual_node = nn.Parameter(torch.zeros(1, hidden)) if graph == "chain_star" else None
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.convs = nn.ModuleList(self._make_conv(conv, hidden) for _ in range(layers))
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)
        self.gate = (
            nn.Sequential(nn.Linear(hidden, hidden // 2 or 1), nn.Tanh(), nn.Linear(hidden // 2 or 1, 1))
            if readout == "attention"
            else None
        )
        # A single linear head keeps the mean readout exactly decomposable per slice.
        self.head = nn.Linear(hidden, num_classes)
        if self.virtual_node is not None:
            nn.init.trunc_normal_(self.virtual_node, std=0.02)

    @staticmethod
    def _make_conv(conv: str, hidden: int) -> nn.Module:
        if conv == "sage":
            return SAGEConv(hidden, hidden)
        if conv == "gat":
            return GATConv(hidden, hidden // GAT_HEADS, heads=GAT_HEADS)
        return GCNConv(hidden, hidden)

    def logits_and_importance(self, x, mask, positions, plane_ids, need_importance):
        """Logits ``[B, K]`` and importance ``[B, D]`` (see the module docstring; computed either way)."""
        valid = resolve_mask(x, mask)
        batch_size = x.shape[0]
        if plane_ids is None or self.planes == 1:
            plane_ids = torch.zeros(valid.shape, dtype=torch.long, device=x.device)
        graph = build_slice_graph(valid, self.graph, k=self.k, features=x, plane_ids=plane_ids)
        nodes = x[valid]
        if self.plane_embedding is not None:
            nodes = torch.cat((nodes, self.plane_embedding(plane_ids[valid]).to(nodes.dtype)), dim=-1)
        h = self.project(nodes)
        if self.virtual_node is not None:
            h = torch.cat((h, self.virtual_node.expand(batch_size, -1).to(h.dtype)), dim=0)
        for norm, conv in zip(self.norms, self.convs):
            h = h + self.dropout(self.act(conv(norm(h), graph.edge_index)))
        slices = self.norm(h[: graph.num_slices])
        slice_batch = graph.batch[: graph.num_slices]

        if self.gate is not None:
            weights = softmax(self.gate(slices).squeeze(-1), slice_batch, num_nodes=graph.num_slices)
            pooled = global_add_pool(weights.unsqueeze(-1) * slices, slice_batch, size=batch_size)
            node_scores = weights
        else:
            pooled = global_mean_pool(slices, slice_batch, size=batch_size)
            # Each slice's exact share of the logits is W z_i / n; n is shared within a volume.
            node_scores = (slices @ self.head.weight.t()).norm(dim=-1)
        logits = self.head(self.dropout(pooled))
        dense = torch.zeros(valid.shape, dtype=node_scores.dtype, device=x.device)
        dense[valid] = node_scores.to(dense.dtype)
        return logits, normalise_importance(dense, valid)
