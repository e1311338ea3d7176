"""``volumes datalist``: your labelled scans -> one checked MONAI datalist with k folds by patient."""

from __future__ import annotations

import argparse
from pathlib import Path

from volumes.errors import VolumesError


def _mapping(text: str | None) -> dict[str, str] | str | None:
    """``CT`` (every case) or ``ct=CT,mr_t1=MR`` (the {modality} field's values)."""
    if text is None or "=" not in text:
        return text
    pairs = [part.partition("=") for part in text.split(",") if part.strip()]
    if any(not sep or not key.strip() or not value.strip() for key, sep, value in pairs):
        raise VolumesError(f"--modality {text!r}: expected CT, MR or NAME=CT,NAME=MR")
    return {key.strip(): value.strip() for key, _, value in pairs}


def _label_names(text: str | None) -> dict[int, str] | None:
    if text is None:
        return None
    names = {}
    for part in text.split(","):
        value, sep, name = part.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise VolumesError(f"--label-names {text!r}: expected VALUE=NAME,... (e.g. 1=tumour)")
        names[int(value)] = name.strip()
    return names


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "datalist", help="check your labelled scans and split them into k folds by patient",
        description="Find image/mask pairs (the MSD / nnU-Net raw layout with dataset.json, or two templates), "
                    "check every case (a 4D image, a mask on another grid, an empty mask, unknown label values, "
                    "an image without a mask: all reported, none dropped), deal the patients to k folds (a "
                    "patient's scans share a fold) and write one MONAI datalist. Reused as it is while the "
                    "files and settings are unchanged. Train a fold with the segmentation bundle: "
                    "python -m monai.bundle run --config_file configs/train.json --datalist OUT --fold K "
                    "(docs/REAL_DATA.md).",
    )
    parser.add_argument("--data", required=True, type=Path, help="the data folder")
    parser.add_argument("--out", required=True, type=Path, help="the datalist .json to write")
    parser.add_argument("--images", default=None, help="image template, e.g. '{patient}/{modality}.nii.gz'")
    parser.add_argument("--labels", default=None, help="mask template, e.g. '{patient}/{modality}_gtv.nii.gz'")
    parser.add_argument("--modality", default=None,
                        help="CT or MR for every case, or NAME=CT,NAME=MR for the {modality} field "
                             "(default: read from the names: ct* is CT; mr*, t1*, t2*, flair* ... are MR)")
    parser.add_argument("--label-names", default=None, help="VALUE=NAME,... (default: labels.json or dataset.json)")
    parser.add_argument("--patient", default=None,
                        help="MSD layout: a regular expression whose first group is the patient in the case id")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a datalist written with other folds")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import collections
    import json

    from volumes.data.labelled import prepare_datalist

    path = prepare_datalist(args.data, args.out, folds=args.folds, seed=args.seed, overwrite=args.overwrite,
                            images=args.images, labels=args.labels, modality=_mapping(args.modality),
                            patient=args.patient, label_names=_label_names(args.label_names))
    content = json.loads(path.read_text())
    per_fold = collections.Counter((e["fold"], e["modality"]) for e in content["training"])
    print(f"{path}: {len(content['training'])} cases of {content['num_patients']} patients, labels "
          f"{content['labels']}, {content['num_folds']} folds by patient")
    for fold in range(content["num_folds"]):
        counts = ", ".join(f"{per_fold[(fold, m)]} {m}" for m in content["modalities"])
        print(f"  fold {fold}: {counts}")
    return 0
