"""The streamed phantom CT (the benchmarks' input): the same case as generate_phantom, chunk by chunk."""

from __future__ import annotations

import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from volumes.data.phantoms import ORGANS, PhantomConfig, generate_phantom
from volumes.data.phantoms.streaming import (
    GENERATOR_VERSION,
    SPACING_MM,
    PhantomStream,
    cached_ct,
    ct_affine,
    ct_chunks,
    write_ct,
)
from volumes.errors import ConfigError

COARSE = PhantomConfig(inplane_spacing_mm=(5.0, 6.0), slice_spacing_mm=(5.0, 6.0))
QUIET = PhantomConfig(inplane_spacing_mm=(5.0, 6.0), slice_spacing_mm=(5.0, 6.0), noise_hu=(0.0, 0.0))


def _volume(stream: PhantomStream) -> tuple[np.ndarray, np.ndarray]:
    """The whole stream as RAS-stored ``[X, Y, Z]`` image and label (the chunks are LPS-stored)."""
    images, labels = zip(*stream.chunks())
    return np.concatenate(images, axis=2)[::-1, ::-1], np.concatenate(labels, axis=2)[::-1, ::-1]


@pytest.mark.parametrize("seed", [0, 3])
def test_stream_on_the_phantoms_own_grid_is_that_phantom(seed):
    """On generate_phantom's matrix and slice count the stream paints the very same case."""
    phantom = generate_phantom(seed, QUIET)
    size, _, slices = phantom.shape
    stream = PhantomStream(size, slices, seed, QUIET, chunk=7)
    np.testing.assert_allclose(stream.body_spacing, phantom.spacing, rtol=1e-9)
    image, label = _volume(stream)
    np.testing.assert_array_equal(label, phantom.label)
    # noise off: the same HU but for the smooth fields' standardisation, taken from a sample
    diff = np.abs(image.astype(np.int32) - np.rint(phantom.image).astype(np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    assert stream.positive == phantom.info["positive"]


def test_chunk_borders_leave_no_trace_without_noise():
    """Blur is exact across chunks (each is painted with the blur's reach on either side)."""
    whole = _volume(PhantomStream(40, 150, 2, QUIET, chunk=150))
    stream = PhantomStream(40, 150, 2, QUIET, chunk=4)
    assert stream.halo >= 2  # 150 slices stretch the case: the blur reaches past the next slice
    chunked = _volume(stream)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])


def test_noise_is_drawn_per_chunk_with_the_cases_level():
    stream = PhantomStream(64, 24, 1, COARSE, chunk=8)
    noisy, label = _volume(stream)
    quiet, _ = _volume(PhantomStream(64, 24, 1, QUIET, chunk=8))
    assert COARSE.noise_hu[0] <= stream.noise_hu <= COARSE.noise_hu[1]
    residual = (noisy.astype(np.float64) - quiet)[label == ORGANS["liver"]]
    assert abs(residual.mean()) < 2.0
    # the in-plane blur of the noise lowers its std a little below the drawn level
    assert 0.6 * stream.noise_hu < residual.std() < 1.1 * stream.noise_hu


def test_written_ct_and_labels_reload_in_patient_orientation(tmp_path):
    from volumes.data.io import load_volume

    path, label_path = tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz"
    write_ct(path, 48, 20, seed=4, label_path=label_path, config=COARSE, chunk=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "label.nii.gz"]  # no temporary file left
    image, label = nib.load(path), nib.load(label_path)
    assert image.shape == label.shape == (48, 48, 20)
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, ct_affine(48), atol=1e-5)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    assert image.header.get_zooms() == pytest.approx(SPACING_MM)
    assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
    stream = PhantomStream(48, 20, 4, COARSE, chunk=6)
    chunks = list(stream.chunks())
    np.testing.assert_array_equal(next(stream.chunks())[0], chunks[0][0])  # iterating again: the same noise
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.concatenate([c[0] for c in chunks], axis=2))
    np.testing.assert_array_equal(np.asanyarray(label.dataobj), np.concatenate([c[1] for c in chunks], axis=2))
    # read as RAS, the liver lies on the patient's right (larger x) of the spleen
    ras = load_volume(label_path, orientation="RAS")[0].numpy()
    liver_x = np.argwhere(ras == ORGANS["liver"])[:, 0].mean()
    spleen_x = np.argwhere(ras == ORGANS["spleen"])[:, 0].mean()
    assert liver_x > spleen_x + 5
    hu = np.asanyarray(image.dataobj)
    assert hu.min() >= -1024 and hu[0, 0].mean() < -950  # air around the body


def test_cached_ct_is_named_by_seed_and_generator_version(tmp_path):
    said: list[str] = []
    first = cached_ct(tmp_path, 32, 6, say=said.append)
    assert first.name == f"ct_32x32x6_v{GENERATOR_VERSION}.nii.gz" and len(said) == 1
    stamp = first.stat().st_mtime_ns
    assert cached_ct(tmp_path, 32, 6, say=said.append) == first and first.stat().st_mtime_ns == stamp
    assert len(said) == 1  # found, not written again
    other = cached_ct(tmp_path, 32, 6, seed=1)
    assert other.name == f"ct_32x32x6_seed1_v{GENERATOR_VERSION}.nii.gz"
    assert not np.array_equal(np.asanyarray(nib.load(first).dataobj), np.asanyarray(nib.load(other).dataobj))
    assert next(ct_chunks(32, 6, seed=1)).shape == (32, 32, 6)


def test_memory_does_not_grow_with_the_slice_count(tmp_path):
    """16x the slices: the peak allocation grows with the blur's reach only, never to the volume."""
    write_ct(tmp_path / "warm.nii.gz", 32, 8, chunk=8)  # imports and caches outside the measurement
    peaks = {}
    for slices in (64, 1024):
        tracemalloc.start()
        write_ct(tmp_path / f"ct{slices}.nii.gz", 32, slices, chunk=8)
        peaks[slices] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # stretched over 1024 slices the z blur reaches 8 slices instead of 2, so a chunk is painted
    # with 24 slices instead of 12; the whole float32 volume would be 16x the 64-slice one
    assert peaks[1024] < 2 * peaks[64], peaks
    assert peaks[1024] < 0.75 * (32 * 32 * 1024 * 4), peaks


def test_stream_arguments_are_checked():
    with pytest.raises(ConfigError, match="lesion"):
        PhantomStream(32, 8, config=PhantomConfig(task="lesion"))
    with pytest.raises(ConfigError, match="slices >= 2"):
        PhantomStream(32, 1)
