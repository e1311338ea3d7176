"""Organ segmentation with :class:`volumes.networks.SliceSegmenter`: transforms, metrics, inference.

The pieces the segmentation bundle's configs assemble, usable from Python too:

* :func:`segmentation_transforms` loads an image and its label map (checked to lie on
  the same grid), keeps the label in its original space under ``original_label`` and
  prepares both for the encoder; :func:`training_crops` adds random slabs of slices.
* :class:`SlabInferer` (:func:`slab_inferer`) runs sliding slabs of whole slices, each
  slice through the encoder and the 2D decoder once however much the slabs overlap.
* :func:`segmentation_postprocessing` turns logits into a label map in the input's
  original geometry (``Invertd``), one-hot for the metrics.
* :class:`HausdorffDistanceMM` is MONAI's HD95 handler with each volume's own voxel
  spacing, so distances are in millimetres on anisotropic volumes.
* :func:`write_label_map` / :class:`SaveLabelMapd` write a label map as NIfTI in the
  input's original voxel order and affine (an exact axis permutation and flip, no
  resampling), through a temporary file and a rename.
* :func:`organ_volumes_ml` and :func:`per_case_metrics` report masks in clinical units.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from torch import nn
from monai.data import MetaTensor, get_track_meta
from monai.handlers import IgniteMetricHandler
from monai.inferers import SlidingWindowInferer
from monai.metrics import HausdorffDistanceMetric, compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot
from monai.utils import convert_to_tensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    CopyItemsd,
    EnsureTyped,
    Invertd,
    MapTransform,
    RandCropByPosNegLabeld,
    SpatialPadd,
)

from volumes.arrays import as_numpy, spacing_mm
from volumes.atomic import atomic_path
from volumes.data.io import LoadVolumed, save_nifti
from volumes.transforms import preprocessing


def segmentation_transforms(
    preprocessing_config: dict[str, Any],
    patch_size: int,
    *,
    with_label: bool = True,
    keep_original_label: bool = True,
    modality: str | None = None,
) -> Compose:
    """Paths -> ``image [3, H, W, D]`` (and ``label [1, H, W, D]``) on the encoder's grid.

    With ``with_label`` the label is loaded next to the image and must match its grid
    (:class:`volumes.data.io.LoadVolumed` raises ``VolumeReadError`` naming the label file
    otherwise). ``keep_original_label`` copies it to ``original_label`` before any
    resampling, for metrics in the original image space. ``modality`` is the default
    modality of volumes that carry none, for ``preset="auto"``
    (:mod:`volumes.transforms.modality`).
    """
    keys = ("image", "label") if with_label else ("image",)
    steps: list = [LoadVolumed(keys, label_keys=("label",) if with_label else ())]
    if with_label and keep_original_label:
        steps.append(CopyItemsd("label", names="original_label"))
    steps.append(preprocessing(("image",), ("label",) if with_label else (), patch_size=patch_size,
                               modality=modality, **preprocessing_config))
    return Compose(steps)


def training_crops(slab: int, num_samples: int = 4, pos: float = 2.0, neg: float = 1.0) -> Compose:
    """Random slabs of ``slab`` whole slices, centred on an organ voxel ``pos : neg`` times as often as not."""
    return Compose([
        SpatialPadd(("image", "label"), spatial_size=(-1, -1, slab)),
        RandCropByPosNegLabeld(("image", "label"), label_key="label", spatial_size=(-1, -1, slab), pos=pos,
                               neg=neg, num_samples=num_samples),
    ])


class _SharedSliceFeatures:
    """A sliding-window predictor that runs each slice through the 2D network once.

    MONAI's sliding window calls it with the window ``[n, 3, H, W, d]`` and the window's
    coordinates in the (padded) input. The network's per-slice results (decoder
    features and 2D logits, :meth:`~volumes.networks.SliceSegmenter.per_slice`) are kept
    by (case, in-plane box, slice index) for as long as the current windows use them, so
    a slice shared by two overlapping slabs goes through the encoder and the decoder
    once; the 3D refinement then runs on each slab
    (:meth:`~volumes.networks.SliceSegmenter.combine`), as the network's forward does.
    """

    def __init__(self, network: nn.Module):
        self.network = network
        self.kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded = 0  # slices that went through the encoder and the decoder

    def __call__(self, window: torch.Tensor, coords: Sequence[Sequence[slice]]) -> torch.Tensor:
        keys = [key for (case, _, rows, cols, depth) in coords
                for key in ((case.start, rows.start, rows.stop, cols.start, cols.stop, z)
                            for z in range(depth.start, depth.stop))]
        depth = window.shape[-1]
        missing = {key: divmod(n, depth) for n, key in enumerate(keys) if key not in self.kept}
        if missing:
            raw = window.as_tensor() if hasattr(window, "as_tensor") else window
            features, logits = self.network.per_slice(torch.stack([raw[i, ..., j] for i, j in missing.values()]))
            self.kept.update(zip(missing, zip(features, logits)))
            self.encoded += len(missing)
        features = torch.stack([self.kept[key][0] for key in keys])
        logits = torch.stack([self.kept[key][1] for key in keys])
        # windows advance along the slices: the next ones need only slices of these
        self.kept = {key: self.kept[key] for key in keys}
        return self.network.combine(features, logits, window.shape[0])


class SlabInferer(SlidingWindowInferer):
    """Sliding windows of whole slices along the slice axis (``roi_size = (-1, -1, slab)``).

    For a network with ``per_slice`` and ``combine`` (a
    :class:`volumes.networks.SliceSegmenter`), every slice goes through the encoder and
    the 2D decoder once however much the slabs overlap; only the 3D refinement runs per
    slab. The result equals MONAI's sliding window over ``network(window)`` (up to float
    rounding): the same windows, the same Gaussian blending. Other networks run through
    MONAI's sliding window unchanged. ``last_encoded`` is the number of slices the last
    call ran through the 2D network (None for other networks).
    """

    def __init__(self, slab: int = 16, overlap: float = 0.25, sw_batch_size: int = 1, *, share_slices: bool = True,
                 **kwargs: Any):
        kwargs.setdefault("mode", "gaussian")
        super().__init__(roi_size=(-1, -1, slab), sw_batch_size=sw_batch_size, overlap=overlap, with_coord=True,
                         **kwargs)
        self.share_slices = share_slices
        self.last_encoded: int | None = None

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any):
        target = network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network
        self.last_encoded = None
        if self.share_slices and hasattr(target, "per_slice") and hasattr(target, "combine"):
            predictor = _SharedSliceFeatures(target)
            out = super().__call__(inputs, predictor, *args, **kwargs)
            self.last_encoded = predictor.encoded
            return out
        return super().__call__(inputs, lambda window, coords, *a, **k: network(window, *a, **k), *args, **kwargs)


def slab_inferer(slab: int = 16, overlap: float = 0.25, sw_batch_size: int = 1) -> SlabInferer:
    """Sliding windows of whole slices along the slice axis, each slice encoded once (:class:`SlabInferer`)."""
    return SlabInferer(slab, overlap=overlap, sw_batch_size=sw_batch_size)


def argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[K, *spatial]`` -> label map ``[1, *spatial]`` (uint8 for K <= 256), metadata kept.

    The same labels as ``torch.argmax(logits, 0)`` (the first of equal maxima), by a
    running maximum over the K channel planes: ``torch.argmax`` across the channel axis
    of a CT-sized map is about 10x slower on a CPU (0.45 s against 0.04 s for 7 x 112 x
    112 x 200 on 2 cores), and the map is 1 byte per voxel from the start.
    """
    raw = logits.as_tensor() if isinstance(logits, MetaTensor) else logits
    if raw.shape[0] > 256:
        labels = raw.argmax(0, keepdim=True)
    else:
        best = raw[0].clone()
        labels = torch.zeros(raw.shape[1:], dtype=torch.uint8, device=raw.device)
        for k in range(1, raw.shape[0]):
            labels.masked_fill_(raw[k] > best, k)
            torch.maximum(best, raw[k], out=best)
        labels = labels[None]
    if isinstance(logits, MetaTensor):
        return MetaTensor(labels, meta=logits.meta, applied_operations=logits.applied_operations)
    return labels


