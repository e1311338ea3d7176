"""The command line: the demo main job, embedding a folder with a bad case in it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from volumes.cli import main
from volumes.data.phantoms import write_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, n=2, seed=3, progress=False)
    return out


def test_demo_writes_one_embedding_per_slice(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--n", "2", "--size", "56"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 2/2 cases" in printed and "centred cosine similarity" in printed
    rows = [json.loads(line) for line in (tmp_path / "embeddings.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        arrays = np.load(tmp_path / row["embedding"])
        depth = row["input_shape"][-1]
        assert arrays["cls"].shape == (depth, 384) == arrays["patch_mean"].shape
        assert arrays["slice_mm"].shape == (depth,) and np.all(np.diff(arrays["slice_mm"]) > 0)
        assert np.isfinite(arrays["cls"]).all()
    config = json.loads((tmp_path / "embed_config.json").read_text())
    assert config["encoder"] == "vit_small_patch14_dinov2" and config["weights_id"] == "random"
    assert not list(tmp_path.rglob("*.tmp"))


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
