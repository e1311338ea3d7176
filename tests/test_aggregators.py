"""Aggregators: the shared contract, graph construction, positions, TorchScript, learnability."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from volumes.aggregators import (
    aggregator_names,
    register_aggregator,
    AttentionMIL,
    MeanPool,
    SliceTransformer,
    build_aggregator,
    centre_positions,
    concat_planes,
    sinusoidal_encoding,
)
from volumes.errors import ConfigError

E, K = 16, 3

CONFIGS = [
    ("transformer", dict(dim=16, heads=2, position="sinusoidal_mm")),
    ("transformer", dict(dim=16, heads=2, position="learned_index", max_slices=64)),
    ("transformer", dict(dim=16, heads=2, position="none")),
    ("gnn", dict(hidden=16, conv="sage", graph="chain", readout="mean")),
    ("gnn", dict(hidden=16, conv="gat", graph="chain_knn", k=2, readout="attention")),
    ("gnn", dict(hidden=16, conv="gcn", graph="chain_star", readout="mean")),
    ("gnn", dict(hidden=16, conv="sage", graph="chain_star", readout="attention")),
    ("mean", {}),
    ("attention_mil", dict(hidden=8)),
    ("attention_mil", dict(hidden=8, gated=False)),
]
CONFIG_IDS = [f"{name}-{'-'.join(str(v) for v in kw.values()) or 'default'}" for name, kw in CONFIGS]


def _batch(seed: int = 0, lengths: tuple[int, ...] = (9, 5, 7)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded batch of volumes with different slice counts and spacings: x, mask, positions (mm)."""
    g = torch.Generator().manual_seed(seed)
    depth = max(lengths)
    x = torch.randn(len(lengths), depth, E, generator=g)
    mask = torch.arange(depth).expand(len(lengths), depth) < torch.tensor(lengths).unsqueeze(1)
    spacing = torch.tensor([1.5, 3.0, 5.0][: len(lengths)]).unsqueeze(1)
    positions = 100.0 + torch.arange(depth).float() * spacing
    return x, mask, positions


def _pad(x, mask, positions, extra: int, seed: int = 1):
    """Append ``extra`` random padded slices (mask False) with random values and positions."""
    g = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    return (
        torch.cat((x, 50 * torch.randn(b, extra, x.shape[2], generator=g)), 1),
        torch.cat((mask, torch.zeros(b, extra, dtype=torch.bool)), 1),
        torch.cat((positions, 1e3 * torch.randn(b, extra, generator=g)), 1),
    )


