"""Data, training and evaluation parts of ``scripts/segmentation_results.py``.

The TotalSegmentator label remapping and the prepared CT with its train/test split of axial
blocks (``label_mapping``, ``Case``, ``prepare_case``), the wall-clock-budgeted training loop and
its crop samplers (``CropSampler``, ``TrainResult``, ``train_budgeted``, ``slice_batches``,
``windowed``, ``volume_batches``), and the per-block prediction and Dice in the original
space (``predict_blocks``, ``label_map_original``, ``dice_on``, ``phantom_dice``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from volumes.arrays import spacing_mm

CT_FILE = "example_ct.nii.gz"
SEG_FILE = "example_seg_fast_force_split.nii.gz"
CLASS_MAP_FILE = "totalsegmentator_class_map.json"
# Training settings of bundles/dinov2_unet_segmentation/configs/train.json, used for (b).
SLAB, SAMPLES, LR_SLICE, WEIGHT_DECAY, INFERENCE_SLAB = 8, 2, 3e-3, 1e-4, 16
POS, NEG = 2.0, 1.0  # crop centres on an organ voxel 2 : 1, as volumes.segmentation.training_crops
ROI_3D = (64, 64, 16)  # 3D crops (in-plane 64 x 64, a whole block of slices)


# --------------------------------------------------------------------------- data
def label_mapping(class_map_file: Path, labels: Sequence[str]) -> dict[int, int]:
    """TotalSegmentator "total" id -> our label id, by class name (unlisted ids -> background)."""
    total = json.loads(class_map_file.read_text())["total"]
    mapping: dict[int, int] = {}
    for ts_id, name in total.items():
        if name in labels and name != "background":
            mapping[int(ts_id)] = labels.index(name)
        elif name.startswith("vertebrae_") and "vertebrae" in labels:
            mapping[int(ts_id)] = labels.index("vertebrae")
    missing = [n for n in labels[1:] if labels.index(n) not in mapping.values()]
    if missing:
        raise ValueError(f"{class_map_file}: no TotalSegmentator class for {missing}")
    return mapping


@dataclass
class Case:
    """The CT prepared once for every model, and the train/test split of its axial slices."""

    prepared: dict[str, Any]  # segmentation_transforms output: image [3,H,W,D], label [1,H,W,D], original_label
    transform: Any  # the preprocessing to invert
    train_blocks: list[tuple[int, int]]
    test_blocks: list[tuple[int, int]]
    spacing: list[float]
    mapping: dict[int, int]
    organ_voxels: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> organ -> count

    @property
    def depth(self) -> int:
        return int(self.prepared["image"].shape[-1])

    def slices(self, blocks: Sequence[tuple[int, int]]) -> list[int]:
        return [z for lo, hi in blocks for z in range(lo, hi)]


def prepare_case(data_dir: Path, work_dir: Path, labels: Sequence[str], block: int, patch_size: int,
                 preprocessing_config: dict[str, Any]) -> Case:
    import nibabel as nib
    import numpy as np

    from volumes.segmentation import segmentation_transforms

    mapping = label_mapping(data_dir / CLASS_MAP_FILE, labels)
    seg = nib.load(str(data_dir / SEG_FILE))
    lut = np.zeros(256 if seg.get_data_dtype() == np.uint8 else int(np.asarray(seg.dataobj).max()) + 1, np.uint8)
    for ts_id, ours in mapping.items():
        if ts_id < len(lut):
            lut[ts_id] = ours
    remapped = lut[np.asarray(seg.dataobj).astype(np.int64)]
    label_path = work_dir / "reference_remapped.nii.gz"
    out = nib.Nifti1Image(remapped, seg.affine)
    out.set_qform(seg.affine, code=1)
    out.set_sform(seg.affine, code=1)
    nib.save(out, str(label_path))

    transform = segmentation_transforms(preprocessing_config, patch_size)
    prepared = transform({"image": str(data_dir / CT_FILE), "label": str(label_path)})
    depth = int(prepared["image"].shape[-1])
    orig = prepared["original_label"]
    # The axial axis is the file's third axis (RAS on disk, no resampling along it), so a
    # slice index means the same slice in the prepared grid and in the original space.
    axcodes = nib.aff2axcodes(seg.affine)
    if axcodes[2] != "S" or int(orig.shape[-1]) != depth:
        raise ValueError(f"expected a RAS-like file with the axial axis last; got {axcodes}, depth {orig.shape}")
    blocks = [(lo, min(lo + block, depth)) for lo in range(0, depth, block)]
    train_blocks = [b for i, b in enumerate(blocks) if i % 2 == 0]
    test_blocks = [b for i, b in enumerate(blocks) if i % 2 == 1]
    spacing = spacing_mm(seg.affine)
    case = Case(prepared, transform, train_blocks, test_blocks, spacing, mapping)
    original_label = np.asarray(orig[0]).astype(np.int64)
    for split, blks in (("train", train_blocks), ("test", test_blocks)):
        part = original_label[..., case.slices(blks)]
        case.organ_voxels[split] = {name: int((part == i).sum()) for i, name in enumerate(labels) if i > 0}
    return case


# --------------------------------------------------------------------------- training
class CropSampler:
    """Training crops from the training blocks only, centred on an organ voxel ``pos : neg`` times as often as not.

    The centre is an organ voxel (uniform over all organ voxels of the training slices) with
    probability ``pos / (pos + neg)``, else a background voxel; the crop is ``crop`` voxels
    (``-1``: the whole side), moved to lie inside the image in-plane and inside the centre's
    block along the slices, so no crop mixes slices of two blocks.
    """

    def __init__(self, case: Case, crop: Sequence[int], seed: int, pos: float = POS, neg: float = NEG):
        import numpy as np

        label = np.asarray(case.prepared["label"][0]).astype(np.int64)
        self.shape = label.shape
        self.crop = tuple(s if c == -1 else c for c, s in zip(crop, self.shape))
        self.block_of = np.full(self.shape[-1], -1)
        for i, (lo, hi) in enumerate(case.train_blocks):
            self.block_of[lo:hi] = i
            if hi - lo < self.crop[2]:
                raise ValueError(f"training block {lo}-{hi} is shorter than the crop depth {self.crop[2]}")
        self.blocks = case.train_blocks
        in_train = (self.block_of >= 0)[None, None, :]
        self.fg = np.argwhere((label > 0) & in_train)
        self.bg = np.argwhere((label == 0) & in_train)
        self.p_pos = pos / (pos + neg) if len(self.fg) else 0.0
        self.rng = np.random.default_rng(seed)

    def boxes(self, n: int) -> list[tuple[slice, slice, slice]]:
        out = []
        for _ in range(n):
            pool = self.fg if self.rng.random() < self.p_pos else self.bg
            centre = pool[self.rng.integers(len(pool))]
            lo_z, hi_z = self.blocks[self.block_of[centre[2]]]
            starts = []
            for axis, (c, size) in enumerate(zip(centre, self.crop)):
                lo, hi = (0, self.shape[axis]) if axis < 2 else (lo_z, hi_z)
                starts.append(int(min(max(c - size // 2, lo), hi - size)))
            out.append(tuple(slice(s, s + size) for s, size in zip(starts, self.crop)))
        return out


@dataclass
class TrainResult:
    steps: int = 0
    seconds: float = 0.0
    first_loss: float = math.nan
    last_loss: float = math.nan  # mean of the last 10 steps


def train_budgeted(network, batches: Callable[[], tuple[Any, Any]], *, lr: float, budget_s: float | None = None,
                   steps: int | None = None, weight_decay: float = WEIGHT_DECAY, log: Callable[[str], None] = print,
                   name: str = "") -> TrainResult:
    """AdamW + DiceCE until ``budget_s`` seconds are spent (the step that crosses it completes), or ``steps`` steps.

    The clock covers crop sampling, forward, backward and the optimiser step.
    """
    import torch
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    network.train()
    result, recent = TrainResult(), []
    start = last_log = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if steps is not None and result.steps >= steps:
            break
        if budget_s is not None and result.steps >= 1 and elapsed >= budget_s:
            break
        x, y = batches()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x), y)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        result.first_loss = value if result.steps == 0 else result.first_loss
        recent = (recent + [value])[-10:]
        result.steps += 1
        now = time.perf_counter()
        if now - last_log > 30:
            log(f"  {name}: step {result.steps}, {now - start:.0f} s, loss {sum(recent) / len(recent):.3f}")
            last_log = now
    result.seconds = time.perf_counter() - start
    result.last_loss = sum(recent) / len(recent) if recent else math.nan
    network.eval()
    return result


def slice_batches(case: Case, seed: int) -> Callable[[], tuple[Any, Any]]:
    """Batches ``[SAMPLES, 3, H, W, SLAB]`` of whole slices for the SliceSegmenter."""
    import torch

    sampler = CropSampler(case, (-1, -1, SLAB), seed)
    image, label = case.prepared["image"].as_tensor(), case.prepared["label"].as_tensor()

    def batch():
        boxes = sampler.boxes(SAMPLES)
        x = torch.stack([image[(slice(None), *b)] for b in boxes])
        y = torch.stack([label[(slice(None), *b)] for b in boxes]).long()
        return x, y
    return batch


def windowed(case: Case):
    """The soft-tissue windowed CT ``[1, H, W, D]`` in [0, 1] on the prepared grid (undoes the ImageNet scaling)."""
    from volumes.transforms import IMAGENET_MEAN, IMAGENET_STD

    image = case.prepared["image"].as_tensor()
    return (image[:1] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0.0, 1.0)


def volume_batches(case: Case, seed: int, pad_depth_to: int | None = None) -> Callable[[], tuple[Any, Any]]:
    """Batches ``[SAMPLES, 1, 64, 64, 16]`` for the 3D networks (depth zero-padded symmetrically if asked)."""
    import torch
    import torch.nn.functional as F

    sampler = CropSampler(case, ROI_3D, seed)
    image, label = windowed(case), case.prepared["label"].as_tensor()

    def batch():
        boxes = sampler.boxes(SAMPLES)
        x = torch.stack([image[(slice(None), *b)] for b in boxes])
        y = torch.stack([label[(slice(None), *b)] for b in boxes]).long()
        if pad_depth_to is not None and x.shape[-1] < pad_depth_to:
            extra = pad_depth_to - x.shape[-1]
            pad = (extra // 2, extra - extra // 2)  # as sliding_window_inference pads a too-short input
            x, y = F.pad(x, pad), F.pad(y, pad)
        return x, y
    return batch


# --------------------------------------------------------------------------- evaluation
def predict_blocks(case: Case, infer: Callable[[Any], Any], blocks: Sequence[tuple[int, int]], num_classes: int,
                   volume_input: Any) -> tuple[Any, float]:
    """Logits ``[K, H, W, D]`` on the prepared grid, each block predicted on its own (zeros elsewhere)."""
    import torch

    h, w, d = case.prepared["image"].shape[1:]
    logits = torch.zeros(num_classes, h, w, d)
    start = time.perf_counter()
    with torch.no_grad():
        for lo, hi in blocks:
            logits[..., lo:hi] = infer(volume_input[None, ..., lo:hi])[0].float()
    return logits, time.perf_counter() - start


def label_map_original(case: Case, logits: Any, num_classes: int):
    """Logits on the prepared grid -> label map ``[X, Y, Z]`` in the CT's original space (Invertd)."""
    import numpy as np
    from monai.data import MetaTensor

    from volumes.segmentation import segmentation_postprocessing

    post = segmentation_postprocessing(case.transform, num_classes, metrics=False)
    data = {"image": case.prepared["image"], "pred": MetaTensor(logits, affine=case.prepared["image"].affine)}
    return np.asarray(post(data)["pred"][0]).astype(np.int64)


