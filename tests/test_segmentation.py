"""SliceSegmenter, its decoder and the segmentation pipeline: shapes, parity, geometry, metrics."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose

from volumes.data.io import load_volume
from volumes.decoders import InstanceNorm2d, InstanceNorm3d
from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case
from volumes.errors import ConfigError, VolumeReadError
from volumes.networks import SliceSegmenter
from volumes.segmentation import (
    HausdorffDistanceMM,
    SaveLabelMapd,
    organ_volumes_ml,
    per_case_metrics,
    segmentation_postprocessing,
    segmentation_transforms,
    SlabInferer,
    slab_inferer,
    to_original_orientation,
    write_label_map,
)

TINY = {"model_kwargs": {"depth": 4, "embed_dim": 48, "num_heads": 2}}
PREP = {"preset": "soft_tissue", "axis": "axial", "channel_mode": "repeat", "size": 56}


@pytest.fixture(scope="module")
def tiny_segmenter() -> SliceSegmenter:
    torch.manual_seed(0)
    return SliceSegmenter(7, encoder_kwargs=TINY, feature_size=8).eval()


def test_output_shape_for_dinov2_and_dinov3_patch_sizes(tiny_segmenter):
    volume = torch.randn(2, 3, 56, 42, 5)
    with torch.no_grad():
        assert tiny_segmenter(volume).shape == (2, 7, 56, 42, 5)
    dinov3 = SliceSegmenter(3, "vit_small_patch16_dinov3", encoder_kwargs=TINY, feature_size=8, refine=False).eval()
    with torch.no_grad():
        assert dinov3(torch.randn(1, 3, 64, 48, 3)).shape == (1, 3, 64, 48, 3)


def test_decoding_in_chunks_gives_the_same_logits(tiny_segmenter):
    volume = torch.randn(1, 3, 42, 42, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = tiny_segmenter(volume)
        tiny_segmenter.chunk_size = 2
        try:
            chunked = tiny_segmenter(volume)
        finally:
            tiny_segmenter.chunk_size = 32
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)


def test_untrained_refinement_leaves_2d_logits_unchanged():
    torch.manual_seed(0)
    refined = SliceSegmenter(4, encoder_kwargs=TINY, feature_size=8, refine=True).eval()
    plain = SliceSegmenter(4, encoder_kwargs=TINY, feature_size=8, refine=False).eval()
    plain.load_state_dict({k: v for k, v in refined.state_dict().items() if not k.startswith("refine.")})
    volume = torch.randn(1, 3, 42, 28, 4)
    with torch.no_grad():
        torch.testing.assert_close(refined(volume), plain(volume))
    # ... and once trained it does use neighbouring slices
    with torch.no_grad():
        refined.refine.body[-1].weight.normal_()
        assert not torch.allclose(refined(volume), plain(volume))


def test_sliding_slabs_along_the_slices_equal_whole_volume_without_refinement():
    torch.manual_seed(0)
    model = SliceSegmenter(3, encoder_kwargs=TINY, feature_size=8, refine=False).eval()
    volume = torch.randn(1, 3, 42, 56, 11)
    with torch.no_grad():
        whole = model(volume)
        windows = sliding_window_inference(volume, roi_size=(-1, -1, 4), sw_batch_size=2, predictor=model, overlap=0.5)
        via_inferer = slab_inferer(4, overlap=0.25)(volume, model)
    torch.testing.assert_close(windows, whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(via_inferer, whole, atol=1e-4, rtol=1e-4)


def _refined_segmenter(seed: int = 0) -> SliceSegmenter:
    torch.manual_seed(seed)
    model = SliceSegmenter(4, encoder_kwargs=TINY, feature_size=8, refine=True).eval()
    with torch.no_grad():  # a refinement that does something: its last layer starts at zero
        model.refine.body[-1].weight.normal_(0, 0.5)
    return model


def _count_encoded_slices(model: SliceSegmenter) -> list[int]:
    seen: list[int] = []
    model.encoder.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("batch, depth, slab, overlap, sw_batch_size", [
    (1, 11, 4, 0.25, 1),  # the windows' last start is pulled back to fit: uneven overlaps
    (2, 9, 4, 0.5, 2),  # two cases, two windows per call
    (1, 3, 4, 0.25, 1),  # fewer slices than a slab: MONAI pads the volume
])
def test_slab_inferer_encodes_each_slice_once_and_equals_monai_sliding_window(batch, depth, slab, overlap,
                                                                              sw_batch_size):
    model = _refined_segmenter()
    volume = torch.randn(batch, 3, 42, 28, depth, generator=torch.Generator().manual_seed(depth))
    inferer = slab_inferer(slab, overlap=overlap, sw_batch_size=sw_batch_size)
    seen = _count_encoded_slices(model)
    with torch.no_grad():
        reference = sliding_window_inference(volume, roi_size=(-1, -1, slab), sw_batch_size=sw_batch_size,
                                             predictor=model, overlap=overlap, mode="gaussian")
        monai_slices = sum(seen)
        seen.clear()
        shared = inferer(volume, model)
    torch.testing.assert_close(shared, reference, atol=1e-5, rtol=1e-4)
    padded = max(depth, slab)
    assert sum(seen) == inferer.last_encoded == batch * padded
    if depth > slab:
        assert monai_slices > batch * padded  # MONAI's windows overlap, so it encodes slices again
        # the refinement mixes slices: a whole-volume forward is not what slabs give
        with torch.no_grad():
            assert not torch.allclose(model(volume), reference, atol=1e-3)


def test_slab_inferer_runs_other_networks_through_monai_unchanged():
    conv = torch.nn.Conv3d(3, 2, kernel_size=3, padding=1).eval()
    volume = torch.randn(1, 3, 12, 10, 9)
    inferer = slab_inferer(4)
    with torch.no_grad():
        out = inferer(volume, conv)
        reference = sliding_window_inference(volume, (-1, -1, 4), 1, conv, overlap=0.25, mode="gaussian")
    torch.testing.assert_close(out, reference)
    assert inferer.last_encoded is None
    assert isinstance(inferer, SlabInferer)


@pytest.mark.parametrize("ours, theirs, shape", [
    (InstanceNorm2d, torch.nn.InstanceNorm2d, (3, 5, 9, 7)),
    (InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 5, 6, 7, 4)),
])
@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_instance_norms_equal_pytorch_in_values_gradients_and_state(ours, theirs, shape, affine):
    torch.manual_seed(0)
    reference, fast = theirs(5, affine=affine), ours(5, affine=affine)
    if affine:
        with torch.no_grad():
            reference.weight.normal_(), reference.bias.normal_()
    fast.load_state_dict(reference.state_dict())  # same keys: checkpoints load either way
    x = (torch.randn(shape) * 3 + 2).requires_grad_()
    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x_last = x.detach().contiguous(memory_format=layout).requires_grad_()
    out_ref, out_fast = reference(x), fast(x_last)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    assert out_fast.is_contiguous(memory_format=layout)  # no copy to the contiguous layout
    weights = torch.randn(shape)
    (out_ref * weights).sum().backward()
    (out_fast * weights).sum().backward()
    torch.testing.assert_close(x_last.grad, x.grad, atol=1e-5, rtol=1e-4)


def test_decoder_uses_the_fast_norms_and_old_checkpoints_load(tiny_segmenter):
    norms = [m for m in tiny_segmenter.modules() if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm)]
    assert norms and all(type(m) in (InstanceNorm2d, InstanceNorm3d) for m in norms)
    # a model built with PyTorch's own instance norms has the same state dict keys
    plain = {k for k, v in tiny_segmenter.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():
        other = SliceSegmenter(7, encoder_kwargs=TINY, feature_size=8).eval()
        for parent in list(other.modules()):
            for name, child in list(parent.named_children()):
                if type(child) in (InstanceNorm2d, InstanceNorm3d):
                    base = torch.nn.InstanceNorm2d if type(child) is InstanceNorm2d else torch.nn.InstanceNorm3d
                    setattr(parent, name, base(child.num_features, affine=child.affine))
        assert set(other.state_dict()) == plain
        other.load_state_dict(tiny_segmenter.state_dict())
        volume = torch.randn(1, 3, 42, 28, 3)
        torch.testing.assert_close(other(volume), tiny_segmenter(volume), atol=1e-5, rtol=1e-4)


def test_torchscript_trace_matches_eager_for_any_slice_count_and_size(tiny_segmenter):
    with torch.no_grad():
        traced = torch.jit.trace(tiny_segmenter, torch.randn(1, 3, 42, 28, 3))
        for depth, width in ((3, 28), (6, 56)):
            volume = torch.randn(1, 3, 42, width, depth, generator=torch.Generator().manual_seed(depth))
            torch.testing.assert_close(traced(volume), tiny_segmenter(volume), atol=1e-4, rtol=1e-4)


def test_bad_inputs_and_settings_fail_clearly(tiny_segmenter):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W, D\]"):
        tiny_segmenter(torch.randn(1, 1, 42, 42, 3))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_segmenter(torch.randn(1, 3, 40, 42, 3))
    with pytest.raises(ConfigError, match="num_classes"):
        SliceSegmenter(1, encoder_kwargs=TINY)
    with pytest.raises(ConfigError, match="encoder layers"):
        SliceSegmenter(3, encoder_kwargs={**TINY, "layers": [1, 3]})


# ------------------------------------------------------------------ data and geometry


def _nifti_case(tmp_path, seed=0, config=None):
    phantom = generate_phantom(seed, config or PhantomConfig(inplane_spacing_mm=(4.0, 5.0), slice_spacing_mm=(6.0, 7.0)))
    written = write_case(phantom, tmp_path, f"case{seed}")
    return {key: tmp_path / written[key] for key in ("image", "label")}, phantom


def test_a_label_on_another_grid_is_rejected_at_loading(tmp_path):
    (paths, phantom) = _nifti_case(tmp_path)
    wrong = tmp_path / "wrong_label.nii.gz"
    nib.save(nib.Nifti1Image(phantom.label[:, :, :-2], phantom.affine), wrong)
    transform = segmentation_transforms(PREP, 14)
    with pytest.raises(Exception) as err:
        transform({"image": str(paths["image"]), "label": str(wrong)})
    chain, exc = [], err.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    read_errors = [e for e in chain if isinstance(e, VolumeReadError)]
    assert read_errors and "wrong_label.nii.gz" in str(read_errors[0]) and "does not match image shape" in str(read_errors[0])


def _reorient(path, out, axcodes):
    """Store the same image in another voxel order (e.g. LPS or PIR), as scanners do."""
    image = nib.load(path)
    transform = nib.orientations.ornt_transform(nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(axcodes))
    data = nib.orientations.apply_orientation(np.asanyarray(image.dataobj), transform)
    affine = image.affine @ nib.orientations.inv_ornt_aff(transform, image.shape)
    nib.save(nib.Nifti1Image(data, affine), out)
    return out


def _predict_and_save(model, image_path, out_dir, case_id):
    transform = segmentation_transforms(PREP, model.encoder.patch_size, with_label=False)
    post = Compose([segmentation_postprocessing(transform, model.num_classes, metrics=False),
                    SaveLabelMapd("pred", out_dir, postfix="_seg")])
    data = transform({"image": str(image_path), "case_id": case_id})
    with torch.no_grad():
        data["pred"] = slab_inferer(4)(data["image"][None], model)[0]
    return post(data)


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("P", "I", "R")])
def test_label_map_has_the_input_geometry_for_anisotropic_non_ras_nifti(tmp_path, tiny_segmenter, axcodes):
    paths, _ = _nifti_case(tmp_path)
    source = _reorient(paths["image"], tmp_path / "stored.nii.gz", axcodes)
    out = _predict_and_save(tiny_segmenter, source, tmp_path / "out", "stored")
    written, original = nib.load(out["pred_path"]), nib.load(source)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
    assert nib.aff2axcodes(written.affine) == axcodes
    assert written.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(written.dataobj))) <= set(range(7))


def test_label_map_has_the_input_geometry_for_a_dicom_series(tmp_path, tiny_segmenter):
    pytest.importorskip("pydicom")
    from volumes.data.dicom import write_dicom_series

    phantom = generate_phantom(2, PhantomConfig(inplane_spacing_mm=(4.0, 5.0), slice_spacing_mm=(6.0, 7.0)))
    series = tmp_path / "series"
    write_dicom_series(phantom.image, phantom.affine, series)
    out = _predict_and_save(tiny_segmenter, series, tmp_path / "out", "series")
    written = nib.load(out["pred_path"])
    stored = load_volume(series, orientation=None)
    assert written.shape == tuple(stored.shape[1:])
    np.testing.assert_allclose(written.affine, stored.meta["original_affine"], atol=1e-3)
    np.testing.assert_allclose(written.affine, phantom.affine, atol=1e-3)


def test_reorientation_round_trip_is_exact():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(6, 7, 8)).astype(np.uint8)
    affine = np.diag([2.0, 3.0, 5.0, 1.0])
    stored = np.diag([-2.0, 3.0, -5.0, 1.0])
    stored[:3, 3] = [10.0, 0.0, 35.0]
    ras = np.diag([2.0, 3.0, 5.0, 1.0])
    ras[:3, 3] = [10 - 2.0 * 5, 0.0, 35 - 5.0 * 7]  # the same grid seen in RAS order
    back, back_affine = to_original_orientation(labels, ras, stored)
    np.testing.assert_array_equal(back, labels[::-1, :, ::-1])
    np.testing.assert_allclose(back_affine, stored)
    with pytest.raises(ValueError, match="not a reorientation"):
        to_original_orientation(labels, affine, np.diag([1.0, 1.0, 1.0, 1.0]))


def test_write_label_map_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "seg.nii.gz"
    write_label_map(np.ones((3, 3, 3)), np.eye(4), target)
    before = target.read_bytes()

    def fail(image, path):  # a writer that dies half way through
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    import volumes.segmentation as segmentation

    monkeypatch.setattr(segmentation, "save_nifti", fail)
    with pytest.raises(OSError, match="disk full"):
        write_label_map(np.zeros((3, 3, 3)), np.eye(4), target)
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


# ------------------------------------------------------------------------ metrics


def test_hd95_handler_uses_each_volume_spacing():
    from monai.networks.utils import one_hot
    from monai.data import MetaTensor

    label = torch.zeros(1, 20, 20, 20)
    label[0, 5:15, 5:15, 5:15] = 1
    pred = torch.zeros_like(label)
    pred[0, 5:15, 5:15, 7:17] = 1  # shifted two voxels along z
    handler = HausdorffDistanceMM()
    for z_spacing in (3.0, 1.0):
        affine = torch.diag(torch.tensor([1.0, 1.0, z_spacing, 1.0]))
        handler.update(([one_hot(pred[None], 2)[0]], [MetaTensor(one_hot(label[None], 2)[0], affine=affine)]))
    distances = handler.metric_fn.get_buffer().flatten().tolist()
    assert distances == pytest.approx([6.0, 2.0])


def test_per_case_metrics_and_organ_volumes_have_known_values():
    label = np.zeros((10, 10, 10), np.uint8)
    label[2:6, 2:6, 2:6] = 1  # 64 voxels
    label[7:9, 7:9, 7:9] = 2  # 8 voxels
    pred = label.copy()
    pred[2:6, 2:6, 5] = 0  # liver loses a quarter
    names = ("background", "liver", "spleen")
    row = per_case_metrics(pred, label, (2.0, 2.0, 2.0), names)
    assert row["dice_liver"] == pytest.approx(2 * 48 / (48 + 64))
    assert row["dice_spleen"] == pytest.approx(1.0) and row["hd95_mm_spleen"] == pytest.approx(0.0)
    assert organ_volumes_ml(label, (2.0, 2.0, 2.0), names) == pytest.approx({"liver": 0.512, "spleen": 0.064})
    # uint8 maps are counted in one pass, other integers organ by organ: the same numbers
    assert organ_volumes_ml(label.astype(np.int16), (2.0, 2.0, 2.0), names) == pytest.approx(
        {"liver": 0.512, "spleen": 0.064})
    assert organ_volumes_ml(np.asfortranarray(label), (2.0, 2.0, 2.0), names) == pytest.approx(
        {"liver": 0.512, "spleen": 0.064})


def test_argmax_labels_equals_torch_argmax_with_ties_and_keeps_metadata():
    from volumes.segmentation import argmax_labels

    logits = torch.randn(5, 6, 7, 8, generator=torch.Generator().manual_seed(0))
    logits[:, 0, 0, 0] = 1.0  # a tie: the first channel wins, as in torch.argmax
    logits[2:4, 1, 1, 1] = 9.0
    image = MetaTensor(logits, affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    labels = argmax_labels(image)
    assert labels.dtype == torch.uint8 and labels.shape == (1, 6, 7, 8)
    assert torch.equal(labels.as_tensor().long(), torch.argmax(logits, dim=0, keepdim=True))
    assert labels[0, 0, 0, 0] == 0 and labels[0, 1, 1, 1] == 2
    torch.testing.assert_close(labels.affine, image.affine)
    assert torch.equal(argmax_labels(logits), labels.as_tensor())  # plain tensors too


def test_bad_loader_and_cohort_settings_fail_clearly(tmp_path):
    from volumes.bundle import ensure_phantom_cohort
    from volumes.data.io import LoadVolumed

    with pytest.raises(ValueError, match=r"label_keys \['mask'\] must be among keys"):
        LoadVolumed(("image", "label"), label_keys=("mask",))
    with pytest.raises(ValueError, match="need an image key"):
        LoadVolumed("label", label_keys=("label",))
    with pytest.raises(ConfigError, match="kind"):
        ensure_phantom_cohort(tmp_path, n=2, kind="detection")
    assert not (tmp_path / "datalist.json").exists()
