"""The demo's real-patient step: a short training on real sarcoma patients, scored on others.

When ``../shared/data/sts_sarcoma`` sits beside the checkout (real CT and MR of soft-tissue
sarcoma patients with manual tumour masks), :func:`real_patients` checks the cases and deals
the patients to 5 folds (``volumes datalist``), copies the segmentation bundle with the
demo's encoder and the labels and slice plan of the data, trains it briefly on folds 1-4
(CT and MR in one model, each volume prepared by its modality), runs ``volumes infer`` on
fold 0's patients, which it never saw, and returns their Dice per modality. The full
5-fold run, beside nnU-Net, is ``scripts/real_results.py`` (docs/REAL_DATA.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from volumes.paths import shared_data_dir

STS = shared_data_dir() / "sts_sarcoma"
TEMPLATES = {"images": "{patient}/{modality}.nii.gz", "labels": "{patient}/{modality}_gtv.nii.gz"}
# The demo's budget: 8 epochs of the demo's 4-block encoder (about 3 minutes on 2 cores);
# docs/REAL_DATA.md gives the full run's figures (12-block encoder, 12 epochs, 5 folds).
REAL_TRAINING = {"epochs": 8, "validation_interval": 4, "fold": 0}


def real_patients(out: Path, encoder_settings: dict[str, Any], *, workers: int | None = None) -> dict[str, Any]:
    """Train on folds 1-4 of sts_sarcoma, infer fold 0; Dice per modality (see the module docstring)."""
    from volumes.apps.bundle_copies import copy_bundle, train_bundle
    from volumes.bundle import datalist_labels, plan_preprocessing
    from volumes.data.labelled import fold_items, prepare_datalist
    from volumes.devices import resolve_device
    from volumes.inference import BatchInference, load_bundle
    from volumes.segmentation import score_label_maps

    datalist = prepare_datalist(STS, out / "real" / "datalist.json", progress=False, **TEMPLATES)
    labels = datalist_labels(datalist, [])
    settings = {**encoder_settings, **REAL_TRAINING, "datalist": str(datalist.resolve()), "labels": labels,
                "preprocessing_config": plan_preprocessing(datalist, {})}
    bundle = copy_bundle("dinov2_unet_segmentation", out / "bundles" / "sarcoma_segmentation", settings)
    train_bundle(bundle)
    items = fold_items(datalist, REAL_TRAINING["fold"], "test")
    output = out / "real" / "infer"
    summary = BatchInference([load_bundle(bundle, device=resolve_device("auto"))], output, workers=workers,
                             figures=False, progress=False).run(items)
    masks = {item["case_id"]: next((output / item["case_id"]).glob("*_seg.nii.gz"), output / "missing")
             for item in items}
    rows = score_label_maps(items, masks, labels, surface_tolerance_mm=None)
    dice = {}
    for modality in sorted({r["modality"] for r in rows}):
        values = [r[f"dice_{labels[1]}"] for r in rows if r["modality"] == modality]
        dice[modality] = {"mean": float(np.mean(values)), "cases": len(values)}
    result = {"dice": dice, "patients": len({i["patient"] for i in items}), "bundle": str(bundle),
              "seconds": summary.seconds, "settings": {k: v for k, v in REAL_TRAINING.items()}}
    (out / "real" / "scores.json").write_text(json.dumps({**result, "cases": rows}, indent=1) + "\n")
    return result


def real_said(result: dict[str, Any]) -> str:
    parts = ", ".join(f"{m} {d['mean']:.3f} ({d['cases']} volumes)" for m, d in result["dice"].items())
    return (f"real patients (sts_sarcoma, fold 0: {result['patients']} patients it never trained on): tumour Dice "
            f"{parts}; {REAL_TRAINING['epochs']} epochs of the demo's encoder (docs/REAL_DATA.md has the 5-fold run "
            f"beside nnU-Net)")
