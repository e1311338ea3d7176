"""Slices for self-supervised pretraining, streamed from an archive of volumes with bounded memory.

From ``--data`` (a folder, a MONAI datalist, a CSV, found by the discovery ``volumes infer``
uses, or a MedMNIST 3D ``.npz`` archive whose ``train`` split is read) to batches of
multi-crop views:

1. Each loader worker takes its share of the cases (and, under torchrun, of its rank's
   share), in a random order on every pass, and reads one volume at a time with
   :func:`volumes.data.io.load_volume` (NIfTI, NRRD, MHA, DICOM series). A case that
   cannot be read is skipped: its file and the reason go to ``OUT/skipped/<case>.json``
   (merged into ``OUT/skipped.csv`` by the trainer), never an abort.
2. The volume is brought to the downstream bundles' slice geometry: the plane's axis last,
   in-plane resize so the longer side is ``size``, padding to the patch grid
   (:class:`volumes.transforms.PrepareSlicesd`'s own geometry), still in HU. Slices that
   are mostly air or background (less than ``min_foreground`` of the pixels inside the
   body) are not used.
3. A rolling cache of the last ``cache_volumes`` volumes (each at most ``size`` x ``size``
   x its slice count) is where slices are drawn from, so a batch mixes volumes and memory
   stays bounded whatever the archive's size.
4. Each drawn slice becomes ``2`` global and ``local_crops`` local views
   (:class:`MultiCrop`): random resized crops of the HU slice, each rendered with its
   own jittered windows into the bundles' channels (``preprocessing_config``: CT windows
   as channels, or one window repeated), ImageNet-normalised - what the encoder sees
   downstream, with the window/level varied like colour jitter in DINO.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from volumes.atomic import atomic_write_bytes
from volumes.errors import ConfigError, VolumesError
from volumes.transforms.intensity import CT_WINDOWS, WINDOW_SETS, mr_normalize, window_ct
from volumes.transforms.slices import IMAGENET_MEAN, IMAGENET_STD, SLICE_AXES

__all__ = ["MultiCrop", "SliceSpec", "SliceStream", "list_cases", "merge_skipped", "prepare_volume"]

#: HU above which a pixel is inside the body (air is about -1000, lung about -800 to -500)
BODY_HU = -500.0


@dataclass(frozen=True)
class SliceSpec:
    """How slices are prepared: the downstream bundles' ``preprocessing_config`` plus sampling.

    Attributes:
        preset: a CT window name, a window set (``ct_three_windows``, ``ct_abdomen_windows``),
            ``mr``, ``None`` for volumes already in ``[0, 1]`` (MedMNIST), or ``auto``: each
            volume by its own modality (:data:`volumes.transforms.modality.MODALITY_PREPARATION`:
            CT windows for CT, MR normalisation for MR), as the bundles' ``preset`` ``auto``.
        channel_mode: ``windows`` (with a window set), ``repeat``, or ``auto`` (with ``auto``).
        size: the longer in-plane side of a slice, as the bundles' ``size``.
        planes: slicing planes to sample from (``axial``, ``coronal``, ``sagittal``).
        min_foreground: least fraction of a slice inside the body for it to be used.
        jitter: window jitter: level moves by up to ``jitter`` x width, width scales by
            up to ``exp(2 x jitter)``; for ``mr`` and ``None`` a gamma of ``exp(+-2 x jitter)``.
    """

    preset: str | None = "ct_three_windows"
    channel_mode: str = "windows"
    size: int = 112
    planes: tuple[str, ...] = ("axial",)
    min_foreground: float = 0.1
    jitter: float = 0.1

    def __post_init__(self) -> None:
        presets = (*CT_WINDOWS, *WINDOW_SETS, "mr", "auto", None)
        if self.preset not in presets:
            raise ConfigError("preset", self.preset, list(presets))
        fitting = ["windows"] if self.preset in WINDOW_SETS else ["auto"] if self.preset == "auto" else ["repeat"]
        if self.channel_mode not in fitting:
            raise ConfigError("channel_mode", self.channel_mode, f"{fitting} with preset={self.preset!r}")
        for plane in self.planes:
            if plane not in SLICE_AXES:
                raise ConfigError("planes", plane, list(SLICE_AXES))
        if not self.planes:
            raise ConfigError("planes", self.planes, "at least one plane")
        if not (isinstance(self.size, int) and self.size >= 14):
            raise ConfigError("size", self.size, "an integer >= 14 (pixels)")
        if not 0.0 <= self.min_foreground < 1.0:
            raise ConfigError("min_foreground", self.min_foreground, "a fraction in [0, 1)")
        if not 0.0 <= self.jitter <= 0.5:
            raise ConfigError("jitter", self.jitter, "a number in [0, 0.5]")

    def for_modality(self, modality: str) -> "SliceSpec":
        """The spec one volume of ``modality`` is prepared with (itself unless the preset is ``auto``)."""
        if self.preset != "auto":
            return self
        from volumes.transforms.modality import MODALITY_PREPARATION

        preset, mode = MODALITY_PREPARATION[modality]
        return replace(self, preset=preset, channel_mode=mode)

    def preprocessing_config(self) -> dict[str, Any]:
        """What a bundle's ``preprocessing_config`` holds for slices prepared like these."""
        return {"preset": self.preset, "axis": self.planes[0], "channel_mode": self.channel_mode, "size": self.size}


