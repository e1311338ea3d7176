"""Find the cases to process: from a folder, a MONAI datalist JSON or a CSV.

A case is one image (a volume file or one DICOM series) with an optional label
map and free-form extras (a class label, a fold, the DICOM series UID). Case ids
are stable, filesystem-safe and unique, so writers can name outputs by them.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from volumes.data.formats import VOLUME_SUFFIXES, volume_suffix
from volumes.errors import ConfigError, VolumeReadError

__all__ = ["Case", "DATALIST_SECTIONS", "VOLUME_SUFFIXES", "cases_to_datalist", "discover_cases", "volume_suffix"]

DATALIST_SECTIONS = ("training", "validation", "test")

# Files that are never a DICOM slice, so a folder scan does not open them.
_NOT_DICOM_SUFFIXES = {
    ".raw", ".zraw", ".img", ".hdr", ".json", ".csv", ".tsv", ".txt", ".md", ".yaml", ".yml", ".py",
    ".npz", ".npy", ".pt", ".pth", ".ckpt", ".safetensors", ".png", ".jpg", ".jpeg", ".gz", ".zip", ".pdf",
}


@dataclass(frozen=True)
class Case:
    """One image to process.

    Attributes:
        case_id: unique, filesystem-safe name (outputs are named by it).
        image: a volume file, or a DICOM series folder.
        label: a label-map file, or None.
        extra: other fields, e.g. ``{"label_class": 1}`` from a datalist/CSV, or
            ``{"series_uid": ...}`` for a DICOM series (pass it to
            ``load_volume(image, series_uid=...)``).
    """

    case_id: str
    image: Path
    label: Path | None = None
    extra: dict = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """A MONAI-style data dict: ``{"case_id", "image", "label"?, **extra}`` with str paths."""
        item: dict[str, Any] = {"case_id": self.case_id, "image": str(self.image)}
        if self.label is not None:
            item["label"] = str(self.label)
        item.update(self.extra)
        return item


def cases_to_datalist(cases: Iterable[Case]) -> list[dict[str, Any]]:
    """Data dicts for ``monai.data.Dataset`` (use with ``volumes.data.io.LoadVolumed``)."""
    return [case.to_dict() for case in cases]


def discover_cases(
    source: str | Path,
    *,
    section: str | Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[Case]:
    """List the cases under ``source``.

    Args:
        source: one of
            - a folder: volume files (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``,
              ``.mha``, ``.mhd``) and DICOM series folders at any depth; a folder
              holding several series gives one case per series (``image`` = the
              folder, ``extra["series_uid"]`` picks the series). Sorted by case id.
            - a MONAI datalist ``.json`` (``{"training": [{"image": ..., "label":
              ...}], "validation": [...], "test": [...]}``); relative paths are
              resolved against the JSON's folder; file order is kept and
              ``extra["section"]`` records the section.
            - a ``.csv`` with an ``image`` column and optional ``case_id``, ``label``
              and any other columns (into ``extra``, numbers parsed); file order kept.
            - a single volume file.
        section: datalist section(s) to read; default all present.
        exclude: folder scans skip files/folders whose path relative to
            ``source`` matches one of these glob patterns (e.g. ``"*_seg*"``).

    Raises:
        VolumeReadError: missing source/listed file, empty folder, CSV without
        an ``image`` column, malformed datalist.
        ConfigError: unknown datalist section.
    """
    source = Path(source)
    if not source.exists():
        raise VolumeReadError(source, "does not exist")
    if source.is_dir():
        return _scan_folder(source, exclude)
    name = source.name.lower()
    if name.endswith(".json"):
        return _read_datalist(source, section)
    if name.endswith(".csv"):
        return _read_csv(source)
    if volume_suffix(source):
        return [Case(case_id=_safe_id(_stem(source)), image=source)]
    raise VolumeReadError(
        source, f"is not a folder, a datalist .json, a .csv or a volume file ({', '.join(VOLUME_SUFFIXES)})"
    )


# ----------------------------------------------------------------- ids


def _stem(path: Path) -> str:
    """File name without its volume suffix; a folder's own name."""
    suffix = volume_suffix(path)
    return path.name[: -len(suffix)] if suffix and not path.is_dir() else path.name


