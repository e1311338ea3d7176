"""``python -m volumes infer``: a mixed folder, fault isolation, DICOM SEG, kill-and-resume, torchrun.

Both bundles run with small random-initialised networks (a 2-block ViT-S/14 at 56 px):
what is tested is the batch machinery and the geometry of the outputs, not accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volumes.cli import main

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {name: ROOT / "bundles" / name for name in ("dinov2_unet_segmentation", "dinov2_slice_classification")}
SMALL = ['encoder_model_kwargs={"depth": 2}', "preprocessing_config#size=56"]
LABELS = ["background", "liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae"]
BAD = {"corrupt": "not a gzip file", "flat": "is 2D", "nan": "NaN voxels", "single": "single slice"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _checkpoints(folder: Path) -> list[Path]:
    """Random-initialised weights for both bundles, saved as the bundles save them."""
    from monai.bundle import ConfigParser

    paths = []
    for name, bundle in BUNDLES.items():
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["encoder_model_kwargs"] = {"depth": 2}
        parser["preprocessing_config#size"] = 56
        torch.manual_seed(0)
        path = folder / f"{name}.pt"
        torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, path)
        paths.append(path)
    return paths


def _mixed_folder(folder: Path, shared: Path | None) -> dict[str, Path]:
    """Good phantoms (NIfTI, DICOM), the real series when present, and four bad inputs."""
    from volumes.data.dicom import write_dicom_series
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case

    config = PhantomConfig.segmentation_demo(matrix=64)
    staging = folder.parent / "staging"
    good = {}
    for index, fmt in enumerate(("nifti", "dicom")):
        entry = write_case(generate_phantom(40 + index, config), staging, f"p{index}", fmt=fmt)
        target = folder / (f"p{index}.nii.gz" if fmt == "nifti" else f"p{index}")
        (shutil.copy if fmt == "nifti" else shutil.copytree)(staging / entry["image"], target)
        good[target.name.split(".")[0]] = target
    if shared is not None:
        good["real_ct"] = Path(shutil.copytree(shared / "totalsegmentator_example" / "example_ct_dicom", folder / "real_ct"))
    (folder / "corrupt.nii.gz").write_bytes(b"\x00 not a volume " * 64)
    nib.save(nib.Nifti1Image(np.zeros((24, 24), np.int16), np.eye(4)), folder / "flat.nii.gz")
    nan = np.zeros((16, 16, 8), np.float32)
    nan[4, 4, 4] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), folder / "nan.nii.gz")
    write_dicom_series(np.zeros((16, 16, 1)), np.eye(4), folder / "single")
    return good


def _infer_args(inputs: Path, output: Path, weights: list[Path], *extra: str) -> list[str]:
    args = ["infer", "--input", str(inputs), "--output", str(output), "--no-progress"]
    for bundle, w in zip(BUNDLES.values(), weights):
        args += ["--bundle", str(bundle), "--weights", str(w)]
    for override in SMALL:
        args += ["--set", override]
    return args + list(extra)


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
    base = tmp_path_factory.mktemp("infer")
    try:
        shared = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        shared = None
    inputs = base / "input"
    inputs.mkdir()
    good = _mixed_folder(inputs, shared)
    weights = _checkpoints(base)
    output = base / "out"
    code = main(_infer_args(inputs, output, weights))
    return {"base": base, "inputs": inputs, "good": good, "weights": weights, "output": output, "code": code}


def _rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]


def test_bad_cases_land_in_failures_csv_and_the_exit_code_says_so(run):
    assert run["code"] == 1
    with open(run["output"] / "failures.csv") as handle:
        failures = {row["case_id"]: row for row in csv.DictReader(handle)}
    assert set(failures) == set(BAD)
    for case_id, phrase in BAD.items():
        assert phrase in failures[case_id]["error"], failures[case_id]
        assert failures[case_id]["source"] in failures[case_id]["error"]  # the reason names the file
        assert not (run["output"] / case_id / "record.json").exists()
    rows = _rows(run["output"])
    assert {r["case_id"] for r in rows} == set(run["good"])
    assert sorted(r["bundle"] for r in rows) == sorted(list(BUNDLES) * len(run["good"]))


def test_masks_have_the_input_geometry_and_organ_volumes_match_them(run):
    from volumes.data.io import load_volume

    for row in _rows(run["output"]):
        if row["task"] != "segmentation":
            continue
        source = load_volume(run["good"][row["case_id"]], orientation=None)  # as stored on disk
        written = nib.load(run["output"] / row["outputs"]["segmentation"])
        assert written.shape == tuple(source.shape[1:])
        np.testing.assert_allclose(written.affine, source.meta["original_affine"], atol=1e-3)
        mask = np.asarray(written.dataobj)
        voxel_ml = float(np.prod(written.header.get_zooms()[:3])) / 1000
        for index, organ in enumerate(LABELS[1:], start=1):
            assert row["organ_volumes_ml"][organ] == pytest.approx((mask == index).sum() * voxel_ml, rel=1e-4, abs=1e-3)
        assert row["input_sha256"] and row["weights_sha256"] and row["bundle_version"] == "0.2.0"
        assert set(row["timings_s"]) >= {"load", "preprocess", "infer", "write"}


def test_classification_rows_hold_probabilities_and_top_slices(run):
    rows = [r for r in _rows(run["output"]) if r["task"] == "classification"]
    assert rows
    for row in rows:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == max(row["probabilities"], key=row["probabilities"].get)
        importances = [s["importance"] for s in row["top_slices"]]
        assert len(importances) == 5 and importances == sorted(importances, reverse=True)
        stored = json.loads((run["output"] / row["outputs"]["probabilities"]).read_text())
        assert stored["probabilities"] == row["probabilities"]
    with open(run["output"] / "predictions.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(_rows(run["output"]))
    assert {"p_normal_liver", "p_hepatomegaly", "volume_ml_liver", "time_infer_s"} <= set(table[0])


def test_dicom_seg_references_the_source_series(run):
    highdicom = pytest.importorskip("highdicom")
    import pydicom

    from volumes.data.dicom import check_dicom_series

    dicom_cases = [case for case, path in run["good"].items() if path.is_dir()]
    assert dicom_cases
    for case_id in dicom_cases:
        seg = highdicom.seg.segread(run["output"] / case_id / "dinov2_unet_segmentation_seg.dcm")
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in check_dicom_series(run["good"][case_id])]
        mask = np.asarray(nib.load(run["output"] / case_id / "dinov2_unet_segmentation_seg.nii.gz").dataobj)
        present = sum(int(np.any(mask[..., k] == label)) for k in range(mask.shape[2]) for label in range(1, len(LABELS)))
        assert int(seg.NumberOfFrames) == max(present, len(sources))  # an all-empty map keeps one frame per image
        assert [seg.get_segment_description(i).SegmentLabel for i in range(1, len(LABELS))] == LABELS[1:]
        referenced = {ref.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                      for ref in series.ReferencedInstanceSequence}
        sop_uids = {str(ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID) for ds in sources}
        assert referenced == sop_uids


def test_report_shows_every_case_failure_and_figure(run):
    report = (run["output"] / "report.html").read_text()
    for case_id in [*run["good"], *BAD]:
        assert case_id in report
    for case_id in run["good"]:
        assert (run["output"] / case_id / "overview.png").stat().st_size > 10_000
        assert f'{case_id}/overview.png' in report


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*")]


def test_kill_then_resume_gives_the_uninterrupted_outputs(run, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "volumes", *_infer_args(run["inputs"], output, run["weights"], "--workers", "0")]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list(output.glob("*/record.json")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_records = len(list(output.glob("*/record.json")))
    assert killed_records >= 1 and not (output / "predictions.csv").exists(), "the kill came too late to test resume"
    assert not _temporaries(output)
    resumed = subprocess.run([*command, "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 1, resumed.stderr[-2000:]
    assert f"{killed_records} already complete" in resumed.stdout
    assert not _temporaries(output)
    first, second = _rows(run["output"]), _rows(output)
    assert [(r["case_id"], r["bundle"]) for r in first] == [(r["case_id"], r["bundle"]) for r in second]
    for a, b in zip(first, second):
        assert a["input_sha256"] == b["input_sha256"] and a["outputs"] == b["outputs"]
        if a["task"] == "classification":
            for name, p in a["probabilities"].items():
                assert b["probabilities"][name] == pytest.approx(p, abs=1e-4)
        else:
            x = np.asarray(nib.load(run["output"] / a["outputs"]["segmentation"]).dataobj)
            y = np.asarray(nib.load(output / b["outputs"]["segmentation"]).dataobj)
            assert (x == y).mean() > 0.999


def _good_phantoms(run, folder: Path) -> Path:
    """A folder with the two good phantom cases of the mixed folder (NIfTI and DICOM)."""
    folder.mkdir()
    for name in ("p0.nii.gz", "p1"):
        source = run["inputs"] / name
        (shutil.copy if source.is_file() else shutil.copytree)(source, folder / name)
    return folder


def test_a_kill_mid_write_leaves_no_temporary_file_after_the_next_run(run, tmp_path):
    """SIGKILL while p0's overview.png is written (temporary file complete, not renamed): the
    orphan is there after the kill and gone after ``--resume``, whose outputs are complete."""
    from volumes.atomic import is_temporary

    inputs = _good_phantoms(run, tmp_path / "input")
    output, marker = tmp_path / "out", tmp_path / "stopped"
    args = _infer_args(inputs, output, run["weights"], "--workers", "0")
    from kill_points import kill, run_until, wait_for

    process = run_until(marker, "p0/overview.png", args, ENV)
    wait_for(marker, process, "the run never reached the overview.png of p0")
    kill(process)
    [orphan] = _temporaries(output)
    assert orphan.parent.name == "p0" and is_temporary(orphan.name) and f"~{process.pid}@" in orphan.name
    assert not (output / "p0" / "overview.png").exists() and not (output / "p0" / "record.json").exists()
    assert main([*args, "--resume"]) == 0
    assert not _temporaries(output)
    record = json.loads((output / "p0" / "record.json").read_text())
    assert "p0/overview.png" in record["files"] and all((output / f).is_file() for f in record["files"])
    assert len(_rows(output)) == 4


def test_resume_redoes_a_case_whose_input_changed(run, tmp_path):
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case

    inputs = _good_phantoms(run, tmp_path / "input")
    output = tmp_path / "out"
    assert main(_infer_args(inputs, output, run["weights"], "--no-figures")) == 0
    stamp = {case: (output / case / "record.json").stat().st_mtime_ns for case in ("p0", "p1")}
    entry = write_case(generate_phantom(99, PhantomConfig.segmentation_demo(matrix=64)), tmp_path / "new", "p0")
    shutil.copy(tmp_path / "new" / entry["image"], inputs / "p0.nii.gz")
    assert main(_infer_args(inputs, output, run["weights"], "--no-figures", "--resume")) == 0
    assert (output / "p1" / "record.json").stat().st_mtime_ns == stamp["p1"]  # unchanged input: skipped
    assert (output / "p0" / "record.json").stat().st_mtime_ns != stamp["p0"]  # changed input: redone
    row = next(r for r in _rows(output) if r["case_id"] == "p0")
    from volumes.inference.runner import input_sha256

    assert row["input_sha256"] == input_sha256({"image": str(inputs / "p0.nii.gz")})


def test_torchrun_splits_the_cases_and_merges_one_table(run, tmp_path):
    inputs = _good_phantoms(run, tmp_path / "input")
    shutil.copy(run["inputs"] / "p0.nii.gz", inputs / "p0_copy.nii.gz")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "volumes", *_infer_args(inputs, output, run["weights"], "--no-figures")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {case: json.loads((output / case / "record.json").read_text()) for case in ("p0", "p0_copy", "p1")}
    assert sorted(r["rank"] for r in records.values()) == [0, 0, 1]  # every 2nd case to rank 1, each once
    rows = _rows(output)
    assert sorted(r["case_id"] for r in rows) == sorted(["p0", "p0", "p0_copy", "p0_copy", "p1", "p1"])
    with open(output / "predictions.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 6


def test_bundles_share_the_loaded_voxels_without_changing_them(run):
    """Each bundle's preprocessing gets the loaded volume without a copy; none may write into it."""
    from volumes.inference import load_bundle
    from volumes.inference.runner import _fresh

    overrides = {"encoder_model_kwargs": {"depth": 2}, "preprocessing_config#size": 56}
    models = [load_bundle(b, weights=w, overrides=overrides) for b, w in zip(BUNDLES.values(), run["weights"])]
    from volumes.data.io import LoadVolumed

    volume = LoadVolumed("image")({"image": str(run["good"]["p0"])})["image"]
    before = volume.clone()
    trace = [op["class"] for op in volume.applied_operations]  # loading records its reorientation
    for model in models:
        shared = _fresh(volume)
        assert shared.data_ptr() == volume.data_ptr()
        data = model.predictor.prepare({"image": shared, "case_id": "p0"})
        assert data["image"].shape[0] == 3
        model.predictor.predict(data)
    assert torch.equal(volume.as_tensor(), before.as_tensor())
    assert [op["class"] for op in volume.applied_operations] == trace  # each bundle had its own trace