class ArgmaxLabelsd(MapTransform):
    """:func:`argmax_labels` on ``keys`` (logits ``[K, ...]`` -> uint8 label map ``[1, ...]``).

    The label map also replaces the logits in the input dict itself (when it is a
    ``dict``), so a caller's dict does not keep the logits alive while the rest of a
    ``Compose`` runs: for a 768-slice CT they are 257 MiB at 112 px.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = argmax_labels(convert_to_tensor(d[key], track_meta=get_track_meta()))
            if isinstance(data, dict):
                data[key] = d[key]
        return d


def segmentation_postprocessing(transform: Compose, num_classes: int, *, metrics: bool = True) -> Compose:
    """Logits ``pred [K, H, W, D]`` -> label map in the input's original geometry.

    ``transform`` is the preprocessing to invert (from :func:`segmentation_transforms`).
    With ``metrics``, ``pred`` and ``reference`` (a copy of ``original_label``) end one-hot
    ``[K, X, Y, Z]``, for metric handlers reading ``from_engine(["pred", "reference"])``;
    without, ``pred`` is the label map ``[1, X, Y, Z]`` (uint8) ready for ``SaveImaged``.
    """
    # argmax of the logits (softmax would not change it) straight to uint8: the
    # nearest-neighbour inverse keeps the dtype, so the map put back to the input's size
    # costs 1 byte per voxel
    steps: list = [ArgmaxLabelsd("pred")]
    steps.append(Invertd("pred", transform=transform, orig_keys="image", nearest_interp=True, to_tensor=True))
    if metrics:
        # a new key: MONAI engines keep keys created by postprocessing in engine.state.output
        steps.append(CopyItemsd("original_label", names="reference"))
        steps.append(AsDiscreted(("pred", "reference"), to_onehot=num_classes))
    else:
        steps.append(EnsureTyped("pred", dtype=torch.uint8))
    return Compose(steps)


def _spacing(volume: torch.Tensor) -> list[float]:
    affine = getattr(volume, "affine", None)
    if affine is None:
        return [1.0, 1.0, 1.0]
    return spacing_mm(affine)


class HausdorffDistanceMM(IgniteMetricHandler):
    """95th-percentile Hausdorff distance in mm, each volume with its own spacing.

    MONAI's ``HausdorffDistance`` handler calls the metric without ``spacing`` (voxel
    units); this one reads every label's affine. Per organ, averaged over organs present;
    volumes where an organ is missing in the prediction or the reference give ``nan``
    for it and are left out of the mean.
    """

    def __init__(self, include_background: bool = False, percentile: float = 95.0,
                 output_transform=lambda x: x, save_details: bool = True, reduction: str = "mean") -> None:
        metric_fn = HausdorffDistanceMetric(include_background=include_background, percentile=percentile,
                                            reduction=reduction)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    def update(self, output: Sequence[Any]) -> None:
        if len(output) != 2:
            raise ValueError(f"output must have length 2, got {len(output)}")
        preds, labels = output
        for pred, label in zip(preds, labels):
            self.metric_fn([pred], [label], spacing=_spacing(label))


def per_case_metrics(pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor,
                     spacing: Sequence[float], labels: Sequence[str],
                     surface_tolerance_mm: float | None = None) -> dict[str, float]:
    """Dice and HD95 (mm) per organ for one label map pair ``[X, Y, Z]`` (integers).

    With ``surface_tolerance_mm`` also the normalised surface Dice at that tolerance
    (``nsd_{tol}mm_{organ}``: the share of both surfaces within the tolerance of the
    other, MONAI's ``compute_surface_dice``), the boundary measure of the segmentation
    challenges. An organ absent from both maps gives NaN; absent from one, HD95 is inf.
    """
    num_classes = len(labels)
    p = one_hot(torch.as_tensor(np.asarray(pred))[None, None].long(), num_classes)
    t = one_hot(torch.as_tensor(np.asarray(label))[None, None].long(), num_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=True)[0]
    hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=list(spacing))[0]
    row: dict[str, float] = {}
    nsd = None
    if surface_tolerance_mm is not None:
        nsd = compute_surface_dice(p, t, class_thresholds=[float(surface_tolerance_mm)] * (num_classes - 1),
                                   include_background=False, spacing=list(spacing))[0]
    for i, name in enumerate(labels[1:]):
        row[f"dice_{name}"] = float(dice[i])
        row[f"hd95_mm_{name}"] = float(hd[i])
        if nsd is not None:
            row[f"nsd_{surface_tolerance_mm:g}mm_{name}"] = float(nsd[i])
    return row


def score_label_maps(items: Sequence[Mapping[str, Any]], masks: Mapping[str, str | Path], labels: Sequence[str],
                     surface_tolerance_mm: float | None = 2.0) -> list[dict[str, Any]]:
    """Per-case metrics of predicted label maps against the manual ones, on each image's own grid.

    ``items``: datalist entries with ``case_id`` and ``label`` (the manual mask; ``modality``
    and ``patient`` are copied when present); ``masks``: case id -> predicted label map
    file. Every item must have a mask on its label's grid (a missing or misplaced mask
    raises, naming it: no case is skipped). Rows: :func:`per_case_metrics` per label plus
    ``truth_ml`` and ``pred_ml`` of the foreground.
    """
    from volumes.errors import VolumeReadError

    rows = []
    for item in items:
        truth_image = nib.load(str(item["label"]))
        truth = np.asarray(truth_image.dataobj).astype(np.int64)
        path = Path(masks[item["case_id"]])
        if not path.is_file():
            raise VolumeReadError(path, f"no predicted mask for case {item['case_id']}")
        predicted = nib.load(str(path))
        if predicted.shape != truth.shape or not np.allclose(predicted.affine, truth_image.affine, atol=1e-3):
            raise VolumeReadError(path, f"the predicted mask is not on the grid of {item['label']}")
        pred = np.asarray(predicted.dataobj).astype(np.int64)
        spacing = [float(s) for s in truth_image.header.get_zooms()[:3]]
        voxel_ml = float(np.prod(spacing)) / 1000.0
        row = {key: item[key] for key in ("case_id", "patient", "modality") if key in item}
        row.update(per_case_metrics(pred, truth, spacing, labels, surface_tolerance_mm=surface_tolerance_mm))
        row.update(truth_ml=float((truth > 0).sum() * voxel_ml), pred_ml=float((pred > 0).sum() * voxel_ml))
        rows.append(row)
    return rows


def organ_volumes_ml(label_map: np.ndarray | torch.Tensor, spacing: Sequence[float],
                     labels: Sequence[str]) -> dict[str, float]:
    """Volume in mL of every labelled organ in ``label_map [X, Y, Z]`` (background skipped)."""
    values = as_numpy(label_map)
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    if values.dtype == np.uint8:  # one pass, no int64 copy (np.bincount would make one)
        counts = torch.bincount(torch.from_numpy(np.ascontiguousarray(values.ravel(order="K"))),
                                minlength=len(labels)).numpy()
    else:  # one comparison per organ
        counts = [np.count_nonzero(values == i) for i in range(len(labels))]
    return {name: float(counts[i] * voxel_ml) for i, name in enumerate(labels) if i > 0}


def to_original_orientation(label_map: np.ndarray, affine: np.ndarray, original_affine: np.ndarray,
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Reorder ``label_map [X, Y, Z]`` on ``affine`` into the voxel order of ``original_affine``.

    Loading reorients volumes to RAS by permuting and flipping axes; this undoes it
    exactly. Returns the reordered array and its affine, which equals ``original_affine``.

    Raises:
        ValueError: the two grids differ by more than an axis permutation and flip.
    """
    affine, original_affine = np.asarray(affine, np.float64), np.asarray(original_affine, np.float64)
    transform = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.io_orientation(original_affine))
    out = nib.orientations.apply_orientation(label_map, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, label_map.shape)
    if not np.allclose(new_affine, original_affine, atol=1e-3):
        raise ValueError(
            "the label map's grid is not a reorientation of the input's original grid "
            f"(affine after reordering:\n{new_affine}\noriginal:\n{original_affine})"
        )
    # Fortran order, NIfTI's own: nibabel then writes the voxels without transposing them
    return np.asfortranarray(out), original_affine