def dice_on(pred, reference, z: Sequence[int], labels: Sequence[str]) -> dict[str, float]:
    """Dice per organ over the slices ``z`` (all of them pooled into one volume)."""
    import torch
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    k = len(labels)
    p = one_hot(torch.as_tensor(pred[..., list(z)])[None, None], k)
    t = one_hot(torch.as_tensor(reference[..., list(z)])[None, None], k)
    dice = compute_dice(p, t, include_background=False, ignore_empty=True)[0]
    return {name: float(dice[i - 1]) for i, name in enumerate(labels) if i > 0}


def phantom_dice(network, datalist: Path, preprocessing_config: dict[str, Any], labels: Sequence[str],
                 patch_size: int) -> tuple[dict[str, float], int]:
    """Mean Dice per organ of ``network`` on the cohort's held-out ``test`` phantoms (original space)."""
    import numpy as np
    import torch

    from volumes.bundle import datalist_section
    from volumes.segmentation import (per_case_metrics, segmentation_postprocessing, segmentation_transforms,
                                      slab_inferer)

    transform = segmentation_transforms(preprocessing_config, patch_size)
    post = segmentation_postprocessing(transform, len(labels), metrics=False)
    inferer = slab_inferer(INFERENCE_SLAB)
    rows = []
    for item in datalist_section(datalist, "test"):
        data = transform(item)
        with torch.no_grad():
            data["pred"] = inferer(data["image"][None], network)[0]
        pred = np.asarray(post(data)["pred"][0])
        reference = np.asarray(data["original_label"][0]).astype(np.int64)
        spacing = spacing_mm(data["original_label"].affine)
        rows.append(per_case_metrics(pred, reference, spacing, labels))
    return {name: float(np.nanmean([r[f"dice_{name}"] for r in rows])) for name in labels[1:]}, len(rows)