# ---------------------------------------------------------------------- cases
def list_cases(source: str | Path, modality: str | None = None) -> list[dict[str, Any]]:
    """The cases of ``--data``: ``[{"case_id", "image", "series_uid"?, "modality"?}]`` or MedMNIST ``{"case_id", "array"}``.

    Labels are ignored. A datalist's ``modality`` field is kept; ``modality`` (``CT``,
    ``MR``, or ``PATTERN=CT,PATTERN=MR`` with shell patterns matched against each image
    path) names it for the others. Raises :class:`VolumesError` when the source names no case.
    """
    source = Path(source)
    if source.suffix == ".npz":
        from volumes.data.medmnist import medmnist3d_arrays

        images, _ = medmnist3d_arrays(source, "train")
        # MedMNIST's frame axis (0) last, as volumes.data.medmnist.load_medmnist3d does
        return [{"case_id": f"train_{i:04d}", "array": np.moveaxis(image, 0, -1)} for i, image in enumerate(images)]
    from volumes.data.discovery import discover_cases

    cases = [case.to_dict() for case in discover_cases(source)]
    if not cases:
        raise VolumesError(f"{source}: no volume found (NIfTI, NRRD, MHA or DICOM series)")
    kept = [{k: v for k, v in case.items() if k in ("case_id", "image", "series_uid", "modality")} for case in cases]
    if modality:
        from volumes.transforms.modality import modality_rule

        rule = modality_rule(modality)
        for case in kept:
            case.setdefault("modality", rule(case["image"]))
            if case["modality"] is None:
                del case["modality"]
    return kept


def _read(case: dict[str, Any]) -> tuple[torch.Tensor, str | None]:
    """``[1, X, Y, Z]`` voxels of a case (RAS; HU for CT as stored; MedMNIST scaled to [0, 1]) and its DICOM modality."""
    if "array" in case:
        return torch.as_tensor(np.asarray(case["array"], dtype=np.float32) / 255.0)[None], None
    from volumes.data.io import load_volume

    volume = load_volume(case["image"], series_uid=case.get("series_uid"), dtype=None)
    modality = volume.meta.get("modality") if hasattr(volume, "meta") else None
    return (volume.as_tensor() if hasattr(volume, "as_tensor") else torch.as_tensor(volume)), modality


def case_spec(spec: SliceSpec, case: dict[str, Any], tag: str | None) -> SliceSpec:
    """The spec of one case: its datalist/rule ``modality``, else its DICOM tag (``auto`` only)."""
    if spec.preset != "auto":
        return spec
    from volumes.transforms.modality import volume_modality

    return spec.for_modality(volume_modality({"modality": case.get("modality") or tag,
                                              "case_id": case.get("image", case["case_id"])}))