# --- the contract -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_contract_shapes_padding_and_importance(name, kwargs):
    torch.manual_seed(0)
    model = build_aggregator(name, E, K, **kwargs).eval()
    x, mask, positions = _batch()
    with torch.no_grad():
        logits = model(x, mask, positions)
        logits2, importance = model.forward_with_importance(x, mask, positions)
        padded_logits, padded_importance = model.forward_with_importance(*_pad(x, mask, positions, extra=6))
        unmasked = model(x[:1, :9], None, positions[:1, :9])  # no mask: every slice valid
    assert logits.shape == (3, K) and importance.shape == (3, 9) and unmasked.shape == (1, K)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=0)
    # Padding must not change anything: logits, nor the importance of the real slices.
    torch.testing.assert_close(padded_logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_importance[:, :9], importance, atol=1e-5, rtol=0)
    assert torch.all(padded_importance[:, 9:] == 0)
    assert torch.all(importance[~mask] == 0) and torch.all(importance >= 0)
    torch.testing.assert_close(importance.sum(1), torch.ones(3))
    torch.testing.assert_close(unmasked, logits[:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS[:1] + CONFIGS[3:4], ids=["transformer", "gnn"])
def test_multi_plane_streams(name, kwargs):
    """Three planes with different slice counts, joined with concat_planes, plane embeddings on."""
    torch.manual_seed(0)
    model = build_aggregator(name, E, K, planes=3, **kwargs).eval()
    planes = [_batch(seed=s, lengths=lengths) for s, lengths in enumerate([(6, 4), (5, 5), (3, 7)])]
    x, mask, positions, plane_ids = concat_planes(*zip(*planes))
    assert x.shape == (2, 18, E) and plane_ids.tolist()[0] == [0] * 6 + [1] * 5 + [2] * 7
    padded = [_pad(*p, extra=3, seed=9 + i) for i, p in enumerate(planes)]
    px, pmask, ppositions, pplane_ids = concat_planes(*zip(*padded))
    with torch.no_grad():
        logits, importance = model.forward_with_importance(x, mask, positions, plane_ids)
        padded_logits = model(px, pmask, ppositions, pplane_ids)
        # Plane identity matters: the same tokens labelled as one plane give other logits.
        single = model(x, mask, positions, torch.zeros_like(plane_ids))
    assert logits.shape == (2, K)
    torch.testing.assert_close(padded_logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(importance.sum(1), torch.ones(2))
    assert not torch.allclose(single, logits)


# --- validation and the factory -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("transformer", dict(position="rope"), "position"),
        ("transformer", dict(dim=30, heads=4), "heads"),
        ("transformer", dict(depth=0), "depth"),
        ("transformer", dict(dropout=1.0), "dropout"),
        ("transformer", dict(mm_scale=0.0), "mm_scale"),
        ("gnn", dict(conv="gin"), "conv"),
        ("gnn", dict(graph="full"), "graph"),
        ("gnn", dict(readout="max"), "readout"),
        ("gnn", dict(k=0), "k"),
        ("gnn", dict(conv="gat", hidden=30), "hidden"),
        ("attention_mil", dict(hidden=-1), "hidden"),
        ("mean", dict(), "embed_dim"),
    ],
)
def test_bad_options_name_the_key(name, kwargs, key):
    embed_dim = 0 if key == "embed_dim" else E
    with pytest.raises(ConfigError, match=rf"^{key}=") as info:
        build_aggregator(name, embed_dim, K, **kwargs)
    assert info.value.key == key


def test_registry_names_and_unknown_name():
    assert set(aggregator_names()) >= {"transformer", "gnn", "mean", "attention_mil"}
    assert isinstance(build_aggregator("mean", E, K), MeanPool)
    assert isinstance(build_aggregator("attention_mil", E, K), AttentionMIL)
    with pytest.raises(ConfigError, match=r"aggregator='mlp' is not allowed; choose from \[.*'transformer'"):
        build_aggregator("mlp", E, K)


def test_a_registered_aggregator_builds_by_name():
    @register_aggregator("test_max_pool")
    class MaxPool(torch.nn.Module):
        def __init__(self, embed_dim: int, num_classes: int, scale: float = 1.0):
            super().__init__()
            self.head, self.scale = torch.nn.Linear(embed_dim, num_classes), scale

        def forward(self, x, mask=None, positions=None, plane_ids=None):
            return self.head(x.amax(dim=1)) * self.scale

    model = build_aggregator("test_max_pool", E, K, scale=2.0)
    x = torch.randn(3, 5, E)
    torch.testing.assert_close(model(x), model.head(x.amax(dim=1)) * 2.0)
    assert "test_max_pool" in aggregator_names()
    with pytest.raises(ValueError, match="registered already"):
        register_aggregator("mean")(MaxPool)


