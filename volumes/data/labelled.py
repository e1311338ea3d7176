"""Your own labelled scans in: checked cases, k folds by patient, one MONAI datalist.

Two layouts are read:

* **Medical Segmentation Decathlon / nnU-Net raw**: a folder with ``dataset.json``,
  ``imagesTr/`` and ``labelsTr/``. The labels and the modality come from
  ``dataset.json`` (MSD's ``"labels": {"0": "background", ...}`` and ``"modality"``, or
  nnU-Net v2's ``"labels": {"background": 0, ...}`` and ``"channel_names"``). One case is
  one patient unless ``patient`` (a regular expression with one group, applied to the
  case id) says otherwise.
* **Pairs matched by a template**, e.g. ``sts_sarcoma/``:
  ``images="{patient}/{modality}.nii.gz"``, ``labels="{patient}/{modality}_gtv.nii.gz"``.
  ``{patient}`` names the patient (required), ``{modality}`` the series (optional);
  ``{case}`` is any other part of the name. Label names come from ``label_names`` or a
  ``labels.json`` in the folder; otherwise the masks are taken as binary
  (``background``, ``foreground``).

Every case is checked before anything trains, and a bad one is reported, never dropped:
a 4D image, a mask on another grid than its image, an empty mask, a mask value missing
from the label list, an image without a mask (or a mask without an image), an unknown
modality. All problems are raised together in one :class:`LabelledDataError`, each line
naming the case and its file.

:func:`prepare_datalist` writes the checked cases with their fold (patients dealt to
``k`` folds, balanced by which modalities they have) to one JSON file, and reuses that
file while the data and the settings are unchanged, so every run of every method sees the
same folds. :func:`fold_items` gives a fold's training, validation (patients held out of
the training folds, for checkpoint selection) and test sections.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from volumes.atomic import atomic_path
from volumes.errors import ConfigError, VolumesError

__all__ = [
    "MODALITIES",
    "LabelledCase",
    "LabelledDataError",
    "modality_of",
    "find_labelled_cases",
    "check_cases",
    "assign_folds",
    "prepare_datalist",
    "read_datalist",
    "fold_items",
]

#: The modalities the preprocessing knows (CT windows for CT, percentile normalisation for MR).
MODALITIES = ("CT", "MR")

# series or channel names read as MR: MSD's "MRI", "T1", "T2", "FLAIR", "ADC", ...; STS's "mr_t1"
_MR_NAMES = re.compile(r"^(mr|mri|t1|t2|t1w|t2w|t1gd|t1c|flair|dwi|adc|pd|dixon)([^a-z].*)?$", re.IGNORECASE)
_CT_NAMES = re.compile(r"^(ct|cect|ncct|cta)([^a-z].*)?$", re.IGNORECASE)
_VOLUME_NAME = re.compile(r"\.(nii\.gz|nii|nrrd|mha|mhd)$", re.IGNORECASE)
DATALIST_FORMAT = 1


class LabelledDataError(VolumesError, ValueError):
    """Labelled data that cannot be trained on; ``problems`` holds one line per bad case."""

    def __init__(self, source: str | Path, problems: Sequence[str]):
        self.source = str(source)
        self.problems = list(problems)
        listed = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.source}: {len(self.problems)} problem(s) in the labelled data:\n{listed}")


@dataclass(frozen=True)
class LabelledCase:
    """One image with its mask. ``case_id`` is unique; a patient may have several cases."""

    case_id: str
    patient: str
    image: Path
    label: Path
    modality: str

    def to_dict(self) -> dict[str, Any]:
        item = asdict(self)
        item["image"], item["label"] = str(self.image), str(self.label)
        return item


def modality_of(name: str, mapping: Mapping[str, str] | None = None) -> str:
    """``"CT"`` or ``"MR"`` for a series or channel name (``mapping`` first, then the usual names).

    Raises ConfigError for a name that is neither (PET, US, ...): its preprocessing is unknown.
    """
    text = str(name).strip()
    if mapping:
        lowered = {str(k).lower(): v for k, v in mapping.items()}
        if text.lower() in lowered:
            text = str(lowered[text.lower()])
    if text.upper() in MODALITIES:
        return text.upper()
    if _CT_NAMES.match(text):
        return "CT"
    if _MR_NAMES.match(text):
        return "MR"
    raise ConfigError("modality", name, f"a CT or MR series name, or a mapping to {list(MODALITIES)}")


# ----------------------------------------------------------------- finding cases


def find_labelled_cases(
    root: str | Path,
    *,
    images: str | None = None,
    labels: str | None = None,
    modality: str | Mapping[str, str] | None = None,
    patient: str | None = None,
    label_names: Mapping[int, str] | None = None,
) -> tuple[list[LabelledCase], dict[int, str]]:
    """The cases under ``root`` and the label names ``{value: name}`` (0 = background).

    Args:
        root: an MSD / nnU-Net raw folder (``dataset.json``), or any folder with ``images``
            and ``labels`` templates.
        images, labels: templates relative to ``root`` (see the module docstring).
        modality: one modality for every case (``"CT"``), or a mapping from the
            ``{modality}`` field (or the MSD channel name) to ``CT``/``MR``.
        patient: MSD layout only: a regular expression whose first group is the patient
            in the case id (default: every case is its own patient).
        label_names: overrides the label names found in the data.

    Raises:
        LabelledDataError: images without masks (or the reverse), unknown modalities,
            nothing found.
    """
    root = Path(root)
    if not root.is_dir():
        raise LabelledDataError(root, ["is not a folder"])
    fixed = modality if isinstance(modality, str) else None
    mapping = modality if isinstance(modality, Mapping) else None
    if images is None and labels is None and (root / "dataset.json").is_file():
        cases, names = _read_msd(root, fixed, mapping, patient)
    elif images is None or labels is None:
        raise LabelledDataError(root, [
            "has no dataset.json (MSD / nnU-Net raw layout); give both an image and a label template, "
            "e.g. images='{patient}/{modality}.nii.gz' labels='{patient}/{modality}_gtv.nii.gz'"])
    else:
        cases = _match_templates(root, images, labels, fixed, mapping)
        names = _labels_json(root)
    if label_names:
        names = {int(k): str(v) for k, v in label_names.items()}
    names.setdefault(0, "background")
    if not cases:
        raise LabelledDataError(root, ["no labelled cases found"])
    return sorted(cases, key=lambda c: c.case_id), dict(sorted(names.items()))


def _template_regex(template: str) -> tuple[re.Pattern, str]:
    fields = re.findall(r"{(\w+)}", template)
    unknown = sorted(set(fields) - {"patient", "modality", "case"})
    if unknown:
        raise ConfigError("template field", unknown[0], ["patient", "modality", "case"])
    if "patient" not in fields:
        raise ConfigError("template", template, "a template with a {patient} field")
    pattern, glob, seen = "", "", set()
    for part in re.split(r"({\w+})", template):
        match = re.fullmatch(r"{(\w+)}", part)
        if match:
            name = match.group(1)
            pattern += f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)"
            seen.add(name)
            glob += "*"
        else:
            pattern += re.escape(part)
            glob += part
    return re.compile(pattern + "$"), glob


def _match_templates(root: Path, images: str, labels: str, fixed: str | None,
                     mapping: Mapping[str, str] | None) -> list[LabelledCase]:
    image_re, image_glob = _template_regex(images)
    label_re, label_glob = _template_regex(labels)
    if set(image_re.groupindex) != set(label_re.groupindex):
        raise ConfigError("labels template", labels, f"the same fields as the image template {images!r}")
    problems, cases, used_labels = [], [], set()
    for path in sorted(root.glob(image_glob)):
        rel = path.relative_to(root).as_posix()
        match = image_re.match(rel)
        if match is None or label_re.match(rel):  # the label glob may also match the image one
            continue
        fields = match.groupdict()
        label = root / labels.format(**fields)
        if not label.is_file():
            problems.append(f"{rel}: no mask (expected {label.relative_to(root).as_posix()})")
            continue
        used_labels.add(label.resolve())
        try:
            kind = modality_of(fields["modality"], mapping) if "modality" in fields and fixed is None else (
                modality_of(fixed, None) if fixed else None)
        except ConfigError:
            kind = None
        if kind is None:
            problems.append(f"{rel}: unknown modality{' ' + repr(fields.get('modality')) if 'modality' in fields else ''}"
                            " (give modality='CT' or 'MR', or a mapping from the {modality} field)")
            continue
        case_id = "_".join(fields[k] for k in ("patient", "modality", "case") if k in fields)
        cases.append(LabelledCase(_safe(case_id), fields["patient"], path, label, kind))
    for path in sorted(root.glob(label_glob)):
        rel = path.relative_to(root).as_posix()
        if label_re.match(rel) and path.resolve() not in used_labels:
            problems.append(f"{rel}: a mask without an image (expected {images.format(**label_re.match(rel).groupdict())})")
    if problems:
        raise LabelledDataError(root, problems)
    return cases


def _labels_json(root: Path) -> dict[int, str]:
    """``labels.json`` beside the data: ``{"1": "tumour"}`` or, per mask name, ``{"x_gtv.nii.gz": {"1": ...}}``."""
    path = root / "labels.json"
    if not path.is_file():
        return {1: "foreground"}
    content = json.loads(path.read_text())
    found: dict[int, list[str]] = {}
    for key, value in content.items():
        table = value if isinstance(value, Mapping) else {key: value}  # or one table per mask name
        for v, name in table.items():
            found.setdefault(int(v), []).append(str(name))
    return {v: _common_name(names) for v, names in found.items()}


def _common_name(names: list[str]) -> str:
    """One name for a value the per-mask tables name differently: their shared leading words.

    ``"GTV (sarcoma) on CT"`` and ``"GTV (sarcoma) on MR T1"`` -> ``"GTV (sarcoma)"``.
    """
    words = [n.split() for n in names]
    shared = []
    for column in zip(*words):
        if len(set(column)) > 1:
            break
        shared.append(column[0])
    while shared and shared[-1].lower() in ("on", "in", "of", "for", "-", "at"):
        shared.pop()
    return " ".join(shared) or names[0]


def _read_msd(root: Path, fixed: str | None, mapping: Mapping[str, str] | None,
              patient: str | None) -> tuple[list[LabelledCase], dict[int, str]]:
    spec = json.loads((root / "dataset.json").read_text())
    raw_labels = spec.get("labels") or {"0": "background", "1": "foreground"}
    names: dict[int, str] = {}
    for key, value in raw_labels.items():
        if str(key).lstrip("-").isdigit():  # MSD: {"0": "background"}
            names[int(key)] = str(value)
        elif isinstance(value, int):  # nnU-Net v2: {"background": 0}
            names[value] = str(key)
        else:
            raise LabelledDataError(root / "dataset.json", [f"label {key!r}: {value!r} is not a label value "
                                                            "(region-based nnU-Net labels are not supported)"])
    channels = spec.get("channel_names") or spec.get("modality") or {}
    problems = []
    if len(channels) > 1:
        problems.append(f"dataset.json: {len(channels)} channels {dict(channels)}; one channel per image is supported")
    try:
        kind = modality_of(fixed or next(iter(channels.values()), ""), mapping)
    except ConfigError:
        kind = None
        problems.append(f"dataset.json: unknown modality {dict(channels)} (give modality='CT' or 'MR')")
    ending = spec.get("file_ending", ".nii.gz")
    pairs: list[tuple[str, Path, Path]] = []
    if spec.get("training"):  # MSD lists its pairs
        for entry in spec["training"]:
            image, label = root / entry["image"], root / entry["label"]
            case = _VOLUME_NAME.sub("", image.name)
            pairs.append((case, image, label))
    else:  # nnU-Net v2: imagesTr/{case}_0000{ending} and labelsTr/{case}{ending}
        for image in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
            case = image.name[: -len(f"_0000{ending}")]
            pairs.append((case, image, root / "labelsTr" / f"{case}{ending}"))
    cases = []
    patient_re = re.compile(patient) if patient else None
    for case, image, label in pairs:
        if not image.is_file():
            problems.append(f"{case}: image {image} does not exist")
            continue
        if not label.is_file():
            problems.append(f"{case}: no mask (expected {label})")
            continue
        who = case
        if patient_re is not None:
            match = patient_re.search(case)
            if match is None:
                problems.append(f"{case}: the patient pattern {patient!r} does not match the case id")
                continue
            who = match.group(1)
        if kind is not None:
            cases.append(LabelledCase(_safe(case), who, image, label, kind))
    if problems:
        raise LabelledDataError(root, problems)
    return cases, names


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "case"


# ----------------------------------------------------------------- checking cases


def check_cases(cases: Sequence[LabelledCase], label_names: Mapping[int, str], *,
                progress: bool = True) -> list[dict[str, Any]]:
    """Load every image and mask once; the datalist entries with their shape, spacing and label counts.

    Raises LabelledDataError listing every bad case (4D image, mask on another grid,
    empty mask, values outside ``label_names``, unreadable files); none is dropped.
    """
    from volumes.data.io import check_label_matches, load_volume
    from volumes.errors import VolumeReadError

    allowed = set(int(v) for v in label_names)
    entries, problems = [], []
    ids = [c.case_id for c in cases]
    for duplicate in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{duplicate}: two cases with this id")
    iterator: Iterable = cases
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cases, desc="checking cases", unit="case")
    for case in iterator:
        try:
            _check_dims(case.image)
            image = load_volume(case.image, orientation=None, dtype=None)
            label = load_volume(case.label, orientation=None, dtype=None, mode="nearest")
            check_label_matches(image, label, case.label)
        except VolumeReadError as exc:
            problems.append(f"{case.case_id}: {exc}")
            continue
        values, counts = np.unique(np.asarray(label[0]), return_counts=True)
        if np.any(values != np.round(values)):
            problems.append(f"{case.case_id}: {case.label}: mask holds non-integer values")
            continue
        found = {int(v): int(n) for v, n in zip(values, counts)}
        unknown = sorted(set(found) - allowed)
        if unknown:
            problems.append(f"{case.case_id}: {case.label}: mask values {unknown} are not in the label list "
                            f"{dict(label_names)}")
            continue
        if not any(v != 0 for v in found):
            problems.append(f"{case.case_id}: {case.label}: the mask is empty (no foreground voxel)")
            continue
        spacing = np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0))
        entries.append({**case.to_dict(), "shape": [int(s) for s in image.shape[1:]],
                        "spacing": [round(float(s), 4) for s in spacing],
                        "label_voxels": {str(k): v for k, v in found.items() if k != 0}})
    if problems:
        raise LabelledDataError(Path(cases[0].image).parent if cases else ".", problems)
    return entries


def _check_dims(path: Path) -> None:
    """A 4D (multi-channel or time-series) image is refused before it is read."""
    from volumes.errors import VolumeReadError

    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        shape = nib.load(str(path)).shape
        extra = [s for s in shape[3:] if s != 1]
        if len(shape) < 3 or extra:
            raise VolumeReadError(path, f"is a {len(shape)}D image {tuple(shape)}; one 3D volume per file is needed "
                                        "(split channels or time points into separate cases)")


# ----------------------------------------------------------------- folds


def assign_folds(entries: Sequence[Mapping[str, Any]], k: int = 5, seed: int = 0) -> dict[str, int]:
    """``{patient: fold}``: patients shuffled with ``seed`` and dealt to ``k`` folds.

    Patients are grouped by the modalities they have (CT and MR, MR only, ...) and each
    group is dealt in turn, continuing where the last left off, so every fold gets a
    share of each group and the folds differ in size by at most one patient.
    """
    patients: dict[str, set[str]] = {}
    for entry in entries:
        patients.setdefault(entry["patient"], set()).add(entry["modality"])
    if not 2 <= k <= len(patients):
        raise ConfigError("folds", k, f"an integer from 2 to the number of patients ({len(patients)})")
    groups: dict[tuple[str, ...], list[str]] = {}
    for who, kinds in sorted(patients.items()):
        groups.setdefault(tuple(sorted(kinds)), []).append(who)
    rng = random.Random(seed)
    folds, position = {}, 0
    for key in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        members = groups[key]
        rng.shuffle(members)
        for who in members:
            folds[who] = position % k
            position += 1
    return folds


def _fingerprint(cases: Sequence[LabelledCase]) -> str:
    """What the datalist was written from: each case's identity and its files' contents (not their
    modification times, which a copy or a re-sync of the same archive changes)."""
    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.case_id):
        digest.update(f"{case.case_id}|{case.patient}|{case.modality}\n".encode())
        for path in (case.image, case.label):
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def prepare_datalist(
    root: str | Path,
    out: str | Path,
    *,
    folds: int = 5,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **find: Any,
) -> Path:
    """Find and check the cases of ``root`` and write them with their folds to ``out`` (a .json).

    An existing ``out`` written from the same files with the same ``folds`` and ``seed``
    is reused as it is (no re-check). One written from other files or settings is refused
    unless ``overwrite``, so the folds of a comparison cannot change between its runs.
    ``find`` goes to :func:`find_labelled_cases`.
    """
    root, out = Path(root), Path(out)
    cases, names = find_labelled_cases(root, **find)
    fingerprint = _fingerprint(cases)
    if out.is_file():
        existing = json.loads(out.read_text())
        same = (existing.get("fingerprint") == fingerprint and existing.get("num_folds") == folds
                and existing.get("seed") == seed and existing.get("labels") == {str(k): v for k, v in names.items()})
        if same:
            read_datalist(out)  # still a valid one
            return out
        if not overwrite:
            raise LabelledDataError(out, [
                "was written from other files or with other folds/seed; its folds are kept so earlier results stay "
                "comparable (pass overwrite=True / --overwrite to write new folds)"])
    entries = check_cases(cases, names, progress=progress)
    fold_of = assign_folds(entries, folds, seed)
    base = out.parent.resolve()
    for entry in entries:
        entry["fold"] = fold_of[entry["patient"]]
        for key in ("image", "label"):
            entry[key] = os.path.relpath(Path(entry[key]).resolve(), base)
    spacing = {m: [round(float(np.median([e["spacing"][i] for e in entries if e["modality"] == m])), 4)
                   for i in range(3)] for m in sorted({e["modality"] for e in entries})}
    content = {
        "format": DATALIST_FORMAT,
        "source": str(root.resolve()),
        "labels": {str(k): v for k, v in names.items()},
        "modalities": sorted({e["modality"] for e in entries}),
        "median_spacing": spacing,
        "num_folds": folds,
        "seed": seed,
        "num_patients": len(fold_of),
        "fingerprint": fingerprint,
        "training": entries,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(content, indent=1) + "\n")
    return out


def read_datalist(path: str | Path) -> dict[str, Any]:
    """A datalist written by :func:`prepare_datalist`, checked (paths made absolute).

    Raises LabelledDataError for a patient in two folds, a fold out of range, a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelledDataError(path, ["datalist not found (write it with `volumes datalist`)"])
    content = json.loads(path.read_text())
    problems, fold_of = [], {}
    k = content.get("num_folds")
    for entry in content.get("training", []):
        for key in ("image", "label"):
            full = (path.parent / entry[key]).resolve()
            if not full.exists():
                problems.append(f"{entry['case_id']}: {key} {full} does not exist")
            entry[key] = str(full)
        fold = entry.get("fold")
        if not isinstance(fold, int) or not (k and 0 <= fold < k):
            problems.append(f"{entry['case_id']}: fold {fold!r} is not in 0..{(k or 1) - 1}")
        previous = fold_of.setdefault(entry["patient"], fold)
        if previous != fold:
            problems.append(f"{entry['case_id']}: patient {entry['patient']} is in folds {previous} and {fold}; "
                            "a patient's cases must share one fold")
    if problems:
        raise LabelledDataError(path, problems)
    return content


