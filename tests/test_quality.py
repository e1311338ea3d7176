"""Segmentation quality control (volumes.quality): the measurements, the statistics, the fit, the files,
and where users see it (predictions.csv, report.html, the figure badge, the DICOM SR).

Known answers: margins and fragment fractions of hand-built logits, agreement 1 for an untrained
(zero) 3D refinement, z-scores and thresholds of given numbers, AUROC equal to scikit-learn's.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from volumes import quality as q
from volumes.errors import VolumesError

LABELS = ["background", "liver", "spleen", "kidney"]


# ---------------------------------------------------------------------------- statistics
def test_robust_reference_and_one_or_two_sided_z_scores():
    stats = q._robust([1.0, 2.0, 3.0, 4.0, 100.0, math.nan], floor=0.01)
    assert stats["center"] == 3.0 and stats["n"] == 5
    assert stats["scale"] == pytest.approx(1.4826 * 1.0)  # MAD of |v - 3| = [2, 1, 0, 1, 97] is 1
    assert q._robust([5.0, 5.0, 5.0], floor=0.25)["scale"] == 0.25  # no spread: the floor
    assert q._robust([], floor=0.1) == {"center": None, "scale": None, "n": 0}
    ref = {"center": 10.0, "scale": 2.0}
    assert q._z("ood", 16.0, ref) == pytest.approx(3.0)
    assert q._z("ood", 4.0, ref) == 0.0  # closer than usual is not bad
    assert q._z("margin", 4.0, ref) == pytest.approx(3.0) and q._z("margin", 16.0, ref) == 0.0
    assert q._z("volume", 4.0, ref) == pytest.approx(3.0) == q._z("volume", 16.0, ref)
    assert math.isnan(q._z("margin", math.nan, ref)) and math.isnan(q._z("margin", 1.0, {"center": None}))


def test_the_auroc_qc_reports_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from volumes.metrics import binary_auc

    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = rng.normal(size=200) + y * 0.8
    s[:20] = np.round(s[:20])  # ties
    assert binary_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert math.isnan(binary_auc([1.0, 2.0], [False, False]))


def test_threshold_flags_at_most_ten_percent_of_the_good_organs():
    clean = np.linspace(0.0, 10.0, 101)  # 101 organs with Dice >= 0.8: at most 10 may be flagged
    threshold, how = q.choose_threshold(clean, [False] * 101)
    assert threshold == pytest.approx(9.0) and int((clean > threshold).sum()) == 10 and "at most 10%" in how
    # organs below the bar do not move it: the smallest allowed threshold flags the most of them
    scores, bad = [0.5, 1.0, 2.5, 3.0, 9.0, 12.0], [False] * 4 + [True] * 2
    assert q.choose_threshold(scores, bad)[0] == 3.0
    assert q.choose_threshold([0.1, 0.2, 0.3], [False] * 3)[0] == q.MIN_THRESHOLD  # never below the minimum
    assert q.choose_threshold([5.0], [True])[0] == q.MIN_THRESHOLD  # no good organ to count


def test_pooled_scale_comes_from_every_organ_and_centres_from_each():
    stats = q._pooled({"a": [1.0, 1.1, 0.9], "b": [5.0, 5.2, 4.8, math.nan], "c": []}, floor=0.001)
    assert stats["a"]["center"] == 1.0 and stats["b"]["center"] == 5.0 and stats["c"]["center"] is None
    deviations = [0.0, 0.1, 0.1, 0.0, 0.2, 0.2]
    assert stats["a"]["scale"] == stats["b"]["scale"] == pytest.approx(1.4826 * np.median(deviations))
    assert stats["b"]["n"] == 3 and stats["c"]["scale"] is None


def test_dice_per_organ_counts_two_empty_masks_as_agreement():
    prediction = np.array([[0, 1, 1, 2]])
    reference = np.array([[0, 1, 0, 2]])
    assert q.dice_per_organ(prediction, reference, LABELS) == {"liver": pytest.approx(2 / 3), "spleen": 1.0,
                                                                 "kidney": 1.0}


# ---------------------------------------------------------------------------- measurements
def _logits_for(label_map: np.ndarray, confidence: dict[int, float], k: int = 4) -> torch.Tensor:
    """Logits whose softmax gives ``confidence[label]`` to each voxel's label and the rest evenly to the others."""
    logits = np.zeros((k, *label_map.shape), np.float32)
    for value in range(k):
        p = confidence.get(value, 0.9)
        rest = (1.0 - p) / (k - 1)
        for c in range(k):
            logits[c][label_map == value] = math.log(p if c == value else rest)
    return torch.from_numpy(logits)


