"""The content-addressed embedding cache: keys, round trips, corruption, concurrency, pruning, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from volumes.cli import main as cli_main
from volumes.cache import (
    CacheWarning,
    EmbeddingCache,
    cache_key,
    config_hash,
    default_cache_dir,
    encoder_weights_id,
    volume_hash,
)

REPO = Path(__file__).resolve().parents[1]
PREP = {"preset": "soft_tissue", "window": (-160.0, 240.0), "axis": "axial", "channel_mode": "repeat", "size": 224}
DAY = 86400.0


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(16, 16, 6)).astype(np.float32)


def _affine() -> np.ndarray:
    return np.diag([0.8, 0.8, 2.5, 1.0])


def _key(seed: int = 0, encoder: str = "vit_small_patch14_dinov2", weights: str = "sha256:ab12", **prep) -> str:
    return cache_key(volume_hash(_volume(seed), _affine()), encoder, weights, {**PREP, **prep})


def _embeddings(seed: int = 0, slices: int = 6, dim: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "cls": rng.normal(size=(slices, dim)).astype(np.float32),
        "patch_mean": rng.normal(size=(slices, dim)).astype(np.float16),
        "slice_mm": np.arange(slices, dtype=np.float64) * 2.5,
    }


def _meta(encoder: str = "vit_small_patch14_dinov2", case_id: str = "case0") -> dict:
    return {"encoder": encoder, "weights_id": "sha256:ab12", "preprocessing": PREP, "case_id": case_id}


def _set_last_use(cache: EmbeddingCache, key: str, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(cache.path(key), (stamp, stamp))


# --------------------------------------------------------------------------- keys
def test_round_trip_is_bit_exact(tmp_path):
    cache = EmbeddingCache(tmp_path)
    arrays = _embeddings()
    arrays["cls"][0, :3] = [np.nan, -0.0, np.inf]  # values a lossy path would change
    key = _key()
    assert cache.get(key) is None
    path = cache.put(key, arrays, _meta())
    assert path == tmp_path / key[:2] / f"{key}.npz" and path.with_suffix(".json").is_file()

    back = cache.get(key)
    assert back is not None and sorted(back) == sorted(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        assert back[name].tobytes() == array.tobytes()
    assert cache.stats["hits"] == 1 and cache.stats["misses"] == 1

    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["encoder"] == "vit_small_patch14_dinov2" and sidecar["case_id"] == "case0"
    assert sidecar["preprocessing"]["window"] == [-160.0, 240.0]
    assert sidecar["shapes"]["cls"] == [6, 32] and sidecar["nbytes"] == sum(a.nbytes for a in arrays.values())
    assert sidecar["created"].endswith("+00:00")


def test_each_key_part_changes_the_key(tmp_path):
    volume, affine = _volume(), _affine()
    base = cache_key(volume_hash(volume, affine), "vit_small_patch14_dinov2", "sha256:ab12", PREP)
    one_voxel = volume.copy()
    one_voxel[3, 4, 5] += 1e-3
    moved = affine.copy()
    moved[0, 3] = 1.0
    variants = {
        "voxel": cache_key(volume_hash(one_voxel, affine), "vit_small_patch14_dinov2", "sha256:ab12", PREP),
        "affine": cache_key(volume_hash(volume, moved), "vit_small_patch14_dinov2", "sha256:ab12", PREP),
        "no affine": cache_key(volume_hash(volume), "vit_small_patch14_dinov2", "sha256:ab12", PREP),
        "dtype": cache_key(volume_hash(volume.astype(np.float64), affine), "vit_small_patch14_dinov2", "sha256:ab12", PREP),
        "shape": cache_key(volume_hash(volume.reshape(16, 6, 16), affine), "vit_small_patch14_dinov2", "sha256:ab12", PREP),
        "encoder": cache_key(volume_hash(volume, affine), "vit_base_patch14_dinov2", "sha256:ab12", PREP),
        "weights": cache_key(volume_hash(volume, affine), "vit_small_patch14_dinov2", "sha256:ab13", PREP),
        "window": cache_key(volume_hash(volume, affine), "vit_small_patch14_dinov2", "sha256:ab12", {**PREP, "window": (-150.0, 240.0)}),
        "size": cache_key(volume_hash(volume, affine), "vit_small_patch14_dinov2", "sha256:ab12", {**PREP, "size": 256}),
    }
    assert len({base, *variants.values()}) == len(variants) + 1

    cache = EmbeddingCache(tmp_path)
    cache.put(base, _embeddings())
    assert cache.get(base) is not None
    for name, key in variants.items():
        assert cache.get(key) is None, name
    assert cache.stats == {**cache.stats, "hits": 1, "misses": len(variants)}


def test_keys_ignore_what_does_not_matter():
    volume, affine = _volume(), _affine()
    # float noise below 1e-6 in the affine, e.g. from a NIfTI round trip
    assert volume_hash(volume, affine) == volume_hash(volume, affine + 1e-9)
    # memory layout and byte order are not content
    assert volume_hash(volume) == volume_hash(np.asfortranarray(volume))
    assert volume_hash(volume) == volume_hash(volume.astype(">f4"))
    # dict order, tuple vs list, Path vs str, numpy vs Python scalars
    assert config_hash({"a": 1, "b": (1.5, 2)}) == config_hash({"b": [1.5, 2], "a": 1})
    assert config_hash({"p": Path("/x/y"), "s": np.int64(3), "f": np.float64(0.25)}) == config_hash(
        {"p": "/x/y", "s": 3, "f": 0.25}
    )
    assert config_hash({"x": -0.0}) == config_hash({"x": 0.0})
    assert config_hash({"x": 1}) != config_hash({"x": 1.5})
    with pytest.raises(TypeError, match=r"\$\.fn"):
        config_hash({"fn": object()})


def test_torch_tensors_hash_like_numpy():
    torch = pytest.importorskip("torch")
    volume = _volume()
    assert volume_hash(torch.from_numpy(volume), torch.from_numpy(_affine())) == volume_hash(volume, _affine())
    assert volume_hash(torch.from_numpy(volume).permute(2, 0, 1)) == volume_hash(volume.transpose(2, 0, 1))
    assert volume_hash(torch.from_numpy(volume).bfloat16()) != volume_hash(torch.from_numpy(volume).half())


def test_key_is_stable_across_processes_and_import_is_light():
    script = (
        "import sys, numpy as np\n"
        "from volumes.cache import cache_key, volume_hash\n"
        "assert 'torch' not in sys.modules, 'import volumes.cache pulled in torch'\n"
        "v = np.random.default_rng(0).normal(size=(16, 16, 6)).astype(np.float32)\n"
        "prep = {'size': 224, 'preset': 'soft_tissue', 'channel_mode': 'repeat', 'axis': 'axial', 'window': (-160.0, 240.0)}\n"
        "print(cache_key(volume_hash(v, np.diag([0.8, 0.8, 2.5, 1.0])), 'vit_small_patch14_dinov2', 'sha256:ab12', prep))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _key()


def test_random_weights_are_refused_and_fingerprinted():
    with pytest.raises(ValueError, match="encoder_weights_id"):
        cache_key("0" * 64, "vit_small_patch14_dinov2", "random", PREP)

    class FakeEncoder:
        def __init__(self, weights_id: str, frozen: bool = True):
            self.weights_id, self.frozen = weights_id, frozen

        def fingerprint(self) -> str:
            return "f" * 64

    assert encoder_weights_id(FakeEncoder("sha256:ab12")) == "sha256:ab12"
    assert encoder_weights_id(FakeEncoder("random")) == "params:" + "f" * 64
    assert encoder_weights_id(FakeEncoder("sha256:ab12", frozen=False)) == "params:" + "f" * 64


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VOLUMES_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" and EmbeddingCache().root == tmp_path / "c"
    monkeypatch.delenv("VOLUMES_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "volumes" / "embeddings"


def test_bad_keys_and_arrays_are_refused(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(ValueError, match="hex"):
        cache.get("../../etc/passwd")
    with pytest.raises(TypeError, match="object"):
        cache.put(_key(), {"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="no arrays"):
        cache.put(_key(), {})


# --------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_entry_is_a_miss_removed_with_a_warning(tmp_path, damage):
    cache = EmbeddingCache(tmp_path)
    key = _key()
    path = cache.put(key, _embeddings(), _meta())
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 50, "empty": b""}[damage])

    with pytest.warns(CacheWarning, match=path.name):
        assert cache.get(key) is None
    assert not path.exists() and not path.with_suffix(".json").exists()
    assert cache.stats["corrupt"] == 1 and cache.stats["misses"] == 1

    # the next get_or_compute recomputes and repairs the entry
    calls = []
    fresh = cache.get_or_compute(key, lambda: calls.append(1) or _embeddings(), _meta())
    assert calls == [1] and np.array_equal(cache.get(key)["cls"], fresh["cls"])


def test_get_or_compute_computes_once(tmp_path):
    cache = EmbeddingCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return _embeddings()

    first = cache.get_or_compute(_key(), compute, _meta())
    second = cache.get_or_compute(_key(), compute, _meta())
    assert len(calls) == 1 and cache.stats["hits"] == 1 and cache.stats["writes"] == 1
    assert all(np.array_equal(first[n], second[n], equal_nan=True) for n in first)


def test_entry_without_sidecar_is_valid(tmp_path):
    cache = EmbeddingCache(tmp_path)
    path = cache.put(_key(), _embeddings(), _meta())
    path.with_suffix(".json").unlink()
    assert cache.get(_key()) is not None
    assert cache.info()["encoders"] == {"unknown": 1}


def _concurrent_writer(root: str, writer: int, barrier, shared_key: str, own_key: str, rounds: int) -> None:
    """Runs in a spawned process: write the shared key repeatedly, then a key of its own."""
    import torch  # noqa: F401 - pay the torch import before the race, not during it

    cache = EmbeddingCache(root)
    payload = {"cls": np.full((64, 1024), writer, dtype=np.float32), "writer": np.array([writer])}
    barrier.wait(timeout=120)
    for _ in range(rounds):
        cache.put(shared_key, payload, {"encoder": "vit", "case_id": f"writer{writer}"})
    cache.put(own_key, payload, {"encoder": "vit", "case_id": f"writer{writer}"})


def test_concurrent_writers_leave_complete_entries(tmp_path):
    writers, rounds = 2, 10
    shared = _key(seed=100)
    own = [_key(seed=200 + i) for i in range(writers)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(writers + 1)
    procs = [
        ctx.Process(target=_concurrent_writer, args=(str(tmp_path), i, barrier, shared, own[i], rounds))
        for i in range(writers)
    ]
    for proc in procs:
        proc.start()
    cache = EmbeddingCache(tmp_path)
    barrier.wait(timeout=120)
    # read while they write: a reader must never see a partial file
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        while any(proc.is_alive() for proc in procs):
            seen = cache.get(shared)
            if seen is not None:
                assert np.all(seen["cls"] == seen["writer"][0])
            time.sleep(0.005)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0

    final = cache.get(shared)
    assert final is not None and int(final["writer"][0]) in range(writers)
    assert np.all(final["cls"] == final["writer"][0])
    for i, key in enumerate(own):
        assert int(cache.get(key)["writer"][0]) == i
    assert json.loads(cache.path(shared).with_suffix(".json").read_text())["key"] == shared
    assert not list(tmp_path.rglob("*.tmp"))
    assert cache.info()["entries"] == writers + 1


# --------------------------------------------------------------------------- pruning
def _filled(tmp_path, encoders=("vit_s", "vit_s", "vit_b", "vit_b")) -> tuple[EmbeddingCache, list[str]]:
    cache = EmbeddingCache(tmp_path)
    keys = [_key(seed=i) for i in range(len(encoders))]
    for i, (key, encoder) in enumerate(zip(keys, encoders)):
        cache.put(key, _embeddings(seed=i, slices=50, dim=100), _meta(encoder=encoder, case_id=f"case{i}"))
        _set_last_use(cache, key, seconds_ago=(10 - i) * 3600)  # keys[0] least recently used
    return cache, keys


def test_prune_by_size_removes_least_recently_used_first(tmp_path):
    cache, keys = _filled(tmp_path)
    assert cache.get(keys[0]) is not None  # a hit makes keys[0] the most recently used
    entry_bytes = cache.info()["total_bytes"] // 4
    budget = 2 * entry_bytes + entry_bytes // 2

    planned = cache.prune(max_bytes=budget, dry_run=True)
    assert planned == [cache.path(keys[1]), cache.path(keys[2])]
    assert cache.info()["entries"] == 4

    assert cache.prune(max_bytes=budget) == planned
    assert sorted(cache.keys()) == sorted([keys[0], keys[3]])
    assert not cache.path(keys[1]).with_suffix(".json").exists()
    assert cache.info()["total_bytes"] <= budget
    assert cache.prune(max_bytes=budget) == []


def test_prune_by_age_and_encoder_and_stray_files(tmp_path):
    cache, keys = _filled(tmp_path)
    _set_last_use(cache, keys[3], seconds_ago=10 * DAY)
    old_tmp = cache.path(keys[0]).parent / f".{keys[0]}.npz.abc123.tmp"
    young_tmp = cache.path(keys[0]).parent / f".{keys[0]}.npz.def456.tmp"
    for tmp in (old_tmp, young_tmp):
        tmp.write_bytes(b"partial")
    os.utime(old_tmp, (time.time() - 2 * 3600,) * 2)
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("not ours")

    removed = cache.prune(older_than_days=5)
    assert removed == [old_tmp, cache.path(keys[3])]
    assert young_tmp.exists() and unrelated.exists()

    assert cache.prune(encoder="vit_s") == [cache.path(keys[0]), cache.path(keys[1])]
    assert cache.keys() == [keys[2]]
    assert cache.info()["encoders"] == {"vit_b": 1}

    assert cache.clear() == 1
    assert cache.keys() == [] and not young_tmp.exists() and unrelated.exists()


def test_info_counts(tmp_path):
    empty = EmbeddingCache(tmp_path / "missing").info()
    assert empty["entries"] == 0 and empty["total_bytes"] == 0 and not empty["exists"]

    cache, keys = _filled(tmp_path, encoders=("vit_s", "vit_b", "vit_b"))
    info = cache.info()
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert info["entries"] == 3 and info["total_bytes"] == on_disk
    assert info["encoders"] == {"vit_b": 2, "vit_s": 1}
    assert info["oldest_created"] <= info["newest_created"]
    assert info["least_recent_use"] < info["most_recent_use"]


# --------------------------------------------------------------------------- command line
def test_cache_command_info(tmp_path, capsys):
    _filled(tmp_path, encoders=("vit_s", "vit_b", "vit_b"))
    assert cli_main(["cache", "info", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "entries: 3" in out and " MB" in out
    assert "vit_b (2)" in out and "vit_s (1)" in out

    assert cli_main(["cache", "info", "--dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 3


def test_cache_command_prune(tmp_path, capsys):
    cache, keys = _filled(tmp_path)
    assert cli_main(["cache", "prune", "--dir", str(tmp_path), "--encoder", "vit_b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 2 entries" in out and keys[2] in out and len(cache.keys()) == 4

    assert cli_main(["cache", "prune", "--dir", str(tmp_path), "--max-gb", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed 4 entries" in out and "0 entries, 0.0 MB remain" in out
    assert cache.keys() == []


def test_cache_command_errors(tmp_path, capsys):
    assert cli_main(["cache", "prune", "--dir", str(tmp_path / "nope"), "--max-gb", "1"]) == 2
    assert "no cache folder" in capsys.readouterr().err
    tmp_path.joinpath("c").mkdir()
    assert cli_main(["cache", "prune", "--dir", str(tmp_path / "c"), "--max-gb", "-1"]) == 2
    assert cli_main(["cache", "frobnicate"]) == 2


# ------------------------------------------------------------ source keys (SliceEmbedder)
def _nifti(path: Path, seed: int) -> Path:
    import nibabel as nib

    voxels = np.random.default_rng(seed).integers(-200, 300, size=(32, 32, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(voxels, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    return path


def _embedder(cache_dir: Path):
    import torch
    from monai.transforms import Compose

    from volumes.embedding import SliceEmbedder
    from volumes.data.io import LoadVolumed
    from volumes.networks import SliceClassifier
    from volumes.transforms import PrepareSlicesd

    torch.manual_seed(0)
    network = SliceClassifier(2, aggregator="mean", encoder_kwargs={"model_kwargs": {"depth": 1}})
    transform = Compose([LoadVolumed("image"), PrepareSlicesd("image", size=28)])
    return SliceEmbedder(network, transform, {"size": 28}, cache_dir=cache_dir, progress=False)


def test_a_second_run_finds_the_file_without_loading_it(tmp_path, monkeypatch):
    import torch

    from volumes.embedding import SliceEmbedder

    item = {"image": str(_nifti(tmp_path / "a.nii.gz", seed=0)), "case_id": "a"}
    first = _embedder(tmp_path / "cache")
    computed = first.embed_item(item)["embedding"]
    assert (first.cache.stats["misses"], first.cache.stats["writes"]) == (1, 2)  # voxel entry + source entry

    def no_loading(self, data):
        raise AssertionError("the volume was loaded although its file's entry is cached")

    second = _embedder(tmp_path / "cache")
    monkeypatch.setattr(second, "transform", no_loading.__get__(second))
    monkeypatch.setattr(SliceEmbedder, "_compute", lambda self, image: pytest.fail("encoded again"))
    torch.testing.assert_close(second.embed_item(item)["embedding"], computed)
    assert (second.cache.stats["hits"], second.cache.stats["misses"]) == (1, 0)
    monkeypatch.undo()

    # the same voxels under another name: the file is new, the voxels are not (no encoding)
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(Path(item["image"]).read_bytes())
    third = _embedder(tmp_path / "cache")
    monkeypatch.setattr(SliceEmbedder, "_compute", lambda self, image: pytest.fail("encoded again"))
    torch.testing.assert_close(third.embed_item({"image": str(copy)})["embedding"], computed)
    assert (third.cache.stats["hits"], third.cache.stats["writes"]) == (1, 1)  # the copy's source entry
    monkeypatch.undo()

    # the file changes: its source key changes with it, and the new voxels are encoded
    _nifti(Path(item["image"]), seed=1)
    fourth = _embedder(tmp_path / "cache")
    changed = fourth.embed_item(item)["embedding"]
    assert fourth.cache.stats["misses"] == 1 and not torch.allclose(changed, computed)


def test_source_keys_off_and_in_memory_images_use_voxel_keys_only(tmp_path):
    embedder = _embedder(tmp_path / "cache")
    embedder.source_keys = False
    embedder.embed_item({"image": str(_nifti(tmp_path / "a.nii.gz", seed=0))})
    assert embedder.cache.stats["writes"] == 1
    embedder.source_keys = True
    from volumes.data.io import load_volume

    assert embedder.source_key_of({"image": load_volume(tmp_path / "a.nii.gz")}) is None
    assert embedder.source_key_of({"image": str(tmp_path / "missing.nii.gz")}) is None


def test_embedder_takes_the_network_under_either_name_and_refuses_neither_or_both(tmp_path):
    from volumes.embedding import ClassifierFeatures, SliceEmbedder

    reference = _embedder(tmp_path / "a")
    network, transform = reference.network, reference.transform
    by_keyword = SliceEmbedder(network=network, transform=transform, preprocessing={"size": 28}, progress=False)
    assert isinstance(by_keyword.features, ClassifierFeatures) and by_keyword.network is network
    assert by_keyword.preprocessing == reference.preprocessing  # the same cache keys as the positional form
    with pytest.raises(TypeError, match="one of features="):
        SliceEmbedder(transform=transform, preprocessing={"size": 28})
    with pytest.raises(TypeError, match="one of features="):
        SliceEmbedder(network, transform, {"size": 28}, network=network)
    with pytest.raises(TypeError, match="transform= and preprocessing="):
        SliceEmbedder(network)
    network.encoder.mode = "finetune"
    with pytest.raises(ValueError, match="frozen encoder"):
        SliceEmbedder(network, transform, {"size": 28})
