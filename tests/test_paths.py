"""Bundles are found in a checkout, where a wheel installs them, or where $VOLUMES_BUNDLES says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import volumes.paths as paths
from volumes.errors import VolumesError


def _fake_bundles(folder: Path) -> Path:
    for name in ("dinov2_unet_segmentation", "dinov2_slice_classification"):
        (folder / name / "configs").mkdir(parents=True)
    return folder


def test_the_checkout_bundles_are_found():
    assert paths.bundles_dir() == Path(__file__).resolve().parents[1] / "bundles"
    assert (paths.bundle_dir("dinov2_unet_segmentation") / "configs" / "inference.json").is_file()


def test_installed_bundles_and_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CHECKOUT", tmp_path / "site-packages")  # an installed wheel: no checkout
    monkeypatch.delenv("VOLUMES_BUNDLES", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    with pytest.raises(VolumesError, match="bundles were not found .* set VOLUMES_BUNDLES"):
        paths.bundles_dir()
    installed = _fake_bundles(tmp_path / "venv" / "share" / "volumes" / "bundles")
    assert paths.bundles_dir() == installed
    mine = _fake_bundles(tmp_path / "mine")
    monkeypatch.setenv("VOLUMES_BUNDLES", str(mine))
    assert paths.bundle_dir("dinov2_slice_classification") == mine / "dinov2_slice_classification"
    with pytest.raises(VolumesError, match="no such bundle"):
        paths.bundle_dir("nonexistent")