def test_measure_case_margins_volumes_components_and_agreement():
    label_map = np.zeros((20, 20, 10), np.uint8)
    label_map[2:6, 2:6, 2:6] = 1  # liver: one 64-voxel box
    label_map[10:12, 10:12, 2:4] = 2  # spleen: an 8-voxel box ...
    label_map[15, 15, 8] = 2  # ... and a 1-voxel fragment far away
    logits = _logits_for(label_map, {1: 0.7, 2: 0.55})
    probe = q.SegmentationProbe()
    # one slab whose 2D answer misses half of the liver's voxels: Dice 2 * 32 / (32 + 64)
    two_d = logits.clone()
    two_d[0, 2:4, 2:6, 2:6] += 10.0
    probe.add_slab(two_d[None], logits[None])
    measured = q.measure_case(logits, probe, spacing=(2.0, 2.0, 2.5), labels=LABELS, chunk=3)
    liver, spleen, kidney = (measured["organs"][n] for n in LABELS[1:])
    margin = lambda p: p - (1 - p) / 3  # noqa: E731
    assert liver["margin"] == pytest.approx(margin(0.7), abs=1e-5)
    assert spleen["margin"] == pytest.approx(margin(0.55), abs=1e-5)
    assert liver["volume_ml"] == pytest.approx(64 * 10 / 1000) and spleen["volume_ml"] == pytest.approx(9 * 10 / 1000)
    assert (liver["components"], liver["fragment_fraction"]) == (1, 0.0)
    assert spleen["components"] == 2 and spleen["fragment_fraction"] == pytest.approx(1 / 9)
    assert liver["agreement"] == pytest.approx(64 / 96) and spleen["agreement"] == 1.0
    assert kidney["volume_ml"] == 0.0 and math.isnan(kidney["margin"]) and kidney["components"] == 0
    assert math.isnan(kidney["agreement"]) and math.isnan(kidney["fragment_fraction"])


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    assert q._components(mask) == (1, 0.0)


@pytest.fixture(scope="module")
def segmenter():
    from volumes.networks import SliceSegmenter

    torch.manual_seed(0)
    return SliceSegmenter(4, "vit_small_patch14_dinov2", feature_size=8, encoder_kwargs={"model_kwargs": {"depth": 2}}
                          ).eval()


def test_probe_sees_every_slice_once_and_an_untrained_refinement_agrees_with_2d(segmenter):
    from volumes.segmentation import slab_inferer

    torch.manual_seed(1)
    volume = torch.randn(3, 28, 28, 20)
    volume[..., 19] = 0.5  # a constant slice: padding-like, left out of the embeddings
    probe = q.SegmentationProbe()
    logits = q.predict_with_probe(segmenter, slab_inferer(8, 0.25), volume, "cpu", probe)
    assert logits.shape == (4, 28, 28, 20) and segmenter.qc_probe is None  # detached afterwards
    with torch.inference_mode():
        expected = segmenter.encoder(volume.permute(3, 0, 1, 2)[:19], with_grids=False).cls
    assert probe.embeddings.shape == (19, segmenter.encoder.embed_dim)
    np.testing.assert_allclose(probe.embeddings, expected.numpy(), atol=1e-4)
    measured = q.measure_case(logits, probe, (1.0, 1.0, 1.0), LABELS)
    present = [o for o in measured["organs"].values() if o["volume_ml"] > 0]
    assert present and all(o["agreement"] == 1.0 for o in present)  # the refinement's last layer starts at zero
    with torch.no_grad():
        segmenter.refine.body[-1].bias.copy_(torch.tensor([0.0, 3.0, -3.0, 0.0]))
    try:
        probe = q.SegmentationProbe()
        logits = q.predict_with_probe(segmenter, slab_inferer(8, 0.25), volume, "cpu", probe)
        organs = q.measure_case(logits, probe, (1.0, 1.0, 1.0), LABELS)["organs"]
        assert any(o["agreement"] < 1.0 for o in organs.values() if math.isfinite(o["agreement"]))
    finally:
        with torch.no_grad():
            segmenter.refine.body[-1].bias.zero_()


