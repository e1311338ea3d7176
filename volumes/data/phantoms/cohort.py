"""Writing phantoms: one case as NIfTI and/or DICOM, a cohort with its MONAI datalist and tables."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volumes.atomic import atomic_path, atomic_write_bytes
from volumes.data.phantoms.config import CLASS_NAMES, ORGANS, Phantom, PhantomConfig
from volumes.data.phantoms.rendering import _image_int16, generate_phantom
from volumes.errors import ConfigError


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI atomically, qform and sform both "scanner anatomical" (code 1), units mm."""
    import nibabel as nib

    from volumes.data.io import save_nifti  # torch and MONAI: imported only when a case is written

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:  # save_nifti picks the format from the name's suffix
        save_nifti(img, tmp)


def _dicom_uids(case_id: str, seed: int) -> tuple[str, str]:
    """Stable study/series UIDs, so a rewritten case is the same DICOM series."""
    from volumes._optional import require

    pydicom_uid = require("pydicom.uid", "writing phantoms as DICOM")
    study = pydicom_uid.generate_uid(entropy_srcs=["volumes-phantom-study", case_id, str(seed)])
    series = pydicom_uid.generate_uid(entropy_srcs=["volumes-phantom-series", case_id, str(seed)])
    return study, series


def write_case(phantom: Phantom, out_dir: str | Path, case_id: str, *, fmt: str = "nifti") -> dict[str, Any]:
    """Write one phantom under ``out_dir``.

    ``fmt="nifti"``: ``images/<id>.nii.gz`` (int16 HU) and ``labels/<id>.nii.gz``
    (uint8). ``fmt="dicom"``: a CT series in ``dicom/<id>/`` (via
    :func:`volumes.data.dicom.write_dicom_series`) plus the label NIfTI on the
    same grid. ``fmt="both"``: all three. Files appear atomically.

    Returns:
        ``{"case_id", "image", "label", "class_label"}`` with paths relative to
        ``out_dir`` (``image`` is the DICOM folder for ``fmt="dicom"``), plus
        ``"dicom"`` when a series was written.
    """
    if fmt not in ("nifti", "dicom", "both"):
        raise ConfigError("fmt", fmt, ("nifti", "dicom", "both"))
    out = Path(out_dir)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"case_id": case_id, "class_label": int(phantom.class_label)}
    hu = _image_int16(phantom.image)
    if fmt in ("nifti", "both"):
        (out / "images").mkdir(parents=True, exist_ok=True)
        _save_nifti(hu, phantom.affine, out / "images" / f"{case_id}.nii.gz")
        entry["image"] = f"images/{case_id}.nii.gz"
    _save_nifti(np.ascontiguousarray(phantom.label, dtype=np.uint8), phantom.affine, out / "labels" / f"{case_id}.nii.gz")
    entry["label"] = f"labels/{case_id}.nii.gz"
    if fmt in ("dicom", "both"):
        from volumes.data.dicom import write_dicom_series

        final = out / "dicom" / case_id
        tmp = out / "dicom" / f".{case_id}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        study, series = _dicom_uids(case_id, int(phantom.info.get("seed", 0)))
        try:
            write_dicom_series(
                hu, phantom.affine, tmp,
                series_description=f"volumes phantom {case_id} ({phantom.info.get('task', '')})",
                patient_id=case_id, study_uid=study, series_uid=series, modality="CT",
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        entry["dicom"] = f"dicom/{case_id}"
        if fmt == "dicom":
            entry["image"] = entry["dicom"]
    return {k: entry[k] for k in ("case_id", "image", "label", "class_label", "dicom") if k in entry}


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a cohort: depends on (seed, index) only."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def _stratified_splits(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[int]:
    """Split index (0, 1, 2, ...) per case, keeping the class mix in every split."""
    total = float(sum(fractions))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B117]))
    out = [0] * len(labels)
    for cls in sorted(set(labels)):
        members = [i for i, c in enumerate(labels) if c == cls]
        rng.shuffle(members)
        # Rounded cumulative boundaries: counts add up exactly and small
        # classes spread over the splits instead of piling into the first.
        bounds = [0] + [int(round(len(members) * c / total)) for c in np.cumsum(fractions)]
        for split in range(len(fractions)):
            for i in members[bounds[split]:bounds[split + 1]]:
                out[i] = split
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda stream: stream.write(text.encode("utf-8")))


SPLIT_NAMES = ("training", "validation", "test")


