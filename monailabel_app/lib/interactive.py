"""MONAI Label infer tasks for clicks and few-shot labels on the frozen features (docs/INTERACTIVE.md).

* :class:`ClickInfer` (type ``deepgrow``, so 3D Slicer's and OHIF's DeepGrow click tools
  work unchanged): request ``foreground`` / ``background`` (voxel indices of the image
  file as stored, as the clients send them), ``roi`` (MONAI Label's 3D box
  ``[x0, x1, y0, y1, z0, z1]``: its centre is the first click when there is none, and
  nothing outside it is segmented) and ``label`` (the object's name, any name:
  the click model is class-agnostic); response a binary label volume in the image's own
  geometry and JSON with ``feature_cache`` (``hit``: the encoder did not run),
  ``encode_s``, ``head_s`` and MONAI Label's ``latencies``.
* :class:`FewShotInfer` (type ``scribbles``): the client uploads a label volume with the
  new structure painted on one to three slices (``label_in``); params ``label_name``,
  ``save`` (keep the head as a new label of the model), ``foreground_value`` (default 1),
  ``background_value`` (scribble mode: only voxels of these two values are samples),
  ``foreground`` / ``background`` clicks that correct the fitted head (voxel indices, as
  for ``clicks``) and ``roi`` (a box that bounds the label).
  Without an uploaded label, a saved label name segments the image with its saved head.

Both share one :class:`volumes.interactive.service.InteractiveModel`: features are encoded once
per (input file hash, model) and kept in memory (``--conf interactive_cache_mb``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.config import strtobool
from volumes.interactive.service import InteractiveModel, fewshot_mask, file_to_ras, load_case

__all__ = ["ClickInfer", "FewShotInfer", "InteractiveService", "PromptError", "check_points"]

logger = logging.getLogger(__name__)


class InteractiveService:
    """The loaded click model folder, and the features of the volumes clicked on."""

    def __init__(self, root: Path, budget_mb: int, device: str | None) -> None:
        self.model = InteractiveModel(root, budget_bytes=budget_mb * 1024 * 1024, device=device or "cpu")
        self.tasks: list[BasicInferTask] = []  # the infer tasks whose label lists /info shows

    def label_saved(self, name: str) -> None:
        """A label saved by a request is listed by ``/info`` at once (not only after a restart)."""
        for task in self.tasks:
            if isinstance(task.labels, dict):
                task.labels.setdefault(name, 1)
            elif isinstance(task.labels, list) and name not in task.labels:
                task.labels.append(name)

    def features(self, image_path: str) -> tuple[Any, bool]:
        from volumes.data.io import source_sha256

        key = source_sha256(image_path)

        def encode():  # only when this file was not encoded by this model before
            from volumes.errors import VolumeReadError
            from volumes.transforms.modality import intensity_modality, volume_modality

            volume, spacing, _, loaded = load_case(image_path)
            vf = self.model.encode(volume, spacing)
            try:  # DICOM's Modality tag; NIfTI has none (or an unsupported one): guessed from the intensities
                modality, source = volume_modality({"image": loaded}), "its DICOM Modality tag"
            except VolumeReadError:
                modality, source = intensity_modality(volume.numpy()), "its intensities"
            vf.extra.update(modality=modality, modality_source=source)
            vf.extra.update(affine=np.asarray(loaded.affine, float),
                            original_affine=np.asarray(loaded.meta.get("original_affine", loaded.affine), float),
                            file_shape=_file_shape(image_path, vf.grid.shape), key=key)
            return vf

        return self.model.store.get_or_compute((key, self.model.model_key), encode)

    @staticmethod
    def box_to_ras(vf: Any, roi: Any) -> list[tuple[int, int]]:
        """MONAI Label's 3D ``roi`` ``[x0, x1, y0, y1, z0, z1]`` (file voxel indices, ends exclusive) -> the
        ``(start, stop)`` of each axis of the RAS-loaded grid; a malformed box raises :class:`PromptError`."""
        shape = tuple(int(n) for n in vf.extra.get("file_shape", vf.grid.shape))
        if not isinstance(roi, (list, tuple)) or len(roi) != 6:
            raise PromptError(f"roi {roi!r}: a box is [x0, x1, y0, y1, z0, z1] voxel indices (6 numbers)")
        try:
            values = [int(v) for v in roi]
        except (TypeError, ValueError):
            raise PromptError(f"roi {list(roi)}: voxel indices must be integers") from None
        pairs = list(zip(values[0::2], values[1::2]))
        for axis, ((lo, hi), n) in enumerate(zip(pairs, shape)):
            if not 0 <= lo < hi <= n:
                raise PromptError(f"roi {values}: axis {axis} runs {lo}..{hi}; a box needs 0 <= start < end <= {n} "
                                  f"(shape {list(shape)})")
        last = [(lo, hi - 1) for lo, hi in pairs]  # the first and the last voxel inside (ends are exclusive)
        corners = [[last[0][i], last[1][j], last[2][k]] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
        ras = np.array(file_to_ras(corners, vf.extra["original_affine"], vf.extra["affine"], vf.grid.shape))
        return [(int(ras[:, a].min()), int(ras[:, a].max()) + 1) for a in range(3)]

    @staticmethod
    def to_ras(vf: Any, points: Any, name: str = "click") -> list[tuple[int, int, int]]:
        """Clicks in file voxel indices -> RAS grid indices; a malformed click raises :class:`PromptError` naming it."""
        points = check_points(points, name, tuple(int(n) for n in vf.extra.get("file_shape", vf.grid.shape)))
        return file_to_ras(points, vf.extra["original_affine"], vf.extra["affine"], vf.grid.shape)


class PromptError(ValueError):
    """A malformed request (the app answers it with HTTP 422 and this message)."""


def check_points(points: Any, name: str, shape: Sequence[int]) -> list[list[int]]:
    """``points`` as a list of 3 non-negative integer voxel indices inside ``shape`` (the file as stored)."""
    if points is None:
        return []
    if not isinstance(points, (list, tuple)):
        raise PromptError(f"{name}: expected a list of [i, j, k] voxel indices, got {points!r}")
    checked = []
    for point in points:
        if not isinstance(point, (list, tuple)) or len(point) != 3:
            raise PromptError(f"{name} {point!r}: a click needs 3 voxel indices [i, j, k]"
                              + (f", got {len(point)}" if isinstance(point, (list, tuple)) else ""))
        try:
            values = [int(v) for v in point]
        except (TypeError, ValueError):
            raise PromptError(f"{name} {list(point)}: voxel indices must be integers") from None
        if any(v != float(raw) for v, raw in zip(values, point)):
            raise PromptError(f"{name} {list(point)}: voxel indices must be integers")
        if any(not 0 <= v < n for v, n in zip(values, shape)):
            raise PromptError(f"{name} {values} is outside the volume: indices run from 0 to {[n - 1 for n in shape]} "
                              f"(shape {list(shape)})")
        checked.append(values)
    return checked


def _inside(mask: Any, box: Sequence[tuple[int, int]]) -> np.ndarray:
    """``mask`` with nothing outside ``box`` (``(start, stop)`` per axis of the loaded grid)."""
    inside = np.zeros(np.shape(mask), bool)
    inside[tuple(slice(lo, hi) for lo, hi in box)] = True
    return np.asarray(mask) & inside


def _file_shape(image_path: str, fallback: Sequence[int]) -> tuple[int, ...]:
    """The image's shape as stored in its file (the index space of the clients' clicks)."""
    try:
        import nibabel as nib

        return tuple(int(n) for n in nib.load(image_path).shape[:3])
    except Exception:  # not NIfTI (a DICOM folder): the loaded grid, an axis permutation of it
        return tuple(int(n) for n in fallback)


def _write_mask(mask: np.ndarray, vf: Any) -> str:
    from volumes.segmentation import write_label_map

    path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
    write_label_map(mask.astype(np.uint8), vf.extra["affine"], path, original_affine=vf.extra["original_affine"])
    return path


class ClickInfer(BasicInferTask):
    """DeepGrow-type clicks on any object: positive adds, negative removes, within the click's window."""

    def __init__(self, service: InteractiveService, labels: Sequence[str]) -> None:
        root = service.model.root
        super().__init__(path=str(root / "click_model.safetensors"), network=None, type=InferType.DEEPGROW,
                         labels={name: 1 for name in labels}, dimension=3,
                         description="Clicks on any structure: a class-agnostic click model on frozen DINOv2 "
                                     "slice features (positive and negative clicks)")
        self.service = service
        service.tasks.append(self)

    def is_valid(self) -> bool:
        return Path(self.path[0] if isinstance(self.path, list) else self.path).is_file()

    def pre_transforms(self, data: dict | None = None) -> list:
        return []

    def inverse_transforms(self, data: dict | None = None) -> None:
        return None

    def post_transforms(self, data: dict | None = None) -> list:
        return []

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict[str, Any]:
        try:
            return self._run(data)
        except ValueError as exc:  # the service's checks of the request (clicks, annotation, label name)
            raise exc if isinstance(exc, PromptError) else PromptError(str(exc)) from exc

    def _run(self, data: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        vf, hit = self.service.features(data["image"])
        foreground = self.service.to_ras(vf, data.get("foreground"), "foreground click")
        background = self.service.to_ras(vf, data.get("background"), "background click")
        box = self.service.box_to_ras(vf, data.get("roi")) if data.get("roi") else None
        if box is not None and not foreground:  # a box alone: its centre is the first positive click
            foreground = [tuple(int((lo + hi - 1) // 2) for lo, hi in box)]
        if not foreground:
            raise PromptError("no foreground click: click the structure first (a positive click) or draw a box "
                              f"(roi); got {len(background)} background click(s)")
        label = str(data.get("label") or "object")
        mask, info = self.service.model.click(vf, foreground, background, key=(vf.extra["key"], label))
        if box is not None:
            mask = _inside(mask, box)
        data["pred"] = mask
        data["_features"] = vf
        data["_result"] = {"label": label, "feature_cache": "hit" if hit else "miss", "encode_s": round(vf.encode_s, 3),
                           "box": box is not None,
                           "head_s": round(info["head_s"], 3), "clicks_run": info["clicks_run"],
                           "seconds": round(time.perf_counter() - start, 3), "voxels": int(mask.sum())}
        return data

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        return _write_mask(data["pred"], data["_features"]), dict(data["_result"])

    def __call__(self, request: dict[str, Any], callbacks: Any = None) -> tuple[Any, dict]:
        """MONAI Label's call; ``label_names`` names what this request segmented (value 1), not every known label."""
        result_file, result_json = super().__call__(request, callbacks)
        if isinstance(result_json, dict) and "label" in result_json:
            result_json["label_names"] = {result_json["label"]: 1}
        return result_file, result_json


class FewShotInfer(ClickInfer):
    """A new label from painted slices (or scribbles), optionally saved as a label of the model."""

    def __init__(self, service: InteractiveService, labels: Sequence[str]) -> None:
        super().__init__(service, labels)
        self.type = InferType.SCRIBBLES
        self.description = ("A new label from one to three painted slices: a logistic head on frozen DINOv2 patch "
                            "features, fitted in seconds; save it with save=true and label_name")

    def _run(self, data: dict[str, Any]) -> dict[str, Any]:
        from volumes.data.io import load_volume

        start = time.perf_counter()
        vf, hit = self.service.features(data["image"])
        box = self.service.box_to_ras(vf, data.get("roi")) if data.get("roi") else None  # checked before any fit
        model = self.service.model
        name = str(data.get("label_name") or "new_structure")
        annotation_path = data.get("label")
        result: dict[str, Any] = {"label": name, "feature_cache": "hit" if hit else "miss",
                                  "encode_s": round(vf.encode_s, 3)}
        if annotation_path:
            painted = load_volume(annotation_path, dtype=None)
            values = np.asarray(painted[0])
            if values.shape != vf.grid.shape:
                raise ValueError(f"{Path(annotation_path).name}: the annotation's shape {list(values.shape)} is not "
                                 f"the image's {list(vf.grid.shape)}")
            fg_value = int(data.get("foreground_value", 1))
            bg_value = data.get("background_value")
            foreground = values == fg_value
            background = None if bg_value is None else values == int(bg_value)
            clicks = [(p, True) for p in self.service.to_ras(vf, data.get("foreground"), "foreground click")]
            clicks += [(p, False) for p in self.service.to_ras(vf, data.get("background"), "background click")]
            mask, head, info = model.fewshot(vf, foreground, background, clicks=clicks)
            result.update(fit_s=round(info["fit_s"], 3), painted_slices=int(np.any(foreground, axis=(0, 1)).sum()),
                          clicks=len(clicks))
            if strtobool(data.get("save") or False):
                fitted_on = {"source_sha256": vf.extra["key"], "modality": vf.extra["modality"]}
                result["saved"] = model.save_label(head, name, fitted_on=fitted_on).name
                self.service.label_saved(name)
        else:
            if data.get("foreground") or data.get("background"):
                raise PromptError("clicks correct a few-shot label fitted in the same request: send the painted "
                                  "slices (label_in) with them")
            head = model.load_label(name)
            fitted = head.meta.get("fitted_on") or {}
            if fitted.get("modality") and fitted["modality"] != vf.extra["modality"]:
                if not strtobool(data.get("allow_other_modality") or False):
                    raise PromptError(
                        f"label {name!r} was fitted on {fitted['modality']}, and this image is {vf.extra['modality']} "
                        f"(from {vf.extra['modality_source']}): a head on one modality's intensities does not carry "
                        "over to another; paint the structure on this image, or pass allow_other_modality=true")
                result["warning"] = f"label fitted on {fitted['modality']}, applied to {vf.extra['modality']}"
            # on the image it was fitted on, the components holding the painted voxels, as when it was fitted
            same = (fitted.get("source_sha256") == vf.extra["key"] and head.seeds is not None
                    and head.seeds.shape == tuple(vf.grid.grid_shape))
            mask = fewshot_mask(vf, head, head.seeds if same else np.zeros(vf.grid.grid_shape, bool))
        if box is not None:  # a box bounds the label, as it bounds clicks
            mask = _inside(mask, box)
            result["box"] = True
        result.update(seconds=round(time.perf_counter() - start, 3), voxels=int(mask.sum()))
        data["pred"], data["_features"], data["_result"] = mask, vf, result
        return data