# ---------------------------------------------------------------------------- fit and assess
def _synthetic(rng: np.random.Generator, shift: float = 0.0, volumes: dict | None = None, margin: float = 0.9,
               slices: int = 30) -> dict:
    """Measurements of one case: embeddings around ``shift``, organs with the given volumes and margin."""
    volumes = volumes or {"liver": 1500.0, "spleen": 200.0, "kidney": 150.0}
    organs = {}
    for name, ml in volumes.items():
        organs[name] = {"volume_ml": ml * rng.uniform(0.9, 1.1) if ml else 0.0,
                        "margin": margin + rng.normal(0, 0.01) if ml else math.nan,
                        "agreement": 0.97 + rng.normal(0, 0.005) if ml else math.nan,
                        "components": 1 if ml else 0, "fragment_fraction": 0.0 if ml else math.nan}
    return {"embeddings": rng.normal(size=(slices, 16)).astype(np.float32) + shift, "organs": organs}


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(30, 16)).astype(np.float32) for _ in range(8)]
    volumes = [{"liver": 1500.0 * rng.uniform(0.8, 1.2), "spleen": 200.0 * rng.uniform(0.8, 1.2),
                "kidney": 150.0 * rng.uniform(0.8, 1.2)} for _ in range(8)]
    validation = [_synthetic(rng) for _ in range(5)]
    dice = [{"liver": 0.95, "spleen": 0.9, "kidney": 0.88} for _ in range(5)]
    return q.fit_reference(LABELS, train, volumes, validation, dice, index_size=100), rng


def test_fit_flags_shifted_images_missing_organs_and_low_confidence_but_passes_clean_cases(fitted):
    reference, rng = fitted
    assert reference.index.shape == (100, 16) and reference.threshold >= q.MIN_THRESHOLD
    assert reference.validation["cases"] == 5 and reference.validation["organs"] == 15
    assert reference.validation["organs_below_dice_bar"] == 0 and "at most 10%" in reference.validation["threshold_rule"]
    clean = [reference.assess(_synthetic(rng)) for _ in range(10)]
    assert sum(c["flag"] == "review" for c in clean) <= 1
    shifted = reference.assess(_synthetic(rng, shift=3.0))
    assert shifted["flag"] == "review" and shifted["reasons"] == ["unusual image"]
    assert shifted["ood_z"] > reference.threshold >= max(o["score"] for o in shifted["organs"].values())
    missing = reference.assess(_synthetic(rng, volumes={"liver": 1500.0, "spleen": 0.0, "kidney": 150.0}))
    assert missing["flag"] == "review" and missing["organs"]["spleen"]["reasons"] == ["implausible volume"]
    assert missing["organs"]["liver"]["flag"] == "pass"
    unsure = reference.assess(_synthetic(rng, margin=0.6))
    assert unsure["flag"] == "review" and "liver: low confidence" in unsure["reasons"]
    json.dumps(missing, allow_nan=False)  # strict JSON: the missing organ's NaN margin is null
    assert missing["organs"]["spleen"]["margin"] is None


def test_validation_figures_count_the_failures_the_threshold_catches():
    rng = np.random.default_rng(1)
    train = [rng.normal(size=(30, 16)).astype(np.float32) for _ in range(6)]
    volumes = [{"liver": 1500.0, "spleen": 200.0, "kidney": 150.0} for _ in range(6)]
    validation = [_synthetic(rng) for _ in range(5)] + [_synthetic(rng, margin=0.5)]
    dice = [{"liver": 0.95, "spleen": 0.9, "kidney": 0.9}] * 5 + [{"liver": 0.5, "spleen": 0.4, "kidney": 0.6}]
    reference = q.fit_reference(LABELS, train, volumes, validation, dice)
    v = reference.validation
    assert v["organs_below_dice_bar"] == 3 and v["organs"] == 18 and v["scored"] == "leave one case out"
    assert v["auroc"] == 1.0 and v["sensitivity"] == 1.0 and v["false_alarm_rate"] <= q.FALSE_ALARM_TARGET


def test_saved_reference_loads_to_the_same_scores_and_broken_files_are_named(fitted, tmp_path):
    reference, rng = fitted
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    json_path, index_path = reference.save(checkpoint)
    assert (json_path.name, index_path.name) == ("model.qc.json", "model.qc_index.npy")
    loaded = q.load_quality_reference(checkpoint, LABELS)
    case = _synthetic(rng, shift=1.0)
    assert loaded.assess(case) == reference.assess(case)
    assert q.load_quality_reference(tmp_path / "other.pt") is None  # no reference: no QC
    with pytest.raises(VolumesError, match="model.qc.json: fitted for labels"):
        q.load_quality_reference(checkpoint, ["background", "liver"])
    np.save(index_path, np.zeros((3, 16), np.float32))
    with pytest.raises(VolumesError, match=r"model\.qc\.json: unreadable .*sha256 differs"):
        q.load_quality_reference(checkpoint)
    json_path.write_text("{not json")
    with pytest.raises(VolumesError, match=r"model\.qc\.json: unreadable"):
        q.load_quality_reference(checkpoint)


