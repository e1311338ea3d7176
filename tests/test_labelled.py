"""Labelled data in (volumes.data.labelled, `volumes datalist`), modality-aware preparation, fold sections."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volumes.data.labelled import (
    LabelledDataError,
    assign_folds,
    find_labelled_cases,
    fold_items,
    modality_of,
    prepare_datalist,
    read_datalist,
)

TEMPLATES = {"images": "{patient}/{modality}.nii.gz", "labels": "{patient}/{modality}_gtv.nii.gz"}


def _write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 3.0, 1.0]) if affine is None else affine), str(path))
    return path


def _case(root: Path, patient: str, modality: str, *, seed: int = 0, mask_value: int = 1,
          mask_affine: np.ndarray | None = None, empty: bool = False, shape=(20, 18, 6)) -> None:
    rng = np.random.default_rng(seed)
    base = -800.0 if modality == "ct" else 0.0
    image = (base + rng.normal(0, 50, shape) + 100).astype(np.int16)
    mask = np.zeros(shape, np.uint8)
    if not empty:
        mask[5:12, 4:10, 2:5] = mask_value
        image[mask > 0] += 300
    _write(root / patient / f"{modality}.nii.gz", image)
    _write(root / patient / f"{modality}_gtv.nii.gz", mask, mask_affine)


@pytest.fixture()
def cohort(tmp_path) -> Path:
    """8 patients: 5 with CT and MR, 3 with MR only (the sts_sarcoma layout)."""
    root = tmp_path / "data"
    for i in range(8):
        if i < 5:
            _case(root, f"P{i:02d}", "ct", seed=i)
        _case(root, f"P{i:02d}", "mr_t1", seed=100 + i)
    (root / "labels.json").write_text(json.dumps({"ct_gtv.nii.gz": {"1": "GTV on CT"},
                                                  "mr_t1_gtv.nii.gz": {"1": "GTV on MR T1"}}))
    return root


def test_templates_find_every_pair_with_its_patient_and_modality(cohort):
    cases, names = find_labelled_cases(cohort, **TEMPLATES)
    assert len(cases) == 13
    assert names == {0: "background", 1: "GTV"}  # the per-mask names' shared words
    assert {c.modality for c in cases if c.case_id.endswith("_ct")} == {"CT"}
    assert {c.modality for c in cases if c.case_id.endswith("_mr_t1")} == {"MR"}
    assert sorted({c.patient for c in cases}) == [f"P{i:02d}" for i in range(8)]


def test_folds_keep_a_patient_together_and_balance_modalities(cohort, tmp_path):
    path = prepare_datalist(cohort, tmp_path / "out" / "datalist.json", folds=4, seed=1, progress=False, **TEMPLATES)
    content = read_datalist(path)
    folds_of = {}
    for entry in content["training"]:
        folds_of.setdefault(entry["patient"], set()).add(entry["fold"])
    assert all(len(f) == 1 for f in folds_of.values())
    sizes = np.bincount([next(iter(f)) for f in folds_of.values()], minlength=4)
    assert sizes.max() - sizes.min() <= 1
    # the 5 CT+MR patients are dealt first: every fold gets at least one
    both = [next(iter(folds_of[p])) for p in ("P00", "P01", "P02", "P03", "P04")]
    assert set(both) == {0, 1, 2, 3}
    assert content["median_spacing"]["CT"] == [1.0, 1.0, 3.0]
    # every case lands in exactly one test fold; training and validation never hold a test patient
    tested = []
    for fold in range(4):
        test = fold_items(path, fold, "test")
        train = fold_items(path, fold, "training")
        val = fold_items(path, fold, "validation")
        tested += [e["case_id"] for e in test]
        test_patients = {e["patient"] for e in test}
        assert not test_patients & {e["patient"] for e in train + val}
        assert not {e["patient"] for e in train} & {e["patient"] for e in val}
        assert len(val) >= 2
    assert sorted(tested) == sorted(e["case_id"] for e in content["training"])
    assert {e["modality"] for e in fold_items(path, 0, "test", modality="MR")} == {"MR"}


def test_a_written_datalist_is_reused_and_not_silently_replaced(cohort, tmp_path):
    out = tmp_path / "datalist.json"
    prepare_datalist(cohort, out, folds=3, progress=False, **TEMPLATES)
    before = out.read_text()
    prepare_datalist(cohort, out, folds=3, progress=False, **TEMPLATES)
    assert out.read_text() == before
    with pytest.raises(LabelledDataError, match="other folds"):
        prepare_datalist(cohort, out, folds=4, progress=False, **TEMPLATES)
    prepare_datalist(cohort, out, folds=4, progress=False, overwrite=True, **TEMPLATES)
    assert json.loads(out.read_text())["num_folds"] == 4


def test_a_resynced_archive_keeps_its_datalist_and_an_edited_mask_does_not(cohort, tmp_path):
    """The fingerprint follows the files' contents: touching every file (as a copy or re-sync does)
    keeps the datalist; one edited mask is refused as other data."""
    out = tmp_path / "datalist.json"
    prepare_datalist(cohort, out, folds=3, progress=False, **TEMPLATES)
    before = out.read_text()
    files = sorted(p for p in Path(cohort).rglob("*.nii.gz"))
    for path in files:
        os.utime(path, (1_000_000_000, 1_000_000_000))
    prepare_datalist(cohort, out, folds=3, progress=False, **TEMPLATES)
    assert out.read_text() == before
    mask = next(p for p in files if "gtv" in p.name)
    image = nib.load(mask)
    data = np.asarray(image.dataobj).copy()
    data[data.shape[0] // 2, data.shape[1] // 2, data.shape[2] // 2] = 1 - data[data.shape[0] // 2, data.shape[1] // 2,
                                                                             data.shape[2] // 2]
    nib.save(nib.Nifti1Image(data, image.affine), mask)
    with pytest.raises(LabelledDataError, match="other files"):
        prepare_datalist(cohort, out, folds=3, progress=False, **TEMPLATES)


def test_a_patient_in_two_folds_is_refused(cohort, tmp_path):
    out = prepare_datalist(cohort, tmp_path / "datalist.json", folds=3, progress=False, **TEMPLATES)
    content = json.loads(out.read_text())
    first = next(e for e in content["training"] if e["patient"] == "P00")
    first["fold"] = (first["fold"] + 1) % 3
    out.write_text(json.dumps(content))
    with pytest.raises(LabelledDataError, match="patient P00 is in folds"):
        read_datalist(out)


def test_every_bad_case_is_named_and_none_dropped(cohort, tmp_path):
    _case(cohort, "P10", "ct", mask_affine=np.diag([2.0, 1.0, 3.0, 1.0]))   # mask on another grid
    _case(cohort, "P11", "ct", empty=True)                                  # empty mask
    _case(cohort, "P12", "ct", mask_value=3)                                # value not in the label list
    _write(cohort / "P13" / "ct.nii.gz", np.zeros((8, 8, 4, 2), np.int16))  # 4D image
    _write(cohort / "P13" / "ct_gtv.nii.gz", np.ones((8, 8, 4), np.uint8))
    _write(cohort / "P14" / "mr_t1.nii.gz", np.zeros((8, 8, 4), np.int16))  # image without a mask
    _write(cohort / "P15" / "mr_t1_gtv.nii.gz", np.ones((8, 8, 4), np.uint8))  # mask without an image
    with pytest.raises(LabelledDataError) as missing:
        prepare_datalist(cohort, tmp_path / "d.json", folds=3, progress=False, **TEMPLATES)
    text = str(missing.value)
    assert "P14/mr_t1.nii.gz: no mask" in text and "P15/mr_t1_gtv.nii.gz: a mask without an image" in text
    (cohort / "P14" / "mr_t1.nii.gz").unlink()
    (cohort / "P15" / "mr_t1_gtv.nii.gz").unlink()
    with pytest.raises(LabelledDataError) as bad:
        prepare_datalist(cohort, tmp_path / "d.json", folds=3, progress=False, **TEMPLATES)
    lines = bad.value.problems
    assert len(lines) == 4
    assert any(line.startswith("P10_ct:") and "another grid" in line for line in lines)
    assert any(line.startswith("P11_ct:") and "empty" in line for line in lines)
    assert any(line.startswith("P12_ct:") and "[3] are not in the label list" in line for line in lines)
    assert any(line.startswith("P13_ct:") and "4D image" in line for line in lines)
    assert not (tmp_path / "d.json").exists()


def test_msd_and_nnunet_layouts(tmp_path):
    for style in ("msd", "nnunet"):
        root = tmp_path / style
        for i in range(3):
            name = f"case{i}"
            image = f"imagesTr/{name}.nii.gz" if style == "msd" else f"imagesTr/{name}_0000.nii.gz"
            _write(root / image, np.full((6, 6, 3), i, np.int16))
            _write(root / f"labelsTr/{name}.nii.gz", np.eye(6, dtype=np.uint8)[:, :, None].repeat(3, 2))
        if style == "msd":
            spec = {"labels": {"0": "background", "1": "liver"}, "modality": {"0": "CT"},
                    "training": [{"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"}
                                 for i in range(3)]}
        else:
            spec = {"labels": {"background": 0, "prostate": 1}, "channel_names": {"0": "T2"}, "file_ending": ".nii.gz"}
        (root / "dataset.json").write_text(json.dumps(spec))
        cases, names = find_labelled_cases(root)
        assert [c.case_id for c in cases] == ["case0", "case1", "case2"]
        assert {c.modality for c in cases} == ({"CT"} if style == "msd" else {"MR"})
        assert names[1] == ("liver" if style == "msd" else "prostate")
    spec["channel_names"] = {"0": "T2", "1": "ADC"}
    (tmp_path / "nnunet" / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(LabelledDataError, match="2 channels"):
        find_labelled_cases(tmp_path / "nnunet")


def test_modality_names_and_fold_arguments():
    assert modality_of("mr_t1") == "MR" and modality_of("CT") == "CT" and modality_of("FLAIR") == "MR"
    assert modality_of("series_a", {"series_a": "CT"}) == "CT"
    with pytest.raises(Exception, match="modality"):
        modality_of("PT")
    with pytest.raises(Exception, match="folds"):
        assign_folds([{"patient": "a", "modality": "CT"}, {"patient": "b", "modality": "CT"}], k=3)


def test_cli_writes_the_datalist(cohort, tmp_path, capsys):
    from volumes.cli import main

    out = tmp_path / "dl.json"
    assert main(["datalist", "--data", str(cohort), "--out", str(out), "--images", TEMPLATES["images"],
                 "--labels", TEMPLATES["labels"], "--folds", "3", "--label-names", "1=tumour"]) == 0
    assert "13 cases of 8 patients" in capsys.readouterr().out
    assert json.loads(out.read_text())["labels"] == {"0": "background", "1": "tumour"}
    assert main(["datalist", "--data", str(cohort), "--out", str(out)]) == 2
    assert "give both an image and a label template" in capsys.readouterr().err


# ----------------------------------------------------------------- modality-aware preparation


def _loaded(modality_value: np.ndarray, meta: dict | None = None):
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(modality_value, dtype=torch.float32)[None], affine=torch.eye(4),
                      meta=meta or {})


def test_auto_preset_gives_ct_windows_to_ct_and_mr_normalisation_to_mr():
    from monai.transforms import Invertd

    from volumes.errors import VolumeReadError
    from volumes.transforms import preprocessing

    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1500, (30, 26, 5))
    mr = rng.uniform(0, 4000, (30, 26, 5))
    pipeline = preprocessing(("image",), preset="auto", channel_mode="auto", patch_size=14)
    out_ct = pipeline({"image": _loaded(ct), "modality": "CT"})["image"]
    out_mr = pipeline({"image": _loaded(mr), "modality": "mr_t1"})["image"]
    assert out_ct.shape == out_mr.shape == (3, 42, 28, 5)
    # CT: three different windows; MR: one normalised channel three times (before ImageNet's per-channel scaling)
    from volumes.transforms import IMAGENET_MEAN, IMAGENET_STD

    def raw(x):
        return x.as_tensor() * torch.tensor(IMAGENET_STD)[:, None, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None, None]

    assert not torch.allclose(raw(out_ct)[0], raw(out_ct)[1], atol=1e-3)
    assert torch.allclose(raw(out_mr)[0], raw(out_mr)[1], atol=1e-5) and torch.allclose(raw(out_mr)[1], raw(out_mr)[2], atol=1e-5)
    # the DICOM tag (kept in the image's metadata) decides when the datalist says nothing
    via_tag = pipeline({"image": _loaded(mr, {"modality": "MR"})})["image"]
    assert torch.allclose(via_tag, out_mr)
    with pytest.raises(Exception) as unknown:
        pipeline({"image": _loaded(mr, {"filename_or_obj": "/data/scan7.nii.gz"})})
    from volumes.errors import volumes_error_in

    error = volumes_error_in(unknown.value)
    assert isinstance(error, VolumeReadError) and error.path == "/data/scan7.nii.gz"
    defaulted = preprocessing(("image",), preset="auto", patch_size=14, modality="MR")
    assert torch.allclose(defaulted({"image": _loaded(mr)})["image"], out_mr)
    # a prediction on the prepared grid goes back to the loaded grid, whichever pipeline ran
    for out in (pipeline({"image": _loaded(ct), "modality": "CT"}), pipeline({"image": _loaded(mr), "modality": "MR"})):
        out["pred"] = out["image"][:2].clone()
        back = Invertd("pred", transform=pipeline, orig_keys="image", nearest_interp=False)(out)["pred"]
        assert tuple(back.shape) == (2, 30, 26, 5)


def test_bundle_helpers_read_labels_folds_and_plan_from_the_datalist(cohort, tmp_path):
    from volumes.bundle import datalist_labels, fold_section, plan_preprocessing, write_derived_bundle

    path = prepare_datalist(cohort, tmp_path / "datalist.json", folds=3, progress=False, **TEMPLATES)
    assert datalist_labels(path, ["x"]) == ["background", "GTV"]
    assert {e["case_id"] for e in fold_section(path, 1, "test")} == {e["case_id"] for e in fold_items(path, 1, "test")}
    final = fold_section(path, "final", "training") + fold_section(path, "final", "validation")
    assert len(final) == 13 and fold_section(path, "final", "test") == []
    plan = plan_preprocessing(path, {"preset": "ct_three_windows"}, target_size=10)
    assert plan["preset"] == "auto" and plan["spacing"] == [2.0, 2.0, 0]  # 20 mm field / 10 px
    phantoms = tmp_path / "phantoms.json"
    phantoms.write_text(json.dumps({"training": []}))
    assert plan_preprocessing(phantoms, {"preset": "ct_three_windows"}) == {"preset": "ct_three_windows"}
    assert datalist_labels(phantoms, ["background", "liver"]) == ["background", "liver"]
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "dinov2_unet_segmentation"
    derived = write_derived_bundle(bundle, tmp_path / "bundle", {"labels": ["background", "GTV"],
                                                                   "preprocessing_config": plan})
    inference = json.loads((derived / "configs" / "inference.json").read_text())
    assert inference["labels"] == ["background", "GTV"] and inference["preprocessing_config"] == plan
    assert not (derived / "models").exists()


def test_surface_dice_at_a_tolerance():
    from volumes.segmentation import per_case_metrics

    truth = np.zeros((30, 30, 10), np.int64)
    truth[10:20, 10:20, 3:7] = 1
    same = per_case_metrics(truth, truth, [1.0, 1.0, 1.0], ["background", "t"], surface_tolerance_mm=2.0)
    assert same["nsd_2mm_t"] == pytest.approx(1.0) and same["dice_t"] == pytest.approx(1.0)
    near = per_case_metrics(np.roll(truth, 1, axis=0), truth, [1.0, 1.0, 1.0], ["background", "t"],
                            surface_tolerance_mm=2.0)
    assert near["nsd_2mm_t"] == pytest.approx(1.0)  # one voxel off is within 2 mm
    far = per_case_metrics(np.roll(truth, 4, axis=0), truth, [1.0, 1.0, 1.0], ["background", "t"],
                           surface_tolerance_mm=2.0)
    assert 0.2 < far["nsd_2mm_t"] < 0.9 and far["dice_t"] == pytest.approx(0.6)


def test_scoring_names_a_missing_or_misplaced_mask(tmp_path):
    from volumes.errors import VolumeReadError
    from volumes.segmentation import score_label_maps

    truth = np.zeros((12, 12, 4), np.uint8)
    truth[3:9, 3:9, 1:3] = 1
    label = _write(tmp_path / "truth.nii.gz", truth)
    half = truth.copy()
    half[3:6] = 0
    good = _write(tmp_path / "pred.nii.gz", half)
    item = {"case_id": "c1", "patient": "p1", "modality": "CT", "label": str(label)}
    [row] = score_label_maps([item], {"c1": good}, ["background", "t"], surface_tolerance_mm=2.0)
    assert row["dice_t"] == pytest.approx(2 * 36 / (72 + 36))
    assert row["truth_ml"] == pytest.approx(72 * 3 / 1000) and row["pred_ml"] == pytest.approx(36 * 3 / 1000)
    assert row["patient"] == "p1" and row["modality"] == "CT"
    with pytest.raises(VolumeReadError, match="no predicted mask for case c1"):
        score_label_maps([item], {"c1": tmp_path / "absent.nii.gz"}, ["background", "t"])
    shifted = _write(tmp_path / "shifted.nii.gz", half, np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(VolumeReadError, match="not on the grid"):
        score_label_maps([item], {"c1": shifted}, ["background", "t"])
