"""Tests for volumes.transforms: intensity presets, slice preparation, Invertd round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Invertd

from volumes.errors import ConfigError
from volumes.transforms import (
    CT_WINDOWS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SLICE_AXES,
    THREE_WINDOWS,
    IntensityPresetd,
    PrepareSlicesd,
    imagenet_normalize,
    mr_normalize,
    preprocessing,
    slice_geometry,
    to_three_channels,
    window_ct,
)

SHAPE = (100, 80, 30)  # X, Y, Z of the test volume: non-square and anisotropic


def _affine(oblique: bool = False) -> torch.Tensor:
    """Anisotropic spacing, an offset, and optionally a rotation about z."""
    affine = torch.diag(torch.tensor([0.8, 0.9, 2.5, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-40.0, 12.5, 300.0], dtype=torch.float64)
    if oblique:
        angle = 0.3
        rotation = torch.eye(4, dtype=torch.float64)
        rotation[:2, :2] = torch.tensor(
            [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=torch.float64
        )
        affine = rotation @ affine
    return affine


def _ct(shape=SHAPE, oblique: bool = False) -> MetaTensor:
    generator = torch.Generator().manual_seed(0)
    hu = torch.rand(1, *shape, generator=generator) * 2000 - 1000
    return MetaTensor(hu, affine=_affine(oblique))


def _blocky_labels(shape=SHAPE, block: int = 10, oblique: bool = False) -> MetaTensor:
    """Labels 0..3 constant on ``block``-sized cubes, so resizing loses little."""
    generator = torch.Generator().manual_seed(1)
    coarse = torch.randint(0, 4, (1, *(-(-s // block) for s in shape)), generator=generator)
    for dim in (1, 2, 3):
        coarse = coarse.repeat_interleave(block, dim=dim)
    return MetaTensor(coarse[:, : shape[0], : shape[1], : shape[2]].contiguous(), affine=_affine(oblique))


# --------------------------------------------------------------------------- intensity


def test_window_ct_known_values_numpy_and_torch():
    hu = [-1000.0, -160.0, 40.0, 240.0, 3000.0]
    expected = [0.0, 0.0, 0.5, 1.0, 1.0]
    out_np = window_ct(np.array(hu), level=40, width=400)
    assert out_np.dtype == np.float32
    np.testing.assert_allclose(out_np, expected, atol=1e-6)
    out_t = window_ct(torch.tensor(hu, dtype=torch.float64), level=40, width=400)
    assert out_t.dtype == torch.float32
    torch.testing.assert_close(out_t, torch.tensor(expected))
    # lung window: [-1350, 150]
    np.testing.assert_allclose(window_ct(np.array([-1350.0, -600.0, 150.0]), *CT_WINDOWS["lung"]), [0, 0.5, 1])


def test_ct_window_table_has_standard_values():
    assert CT_WINDOWS["soft_tissue"] == (40.0, 400.0)
    assert CT_WINDOWS["abdomen"] == (50.0, 400.0)
    assert CT_WINDOWS["liver"] == (30.0, 150.0)
    assert CT_WINDOWS["mediastinum"] == (50.0, 350.0)
    assert CT_WINDOWS["lung"] == (-600.0, 1500.0)
    assert CT_WINDOWS["bone"] == (400.0, 1800.0)
    assert CT_WINDOWS["brain"] == (40.0, 80.0)
    assert THREE_WINDOWS == ("soft_tissue", "lung", "bone")
    with pytest.raises(ValueError, match="width"):
        window_ct(np.zeros(3), 40, 0)


def test_mr_normalize_foreground_stats_and_background():
    rng = np.random.default_rng(0)
    volume = np.zeros((40, 40, 40), dtype=np.float32)
    volume[5:35, 5:35, 5:35] = rng.normal(300.0, 50.0, size=(30, 30, 30))
    out = mr_normalize(volume)
    foreground = out[5:35, 5:35, 5:35]
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    # z-score then [-3, 3] -> [0, 1]: mean 0.5, std 1/6 (0.5/99.5 percentile clipping stays inside +-3)
    assert abs(foreground.mean() - 0.5) < 1e-3
    assert abs(foreground.std() - 1 / 6) < 1e-3
    assert (out[:5] == 0).all()
    torch_out = mr_normalize(torch.from_numpy(volume))
    assert isinstance(torch_out, torch.Tensor) and torch_out.dtype == torch.float32
    np.testing.assert_allclose(torch_out.numpy(), out, atol=1e-6)
    assert (mr_normalize(np.zeros((4, 4, 4))) == 0).all()


def test_intensity_preset_three_windows_channel_order_keeps_meta():
    ct = _ct()
    out = IntensityPresetd("image", preset="ct_three_windows")({"image": ct})["image"]
    assert isinstance(out, MetaTensor) and out.shape == (3, *SHAPE)
    for channel, name in enumerate(THREE_WINDOWS):
        torch.testing.assert_close(out[channel].as_tensor(), window_ct(ct[0].as_tensor(), *CT_WINDOWS[name]))
    torch.testing.assert_close(out.affine, ct.affine)


@pytest.mark.parametrize("preset", ["soft_tissue", "bone", "mr"])
def test_intensity_preset_single_channel(preset):
    ct = _ct()
    out = IntensityPresetd("image", preset=preset)({"image": ct})["image"]
    assert isinstance(out, MetaTensor) and out.shape == (1, *SHAPE) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(out.affine, ct.affine)


def test_intensity_preset_errors():
    with pytest.raises(ConfigError, match=r"preset='ct_wide' is not allowed; choose from \[.*'soft_tissue'.*'mr'") as info:
        IntensityPresetd("image", preset="ct_wide")
    assert info.value.key == "preset" and "ct_three_windows" in info.value.allowed
    with pytest.raises(ValueError, match="1-channel"):
        IntensityPresetd("image", preset="ct_three_windows")({"image": torch.zeros(2, 4, 4, 4)})


# --------------------------------------------------------------------------- channels


def test_to_three_channels_repeat_and_meta():
    x = MetaTensor(torch.rand(1, 5, 6, 7), affine=_affine())
    out = to_three_channels(x, "repeat")
    assert isinstance(out, MetaTensor) and out.shape == (3, 5, 6, 7)
    for channel in range(3):
        torch.testing.assert_close(out[channel].as_tensor(), x[0].as_tensor())
    torch.testing.assert_close(out.affine, x.affine)


def test_to_three_channels_25d_neighbours_with_edge_replication():
    depth = 6
    x = torch.arange(depth, dtype=torch.float32).reshape(1, 1, 1, depth).expand(1, 3, 4, depth).clone()
    out = to_three_channels(x, "2.5d")
    assert out.shape == (3, 3, 4, depth)
    previous, centre, following = out[0, 0, 0], out[1, 0, 0], out[2, 0, 0]
    torch.testing.assert_close(centre, torch.arange(depth, dtype=torch.float32))
    torch.testing.assert_close(previous, torch.tensor([0, 0, 1, 2, 3, 4], dtype=torch.float32))
    torch.testing.assert_close(following, torch.tensor([1, 2, 3, 4, 5, 5], dtype=torch.float32))


def test_to_three_channels_errors():
    with pytest.raises(ValueError, match="'windows' needs 3 channels"):
        to_three_channels(torch.zeros(1, 2, 2, 2), "windows")
    with pytest.raises(ValueError, match=r"'2.5d' needs a 1-channel volume"):
        to_three_channels(torch.zeros(3, 2, 2, 2), "2.5d")
    with pytest.raises(ConfigError, match="channel_mode='rgb'.*'repeat', '2.5d', 'windows'"):
        to_three_channels(torch.zeros(1, 2, 2, 2), "rgb")
    windows = torch.rand(3, 2, 2, 2)
    assert to_three_channels(windows, "windows") is windows


def test_imagenet_normalize_per_channel():
    x = torch.full((3, 4, 4, 2), 0.5)
    out = imagenet_normalize(x)
    for channel in range(3):
        expected = (0.5 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        torch.testing.assert_close(out[channel], torch.full((4, 4, 2), expected))
    batch = torch.zeros(2, 3, 4, 4)
    out_b = imagenet_normalize(batch, channel_dim=1)
    torch.testing.assert_close(out_b[1, 2], torch.full((4, 4), -IMAGENET_MEAN[2] / IMAGENET_STD[2]))
    with pytest.raises(ValueError, match="3 channels"):
        imagenet_normalize(torch.zeros(1, 4, 4))


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "in_plane, patch, size, expected",
    [
        ((100, 80), 14, None, ((100, 80), (112, 84), ((6, 6), (2, 2)))),
        ((100, 80), 14, 224, ((224, 179), (224, 182), ((0, 0), (1, 2)))),
        ((80, 100), 16, 224, ((179, 224), (192, 224), ((6, 7), (0, 0)))),
        ((112, 28), 14, None, ((112, 28), (112, 28), ((0, 0), (0, 0)))),
        ((512, 512), 16, 256, ((256, 256), (256, 256), ((0, 0), (0, 0)))),
        ((30, 100), 14, 50, ((15, 50), (28, 56), ((6, 7), (3, 3)))),
    ],
)
def test_slice_geometry(in_plane, patch, size, expected):
    resized, padded, pad = slice_geometry(in_plane, patch, size)
    assert (resized, padded, pad) == expected
    assert all(p % patch == 0 for p in padded)
    assert all(r + before + after == p for r, p, (before, after) in zip(resized, padded, pad))
    # aspect ratio kept up to rounding to whole voxels
    assert abs(resized[0] / resized[1] - in_plane[0] / in_plane[1]) <= 1 / min(resized)


def test_slice_geometry_rejects_bad_values():
    with pytest.raises(ConfigError, match="patch_size=0"):
        slice_geometry((10, 10), 0)
    with pytest.raises(ConfigError, match="size=-3"):
        slice_geometry((10, 10), 14, -3)


@pytest.mark.parametrize(
    "axis, size, patch, expected",
    [
        ("axial", None, 14, (3, 112, 84, 30)),
        ("sagittal", None, 14, (3, 84, 42, 100)),  # [Y, Z, X]
        ("coronal", None, 14, (3, 112, 42, 80)),  # [X, Z, Y]
        ("axial", 224, 14, (3, 224, 182, 30)),
        ("coronal", 224, 16, (3, 224, 80, 80)),  # (100, 30) -> (224, 67) -> pad 80
        ("sagittal", 64, 16, (3, 64, 32, 100)),  # (80, 30) -> (64, 24) -> pad 32
    ],
)
def test_prepare_slices_shapes(axis, size, patch, expected):
    image = IntensityPresetd("image", "soft_tissue")({"image": _ct()})["image"]
    prepare = PrepareSlicesd("image", axis=axis, patch_size=patch, size=size, label_keys="label")
    out = prepare({"image": image, "label": _blocky_labels()})
    assert tuple(out["image"].shape) == expected
    assert tuple(out["label"].shape) == (1, *expected[1:])
    assert out["label"].dtype == torch.int64  # labels keep their dtype, no channel ops


def test_prepare_slices_keeps_aspect_ratio_and_pads_with_minimum():
    image = MetaTensor(torch.full((1, 100, 80, 30), 0.5), affine=_affine())
    image[0, 0, 0, 0] = 0.2  # the minimum becomes the pad value
    out = PrepareSlicesd("image", size=224, label_keys="label")(
        {"image": image, "label": MetaTensor(torch.ones(1, 100, 80, 30, dtype=torch.uint8), affine=_affine())}
    )
    label = out["label"][0, :, :, 0]
    rows, cols = label.any(dim=1).sum().item(), label.any(dim=0).sum().item()
    assert (rows, cols) == (224, 179) and abs(rows / cols - 100 / 80) < 0.01
    # pad columns hold the normalised minimum, content the normalised 0.5
    for channel in range(3):
        pad_value = (0.2 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        content = (0.5 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert out["image"][channel, 100, 0, 5].item() == pytest.approx(pad_value, abs=1e-5)
        assert out["image"][channel, 100, 90, 5].item() == pytest.approx(content, abs=1e-5)


@pytest.mark.parametrize("axis", list(SLICE_AXES))
def test_prepared_affine_maps_voxels_to_the_same_world_points(axis):
    labels = _blocky_labels(block=3, oblique=True)
    prepared = PrepareSlicesd("image", axis=axis, label_keys="label")({"image": labels.float(), "label": labels})
    out = prepared["label"]
    original_index = torch.tensor([[7, 20, 4], [55, 3, 28], [99, 79, 29]], dtype=torch.float64)
    world = labels.affine[:3, :3] @ original_index.T + labels.affine[:3, 3:]
    new_index = torch.linalg.solve(out.affine[:3, :3], world - out.affine[:3, 3:]).T.round().long()
    for old, new in zip(original_index.long(), new_index):
        assert labels[(0, *old)] == out[(0, *new)]


# --------------------------------------------------------------------------- Invertd


def _round_trip(transform, data, key: str, orig_key: str) -> MetaTensor:
    inverter = Invertd(keys=key, orig_keys=orig_key, transform=transform, nearest_interp=True)
    return inverter(data)[key]


@pytest.mark.parametrize("axis", list(SLICE_AXES))
@pytest.mark.parametrize("oblique", [False, True])
def test_invertd_pad_only_restores_labels_exactly(axis, oblique):
    labels = MetaTensor(torch.randint(0, 5, (1, 37, 52, 23), generator=torch.Generator().manual_seed(2)))
    labels.affine = _affine(oblique)
    ct = MetaTensor(torch.rand(1, 37, 52, 23) * 1000, affine=labels.affine)
    transform = preprocessing(("image",), ("label",), axis=axis, channel_mode="2.5d")
    out = transform({"image": ct, "label": labels})
    # a prediction on the prepared grid goes back through the image's record ...
    out["pred"] = MetaTensor(out["label"].as_tensor().clone())  # Invertd skips plain tensors
    restored_pred = _round_trip(transform, out, "pred", "image")
    # ... and the label through its own
    restored_label = _round_trip(transform, out, "label", "label")
    for restored in (restored_pred, restored_label):
        assert restored.shape == labels.shape
        torch.testing.assert_close(restored.affine, labels.affine)
        assert torch.equal(restored.as_tensor().long(), labels.as_tensor())


@pytest.mark.parametrize("axis", list(SLICE_AXES))
@pytest.mark.parametrize("size", [224, 72])
def test_invertd_with_resize_restores_shape_affine_and_most_labels(axis, size):
    labels = _blocky_labels(oblique=True)
    transform = preprocessing(("image",), ("label",), axis=axis, size=size, patch_size=16)
    out = transform({"image": _ct(oblique=True), "label": labels})
    out["pred"] = MetaTensor(out["label"].as_tensor().clone())  # Invertd skips plain tensors
    for key, orig_key in (("pred", "image"), ("label", "label")):
        restored = _round_trip(transform, out, key, orig_key)
        assert restored.shape == labels.shape
        torch.testing.assert_close(restored.affine, labels.affine)
        agreement = (restored.as_tensor().long() == labels.as_tensor()).float().mean().item()
        assert agreement >= 0.95 if size < 100 else agreement == 1.0  # upsampling round trips are exact


def test_invertd_soft_prediction_and_spacing():
    labels = _blocky_labels()
    transform = preprocessing(("image",), ("label",), spacing=(1.6, 1.8, 2.5), size=64)
    out = transform({"image": _ct(), "label": labels})
    assert tuple(out["image"].shape) == (3, 70, 56, 30)  # (50, 40) after Spacingd -> (64, 51) -> pad to 14s
    probabilities = torch.rand(2, *out["image"].shape[1:])
    out["pred"] = MetaTensor(probabilities)
    inverter = Invertd(keys="pred", orig_keys="image", transform=transform, nearest_interp=False)
    restored = inverter(out)["pred"]
    assert restored.shape == (2, *SHAPE)
    torch.testing.assert_close(restored.affine, labels.affine)


# --------------------------------------------------------------------------- configs


def test_preprocessing_three_windows_end_to_end():
    ct = _ct((20, 16, 5))
    out = preprocessing(preset="ct_three_windows", channel_mode="windows", patch_size=16)({"image": ct})["image"]
    assert tuple(out.shape) == (3, 32, 16, 5)
    lung = window_ct(ct[0].as_tensor(), *CT_WINDOWS["lung"])
    expected = (lung - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    torch.testing.assert_close(out[1, 6:26, :, :].as_tensor(), expected)


@pytest.mark.parametrize(
    "kwargs, key, allowed",
    [
        ({"preset": "soft_tissue", "channel_mode": "windows"}, "channel_mode", "'repeat', '2.5d'"),
        ({"preset": "ct_three_windows", "channel_mode": "repeat"}, "channel_mode", "['windows']"),
        ({"preset": "ct_three_windows", "channel_mode": "2.5d"}, "channel_mode", "['windows']"),
        ({"preset": "pet"}, "preset", "'lung'"),
        ({"axis": "oblique"}, "axis", "['sagittal', 'coronal', 'axial']"),
        ({"channel_mode": "rgb"}, "channel_mode", "'2.5d'"),
        ({"patch_size": 0}, "patch_size", "positive integers"),
        ({"size": 0}, "size", "positive integers"),
    ],
)
def test_preprocessing_rejects_bad_combinations_up_front(kwargs, key, allowed):
    with pytest.raises(ConfigError) as info:
        preprocessing(**kwargs)
    assert info.value.key == key
    assert f"{key}=" in str(info.value) and allowed in str(info.value)


def test_transforms_build_from_bundle_config():
    config = {
        "prepare": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "volumes.transforms.IntensityPresetd", "keys": ["image"], "preset": "lung"},
                {
                    "_target_": "volumes.transforms.PrepareSlicesd",
                    "keys": ["image"],
                    "axis": "coronal",
                    "channel_mode": "2.5d",
                    "patch_size": 16,
                    "label_keys": ["label"],
                },
            ],
        }
    }
    transform = ConfigParser(config).get_parsed_content("prepare")
    out = transform({"image": _ct((20, 10, 6)), "label": MetaTensor(torch.zeros(1, 20, 10, 6))})
    assert tuple(out["image"].shape) == (3, 32, 16, 10)
    assert tuple(out["label"].shape) == (1, 32, 16, 10)


def test_prepare_slices_accepts_plain_arrays():
    out = PrepareSlicesd("image")({"image": np.random.rand(1, 20, 15, 4).astype(np.float32)})["image"]
    assert tuple(out.shape) == (3, 28, 28, 4)


def test_resize_in_plane_is_the_same_in_chunks_and_keeps_voxel_centres():
    from monai.data import MetaTensor

    from volumes.transforms import resize_in_plane

    generator = torch.Generator().manual_seed(0)
    volume = MetaTensor(torch.rand(2, 40, 30, 10, generator=generator), affine=torch.diag(torch.tensor([2.0, 3.0, 5.0, 1.0])))
    whole, info = resize_in_plane(volume, (20, 15), "trilinear", chunk=100)
    chunked, _ = resize_in_plane(volume, (20, 15), "trilinear", chunk=3)
    assert whole.shape == (2, 20, 15, 10)
    assert torch.equal(whole.as_tensor(), chunked.as_tensor())
    # the same voxels in NIfTI's Fortran order (x fastest, as load_volume keeps them)
    # take the other GEMM order: equal up to float rounding
    fortran = MetaTensor(volume.as_tensor().permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1), affine=volume.affine)
    assert fortran.stride(1) == 1
    from_fortran, _ = resize_in_plane(fortran, (20, 15), "trilinear", chunk=3)
    torch.testing.assert_close(from_fortran.as_tensor(), whole.as_tensor(), atol=1e-6, rtol=1e-5)
    # halving the grid: voxel (0, 0) of the output is centred between input voxels 0 and 1
    expected = torch.tensor([[4.0, 0, 0, 1.0], [0, 6.0, 0, 1.5], [0, 0, 5.0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(whole.affine.double(), expected)
    assert info["orig_size"] == (40, 30, 10)
    # antialiased shrinking averages: a constant stays constant, a checkerboard goes grey
    board = MetaTensor(((torch.arange(40)[:, None] + torch.arange(30)[None]) % 2).float()[None, ..., None].repeat(1, 1, 1, 4))
    grey, _ = resize_in_plane(board, (10, 15), "trilinear")
    assert torch.allclose(grey.as_tensor(), torch.full_like(grey.as_tensor(), 0.5), atol=0.05)


def test_resize_in_plane_keeps_label_values_and_dtype():
    from volumes.transforms import resize_in_plane

    labels = torch.randint(0, 7, (1, 12, 8, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    up, _ = resize_in_plane(labels, (24, 16), "nearest", antialias=True)
    assert up.dtype == torch.uint8
    assert torch.equal(up[:, ::2, ::2], labels)  # nearest-exact doubling repeats every voxel


def test_prepare_slices_of_int16_voxels_equals_float32_voxels():
    """Batch inference loads CT as stored (int16); the prepared slices are the same as from float32."""
    from monai.data import MetaTensor

    from volumes.transforms import preprocessing

    ct = torch.randint(-1024, 2000, (1, 50, 40, 6), generator=torch.Generator().manual_seed(0), dtype=torch.int16)
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.0, 1.0], dtype=torch.float64))
    for preset, mode in (("ct_three_windows", "windows"), ("soft_tissue", "repeat"), ("mr", "repeat")):
        prep = preprocessing(("image",), preset=preset, channel_mode=mode, size=28)
        from_int = prep({"image": MetaTensor(ct, affine=affine)})["image"]
        from_float = prep({"image": MetaTensor(ct.float(), affine=affine)})["image"]
        assert from_int.dtype == torch.float32
        torch.testing.assert_close(from_int.as_tensor(), from_float.as_tensor(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset, mode", [("ct_three_windows", "windows"), ("soft_tissue", "repeat"),
                                          ("soft_tissue", "2.5d"), ("mr", "repeat")])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_prepare_slices_never_writes_into_its_input(preset, mode, as_numpy):
    """The ImageNet normalisation runs in place on the prepared tensor, never on the caller's voxels,
    even when no resize or padding makes a copy (28 x 28 slices at patch size 14, no size)."""
    from monai.data import MetaTensor

    from volumes.transforms import preprocessing

    values = torch.rand(1, 28, 28, 5, generator=torch.Generator().manual_seed(0)) * 400 - 100
    original = values.clone()
    image = values.numpy() if as_numpy else MetaTensor(values)
    out = preprocessing(("image",), preset=preset, channel_mode=mode, size=None)({"image": image})["image"]
    assert out.shape == (3, 28, 28, 5)
    torch.testing.assert_close(values, original, rtol=0, atol=0)


def test_abdomen_window_set_stacks_liver_soft_tissue_and_bone():
    from volumes.transforms import WINDOW_SETS, IntensityPresetd, preprocessing

    hu = torch.tensor([-1000.0, -45.0, 30.0, 105.0, 240.0, 1300.0]).reshape(1, 6, 1, 1)
    out = IntensityPresetd("image", preset="ct_abdomen_windows")({"image": hu})["image"]
    assert WINDOW_SETS["ct_abdomen_windows"] == ("liver", "soft_tissue", "bone")
    expected = torch.tensor([
        [0.0, 0.0, 0.5, 1.0, 1.0, 1.0],                                   # liver: level 30, width 150
        [0.0, 115 / 400, 190 / 400, 265 / 400, 1.0, 1.0],                 # soft tissue: 40, 400
        [0.0, 455 / 1800, 530 / 1800, 605 / 1800, 740 / 1800, 1.0],        # bone: 400, 1800
    ])
    assert torch.allclose(out[:, :, 0, 0], expected, atol=1e-6)
    with pytest.raises(ConfigError):
        preprocessing(("image",), preset="ct_abdomen_windows", channel_mode="repeat")