def test_package_import_does_not_load_torch_geometric():
    script = (
        "import sys, json; import volumes.aggregators as a; a.build_aggregator('mean', 4, 2);"
        "a.SliceTransformer(4, 2, dim=8, heads=2); print(json.dumps('torch_geometric' in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) is False


# --- graph construction --------------------------------------------------------------


def _edges(graph) -> set[tuple[int, int]]:
    return set(map(tuple, graph.edge_index.t().tolist()))


def test_chain_graph_exact_edges_with_offsets_and_padding():
    from volumes.aggregators.gnn import build_slice_graph

    assert _edges(build_slice_graph(torch.ones(1, 3, dtype=torch.bool))) == {(0, 1), (1, 0), (1, 2), (2, 1)}
    # Two volumes (3 and 2 valid slices): the second's nodes are offset by 3; no edge crosses volumes.
    graph = build_slice_graph(torch.tensor([[True, True, True], [True, True, False]]))
    assert _edges(graph) == {(0, 1), (1, 0), (1, 2), (2, 1), (3, 4), (4, 3)}
    assert graph.batch.tolist() == [0, 0, 0, 1, 1] and graph.num_slices == 5 and graph.num_virtual == 0


def test_chain_graph_stays_within_a_plane():
    from volumes.aggregators.gnn import build_slice_graph

    graph = build_slice_graph(torch.ones(1, 5, dtype=torch.bool), plane_ids=torch.tensor([[0, 0, 1, 1, 1]]))
    assert _edges(graph) == {(0, 1), (1, 0), (2, 3), (3, 2), (3, 4), (4, 3)}


def test_star_graph_adds_one_virtual_node_per_volume():
    from volumes.aggregators.gnn import build_slice_graph

    graph = build_slice_graph(torch.tensor([[True, True, True], [True, True, False]]), "chain_star")
    chain = {(0, 1), (1, 0), (1, 2), (2, 1), (3, 4), (4, 3)}
    hubs = {0: 5, 1: 5, 2: 5, 3: 6, 4: 6}  # slice -> its volume's virtual node
    star = {(s, v) for s, v in hubs.items()} | {(v, s) for s, v in hubs.items()}
    assert _edges(graph) == chain | star
    assert graph.batch.tolist() == [0, 0, 0, 1, 1, 0, 1] and graph.num_virtual == 2


def test_knn_graph_picks_the_nearest_by_cosine():
    from volumes.aggregators.gnn import build_slice_graph

    # Slices 0 and 3 point the same way (cosine 1) though far in Euclidean distance; so do 1 and 4.
    # Slice 2 is closest in angle to slice 4. Padding (index 5) looks like slice 0 but must be ignored.
    features = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8], [10.0, 0.1], [-0.1, 5.0], [1.0, 0.0]]]
    )
    mask = torch.tensor([[True, True, True, True, True, False]])
    graph = build_slice_graph(mask, "chain_knn", k=1, features=features)
    chain = {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3)}
    nearest = {0: 3, 1: 4, 2: 4, 3: 0, 4: 1}
    knn = {(j, i) for i, j in nearest.items()} | {(i, j) for i, j in nearest.items()}
    assert _edges(graph) == chain | knn


# --- positions -------------------------------------------------------------------------


def test_sinusoidal_positions_are_spacing_aware():
    """The same 120 mm of anatomy sampled at 2 mm and at 4 mm: equal codes at equal mm."""
    fine = torch.arange(0.0, 121.0, 2.0) + 37.0  # scanner z of each slice, mm
    coarse = torch.arange(0.0, 121.0, 4.0) + 37.0
    codes = []
    for positions in (fine, coarse):
        mask = torch.ones(1, len(positions), dtype=torch.bool)
        zeros = torch.zeros(1, len(positions), dtype=torch.long)
        codes.append(sinusoidal_encoding(centre_positions(positions[None], mask, zeros, 1), 64)[0])
    fine_code, coarse_code = codes
    # Every coarse slice lies at the same mm as every other fine slice.
    torch.testing.assert_close(fine_code[::2], coarse_code, atol=1e-5, rtol=0)
    # Index-based codes would disagree: fine slice i is at 2i mm, coarse slice i at 4i mm.
    assert not torch.allclose(fine_code[: len(coarse)], coarse_code, atol=1e-2)
    # Near positions get near codes, far positions far codes.
    assert torch.dist(fine_code[30], fine_code[31]) < torch.dist(fine_code[30], fine_code[60])


def test_centre_positions_per_plane_ignores_padding():
    positions = torch.tensor([[10.0, 20.0, 30.0, 999.0, -5.0, 5.0]])
    mask = torch.tensor([[True, True, True, False, True, True]])
    plane_ids = torch.tensor([[0, 0, 0, 0, 1, 1]])
    centred = centre_positions(positions, mask, plane_ids, 2)
    assert centred.tolist() == [[-10.0, 0.0, 10.0, 0.0, -5.0, 5.0]]


def test_learned_index_rejects_too_many_slices():
    model = SliceTransformer(E, K, dim=16, heads=2, position="learned_index", max_slices=4)
    with pytest.raises(ValueError, match="max_slices=4"):
        model(torch.randn(1, 5, E))