def fold_items(datalist: str | Path, fold: int, section: str, *, validation_patients: float = 0.1,
               modality: str | None = None) -> list[dict[str, Any]]:
    """The items of one ``section`` of cross-validation fold ``fold``.

    ``"test"``: the patients of fold ``fold``. ``"validation"``: about
    ``validation_patients`` of the other patients (at least 2, chosen by the datalist's
    seed), for checkpoint selection and early stopping. ``"training"``: the rest.
    ``"final_training"`` and ``"final_validation"``: the same split of every patient,
    for the model trained on all of them. ``modality`` keeps only CT or MR cases.
    """
    content = read_datalist(datalist)
    k = content["num_folds"]
    sections = ("training", "validation", "test", "final_training", "final_validation")
    if section not in sections:
        raise ConfigError("section", section, list(sections))
    if section.startswith("final_"):
        fold = -1
    elif not 0 <= int(fold) < k:
        raise ConfigError("fold", fold, f"0..{k - 1}")
    items = content["training"]
    rest = sorted({e["patient"] for e in items if e["fold"] != fold})
    rng = random.Random(f"{content['seed']}-{fold}")
    held = set(rng.sample(rest, max(2, round(validation_patients * len(rest))))) if len(rest) > 4 else set()
    chosen = {
        "test": [e for e in items if e["fold"] == fold],
        "validation": [e for e in items if e["fold"] != fold and e["patient"] in held],
        "final_validation": [e for e in items if e["patient"] in held],
        "training": [e for e in items if e["fold"] != fold and e["patient"] not in held],
        "final_training": [e for e in items if e["patient"] not in held],
    }[section]
    if modality is not None:
        chosen = [e for e in chosen if e["modality"] == modality_of(modality)]
    return [dict(e) for e in chosen]
