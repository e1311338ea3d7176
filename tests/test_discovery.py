"""discover_cases over folders, MONAI datalists and CSV files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volumes.data.discovery import Case, cases_to_datalist, discover_cases
from volumes.errors import ConfigError, VolumeReadError


def save_nifti(path: Path, value: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), value, np.float32), np.eye(4)), path)
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Two files named a.nii.gz, an NRRD, an awkward name, two DICOM folders (one with 2 series)."""
    from volumes.data.dicom import write_dicom_series

    root = tmp_path / "data"
    save_nifti(root / "a.nii.gz")
    save_nifti(root / "other" / "a.nii.gz")
    save_nifti(root / "my scan (1).nii")
    save_nifti(root / "a_seg.nii.gz")
    (root / "sub").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(root / "sub" / "b.nrrd"))
    (root / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    save_nifti(root / ".hidden" / "c.nii.gz")
    volume = np.zeros((6, 5, 4), np.float32)
    write_dicom_series(volume, np.eye(4), root / "pacs" / "study1", file_prefix="ct_", series_number=3)
    write_dicom_series(volume + 100, np.eye(4), root / "pacs" / "study1", file_prefix="pet_", series_number=4)
    write_dicom_series(volume, np.eye(4), root / "pacs" / "study2")
    return root


def test_folder_discovery(mixed_folder):
    cases = discover_cases(mixed_folder, exclude=["*_seg*"])
    ids = [case.case_id for case in cases]
    assert ids == sorted(ids)
    assert ids == ["b", "data_a", "my_scan_1", "other_a", "study1_series3", "study1_series4", "study2"]
    by_id = {case.case_id: case for case in cases}
    assert by_id["data_a"].image == mixed_folder / "a.nii.gz"
    assert by_id["b"].image == mixed_folder / "sub" / "b.nrrd"
    assert by_id["study1_series3"].image == by_id["study1_series4"].image == mixed_folder / "pacs" / "study1"
    assert by_id["study1_series3"].extra["series_uid"] != by_id["study1_series4"].extra["series_uid"]
    assert "series_uid" in by_id["study2"].extra
    assert discover_cases(mixed_folder, exclude=["*_seg*"]) == cases, "order and ids must be stable"
    assert "a_seg" in [c.case_id for c in discover_cases(mixed_folder)]


def test_split_series_load_through_datalist(mixed_folder):
    from volumes.data.io import LoadVolumed

    cases = [c for c in discover_cases(mixed_folder) if c.case_id.startswith("study1")]
    load = LoadVolumed(keys="image")
    means = [load(item)["image"].mean().item() for item in cases_to_datalist(cases)]
    assert means == [0.0, 100.0]


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing")
    with pytest.raises(VolumeReadError, match="holds no volumes"):
        discover_cases(tmp_path)


def test_missing_source(tmp_path):
    with pytest.raises(VolumeReadError, match="does not exist"):
        discover_cases(tmp_path / "absent")


def test_single_file(tmp_path):
    assert discover_cases(save_nifti(tmp_path / "x.nii.gz")) == [Case("x", tmp_path / "x.nii.gz")]


def test_datalist_json(tmp_path):
    save_nifti(tmp_path / "imgs" / "c1.nii.gz")
    save_nifti(tmp_path / "imgs" / "c2.nii.gz")
    save_nifti(tmp_path / "labels" / "c1.nii.gz")
    datalist = {
        "training": [{"image": "imgs/c1.nii.gz", "label": "labels/c1.nii.gz", "fold": 0}],
        "validation": [{"image": "imgs/c2.nii.gz", "label_class": 1}],
        "test": ["imgs/c2.nii.gz"],
    }
    path = tmp_path / "lists" / "datalist.json"
    path.parent.mkdir()
    path.write_text(json.dumps(datalist).replace("imgs/", "../imgs/").replace("labels/", "../labels/"))

    cases = discover_cases(path)
    assert [c.extra["section"] for c in cases] == ["training", "validation", "test"]
    assert cases[0] == Case("c1", tmp_path / "imgs" / "c1.nii.gz", tmp_path / "labels" / "c1.nii.gz",
                            {"fold": 0, "section": "training"})
    assert len({c.case_id for c in cases}) == 3, "the test entry repeats c2 and needs its own id"

    validation = discover_cases(path, section="validation")
    assert len(validation) == 1 and validation[0].extra == {"label_class": 1, "section": "validation"}
    assert validation[0].to_dict()["label_class"] == 1
    with pytest.raises(ConfigError, match="section"):
        discover_cases(path, section="holdout")


def test_datalist_with_missing_file(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "gone.nii.gz"}]}))
    with pytest.raises(VolumeReadError, match=r"gone.nii.gz: listed in .*training\[0\].* does not exist"):
        discover_cases(path)


def test_csv(tmp_path):
    save_nifti(tmp_path / "scans" / "p1.nii.gz")
    save_nifti(tmp_path / "scans" / "p2.nii.gz")
    save_nifti(tmp_path / "scans" / "p2_label.nii.gz")
    path = tmp_path / "cases.csv"
    path.write_text(
        "case_id,image,label,label_class,site\n"
        "patient-1,scans/p1.nii.gz,,0,A\n"
        ",scans/p2.nii.gz,scans/p2_label.nii.gz,1,\n"
    )
    first, second = discover_cases(path)
    assert first == Case("patient-1", tmp_path / "scans" / "p1.nii.gz", None, {"label_class": 0, "site": "A"})
    assert second.case_id == "p2" and second.label == tmp_path / "scans" / "p2_label.nii.gz"
    assert second.extra == {"label_class": 1}


def test_csv_without_image_column(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("path,label\nx.nii.gz,1\n")
    with pytest.raises(VolumeReadError, match="has no 'image' column"):
        discover_cases(path)


def test_csv_with_missing_file(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("image\nnot_there.nii.gz\n")
    with pytest.raises(VolumeReadError, match="line 2.* does not exist"):
        discover_cases(path)


def test_bundle_datalist_reader_names_cases_as_discovery_does(tmp_path):
    """Two test images with one base name: the bundles' reader gives them distinct ids, the same as volumes infer."""
    from volumes.bundle import datalist_section, input_items

    save_nifti(tmp_path / "site1" / "ct.nii.gz", 1.0)
    save_nifti(tmp_path / "site2" / "ct.nii.gz", 2.0)
    save_nifti(tmp_path / "site1" / "other.nii.gz")
    datalist = {"training": [{"image": "site1/other.nii.gz", "class_label": 0}],
                "validation": [],
                "test": [{"image": "site1/ct.nii.gz", "class_label": 1}, {"image": "site2/ct.nii.gz", "class_label": 0}]}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))

    items = datalist_section(path, "test")
    assert [item["case_id"] for item in items] == ["site1_ct", "site2_ct"]
    assert [item["case_id"] for item in items] == [c.case_id for c in discover_cases(path, section="test")]
    assert [item["case_id"] for item in input_items(path, "test")] == ["site1_ct", "site2_ct"]
    assert [item["image"] for item in items] == [str(tmp_path / "site1" / "ct.nii.gz"), str(tmp_path / "site2" / "ct.nii.gz")]
    assert [item["class_label"] for item in items] == [1, 0]
    assert datalist_section(path, "validation") == []
    with pytest.raises(ConfigError, match="holdout"):
        datalist_section(path, "holdout")