def write_cohort(out_dir: str | Path, n: int, seed: int, config: PhantomConfig | None = None, *,
                 splits: Sequence[float] = (0.6, 0.2, 0.2), dicom_cases: int = 0, name: str | None = None,
                 progress: bool | None = None) -> Path:
    """Generate and write ``n`` phantoms plus a MONAI datalist.

    Layout under ``out_dir``: ``images/``, ``labels/``, ``dicom/<id>/`` (for
    ``dicom_cases`` cases, test split first, written in addition to NIfTI),
    ``datalist.json`` (MONAI decathlon style: ``training`` / ``validation`` /
    ``test`` lists of ``{"image", "label", "class_label", "case_id"}`` with
    paths relative to ``out_dir``, plus a ``dicom`` list of the DICOM copies),
    ``cohort.csv`` (one row per case) and ``cases.json`` (each case's info).

    Case ``i`` uses :func:`case_seed` ``(seed, i)``, so it is the same case
    whatever ``n`` is; splits are stratified by class and depend on ``n``.

    Returns:
        Path of ``datalist.json``.
    """
    config = config or PhantomConfig()
    if n < 1:
        raise ConfigError("n", n, "a positive number of cases")
    if len(splits) != 3 or min(splits) < 0 or sum(splits) <= 0:
        raise ConfigError("splits", tuple(splits), "three non-negative fractions (training, validation, test)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or f"volumes-phantoms-{config.task}"
    show = sys.stderr.isatty() if progress is None else progress

    from tqdm.auto import tqdm

    phantom_infos: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    for index in tqdm(range(n), desc=f"phantoms ({config.task})", disable=not show, unit="case"):
        case_id = f"case_{index:04d}"
        phantom = generate_phantom(case_seed(seed, index), config)
        entries.append(write_case(phantom, out, case_id, fmt="nifti"))
        phantom_infos.append(phantom.info)
        del phantom

    split_of = _stratified_splits([e["class_label"] for e in entries], splits, seed)
    ordered = sorted(range(n), key=lambda i: (-split_of[i], i))  # test split first for DICOM copies
    dicom_ids = set()
    for i in ordered[: max(0, min(int(dicom_cases), n))]:
        # Regenerating is cheaper than keeping every phantom in memory.
        phantom = generate_phantom(case_seed(seed, i), config)
        entries[i] = write_case(phantom, out, entries[i]["case_id"], fmt="both")
        dicom_ids.add(i)

    class_names = CLASS_NAMES[config.task]
    datalist: dict[str, Any] = {
        "name": name,
        "description": f"Synthetic abdominal CT phantoms (volumes.data.phantoms), task '{config.task}'",
        "modality": {"0": "CT"},
        "labels": {str(v): k for k, v in ORGANS.items()},
        "task": config.task,
        "class_names": {"0": class_names[0], "1": class_names[1]},
        "seed": int(seed),
        "numCases": n,
        "config": config.to_dict(),
    }
    for split, split_name in enumerate(SPLIT_NAMES):
        datalist[split_name] = [
            {"image": entries[i]["image"], "label": entries[i]["label"], "class_label": entries[i]["class_label"],
             "case_id": entries[i]["case_id"]}
            for i in range(n) if split_of[i] == split
        ]
    datalist["dicom"] = [
        {"image": entries[i]["dicom"], "label": entries[i]["label"], "class_label": entries[i]["class_label"],
         "case_id": entries[i]["case_id"], "split": SPLIT_NAMES[split_of[i]]}
        for i in sorted(dicom_ids)
    ]
    datalist_path = out / "datalist.json"
    _atomic_write_text(datalist_path, json.dumps(datalist, indent=2) + "\n")
    _atomic_write_text(out / "cases.json", json.dumps(
        {entries[i]["case_id"]: phantom_infos[i] for i in range(n)}, indent=1) + "\n")

    fields = ["case_id", "image", "label", "class_label", "class_name", "split", "seed", "spleen_ml", "liver_ml",
              "spacing_x", "spacing_y", "spacing_z", "nx", "ny", "nz", "lesion_diameter_mm", "dicom"]
    rows = []
    for i in range(n):
        info = phantom_infos[i]
        lesion = info.get("lesion") or {}
        rows.append({
            "case_id": entries[i]["case_id"], "image": entries[i]["image"], "label": entries[i]["label"],
            "class_label": entries[i]["class_label"], "class_name": info["class_name"],
            "split": SPLIT_NAMES[split_of[i]], "seed": info["seed"],
            "spleen_ml": f"{info['spleen_ml']:.1f}", "liver_ml": f"{info['organ_ml']['liver']:.1f}",
            "spacing_x": f"{info['spacing_mm'][0]:.4f}", "spacing_y": f"{info['spacing_mm'][1]:.4f}",
            "spacing_z": f"{info['spacing_mm'][2]:.4f}",
            "nx": info["shape"][0], "ny": info["shape"][1], "nz": info["shape"][2],
            "lesion_diameter_mm": f"{lesion['diameter_mm']:.1f}" if lesion else "",
            "dicom": entries[i].get("dicom", ""),
        })
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_text(out / "cohort.csv", table.getvalue())
    return datalist_path


def cohort_summary(datalist_path: Path) -> str:
    """One paragraph on a cohort written by :func:`write_cohort`: classes, splits, geometry, files."""
    datalist = json.loads(datalist_path.read_text())
    out = datalist_path.parent
    cases = json.loads((out / "cases.json").read_text())
    parts = []
    for split in SPLIT_NAMES:
        items = datalist[split]
        parts.append(f"{split} {len(items)} ({sum(e['class_label'] for e in items)} positive)")
    spacing = np.array([c["spacing_mm"] for c in cases.values()])
    shapes = np.array([c["shape"] for c in cases.values()])
    n_pos = sum(c["class_label"] for c in cases.values())
    text = (
        f"Wrote {len(cases)} synthetic CT phantoms for task '{datalist['task']}' "
        f"({n_pos} {datalist['class_names']['1']}, {len(cases) - n_pos} {datalist['class_names']['0']}) to {out}: "
        f"{', '.join(parts)}. In-plane spacing {spacing[:, 0].min():.2f}-{spacing[:, 0].max():.2f} mm, "
        f"slice spacing {spacing[:, 2].min():.2f}-{spacing[:, 2].max():.2f} mm, "
        f"matrix {shapes[:, 0].min()}-{shapes[:, 0].max()}, {shapes[:, 2].min()}-{shapes[:, 2].max()} slices."
    )
    if datalist.get("dicom"):
        text += f" {len(datalist['dicom'])} case(s) also written as DICOM series under {out / 'dicom'}."
    text += f" Datalist (MONAI decathlon format): {datalist_path}; per-case table: {out / 'cohort.csv'}."
    return text