# ---------------------------------------------------------------------------- where users see it
def _row(case_id: str, flag: str, score: float) -> dict:
    organs = {"liver": {"flag": flag, "score": score, "reasons": ["low confidence"] if flag == "review" else []},
              "spleen": {"flag": "pass", "score": 0.4, "reasons": []}}
    return {"case_id": case_id, "source": f"/in/{case_id}.nii.gz", "input_sha256": "ab" * 32, "bundle": "seg",
            "bundle_version": "1", "task": "segmentation", "weights_sha256": "cd" * 32,
            "organ_volumes_ml": {"liver": 1500.0, "spleen": 200.0}, "outputs": {},
            "quality": {"flag": flag, "score": score, "threshold": 3.0, "ood_z": 0.0, "organs": organs,
                        "reasons": ["liver: low confidence"] if flag == "review" else []}}


def test_predictions_csv_and_report_show_the_flags_worst_first(tmp_path):
    import csv
    import io

    from volumes.inference.report import write_report
    from volumes.inference.runner import _csv

    rows = [_row("ok", "pass", 1.2), _row("bad<1>", "review", 4.0), _row("worse", "review", 9.5)]
    table = list(csv.DictReader(io.StringIO(_csv(rows))))
    assert [r["qc_flag"] for r in table] == ["pass", "review", "review"]
    assert table[1]["qc_flag_liver"] == "review" and table[1]["qc_score_spleen"] == "0.4"
    assert table[2]["qc_reasons"] == "liver: low confidence"
    page = write_report(tmp_path, rows, []).read_text()
    flagged = page[page.index('id="quality"'):page.index("<nav>")]  # the first section, before the case list
    assert "Flagged for review (2 of 3 segmentations)" in flagged
    assert flagged.index("worse") < flagged.index("bad&lt;1&gt;") and ">ok<" not in flagged
    assert 'class="qc review"' in page and 'class="qc pass"' in page


def test_figure_badge_says_the_flag_and_the_reasons(tmp_path):
    from volumes.inference.figures import QC_COLOURS, case_figure, quality_badge

    quality = _row("x", "review", 7.25)["quality"]
    text, colour = quality_badge(quality)
    assert text == "QC review (score 7.2, threshold 3.0): liver: low confidence" and colour == QC_COLOURS["review"]
    assert quality_badge(None) is None
    volume = np.zeros((16, 16, 8), np.float32)
    path = case_figure(volume, (1.0, 1.0, 1.0), tmp_path / "f.png", badge=(text, colour))
    assert path.stat().st_size > 0


def test_dicom_sr_carries_the_flags_as_qualitative_evaluations(tmp_path):
    import highdicom as hd
    import pydicom

    from dicom_conformance import dciodvfy_errors
    from volumes.data.dicom import write_dicom_series
    from volumes.inference.dicom_seg import write_dicom_seg
    from volumes.pacs.sr import build_sr

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    write_dicom_series(np.full((16, 16, 6), 40, np.int16), affine, tmp_path / "ct", patient_id="qc")
    mask = np.zeros((16, 16, 6), np.uint8)
    mask[2:8, 2:8, 1:4] = 1
    labels = ["background", "liver", "spleen"]
    seg_path = write_dicom_seg(mask, affine, tmp_path / "ct", tmp_path / "seg.dcm", labels=labels)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((tmp_path / "ct").iterdir())]
    model = {"bundle": "seg", "version": "1", "weights_sha256": "cd" * 32, "task": "segmentation"}
    quality = {"flag": "review", "score": 5.5, "organs": {"liver": {"flag": "pass", "score": 1.25},
                                                          "spleen": {"flag": "review", "score": 5.5}}}
    sr_path = build_sr(sources, [(pydicom.dcmread(seg_path), model, {"liver": 12.0, "spleen": 0.0}, labels, quality)],
                       [], tmp_path / "sr.dcm", "key")
    report = hd.sr.srread(sr_path).content
    (liver,) = report.get_volumetric_roi_measurement_groups()  # the spleen was not found: no segment
    (evaluation,) = liver.get_qualitative_evaluations()
    assert evaluation.name.meaning == "AI segmentation quality control" and evaluation.value.meaning == "Quality control passed"
    scores = liver.get_measurements(name=hd.sr.CodedConcept("qc-score", "99VOLUMES", "AI segmentation quality control score"))
    assert scores[0].value == pytest.approx(1.25)
    (case,) = report.get_image_measurement_groups()
    (evaluation,) = case.get_qualitative_evaluations()
    assert evaluation.value.meaning == "Review recommended" and case.get_measurements()[0].value == pytest.approx(5.5)
    assert not dciodvfy_errors(sr_path)