def prepare_volume(volume: torch.Tensor, spec: SliceSpec, plane: str, patch_size: int) -> torch.Tensor:
    """``[1, X, Y, Z]`` -> ``[1, H, W, D]`` on the bundles' slice grid, intensities unchanged (MR: normalised)."""
    from volumes.transforms.slices import PrepareSlicesd

    if spec.preset == "mr":
        volume = torch.as_tensor(mr_normalize(volume[0]))[None]
    geometry = PrepareSlicesd("image", axis=plane, patch_size=patch_size, size=spec.size)
    with torch.no_grad():
        stack = geometry.geometry(volume)
    # a plain tensor: MONAI metadata must not ride along into the model, its losses' buffers or a checkpoint
    return (stack.as_tensor() if hasattr(stack, "as_tensor") else torch.as_tensor(stack)).float()


def foreground(stack: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
    """Per slice of ``[1, H, W, D]``: the fraction of pixels inside the body (CT) or above background."""
    inside = stack > BODY_HU if spec.preset not in ("mr", None) else stack > 0.05
    return inside.float().mean(dim=(0, 1, 2))


# ---------------------------------------------------------------------- views
def render(hu: torch.Tensor, spec: SliceSpec, generator: torch.Generator) -> torch.Tensor:
    """One ``[1, h, w]`` slice (HU, or [0, 1]) -> ``[3, h, w]`` encoder input with jittered windows."""

    def uniform(low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand((), generator=generator))

    j = spec.jitter
    if spec.preset in ("mr", None):
        gamma = math.exp(uniform(-2 * j, 2 * j))
        channels = hu.clamp(0.0, 1.0).pow(gamma).expand(3, -1, -1)
    else:
        windows = WINDOW_SETS.get(spec.preset, (spec.preset,))
        rendered = []
        for name in windows:
            level, width = CT_WINDOWS[name]
            rendered.append(window_ct(hu[0], level + uniform(-j, j) * width, width * math.exp(uniform(-2 * j, 2 * j))))
        channels = torch.stack(rendered) if len(rendered) == 3 else rendered[0].expand(3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (channels - mean) / std


@dataclass
class MultiCrop:
    """DINO's multi-crop on one HU slice: ``global_crops`` views of ``global_size`` and ``local_crops`` of ``local_size``.

    Crops are random resized crops (area fraction in ``global_scale`` / ``local_scale``,
    aspect ratio 3/4 to 4/3), each rendered with its own window jitter (:func:`render`).
    """

    spec: SliceSpec
    patch_size: int = 14
    local_crops: int = 4
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    local_size: int | None = None
    global_crops: int = 2
    global_size: int = field(init=False)

    def __post_init__(self) -> None:
        # the global view is the downstream slice size; the local one 3/7 of it (DINOv2: 98 of 224), on the patch grid
        self.global_size = self.spec.size - self.spec.size % self.patch_size or self.patch_size
        if self.local_size is None:
            self.local_size = max(self.patch_size, round(self.global_size * 3 / 7 / self.patch_size) * self.patch_size)
        if self.local_crops < 0:
            raise ConfigError("local_crops", self.local_crops, "an integer >= 0")

    def _crop(self, hu: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        _, height, width = hu.shape
        area = height * width
        for _ in range(10):
            target = area * float(scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=generator))
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(torch.rand((), generator=generator)))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                break
        else:
            top, left, h, w = 0, 0, height, width
        return F.resized_crop(hu, top, left, h, w, [size, size], antialias=True)

    def __call__(self, hu: torch.Tensor, generator: torch.Generator, spec: SliceSpec | None = None) -> list[torch.Tensor]:
        """The views of one slice, rendered with ``spec`` (a case's own, under ``auto``; default ``self.spec``)."""
        views = [self._crop(hu, self.global_size, self.global_scale, generator) for _ in range(self.global_crops)]
        views += [self._crop(hu, self.local_size, self.local_scale, generator) for _ in range(self.local_crops)]
        return [render(view, spec or self.spec, generator) for view in views]


# ---------------------------------------------------------------------- the stream
class SliceStream(IterableDataset):
    """An endless stream of multi-crop views of foreground slices (see the module docstring).

    Args:
        cases: from :func:`list_cases`.
        crops: the views to make of each slice.
        patch_size: the encoder's patch size (the slice grid's multiple).
        seed: with ``rank``, ``restart`` and the worker index, seeds this stream's order;
            a resumed run passes its step as ``restart`` so it does not replay the start.
        rank, world: this process's share of the cases under torchrun.
        cache_volumes: volumes held at once per worker (memory: each at most
            ``size`` x ``size`` x slices x 4 bytes).
        slices_per_volume: slices drawn from the cache after each volume read.
        skipped_dir: where a worker records a case it cannot read (one JSON per case).
    """

    def __init__(self, cases: Sequence[dict[str, Any]], crops: MultiCrop, *, patch_size: int = 14, seed: int = 0,
                 rank: int = 0, world: int = 1, restart: int = 0, cache_volumes: int = 8,
                 slices_per_volume: int = 16, skipped_dir: str | Path | None = None):
        super().__init__()
        if not cases:
            raise VolumesError("no case to pretrain on")
        self.cases = list(cases)
        self.crops = crops
        self.spec = crops.spec
        self.patch_size = patch_size
        self.seed, self.rank, self.world, self.restart = seed, rank, world, restart
        self.cache_volumes = max(1, cache_volumes)
        self.slices_per_volume = max(1, slices_per_volume)
        self.skipped_dir = Path(skipped_dir) if skipped_dir is not None else None

    def _share(self) -> tuple[list[dict[str, Any]], int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index, count = self.rank * workers + worker, self.world * workers
        share = self.cases[index::count]
        # fewer cases than readers: every reader takes all of them (a small archive)
        return (share if share else self.cases), worker

    def _skip(self, case: dict[str, Any], exc: BaseException) -> None:
        reason = str(exc).strip() or type(exc).__name__
        source = str(case.get("image", case["case_id"]))
        if source not in reason:
            reason = f"{source}: {reason}"
        if self.skipped_dir is not None:
            entry = {"case_id": case["case_id"], "source": source, "reason": reason}
            atomic_write_bytes(self.skipped_dir / f"{case['case_id']}.json", lambda f: f.write(json.dumps(entry).encode()))

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        share, worker = self._share()
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.restart, self.rank, worker]).generate_state(1)[0]))
        # (stack [1, H, W, D], usable slice indices, the case's spec)
        cache: list[tuple[torch.Tensor, torch.Tensor, SliceSpec]] = []
        readable = {id(case): True for case in share}
        while any(readable.values()):
            for position in torch.randperm(len(share), generator=generator).tolist():
                case = share[position]
                if not readable[id(case)]:
                    continue
                try:
                    volume, tag = _read(case)
                    spec = case_spec(self.spec, case, tag)
                    plane = self.spec.planes[int(torch.randint(len(self.spec.planes), (), generator=generator))]
                    stack = prepare_volume(volume, spec, plane, self.patch_size)
                    del volume
                except Exception as exc:  # an unreadable case is skipped, never an abort
                    readable[id(case)] = False
                    self._skip(case, exc)
                    continue
                usable = torch.nonzero(foreground(stack, spec) >= self.spec.min_foreground).flatten()
                if len(usable) == 0:
                    continue
                cache.append((stack, usable, spec))
                if len(cache) > self.cache_volumes:
                    cache.pop(0)
                for _ in range(self.slices_per_volume):
                    stack, usable, spec = cache[int(torch.randint(len(cache), (), generator=generator))]
                    index = int(usable[int(torch.randint(len(usable), (), generator=generator))])
                    yield self.crops(stack[..., index], generator, spec)


def merge_skipped(out: str | Path) -> list[dict[str, str]]:
    """``OUT/skipped/*.json`` (one per unreadable case) -> ``OUT/skipped.csv``; returns the rows."""
    out = Path(out)
    rows = []
    for path in sorted((out / "skipped").glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case_id", "source", "reason"], restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "skipped.csv", lambda f: f.write(buffer.getvalue().encode()))
    return rows
