"""MedMNIST 3D loader (volumes.data.medmnist) and the AdrenalMNIST3D results script.

File-format and error tests write their own small archives; the real-data tests
need ../shared/data/medmnist3d and skip without it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from volumes.data.medmnist import ADRENAL_CLASS_NAMES, load_medmnist3d, load_medmnist3d_splits, medmnist3d_arrays
from volumes.errors import ConfigError, VolumeReadError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "adrenal_results.py"


def write_archive(path: Path, size: int = 6, counts=(5, 2, 3), **overrides) -> Path:
    """A MedMNIST-shaped archive: volume ``k`` of a split has value ``k`` on its stored axis-0 index 1."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        images = np.zeros((n, size, size, size), dtype=np.uint8)
        images[:, 1] = np.arange(n, dtype=np.uint8)[:, None, None] * 50 + 5
        images[:, 0, 2, 3] = 255
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez_compressed(path, **arrays)
    return path


# ------------------------------------------------------------------ format (no shared data)
def test_loader_items_from_written_archive(tmp_path):
    path = write_archive(tmp_path / "tiny.npz")
    items = load_medmnist3d(path, "train")
    assert [item["case_id"] for item in items] == [f"train_{i:04d}" for i in range(5)]
    _, labels = medmnist3d_arrays(path, "train")
    assert [item["class_label"] for item in items] == labels.tolist()
    for k, item in enumerate(items):
        image = item["image"]
        assert isinstance(image, MetaTensor) and image.dtype == torch.float32
        assert tuple(image.shape) == (1, 6, 6, 6)
        assert torch.equal(image.affine, torch.eye(4, dtype=image.affine.dtype))
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        # stored axis 0 (MedMNIST's frame axis) is the last axis now; the other two keep their order
        assert torch.allclose(image[0, :, :, 1][image[0, :, :, 1] < 1], torch.tensor((k * 50 + 5) / 255))
        assert float(image[0, 2, 3, 0]) == 1.0 and float(image[0, 3, 2, 0]) == 0.0
        assert image.meta["filename_or_obj"].endswith(f"#train_{k:04d}")
    assert isinstance(items[0]["class_label"], int)
    assert {k: len(v) for k, v in load_medmnist3d_splits(path).items()} == {"train": 5, "val": 2, "test": 3}


def test_slice_axis_option(tmp_path):
    path = write_archive(tmp_path / "tiny.npz")
    cube = np.load(path)["val_images"][1].astype(np.float32) / 255
    for axis in (0, 1, 2):
        image = load_medmnist3d(path, "val", slice_axis=axis)[1]["image"]
        np.testing.assert_allclose(image[0].numpy(), np.moveaxis(cube, axis, -1))


def test_missing_file(tmp_path):
    with pytest.raises(VolumeReadError, match="file not found") as info:
        load_medmnist3d(tmp_path / "absent.npz", "train")
    assert info.value.path == str(tmp_path / "absent.npz")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(VolumeReadError, match="not a readable .npz"):
        load_medmnist3d(bad, "train")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(write_archive(tmp_path / "good.npz").read_bytes()[:300])
    with pytest.raises(VolumeReadError, match=str(truncated.name)):
        load_medmnist3d(truncated, "train")


def test_missing_keys(tmp_path):
    path = write_archive(tmp_path / "nolabels.npz", test_labels=None)
    load_medmnist3d(path, "train")  # the other splits still load
    with pytest.raises(VolumeReadError, match="test_labels"):
        load_medmnist3d(path, "test")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train_images": np.zeros((3, 4, 4), np.uint8)}, r"\[N, S, S, S\]"),
        ({"train_images": np.zeros((5, 4, 4, 4), np.float32)}, "uint8"),
        ({"train_labels": np.zeros((4, 1), np.uint8)}, "N = 5"),
    ],
)
def test_bad_arrays(tmp_path, override, message):
    path = write_archive(tmp_path / "bad.npz", **override)
    with pytest.raises(VolumeReadError, match=message):
        load_medmnist3d(path, "train")


def test_bad_arguments(tmp_path):
    path = write_archive(tmp_path / "tiny.npz")
    with pytest.raises(ConfigError, match="split"):
        load_medmnist3d(path, "validation")
    with pytest.raises(ConfigError, match="slice_axis"):
        load_medmnist3d(path, "train", slice_axis=3)