def write_label_map(label_map: Any, affine: Any, path: str | Path, *, original_affine: Any | None = None,
                    dtype: Any = np.uint8) -> Path:
    """Write ``label_map [X, Y, Z]`` (or ``[1, X, Y, Z]``) as NIfTI, atomically.

    With ``original_affine`` the map is first put back into that grid's voxel order
    (:func:`to_original_orientation`), so the file has the input's shape and affine.
    The data go to a temporary file in the same folder, renamed into place when complete.
    """
    array = as_numpy(label_map)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"write_label_map needs one channel, got shape {array.shape}")
        array = array[0]
    affine = as_numpy(affine).astype(np.float64)
    if original_affine is not None:
        array, affine = to_original_orientation(array, affine, as_numpy(original_affine))
    path = Path(path)
    image = nib.Nifti1Image(array.astype(dtype, copy=False), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        save_nifti(image, tmp)
    return path


class SaveLabelMapd(MapTransform):
    """Write ``data[key]`` (a label map MetaTensor ``[1, X, Y, Z]``) next to its input's name.

    The file is ``output_dir / <case id><postfix>.nii.gz`` in the input's original geometry
    (shape, voxel order and affine of the file or DICOM series as stored). The case id is
    ``data["case_id"]`` when present, else the input's file or folder name. The path
    written goes to ``data[f"{key}_path"]``.
    """

    def __init__(self, keys: Any = "pred", output_dir: str | Path = "eval", postfix: str = "_seg",
                 image_key: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            meta = getattr(pred, "meta", {}) or {}
            source = str(meta.get("filename_or_obj", ""))
            case_id = d.get("case_id") or Path(source.rstrip("/")).name.split(".")[0] or "case"
            d[f"{key}_path"] = str(write_label_map(
                pred, pred.affine, self.output_dir / f"{case_id}{self.postfix}.nii.gz",
                original_affine=meta.get("original_affine"),
            ))
        return d


__all__ = [
    "to_original_orientation",
    "write_label_map",
    "SaveLabelMapd",
    "segmentation_transforms",
    "training_crops",
    "slab_inferer",
    "SlabInferer",
    "segmentation_postprocessing",
    "argmax_labels",
    "ArgmaxLabelsd",
    "HausdorffDistanceMM",
    "per_case_metrics",
    "organ_volumes_ml",
]
