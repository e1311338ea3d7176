"""The command line: the demo main job, embedding a folder with a bad case in it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from volumes.cli import main
from volumes.data.io import load_volume
from volumes.data.phantoms import write_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, n=2, seed=3, progress=False)
    return out


def test_quick_demo_trains_both_bundles_and_runs_batch_inference(tmp_path, capsys):
    """The main job end to end with tiny networks: train, infer on phantoms (NIfTI and DICOM), score."""
    from volumes.apps.demo import SHARED

    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "mean Dice" in printed and str(tmp_path / "infer" / "report.html") in printed
    assert "on the segmenter's own held-out phantoms" in printed and "on the classification cohort's" in printed
    for bundle in ("dinov2_unet_segmentation", "dinov2_slice_classification"):
        assert (tmp_path / "bundles" / bundle / "models" / "model.pt").is_file()
    scores = json.loads((tmp_path / "demo_scores.json").read_text())
    # Dice per cohort: the segmenter's own test split and the classification cohort, apart
    assert scores["dice"]["seg"]["cases"] >= 1 and scores["dice"]["cls"]["cases"] >= 1
    for cohort, entry in scores["dice"].items():
        values = [c["mean_dice"] for c in scores["cases"].values() if c["cohort"] == cohort]
        assert entry["mean"] == pytest.approx(np.mean(values)) and 0.0 <= entry["mean"] <= 1.0
    # one encoder file, one preparation: the encoder ran once per case for both heads
    assert scores["encoder"]["encoded_once"] == scores["encoder"]["cases"] >= 4
    assert f"encoder: ran once for both heads on {scores['encoder']['cases']} of" in printed
    # the classifier's probabilities come calibrated, with the temperature the training fitted
    fitted = json.loads((tmp_path / "bundles" / "dinov2_slice_classification" / "models" /
                         "model.calibration.json").read_text())
    temperature = fitted["temperature"]
    assert fitted["method"] in ("none", "temperature scaling", "Platt scaling") and fitted["reason"]
    assert scores["calibration"]["bias"] == fitted["bias"] and scores["calibration"]["reason"] == fitted["reason"]
    assert fitted["reason"] in printed  # the demo says which calibration and why
    assert 0.0 <= scores["ece_calibrated"] <= 1.0 and 0.0 <= scores["brier_calibrated"] <= 2.0
    assert "ECE" in printed and "Brier" in printed
    rows = [json.loads(line) for line in (tmp_path / "infer" / "predictions.jsonl").read_text().splitlines()]
    cases = {row["case_id"] for row in rows}
    assert any(case.endswith("_dicom") and case.startswith("seg_") for case in cases)
    assert ("real_example_ct" in cases and "real_example_ct_dicom" in cases) == SHARED.is_dir()
    classified = [row for row in rows if row["task"] == "classification"]
    assert {row["temperature"] for row in classified} == {temperature}
    assert all(row["logit_bias"] == fitted["bias"] for row in classified)
    # the demo's accuracy is at the calibrated 0.5 threshold, on the classification phantoms
    held_out = [row for row in classified if row["case_id"].startswith("cls_")]
    assert len(held_out) == scores["classified_cases"]
    assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["accuracy_uncalibrated"] <= 1.0
    assert (tmp_path / "infer" / "failures.csv").read_text().count("\n") == 1  # header only
    # every segmentation carries its quality-control flag, and the demo counts the flagged ones
    segmentations = [row for row in rows if row["task"] == "segmentation"]
    assert segmentations and all(row["quality"]["flag"] in ("pass", "review") for row in segmentations)
    assert scores["qc_checked"] == len(segmentations) and "quality control flagged" in printed
    assert scores["qc_review"] == sorted(r["case_id"] for r in segmentations if r["quality"]["flag"] == "review")
    # quality control against the known answer, per cohort, from the cases' own Dice and flags
    from volumes.apps.demo import DICE_BAR

    for cohort, table in scores["qc"].items():
        cases = [c for c in scores["cases"].values() if cohort in ("all", c["cohort"])]
        bad = [min(c["dice"].values()) < DICE_BAR for c in cases]
        flagged = [c["qc"] == "review" for c in cases]
        assert table == {"cases": len(cases), "below_bar": sum(bad), "flagged": sum(flagged),
                         "flagged_right": sum(f and b for f, b in zip(flagged, bad)),
                         "passed": len(cases) - sum(flagged),
                         "passed_right": sum(not f and not b for f, b in zip(flagged, bad))}


def test_qc_against_the_known_answer_counts_right_and_wrong_flags():
    from volumes.apps.demo import qc_against_truth

    cases = {"a": {"cohort": "seg", "dice": {"liver": 0.95, "aorta": 0.70}, "qc": "review"},   # rightly flagged
             "b": {"cohort": "seg", "dice": {"liver": 0.95, "aorta": 0.90}, "qc": "review"},   # a false alarm
             "c": {"cohort": "seg", "dice": {"liver": 0.85, "aorta": 0.81}, "qc": "pass"},     # rightly passed
             "d": {"cohort": "cls", "dice": {"liver": 0.50, "aorta": 0.90}, "qc": "pass"},     # missed
             "e": {"cohort": "cls", "dice": {"liver": 0.90}, "qc": None}}                      # no QC: not counted
    table = qc_against_truth(cases)
    assert table["seg"] == {"cases": 3, "below_bar": 1, "flagged": 2, "flagged_right": 1, "passed": 1,
                            "passed_right": 1}
    assert table["cls"] == {"cases": 1, "below_bar": 1, "flagged": 0, "flagged_right": 0, "passed": 1,
                            "passed_right": 0}
    assert table["all"]["cases"] == 4 and table["all"]["flagged_right"] == 1 and "dicom" not in table


def test_embed_writes_one_embedding_per_slice(cohort, tmp_path, capsys):
    assert main(["embed", "--input", str(cohort / "datalist.json"), "--out", str(tmp_path), "--size", "56"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 2/2 cases" in printed and "centred cosine similarity" in printed
    rows = [json.loads(line) for line in (tmp_path / "embeddings.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        arrays = np.load(tmp_path / row["embedding"])
        depth = load_volume(row["image"]).shape[-1]  # axial slices of the RAS-oriented volume
        assert row["slices"] == depth
        assert arrays["cls"].shape == (depth, 384) == arrays["patch_mean"].shape
        assert arrays["slice_mm"].shape == (depth,) and np.all(np.diff(arrays["slice_mm"]) > 0)
        assert np.isfinite(arrays["cls"]).all()
    config = json.loads((tmp_path / "embed_config.json").read_text())
    assert config["encoder"] == "vit_small_patch14_dinov2" and config["weights_id"] == "random"
    assert not list(tmp_path.rglob("*.tmp"))


def test_embed_reads_a_second_run_from_the_cache(cohort, tmp_path, capsys, monkeypatch):
    from volumes.embedding import SliceEmbedder

    argv = ["embed", "--input", str(cohort / "datalist.json"), "--size", "28", "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    monkeypatch.setattr(SliceEmbedder, "_compute", lambda self, image: pytest.fail("encoded although cached"))
    monkeypatch.setattr(SliceEmbedder, "transform", property(lambda self: pytest.fail("loaded although cached"),
                                                             lambda self, value: None), raising=False)
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0
    for first in sorted((tmp_path / "first" / "embeddings").glob("*.npz")):
        cached = np.load(tmp_path / "second" / "embeddings" / first.name)
        for key, value in np.load(first).items():
            np.testing.assert_array_equal(cached[key], value)
    capsys.readouterr()


def test_embed_goes_on_past_a_bad_case_and_reports_it(cohort, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted((cohort / "images").glob("*.nii.gz"))[0]
    (folder / good.name).write_bytes(good.read_bytes())
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, dtype=np.float32), np.eye(4)), folder / "broken.nii.gz")

    code = main(["embed", "--input", str(folder), "--out", str(tmp_path / "out"), "--size", "56"])
    assert code == 1
    printed = capsys.readouterr().out
    assert "embedded 1/2 cases" in printed
    assert "FAILED broken" in printed and "NaN" in printed
    assert (tmp_path / "out" / "embeddings" / good.name.replace(".nii.gz", ".npz")).is_file()


def test_bad_option_is_a_clear_error(cohort, tmp_path, capsys):
    code = main(["embed", "--input", str(cohort / "datalist.json"), "--out", str(tmp_path), "--preset", "purple"])
    assert code == 2
    assert "preset='purple' is not allowed" in capsys.readouterr().err


def test_phantoms_command(tmp_path, capsys):
    assert main(["phantoms", "--out", str(tmp_path), "--n", "3", "--seed", "1", "--no-progress"]) == 0
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert sum(len(datalist[k]) for k in ("training", "validation", "test")) == 3
