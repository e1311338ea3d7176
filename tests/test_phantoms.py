"""Synthetic CT phantoms: determinism, anatomy, class rules and cohort files."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from volumes.cli import main as cli_main
from volumes.data.phantoms import (
    HU_RANGES,
    LABEL_NAMES,
    ORGANS,
    PhantomConfig,
    case_seed,
    generate_phantom,
    write_case,
    write_cohort,
)
from volumes.data.phantoms import _stratified_splits
from volumes.errors import ConfigError

# Coarse voxels make a case ~20 ms: enough for statistics over many cases.
COARSE = PhantomConfig(inplane_spacing_mm=(5.0, 6.0), slice_spacing_mm=(5.0, 6.0))


@pytest.fixture(scope="module")
def coarse_cases() -> list:
    return [generate_phantom(seed, COARSE) for seed in range(40)]


@pytest.fixture(scope="module")
def small_case():
    return generate_phantom(5)  # a splenomegaly positive at the default (small) preset


def _world_centroid(phantom, organ: str) -> np.ndarray:
    idx = np.argwhere(phantom.label == ORGANS[organ]).mean(axis=0)
    return phantom.affine[:3, :3] @ idx + phantom.affine[:3, 3]


def _max_slice_area_mm2(phantom, organ: str = "spleen") -> float:
    per_slice = (phantom.label == ORGANS[organ]).sum(axis=(0, 1))
    return float(per_slice.max() * phantom.spacing[0] * phantom.spacing[1])


def test_label_names_follow_organ_ids():
    assert LABEL_NAMES[0] == "background"
    assert {"liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae"} <= set(ORGANS)
    for name, value in ORGANS.items():
        assert LABEL_NAMES[value] == name
    assert sorted(ORGANS.values()) == list(range(len(ORGANS)))


def test_same_seed_same_case_different_seed_different_case():
    a, b, c = generate_phantom(11, COARSE), generate_phantom(11, COARSE), generate_phantom(12, COARSE)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.info == b.info
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert a.info["spleen_ml"] != c.info["spleen_ml"]


def test_forcing_the_class_keeps_the_scan_geometry_and_spleen_rule():
    pos, neg = generate_phantom(3, COARSE, positive=True), generate_phantom(3, COARSE, positive=False)
    assert pos.class_label == 1 and neg.class_label == 0
    assert pos.spacing == neg.spacing and pos.shape[:2] == neg.shape[:2]
    assert pos.info["spleen_ml"] > COARSE.spleen_threshold_ml > neg.info["spleen_ml"]


def test_arrays_types_and_affine(small_case):
    ph = small_case
    assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
    assert ph.image.shape == ph.label.shape and ph.image.ndim == 3
    assert ph.affine.dtype == np.float64 and ph.affine.shape == (4, 4)
    np.testing.assert_allclose(np.diag(ph.affine)[:3], ph.spacing)
    assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
    assert set(np.unique(ph.label)) <= set(ORGANS.values())
    json.dumps(ph.info)  # JSON-ready


@pytest.mark.parametrize("seed", range(6))
def test_small_preset_geometry_within_config(seed):
    cfg = PhantomConfig()
    ph = generate_phantom(seed, cfg)
    sx, sy, sz = ph.spacing
    assert sx == sy and cfg.inplane_spacing_mm[0] <= sx <= cfg.inplane_spacing_mm[1]
    assert cfg.slice_spacing_mm[0] <= sz <= cfg.slice_spacing_mm[1]
    nx, ny, nz = ph.shape
    assert nx == ny and 90 <= nx <= 190
    assert 300 <= nx * sx <= 500  # body-sized field of view
    extent = (nz - 1) * sz
    assert cfg.extent_mm[0] - sz <= extent <= cfg.extent_mm[1] + sz
    # the whole body lies inside the field of view: the border is air
    border = np.concatenate([ph.image[0].ravel(), ph.image[-1].ravel(), ph.image[:, 0].ravel(), ph.image[:, -1].ravel()])
    assert np.mean(border) < -950


def test_realistic_preset_geometry():
    cfg = PhantomConfig.realistic(extent_mm=(150.0, 160.0), slice_spacing_mm=(5.0, 5.0))
    ph = generate_phantom(1, cfg, positive=False)
    assert ph.shape[:2] == (512, 512)
    assert 0.6 <= ph.spacing[0] <= 1.0
    assert ph.spacing[2] == 5.0
    assert PhantomConfig.realistic().slice_spacing_mm == (1.5, 5.0)


def test_hu_per_tissue(small_case):
    ph = small_case
    hu = ph.info["hu"]

    def core(organ: str, iterations: int = 1) -> np.ndarray:
        mask = ndimage.binary_erosion(ph.label == ORGANS[organ], iterations=iterations)
        assert mask.sum() > 20, organ
        return ph.image[mask]

    for organ in ("liver", "spleen"):
        lo, hi = HU_RANGES[organ]
        median = float(np.median(core(organ)))
        assert lo - 5 <= median <= hi + 5, (organ, median)
        assert abs(median - hu[organ]) < 5
    assert HU_RANGES["kidney_medulla"][0] - 10 <= np.median(core("kidney_right")) <= HU_RANGES["kidney_cortex"][1] + 10
    aorta = float(np.median(core("aorta")))
    assert HU_RANGES["aorta"][0] - 15 <= aorta <= HU_RANGES["aorta"][1] + 15
    assert np.mean(ph.image[ph.label == ORGANS["vertebrae"]]) > 250  # bone
    # air outside the body (corners of the field of view)
    corners = np.concatenate([ph.image[:6, :6].ravel(), ph.image[-6:, -6:].ravel()])
    assert abs(float(corners.mean()) + 1000.0) < 5.0
    # noise: the std in a homogeneous region is about the drawn sigma
    assert 0.5 * ph.info["noise_hu"] < float(core("liver", 2).std()) < 2.0 * ph.info["noise_hu"] + 10


def test_laterality_in_ras_world_coordinates(coarse_cases):
    for ph in coarse_cases[:12]:
        liver, spleen = _world_centroid(ph, "liver"), _world_centroid(ph, "spleen")
        k_left, k_right = _world_centroid(ph, "kidney_left"), _world_centroid(ph, "kidney_right")
        aorta, spine = _world_centroid(ph, "aorta"), _world_centroid(ph, "vertebrae")
        body_x, body_y = ph.info["body_centre_mm"]
        # RAS+: +x is the patient's right. Liver on the right, spleen on the left.
        assert liver[0] > body_x > spleen[0]
        assert k_right[0] > spine[0] > k_left[0]
        # kidneys and spine posterior (-y) to the body centre, aorta in front of the spine
        assert k_left[1] < body_y and k_right[1] < body_y and spine[1] < body_y
        assert aorta[1] > spine[1]
        assert aorta[0] < spine[0]  # aorta left of the midline
        assert liver[2] > k_right[2]  # liver above the right kidney


def test_labelled_volumes_match_info(coarse_cases):
    for ph in coarse_cases[:10]:
        voxel_ml = ph.voxel_volume_ml
        for organ, value in ORGANS.items():
            if value:
                assert ph.info["organ_ml"][organ] == pytest.approx(np.count_nonzero(ph.label == value) * voxel_ml)
        assert ph.info["spleen_ml"] == pytest.approx(ph.info["organ_ml"]["spleen"])
        # the spleen is painted last and fully in view: its volume is the drawn one
        assert ph.info["spleen_ml"] == pytest.approx(ph.info["spleen_target_ml"], rel=0.08)


def test_splenomegaly_rule_holds_and_one_slice_does_not_decide(coarse_cases):
    thr = COARSE.spleen_threshold_ml
    pos = [ph for ph in coarse_cases if ph.class_label == 1]
    neg = [ph for ph in coarse_cases if ph.class_label == 0]
    assert len(pos) >= 8 and len(neg) >= 8
    assert all(ph.info["spleen_ml"] > thr for ph in pos)
    assert all(ph.info["spleen_ml"] < thr for ph in neg)
    assert min(ph.info["spleen_ml"] for ph in pos) > COARSE.spleen_enlarged_ml[0] * 0.95
    assert max(ph.info["spleen_ml"] for ph in neg) < COARSE.spleen_normal_ml[1] * 1.05
    # largest axial spleen cross-sections overlap between the classes ...
    pos_area = np.array([_max_slice_area_mm2(ph) for ph in pos])
    neg_area = np.array([_max_slice_area_mm2(ph) for ph in neg])
    assert neg_area.max() > pos_area.min()
    overlap = np.mean(pos_area < neg_area.max()) + np.mean(neg_area > pos_area.min())
    assert overlap > 0.1
    # ... while the cranio-caudal length (many slices) separates them
    assert min(ph.info["spleen_length_mm"] for ph in pos) > max(ph.info["spleen_length_mm"] for ph in neg)


def test_prevalence_is_respected(coarse_cases):
    positives = sum(ph.class_label for ph in coarse_cases)
    assert 12 <= positives <= 28  # Binomial(40, 0.5)
    low = PhantomConfig(inplane_spacing_mm=(6.0, 6.0), slice_spacing_mm=(6.0, 6.0), prevalence=0.2)
    count = sum(generate_phantom(seed, low).class_label for seed in range(40))
    assert 2 <= count <= 15  # Binomial(40, 0.2): mean 8, sd 2.5
    never = PhantomConfig(inplane_spacing_mm=(6.0, 6.0), slice_spacing_mm=(6.0, 6.0), prevalence=0.0)
    assert all(generate_phantom(seed, never).class_label == 0 for seed in range(5))


def test_lesion_only_in_positives_and_on_a_few_slices():
    cfg = PhantomConfig(task="lesion")
    for seed in range(4):
        neg = generate_phantom(seed, cfg, positive=False)
        assert neg.class_label == 0 and neg.lesion_mask is None and neg.info["lesion"] is None
        assert neg.info["spleen_ml"] < cfg.spleen_threshold_ml  # no splenomegaly confound

        ph = generate_phantom(seed, cfg, positive=True)
        assert ph.class_label == 1
        lesion, mask = ph.info["lesion"], ph.lesion_mask
        assert mask is not None and mask.dtype == bool and mask.shape == ph.shape and mask.any()
        assert np.all(ph.label[mask] == ORGANS["liver"])  # lesions stay part of the liver label
        lo, hi = cfg.lesion_diameter_mm
        assert lo <= lesion["diameter_mm"] <= hi
        slices = np.flatnonzero(mask.any(axis=(0, 1)))
        assert list(slices) == lesion["slices"]
        sz = ph.spacing[2]
        assert 1 <= len(slices) <= math.ceil(1.2 * lesion["diameter_mm"] / sz) + 1
        liver_slices = np.flatnonzero((ph.label == ORGANS["liver"]).any(axis=(0, 1)))
        assert len(slices) < len(liver_slices) / 3
        # hypodense: darker than the liver by roughly the drawn contrast
        liver = ph.image[ndimage.binary_erosion(ph.label == ORGANS["liver"]) & ~ndimage.binary_dilation(mask, iterations=2)]
        centre = tuple(lesion["center_voxel"])
        assert mask[centre]
        assert np.median(ph.image[mask]) < np.median(liver) - 10
        # matched pair: same seed, same picture except around the lesion
        assert neg.shape == ph.shape
        near = ndimage.binary_dilation(mask, iterations=3)
        np.testing.assert_allclose(neg.image[~near], ph.image[~near], atol=1e-3)  # blur tails
        # world centre agrees with the voxel centre
        world = ph.affine @ np.array([*centre, 1.0])
        np.testing.assert_allclose(world[:3], lesion["center_mm"], atol=1e-6)


def test_case_seed_depends_on_seed_and_index_only():
    assert case_seed(0, 3) == case_seed(0, 3)
    assert len({case_seed(0, i) for i in range(50)}) == 50
    assert case_seed(0, 3) != case_seed(1, 3)


def test_stratified_splits_keep_the_class_mix():
    labels = [0] * 30 + [1] * 20
    splits = _stratified_splits(labels, (0.6, 0.2, 0.2), seed=4)
    counts = {(s, c): 0 for s in range(3) for c in (0, 1)}
    for s, c in zip(splits, labels):
        counts[(s, c)] += 1
    assert (counts[(0, 0)], counts[(1, 0)], counts[(2, 0)]) == (18, 6, 6)
    assert (counts[(0, 1)], counts[(1, 1)], counts[(2, 1)]) == (12, 4, 4)
    assert _stratified_splits(labels, (0.6, 0.2, 0.2), seed=4) == splits


def test_write_case_roundtrip(tmp_path, small_case):
    ph = small_case
    entry = write_case(ph, tmp_path, "c7")
    assert entry == {"case_id": "c7", "image": "images/c7.nii.gz", "label": "labels/c7.nii.gz", "class_label": ph.class_label}
    img, lab = nib.load(tmp_path / entry["image"]), nib.load(tmp_path / entry["label"])
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.rint(ph.image).astype(np.int16))
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), ph.label)
    for loaded in (img, lab):
        np.testing.assert_allclose(loaded.affine, ph.affine, atol=1e-4)
        assert int(loaded.header["qform_code"]) == 1 and int(loaded.header["sform_code"]) == 1
        assert loaded.header.get_xyzt_units()[0] == "mm"
    assert not list(tmp_path.rglob(".*"))  # no temporary files (volumes.atomic's hidden names) left behind
    # through volumes.data.io.save_nifti: the bytes nibabel serialises for the same image and header
    expected = nib.Nifti1Image(np.rint(ph.image).astype(np.int16), ph.affine)
    expected.header.set_xyzt_units("mm")
    expected.set_qform(ph.affine, code=1)
    expected.set_sform(ph.affine, code=1)
    assert gzip.decompress((tmp_path / entry["image"]).read_bytes()) == expected.to_bytes()
    with pytest.raises(ConfigError):
        write_case(ph, tmp_path, "c8", fmt="png")


def test_write_cohort_datalist_and_stability(tmp_path):
    out = tmp_path / "cohort"
    path = write_cohort(out, 10, seed=2, config=COARSE, progress=False)
    assert path == out / "datalist.json"
    datalist = json.loads(path.read_text())
    assert datalist["labels"] == {str(v): k for k, v in ORGANS.items()}
    assert datalist["task"] == "splenomegaly" and datalist["dicom"] == []
    entries = datalist["training"] + datalist["validation"] + datalist["test"]
    assert len(entries) == 10 and len({e["case_id"] for e in entries}) == 10
    for entry in entries:
        assert set(entry) == {"image", "label", "class_label", "case_id"}
        for key in ("image", "label"):
            assert not Path(entry[key]).is_absolute()
            assert (out / entry[key]).is_file()
    # stratified: each class split 60/20/20 as closely as the counts allow
    for cls in (0, 1):
        n_cls = sum(e["class_label"] == cls for e in entries)
        n_train = sum(e["class_label"] == cls for e in datalist["training"])
        assert abs(n_train - 0.6 * n_cls) <= 1
    with open(out / "cohort.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and {r["split"] for r in rows} <= {"training", "validation", "test"}
    # decathlon layout as monai.data.load_decathlon_datalist reads it (importing
    # MONAI here would cost more than this whole file): lists of dicts whose
    # "image"/"label" resolve against the datalist's folder
    assert all(isinstance(datalist[k], list) for k in ("training", "validation", "test"))
    assert datalist["numCases"] == 10 and datalist["name"]
    # a case does not change when the cohort grows
    out2 = tmp_path / "bigger"
    write_cohort(out2, 12, seed=2, config=COARSE, progress=False)
    for name in ("images/case_0003.nii.gz", "labels/case_0007.nii.gz"):
        np.testing.assert_array_equal(np.asanyarray(nib.load(out / name).dataobj), np.asanyarray(nib.load(out2 / name).dataobj))


def test_cli_writes_a_cohort_and_summarises(tmp_path, capsys):
    rc = cli_main(["phantoms", "--out", str(tmp_path / "c"), "--n", "3", "--seed", "1", "--task", "lesion",
                        "--prevalence", "0.7", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "datalist.json" in text and "lesion" in text and "3 synthetic CT phantoms" in text
    assert json.loads((tmp_path / "c" / "datalist.json").read_text())["task"] == "lesion"
    assert cli_main(["phantoms", "--out", str(tmp_path / "d"), "--n", "2", "--prevalence", "2"]) == 2


def test_config_is_validated():
    with pytest.raises(ConfigError):
        PhantomConfig(task="tumour")
    with pytest.raises(ConfigError):
        PhantomConfig(prevalence=1.5)
    with pytest.raises(ConfigError):
        PhantomConfig(inplane_spacing_mm=(1.0, 0.5))
    with pytest.raises(ConfigError):
        PhantomConfig(spleen_threshold_ml=200.0)  # inside the normal range: no margin


def test_dicom_case_reloads_like_the_phantom(tmp_path):
    pytest.importorskip("pydicom", reason="DICOM writing needs pydicom (pip install 'volumes[dicom]')")
    from volumes.data.io import load_volume

    ph = generate_phantom(2, COARSE)
    entry = write_case(ph, tmp_path, "d2", fmt="dicom")
    assert entry["image"] == entry["dicom"] == "dicom/d2"
    assert (tmp_path / "labels" / "d2.nii.gz").is_file() and not (tmp_path / "images").exists()
    loaded = load_volume(tmp_path / entry["image"], orientation="RAS")
    assert tuple(loaded.shape) == (1, *ph.shape)
    np.testing.assert_array_equal(loaded[0].numpy(), np.rint(ph.image))
    np.testing.assert_allclose(np.asarray(loaded.affine), ph.affine, atol=1e-3)
    # rewriting the same case gives the same series (stable UIDs)
    import pydicom

    first = pydicom.dcmread(sorted((tmp_path / "dicom" / "d2").iterdir())[0], stop_before_pixels=True)
    write_case(ph, tmp_path, "d2", fmt="dicom")
    again = pydicom.dcmread(sorted((tmp_path / "dicom" / "d2").iterdir())[0], stop_before_pixels=True)
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert not list((tmp_path / "dicom").glob(".*"))