# --- TorchScript ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        SliceTransformer(E, K, dim=16, heads=2, depth=2),
        SliceTransformer(E, K, dim=16, heads=2, position="learned_index", planes=3),
        MeanPool(E, K),
    ],
    ids=["transformer-sinusoidal", "transformer-index-planes", "mean"],
)
def test_trace_matches_eager_on_new_shapes(model):
    model.eval()
    x, mask, positions = _batch(seed=3)
    plane_ids = torch.randint(0, 3, mask.shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(model, (x, mask, positions, plane_ids))
    # A different batch size and slice count than the one traced.
    x2, mask2, positions2 = _pad(*_batch(seed=4, lengths=(4, 11)), extra=2)
    plane_ids2 = torch.randint(0, 3, mask2.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(traced(x2, mask2, positions2, plane_ids2), model(x2, mask2, positions2, plane_ids2))


# --- learnability -----------------------------------------------------------------------


def _lesion_bags(count: int, seed: int, dim: int = 32, shift: float = 2.0):
    """Synthetic 3D task: a positive volume has 3 consecutive "lesion" slices shifted along one direction.

    10-30 slices of Gaussian features per volume, padded to 30; returns x, mask, positions,
    labels and the lesion-slice mask.
    """
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(1234).standard_normal(dim)
    direction /= np.linalg.norm(direction)
    x = np.zeros((count, 30, dim), np.float32)
    mask = np.zeros((count, 30), bool)
    lesion = np.zeros((count, 30), bool)
    labels = rng.integers(0, 2, count)
    for i in range(count):
        n = int(rng.integers(10, 31))
        x[i, :n] = rng.standard_normal((n, dim))
        mask[i, :n] = True
        if labels[i]:
            start = int(rng.integers(0, n - 2))
            lesion[i, start : start + 3] = True
            x[i, start : start + 3] += shift * direction * np.sqrt(dim) / 2
    spacing = rng.choice([1.0, 2.5, 5.0], size=(count, 1))
    positions = (np.arange(30) * spacing).astype(np.float32)
    return (
        torch.from_numpy(x),
        torch.from_numpy(mask),
        torch.from_numpy(positions),
        torch.from_numpy(labels).float(),
        torch.from_numpy(lesion),
    )


# (name, options, whether the importance is attention that should find the lesion)
LEARN = [
    ("transformer", dict(dim=32, depth=1, heads=2, dropout=0.0), True),
    ("gnn", dict(hidden=32, conv="sage", graph="chain", readout="attention", dropout=0.0), True),
    ("gnn", dict(hidden=32, conv="gat", graph="chain_knn", readout="mean", dropout=0.0), False),
    ("gnn", dict(hidden=32, conv="gcn", graph="chain_star", readout="attention", dropout=0.0), True),
    ("mean", {}, False),
    ("attention_mil", dict(hidden=32), True),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kwargs", "attends"), LEARN, ids=["transformer", "gnn-sage", "gnn-gat-knn", "gnn-gcn-star", "mean", "mil"]
)
def test_learns_synthetic_lesion_task(name, kwargs, attends):
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    x, mask, positions, labels, _ = _lesion_bags(200, seed=0)
    tx, tmask, tpositions, tlabels, lesion = _lesion_bags(100, seed=1)
    model = build_aggregator(name, 32, 1, **kwargs)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = torch.randperm(200, generator=generator)[:64]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(x[batch], mask[batch], positions[batch]).squeeze(1), labels[batch]
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        logits, importance = model.forward_with_importance(tx, tmask, tpositions)
    auc = roc_auc_score(tlabels.numpy(), logits.squeeze(1).numpy())
    # Share of importance on the 3 lesion slices of positive volumes, against a uniform share.
    positive = tlabels.bool()
    on_lesion = (importance * lesion).sum(1)[positive].mean().item()
    uniform = (3 / tmask.sum(1).float())[positive].mean().item()
    print(f"{name} {kwargs}: held-out AUC {auc:.3f}, lesion importance {on_lesion:.2f} (uniform {uniform:.2f})")
    assert auc >= 0.9
    if attends:
        assert on_lesion > 2 * uniform
