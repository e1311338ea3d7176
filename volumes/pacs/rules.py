"""Series selection rules and the pre-flight checks that decide which series each bundle runs on.

Rules file (YAML or JSON; the ``rules`` key of the config), in the spirit of MONAI
Deploy's series selector::

    min_slices: 8                    # pre-flight: fewer slices are refused
    bundles:
      dinov2_unet_segmentation:      # bundle_id; "*" applies to bundles not listed
        - Modality: CT               # one mapping = one rule; every condition must hold
          Orientation: axial         # computed from ImageOrientationPatient (axial|coronal|sagittal|oblique)
          ImageType: ["!DERIVED", "!SECONDARY", "!LOCALIZER"]
          SliceThickness: "<=5"
          SeriesDescription: "/(abdo|body|thorax)/"
        - Modality: MR               # a second rule: a series matching any rule is selected

Conditions, on a DICOM keyword (or ``Orientation`` / ``NumberOfInstances``):

* ``"CT"``: case-insensitive equality with the value, or with any value of a
  multi-valued attribute (``ImageType``);
* ``"/regex/"``: case-insensitive regular-expression search;
* ``"<=5"``, ``">1"``, ``"1..5"``, a number, or ``{min: 1, max: 5}``: numeric;
* ``"!..."`` in front of any of these: the series must *not* match;
* a list: all of its conditions hold.

A missing attribute fails a positive condition and passes a negated one. Every
decision comes with a readable reason; the job writes it to the ledger and the audit log.

The pre-flight (:func:`preflight`) reads every instance of a selected series and
refuses, with a plain reason: non-image objects, unreadable or truncated instances,
unsupported transfer syntaxes, too few slices, the loader's geometry problems
(:func:`volumes.data.dicom.check_series_geometry`), gantry tilt.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from volumes.data.dicom import check_series_geometry
from volumes.errors import VolumeReadError, VolumesError

__all__ = ["SeriesSummary", "summarize_series", "select", "preflight", "non_image_reason", "SUPPORTED_TRANSFER_SYNTAXES"]

SUPPORTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
"""What GDCM (through SimpleITK, :func:`volumes.data.io.load_volume`) decodes; video and
HTJ2K syntaxes are refused by the pre-flight rather than failing inside the loader."""

_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_MAX_TILT_DEG = 0.5       # slice normal vs. the line through the slice positions


@dataclass
class SeriesSummary:
    """One received series: its folder, instance files and the header of its first instance."""

    folder: Path
    files: list[Path]
    series_uid: str
    sop_instance_uids: list[str]
    header: Any
    attributes: dict[str, Any] = field(default_factory=dict)


def _orientation(header: Any) -> str | None:
    iop = getattr(header, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None
    normal = np.cross(np.array([float(v) for v in iop[:3]]), np.array([float(v) for v in iop[3:]]))
    axis = int(np.argmax(np.abs(normal)))
    # more than ~25 degrees off the main axis counts as oblique
    if abs(normal[axis]) < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def summarize_series(folder: str | Path) -> SeriesSummary:
    """Read the headers of a received series folder (one series, ``<sop uid>.dcm`` files)."""
    import pydicom

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise VolumesError(f"{folder}: no instances")
    uids, first = [], None
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
            uids.append(str(ds.SOPInstanceUID))
        except Exception:
            uids.append(path.stem)  # unreadable: the pre-flight says why
    for path in files:
        try:
            first = pydicom.dcmread(path, stop_before_pixels=True)
            break
        except Exception:
            continue
    series_uid = str(getattr(first, "SeriesInstanceUID", "") or folder.name)
    attributes = {"Orientation": _orientation(first) if first is not None else None, "NumberOfInstances": len(files)}
    return SeriesSummary(folder=folder, files=files, series_uid=series_uid, sop_instance_uids=uids,
                         header=first, attributes=attributes)


def non_image_reason(summary: SeriesSummary) -> str | None:
    """Why a series is not an image series (SR, PDF, presentation states...), or None."""
    header = summary.header
    if header is None:
        return f"{summary.folder.name}: no readable instance"
    if "Rows" not in header or "ImagePositionPatient" not in header:
        sop = getattr(header, "SOPClassUID", None)
        return f"non-image object ({getattr(sop, 'name', str(sop))}, Modality {header.get('Modality', '?')})"
    return None


# ---------------------------------------------------------------------- selection
def _values(summary: SeriesSummary, keyword: str) -> list[Any] | None:
    if keyword in summary.attributes:
        value = summary.attributes[keyword]
    else:
        if summary.header is None or keyword not in summary.header:
            return None
        value = summary.header.get(keyword)
        value = getattr(value, "value", value)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _number(text: str) -> float:
    return float(text.strip())


def _matches(condition: Any, values: list[Any]) -> bool:
    """One positive condition against an attribute's values (non-empty)."""
    if isinstance(condition, Mapping):
        low, high = condition.get("min", -math.inf), condition.get("max", math.inf)
        return any(_in_range(v, float(low), float(high), True, True) for v in values)
    if isinstance(condition, bool):
        return any(str(v).lower() == str(condition).lower() for v in values)
    if isinstance(condition, (int, float)):
        return any(_as_float(v) == float(condition) for v in values)
    text = str(condition)
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        pattern = re.compile(text[1:-1], re.IGNORECASE)
        return any(pattern.search(str(v)) for v in values)
    for op in ("<=", ">=", "<", ">"):
        if text.startswith(op):
            bound = _number(text[len(op):])
            low, high = (bound, math.inf) if op[0] == ">" else (-math.inf, bound)
            return any(_in_range(v, low, high, op != ">", op != "<") for v in values)
    if ".." in text:
        low, high = (_number(part) for part in text.split("..", 1))
        return any(_in_range(v, low, high, True, True) for v in values)
    return any(str(v).strip().lower() == text.strip().lower() for v in values)


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _in_range(value: Any, low: float, high: float, closed_low: bool, closed_high: bool) -> bool:
    number = _as_float(value)
    if number is None:
        return False
    return (number >= low if closed_low else number > low) and (number <= high if closed_high else number < high)