def _safe_id(text: str) -> str:
    """Letters, digits, ``.``, ``_``, ``-`` only; never empty or hidden."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return safe or "case"


@dataclass
class _Entry:
    """A case before its id is final."""

    image: Path
    label: Path | None = None
    extra: dict = field(default_factory=dict)
    case_id: str | None = None  # given explicitly (CSV/datalist)
    name: str = ""  # derived base name


def _assign_ids(entries: list[_Entry], origin: Path) -> list[Case]:
    """Derive unique ids: base name, then parent folder names prepended on collisions."""
    explicit = [e.case_id for e in entries if e.case_id is not None]
    duplicates = sorted({i for i in explicit if explicit.count(i) > 1})
    if duplicates:
        raise VolumeReadError(origin, f"case_id values are not unique: {', '.join(duplicates)}")
    taken = set(explicit)
    derived = [e for e in entries if e.case_id is None]
    ids = {id(e): _safe_id(e.name or _stem(e.image)) for e in derived}
    parents = {id(e): list(e.image.parent.parts[::-1]) for e in derived}
    for _ in range(64):  # each round prepends one more parent folder name to clashing ids
        counts: dict[str, int] = {}
        for e in derived:
            counts[ids[id(e)]] = counts.get(ids[id(e)], 0) + 1
        clashing = [e for e in derived if counts[ids[id(e)]] > 1 or ids[id(e)] in taken]
        if not clashing:
            break
        grew = False
        for e in clashing:
            if parents[id(e)]:
                ids[id(e)] = _safe_id(f"{parents[id(e)].pop(0)}_{ids[id(e)]}")
                grew = True
        if not grew:
            break
    used = set(taken)
    cases = []
    for e in entries:
        case_id = e.case_id if e.case_id is not None else ids[id(e)]
        if e.case_id is None and case_id in used:  # same path listed twice: number it
            n = 2
            while f"{case_id}_{n}" in used:
                n += 1
            case_id = f"{case_id}_{n}"
        used.add(case_id)
        cases.append(Case(case_id=case_id, image=e.image, label=e.label, extra=e.extra))
    return cases


# ----------------------------------------------------------------- folders


def _scan_folder(root: Path, exclude: Sequence[str]) -> list[Case]:
    from volumes.data.dicom import is_dicom_file, series_info

    entries: list[_Entry] = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and not _excluded(here / d, root, exclude))
        has_dicom = False
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or _excluded(path, root, exclude):
                continue
            if volume_suffix(path):
                entries.append(_Entry(image=path))
            elif not has_dicom and Path(name).suffix.lower() not in _NOT_DICOM_SUFFIXES:
                has_dicom = is_dicom_file(path)
        if has_dicom:
            try:
                infos = series_info(here)
            except VolumeReadError:
                # a damaged series is still a case: loading it reports the problem, and a
                # batch records that case as failed instead of refusing the whole folder
                entries.append(_Entry(image=here, name=here.name))
            else:
                entries.extend(_series_entries(here, infos))
    if not entries:
        raise VolumeReadError(
            root, f"holds no volumes (looked for {', '.join(VOLUME_SUFFIXES)} files and DICOM series at any depth)"
        )
    return sorted(_assign_ids(entries, root), key=lambda case: case.case_id)


def _excluded(path: Path, root: Path, patterns: Sequence[str]) -> bool:
    relative = path.relative_to(root).as_posix()
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(path.name, p) for p in patterns)


def _series_entries(folder: Path, infos: list) -> list[_Entry]:
    """One entry per series; split series are named by SeriesNumber, or by UID when numbers clash."""
    if len(infos) == 1:
        return [_Entry(image=folder, extra={"series_uid": infos[0].uid}, name=folder.name)]
    numbers = [info.number for info in infos]
    by_number = None not in numbers and len(set(numbers)) == len(numbers)
    entries = []
    for info in infos:
        tag = f"series{info.number}" if by_number else (info.uid.rsplit(".", 1)[-1][-12:] or "nouid")
        entries.append(_Entry(image=folder, extra={"series_uid": info.uid}, name=f"{folder.name}_{tag}"))
    return entries


# ----------------------------------------------------------------- datalist JSON


def _read_datalist(path: Path, section: str | Sequence[str] | None) -> list[Case]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VolumeReadError(path, f"is not a readable JSON datalist ({exc})") from exc
    if not isinstance(content, dict):
        raise VolumeReadError(path, "is not a MONAI datalist (expected an object with 'training'/'validation'/'test' lists)")
    present = [name for name in content if isinstance(content[name], list)]
    wanted = list(present) if section is None else [section] if isinstance(section, str) else list(section)
    for name in wanted:
        if name not in present:
            raise ConfigError("section", name, present)
    if not wanted:
        raise VolumeReadError(path, "holds no datalist sections (expected 'training', 'validation' or 'test' lists)")
    entries = []
    for name in wanted:
        for index, item in enumerate(content[name]):
            entries.append(_datalist_entry(path, f"{name}[{index}]", item, name))
    if not entries:
        raise VolumeReadError(path, f"lists no cases in section(s) {', '.join(wanted)}")
    return _assign_ids(entries, path)


def _datalist_entry(path: Path, where: str, item: Any, section: str) -> _Entry:
    if isinstance(item, str):  # MONAI allows "test": ["a.nii.gz", ...]
        item = {"image": item}
    if not isinstance(item, dict) or "image" not in item:
        raise VolumeReadError(path, f"{where} has no 'image' entry")
    if not isinstance(item["image"], str):
        raise VolumeReadError(path, f"{where}: 'image' must be one path (multi-image lists are not supported)")
    base = path.parent
    image = _resolve(base, item["image"], path, where)
    label = _resolve(base, item["label"], path, where) if isinstance(item.get("label"), str) else None
    extra = {k: v for k, v in item.items() if k not in ("image", "label", "case_id")}
    if "label" in item and not isinstance(item["label"], str):
        extra["label"] = item["label"]  # a class index stored under "label" stays available
    extra["section"] = section
    case_id = _safe_id(str(item["case_id"])) if item.get("case_id") not in (None, "") else None
    return _Entry(image=image, label=label, extra=extra, case_id=case_id)


def _resolve(base: Path, value: str, listing: Path, where: str) -> Path:
    path = Path(value).expanduser()
    # normpath tidies "lists/../imgs" without resolving symlinks the user chose.
    path = Path(os.path.normpath(path if path.is_absolute() else base / path))
    if not path.exists():
        raise VolumeReadError(path, f"listed in {listing} ({where}) does not exist")
    return path


# ----------------------------------------------------------------- CSV


def _read_csv(path: Path) -> list[Case]:
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise VolumeReadError(path, f"is not a readable CSV file ({exc})") from exc
    if "image" not in columns:
        raise VolumeReadError(path, f"has no 'image' column (columns: {', '.join(columns) or 'none'})")
    if not rows:
        raise VolumeReadError(path, "lists no cases")
    entries = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"line {number}"
        if not row.get("image"):
            raise VolumeReadError(path, f"{where} has an empty image")
        image = _resolve(path.parent, row["image"], path, where)
        label = _resolve(path.parent, row["label"], path, where) if row.get("label") else None
        extra = {k: _parse_value(v) for k, v in row.items() if k not in ("image", "label", "case_id") and k and v != ""}
        case_id = _safe_id(row["case_id"]) if row.get("case_id") else None
        entries.append(_Entry(image=image, label=label, extra=extra, case_id=case_id))
    return _assign_ids(entries, path)


def _parse_value(text: str) -> Any:
    """CSV cell -> int, float or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
