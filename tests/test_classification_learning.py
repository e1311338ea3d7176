"""End to end: phantoms -> loading + preprocessing -> random-init encoder -> cached slice
embeddings -> each aggregator learns a volume-level label that needs 3D context.

The label is the phantom ``"hepatomegaly"`` task: the liver's cranio-caudal span, which no
single axial slice shows (the classes' largest liver cross-sections overlap) and which the
scan geometry does not give away (the scan covers the longest possible liver in both
classes). The encoder is a randomly initialised DINOv2 ViT-S/14 with 2 blocks, since no
pretrained weights can be downloaded here. What makes this learnable for random features
(measured; see the report in the test docstrings):

* the finding is a large structure that differs from its surroundings: an enhanced
  (portal-venous) liver in the liver window. The default phantoms' spleen is almost
  isodense with liver, muscle and bowel, and random features cannot find it;
* every case has the same field of view (``matrix`` and in-plane spacing fixed, as with a
  scanner protocol's fixed reconstruction diameter), so resizing the slices to the encoder
  input does not scale each case's anatomy differently;
* coarse slices (42 px, 3 x 3 patches): a random ViT's class token is close to a bag of its
  patch tokens, and a patch that the liver fills changes a lot;
* features standardised with training statistics: raw random-encoder features share a
  large offset with little spread between cases, so linear heads hardly move in a short run.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

from volumes.data.phantoms import PORTAL_VENOUS_HU, PhantomConfig, generate_phantom, write_cohort
from volumes.errors import ConfigError

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="AUC needs scikit-learn (pip install 'volumes[dev]')")

pytestmark = pytest.mark.slow

# Fixed field of view (96 x 5 mm = 480 mm, every body fits) and 5-6 mm slices: ~0.08 s a case.
LEARNING_CONFIG = PhantomConfig.classification_demo()
PREPROCESSING = {"preset": "liver", "axis": "axial", "channel_mode": "repeat", "size": 42}
N_CASES = 80
SPLITS = (0.6, 0.4, 0.0)  # 48 training, 32 validation cases, stratified
AGGREGATORS = ("transformer", "gnn", "mean", "attention_mil")


def _auc(labels, scores) -> float:
    return float(sklearn_metrics.roc_auc_score(np.asarray(labels), np.asarray(scores)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """The phantom cohort, embedded once through the real pipeline (with an on-disk cache)."""
    from monai.transforms import Compose

    from volumes.embedding import SliceEmbedder
    from volumes.data.io import LoadVolumed
    from volumes.networks import SliceClassifier
    from volumes.transforms import preprocessing

    root = tmp_path_factory.mktemp("learning")
    start = time.perf_counter()
    datalist_path = write_cohort(root / "phantoms", N_CASES, seed=0, config=LEARNING_CONFIG, splits=SPLITS,
                                 progress=False)
    generated = time.perf_counter()
    datalist = json.loads(datalist_path.read_text())

    torch.manual_seed(0)
    network = SliceClassifier(
        2, "vit_small_patch14_dinov2", "mean", features="cls_patch_mean",
        encoder_kwargs={"model_kwargs": {"depth": 2}},  # random init (no weights offline)
    )
    transform = Compose([
        LoadVolumed("image"),
        preprocessing(("image",), patch_size=network.encoder.patch_size, **PREPROCESSING),
    ])
    embedder = SliceEmbedder(network, transform, PREPROCESSING, cache_dir=root / "cache", progress=False)

    def items(split: str) -> list[dict]:
        return [{**item, "image": str(datalist_path.parent / item["image"]),
                 "label": str(datalist_path.parent / item["label"])} for item in datalist[split]]

    training, validation = embedder(items("training")), embedder(items("validation"))
    embedded = time.perf_counter()
    print(f"cohort: {N_CASES} phantoms in {generated - start:.1f} s, embedded in {embedded - generated:.1f} s "
          f"({len(training)} training, {len(validation)} validation)")
    cases = json.loads((datalist_path.parent / "cases.json").read_text())
    return {"training": training, "validation": validation, "cases": cases, "embedder": embedder,
            "items": items("validation")}


def _standardise(training: list[dict], validation: list[dict]) -> tuple[list[dict], list[dict]]:
    stacked = torch.cat([item["embedding"] for item in training])
    mean, std = stacked.mean(0), stacked.std(0).clamp_min(1e-6)

    def apply(items: list[dict]) -> list[dict]:
        return [{**item, "embedding": (item["embedding"] - mean) / std} for item in items]

    return apply(training), apply(validation)


def _train_and_score(name: str, training: list[dict], validation: list[dict], *, steps: int = 150,
                     batch_size: int = 16, seed: int = 0) -> tuple[float, float]:
    """Train aggregator ``name`` (AdamW, cross entropy) on the embeddings; (validation AUC, seconds)."""
    from volumes.aggregators import build_aggregator
    from volumes.classification import EmbeddingBatch, collate_embeddings

    torch.manual_seed(seed)
    model = build_aggregator(name, training[0]["embedding"].shape[1], 2)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    prepare = EmbeddingBatch()
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        picked = torch.randperm(len(training), generator=generator)[:batch_size]
        inputs, labels, args, _ = prepare(collate_embeddings([training[i] for i in picked]))
        loss = loss_fn(model(inputs, *args), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        inputs, labels, args, _ = prepare(collate_embeddings(validation))
        probabilities = torch.softmax(model(inputs, *args), dim=-1)[:, 1]
    return _auc(labels.numpy(), probabilities.numpy()), time.perf_counter() - start


def test_validation_split_is_meaningful(cohort):
    labels = [item["label"] for item in cohort["validation"]]
    assert len(labels) >= 20 and 8 <= sum(labels) <= len(labels) - 8
    assert {item["embedding"].shape[1] for item in cohort["training"] + cohort["validation"]} == {768}


def test_scan_geometry_does_not_predict_the_label(cohort):
    """Slice count and scan length alone are no better than chance at the label.

    (By construction: a matched pair, same seed with either class, has the same grid;
    see ``test_hepatomegaly_matched_pair_differs_in_the_liver_only``.)
    """
    labels = [item["label"] for item in cohort["validation"]]
    slices = [item["embedding"].shape[0] for item in cohort["validation"]]
    length = [float(item["positions"][-1]) for item in cohort["validation"]]
    every = list(cohort["cases"].values())
    all_labels = [case["class_label"] for case in every]
    all_slices = [case["shape"][2] for case in every]
    aucs = {"slice count (validation)": _auc(labels, slices), "scan length (validation)": _auc(labels, length),
            "slice count (all cases)": _auc(all_labels, all_slices)}
    print("trivial predictors:", {k: round(v, 3) for k, v in aucs.items()})
    for value in aucs.values():
        assert 0.25 <= value <= 0.75


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_learns_hepatomegaly_from_random_encoder_embeddings(cohort, name):
    training, validation = _standardise(cohort["training"], cohort["validation"])
    auc, seconds = _train_and_score(name, training, validation)
    print(f"{name}: validation AUC {auc:.3f} ({len(validation)} cases), trained in {seconds:.1f} s")
    assert auc >= 0.9


def test_embeddings_come_from_the_cache_the_second_time(cohort):
    embedder = cohort["embedder"]
    item = cohort["items"][0]
    before = dict(embedder.cache.stats)
    again = embedder.embed_item(item)
    after = dict(embedder.cache.stats)
    assert after["hits"] == before["hits"] + 1 and after["writes"] == before["writes"]
    torch.testing.assert_close(again["embedding"], cohort["validation"][0]["embedding"])


# ------------------------------------------------------------ the task itself

COARSE_HEPATOMEGALY = PhantomConfig(task="hepatomegaly", inplane_spacing_mm=(5.0, 6.0), slice_spacing_mm=(5.0, 6.0))


def test_hepatomegaly_rule_holds_and_one_slice_does_not_decide():
    cases = [generate_phantom(seed, COARSE_HEPATOMEGALY) for seed in range(24)]
    pos = [ph for ph in cases if ph.class_label == 1]
    neg = [ph for ph in cases if ph.class_label == 0]
    assert len(pos) >= 6 and len(neg) >= 6
    threshold = COARSE_HEPATOMEGALY.liver_span_threshold_mm
    for ph in cases:
        assert ph.class_label == int(ph.info["positive"]) == int(ph.info["liver_span_mm"] > threshold)
        liver_slices = np.flatnonzero((ph.label == 1).any(axis=(0, 1)))
        span = (liver_slices[-1] - liver_slices[0] + 1) * ph.spacing[2]
        assert ph.info["liver_span_mm"] == pytest.approx(span)
        assert liver_slices[0] > 0  # the whole liver is in view
    assert max(ph.info["liver_span_mm"] for ph in neg) < threshold - 15.0
    assert min(ph.info["liver_span_mm"] for ph in pos) > threshold + 15.0
    # largest axial liver cross-sections overlap between the classes
    def area(ph):
        return float((ph.label == 1).sum(axis=(0, 1)).max() * ph.spacing[0] * ph.spacing[1])

    assert min(area(ph) for ph in pos) < max(area(ph) for ph in neg)


def test_hepatomegaly_matched_pair_differs_in_the_liver_only():
    for seed in range(4):
        pos = generate_phantom(seed, LEARNING_CONFIG, positive=True)
        neg = generate_phantom(seed, LEARNING_CONFIG, positive=False)
        assert (pos.class_label, neg.class_label) == (1, 0)
        assert pos.shape == neg.shape and np.array_equal(pos.affine, neg.affine)  # no geometry leak
        assert pos.info["organ_ml"]["liver"] > neg.info["organ_ml"]["liver"]
        for organ in ("spleen", "kidney_left", "aorta", "vertebrae"):
            assert pos.info["organ_ml"][organ] == pytest.approx(neg.info["organ_ml"][organ])


def test_hu_ranges_override_only_the_named_tissues():
    base = generate_phantom(3, COARSE_HEPATOMEGALY)
    enhanced = generate_phantom(3, dataclasses.replace(COARSE_HEPATOMEGALY, hu_ranges=PORTAL_VENOUS_HU))
    np.testing.assert_array_equal(base.label, enhanced.label)
    for tissue, value in enhanced.info["hu"].items():
        if tissue in PORTAL_VENOUS_HU:
            lo, hi = PORTAL_VENOUS_HU[tissue]
            assert lo <= value <= hi
        else:
            assert value == base.info["hu"][tissue]
    liver = enhanced.label == 1
    assert np.median(enhanced.image[liver]) > np.median(base.image[liver]) + 30
    with pytest.raises(ConfigError):
        PhantomConfig(hu_ranges={"brain": (0.0, 10.0)})
    with pytest.raises(ConfigError):
        PhantomConfig(task="hepatomegaly", liver_span_threshold_mm=130.0)  # inside the normal range