def _check_rule(rule: Mapping[str, Any], summary: SeriesSummary) -> str | None:
    """None when every condition of ``rule`` holds, else the first failing one, in words."""
    for keyword, conditions in rule.items():
        for condition in conditions if isinstance(conditions, list) else [conditions]:
            negate = isinstance(condition, str) and condition.startswith("!")
            positive = condition[1:] if negate else condition
            values = _values(summary, keyword)
            shown = values if values is None or len(values) > 1 else values[0]
            if values is None:
                if not negate:
                    return f"{keyword} is missing (rule needs {condition!r})"
                continue
            if _matches(positive, values) == negate:
                return f"{keyword}={shown!r} {'matches excluded' if negate else 'does not match'} {positive!r}"
    return None


def select(rules: Mapping[str, Any], bundle_id: str, summary: SeriesSummary) -> tuple[bool, str]:
    """Does ``bundle_id`` run on this series? ``(selected, reason)``; no rules select everything."""
    by_bundle = rules.get("bundles") or {}
    if not isinstance(by_bundle, Mapping):
        raise VolumesError(f"rules: 'bundles' must map bundle ids to lists of rules, got {type(by_bundle).__name__}")
    chosen = by_bundle.get(bundle_id, by_bundle.get("*"))
    if chosen is None:
        return (True, "no rule for this bundle") if not by_bundle else (False, f"no rule selects bundle {bundle_id}")
    chosen = [chosen] if isinstance(chosen, Mapping) else list(chosen)
    failures = []
    for index, rule in enumerate(chosen, start=1):
        if not isinstance(rule, Mapping):
            raise VolumesError(f"rules: bundles.{bundle_id}[{index - 1}] must be a mapping of keyword: condition")
        problem = _check_rule(rule, summary)
        if problem is None:
            return True, f"rule {index} matches"
        failures.append(f"rule {index}: {problem}")
    return False, "; ".join(failures)


# ---------------------------------------------------------------------- pre-flight
def _expected_pixel_bytes(ds: Any) -> int:
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8 * int(getattr(ds, "SamplesPerPixel", 1)) * frames


def preflight(summary: SeriesSummary, *, min_slices: int = 3) -> str | None:
    """None when the series can be run; else a plain reason (the first problem found)."""
    import pydicom

    header = summary.header
    if header is None:
        return f"{summary.folder}: no readable instance"
    headers = []
    for path in summary.files:
        try:
            # a full read: a truncated instance fails here or has short pixel data
            ds = pydicom.dcmread(path)
        except Exception as exc:
            return f"{path.name}: unreadable or truncated instance ({type(exc).__name__}: {str(exc)[:120]})"
        syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
        absent = [k for k in ("PixelData", "ImagePositionPatient", "ImageOrientationPatient") if k not in ds]
        if absent:
            sop = getattr(ds, "SOPClassUID", None)
            if sop is not None and str(sop) != str(getattr(header, "SOPClassUID", "")):
                return f"{path.name}: non-image object ({getattr(sop, 'name', str(sop))}) in an image series"
            # pydicom stops quietly where a file ends: what is missing says it was cut short
            return f"{path.name}: unreadable or truncated instance (no {', '.join(absent)})"
        if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
            name = getattr(pydicom.uid.UID(syntax), "name", syntax)
            return f"{path.name}: unsupported transfer syntax {syntax} ({name})"
        if syntax in _NATIVE:
            have, need = len(ds.PixelData), _expected_pixel_bytes(ds)
            if have < need:
                return f"{path.name}: truncated instance (pixel data {have} of {need} bytes)"
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            return f"{path.name}: multi-frame images are not supported (NumberOfFrames={ds.NumberOfFrames})"
        headers.append((path, ds))
    try:  # the geometry a volume needs: the loader's own check (volumes.data.dicom), reported, not raised
        order = check_series_geometry(summary.folder, headers, min_slices=min_slices)
    except VolumeReadError as exc:
        return exc.problem
    tilt = max(abs(float(getattr(ds, "GantryDetectorTilt", 0) or 0)) for _, ds in headers)
    if tilt > 0.01:
        return f"gantry tilt of {tilt:g} degrees"
    # a sheared stack (positions drifting sideways) is what a tilted gantry writes without the tag: the gaps
    # along the normal stay regular, so the geometry check cannot see it
    cosines = np.array([float(v) for v in headers[0][1].ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    positions = np.array([[float(v) for v in headers[i][1].ImagePositionPatient] for i in order])
    line = positions[-1] - positions[0]
    angle = math.degrees(math.acos(min(1.0, abs(float(line @ normal)) / float(np.linalg.norm(line)))))
    if angle > _MAX_TILT_DEG:
        return f"gantry tilt: slice positions are sheared by {angle:.2f} degrees from the slice normal"
    return None


def min_slices(rules: Mapping[str, Any]) -> int:
    """The ``min_slices`` of a rules mapping (default 3)."""
    try:
        return int(rules.get("min_slices", 3))
    except (TypeError, ValueError):
        raise VolumesError(f"rules: min_slices={rules.get('min_slices')!r} must be an integer") from None