def load_script():
    """``scripts/adrenal_results.py`` as a module (registered first: its dataclasses look it up)."""
    if "adrenal_results" not in sys.modules:
        spec = importlib.util.spec_from_file_location("adrenal_results", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["adrenal_results"] = module
        spec.loader.exec_module(module)
    return sys.modules["adrenal_results"]


def test_blank_sharing_embedder_matches_slice_embedder(tmp_path):
    """Encoding each blank slice once gives the embeddings of a plain SliceEmbedder."""
    from monai.transforms import Compose

    from volumes.embedding import SliceEmbedder
    from volumes.networks import SliceClassifier
    from volumes.transforms import PrepareSlicesd

    torch.manual_seed(0)
    network = SliceClassifier(2, aggregator="mean", encoder_kwargs={"model_kwargs": {"depth": 1}})
    transform = Compose([PrepareSlicesd("image", size=28)])
    items = load_medmnist3d(write_archive(tmp_path / "tiny.npz", size=8), "train")[:3]
    sharing = load_script().blank_sharing_embedder(network, transform, {"size": 28}, progress=False)
    plain = SliceEmbedder(network, transform, {"size": 28}, progress=False)
    for shared, reference in zip(sharing(items), plain(items)):
        torch.testing.assert_close(shared["embedding"], reference["embedding"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(shared["positions"], reference["positions"])
        assert shared["label"] == reference["label"] and shared["case_id"] == reference["case_id"]
    # 8 stored slices per volume, of which slices 0 and 1 are not blank: 2 per volume + one blank slice
    assert sharing.encoded_slices == 3 * 2 + 1


# ------------------------------------------------------------------ real data (shared folder)
@pytest.fixture(scope="module")
def medmnist_dir(shared_data: Path) -> Path:
    folder = shared_data / "medmnist3d"
    if not (folder / "adrenalmnist3d.npz").is_file():
        pytest.skip(f"{folder}/adrenalmnist3d.npz not found")
    return folder


@pytest.mark.shared
def test_adrenal_28(medmnist_dir):
    splits = load_medmnist3d_splits(medmnist_dir / "adrenalmnist3d.npz")
    assert {split: len(items) for split, items in splits.items()} == {"train": 1188, "val": 98, "test": 298}
    assert sum(item["class_label"] for item in splits["test"]) == 69  # hyperplasia cases in the test split
    assert ADRENAL_CLASS_NAMES == ("normal", "hyperplasia")
    for split, items in splits.items():
        assert {item["class_label"] for item in items} == {0, 1}
        assert items[0]["case_id"] == f"{split}_0000"
    images = torch.stack([item["image"].as_tensor() for item in splits["val"]])
    assert images.shape == (98, 1, 28, 28, 28) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert torch.equal(splits["val"][0]["image"].affine, torch.eye(4, dtype=torch.float64))


@pytest.mark.shared
def test_adrenal_64(medmnist_dir):
    path = medmnist_dir / "adrenalmnist3d_64.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    items = load_medmnist3d(path, "val")
    assert len(items) == 98 and tuple(items[0]["image"].shape) == (1, 64, 64, 64)
    assert 0.0 <= float(items[0]["image"].min()) and float(items[0]["image"].max()) == 1.0


@pytest.mark.shared
@pytest.mark.slow
def test_results_script_quick(medmnist_dir, tmp_path):
    output = tmp_path / "results.md"
    command = [
        sys.executable, str(SCRIPT), "--quick", "--no-progress", "--data", str(medmnist_dir / "adrenalmnist3d.npz"),
        "--output", str(output), "--cache-dir", str(tmp_path / "cache"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = output.read_text()
    assert "randomly initialised" in text and "--quick" in text
    for row in (
        "+ slice transformer", "+ slice GNN", "+ mean pooling", "+ gated attention MIL",
        "ResNet-18 3D from scratch", "majority class", "MedMNIST v2 published: ResNet-18 (3D) | – | 0.827 | 0.721",
        "MedMNIST v2 published: auto-sklearn | – | 0.828 | 0.802",
    ):
        assert row in text, row
    table_rows = [line for line in text.splitlines() if line.startswith("| DINOv2") or line.startswith("| ResNet-18")]
    assert len(table_rows) == 5 + 5 * 2  # summary rows + per-run rows (2 seeds)
    assert any(p.suffix == ".npz" for p in (tmp_path / "cache").rglob("*"))  # embeddings went through the cache
