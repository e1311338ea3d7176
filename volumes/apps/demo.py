"""The main job, end to end on built-in data: ``python -m volumes demo --out runs/demo``.

1. Copy both bundles under ``OUT/bundles/`` (a user's own copy, with the demo's settings
   written into its configs) and train each briefly on its synthetic phantom cohort
   (written by the bundle on first use under ``OUT/bundles/<name>/data/phantoms``).
2. Gather inference inputs under ``OUT/input/``: the held-out test phantoms of both
   cohorts, one of them also written as a DICOM series, and - when ``../shared/data`` is
   beside the checkout - the real example CT (NIfTI) and the real DICOM series.
3. Run both bundles with :class:`volumes.inference.BatchInference` (what ``volumes infer`` runs).
4. Score what can be scored: Dice of the masks against the phantoms' ground truth,
   accuracy/AUC and calibration of the classifier on its own held-out phantoms, and which
   segmentations quality control flagged for review; print where ``report.html`` is.

The encoders are random-initialised (no model hub here): the numbers show the pipeline
learning on phantoms, not DINOv2 quality, and masks on the real CT from a phantom-trained
model are not expected to be right.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from volumes.apps.bundle_copies import copy_bundle, train_bundle  # noqa: F401  (the demo's steps; scripts import them here)
from volumes.paths import shared_data_dir

SHARED = shared_data_dir() / "totalsegmentator_example"

# One encoder for both heads: the same 4-block ViT-S/14 (its weights written once to
# OUT/encoder/encoder.safetensors, random-initialised) and the same slice preparation, so
# `volumes infer` runs it once per case for the segmenter and the classifier. The
# preparation is the abdominal window set (liver, soft tissue, bone): on the demo's
# held-out phantoms the classifier on the segmenter's default three windows (soft tissue,
# lung, bone) reached AUC 0.41, on the liver window alone 0.97, on these 1.00; the
# segmenter on the liver window alone lost 0.15 Dice (docs/PERFORMANCE.md, "One
# preparation for both heads").
ENCODER = "vit_small_patch14_dinov2"
ENCODER_KWARGS = {"depth": 4}
PREPARATION = {"preset": "ct_abdomen_windows", "axis": "axial", "channel_mode": "windows", "size": 112}
QUICK_ENCODER_KWARGS = {"depth": 2}
QUICK_PREPARATION = {**PREPARATION, "size": 56}
# "Briefly": 32 epochs for the segmenter's decoder, 20 for the classifier's aggregator.
SEGMENTATION = {"encoder_model_kwargs": ENCODER_KWARGS, "preprocessing_config": PREPARATION, "epochs": 32,
                "validation_interval": 16}
CLASSIFICATION = {"encoder_model_kwargs": ENCODER_KWARGS, "preprocessing_config": PREPARATION, "epochs": 20}
QUICK_SEGMENTATION = {"encoder_model_kwargs": QUICK_ENCODER_KWARGS, "preprocessing_config": QUICK_PREPARATION,
                      "epochs": 2, "validation_interval": 2, "phantom_cases": 8}
QUICK_CLASSIFICATION = {"encoder_model_kwargs": QUICK_ENCODER_KWARGS, "preprocessing_config": QUICK_PREPARATION,
                        "epochs": 2, "phantom_cases": 12}
DICE_BAR = 0.8  # an organ below it is one quality control should send for review (docs/QC.md)


def write_encoder(path: Path, model_kwargs: dict[str, Any], seed: int = 0) -> Path:
    """The demo's one encoder: a random-initialised ``ENCODER`` saved as a timm state dict (safetensors)."""
    from volumes.encoders.slice_encoder import write_random_encoder

    return write_random_encoder(path, ENCODER, model_kwargs, seed=seed)


def _test_items(bundle: Path) -> list[dict]:
    from volumes.bundle import datalist_section

    return datalist_section(bundle / "data" / "phantoms" / "datalist.json", "test")


def gather_inputs(folder: Path, segmentation: Path, classification: Path) -> dict[str, dict]:
    """Copy the inputs into ``folder``; returns case id -> what is known about it (label, class)."""
    import nibabel as nib

    from volumes.data.dicom import write_dicom_series

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    known: dict[str, dict] = {}
    for prefix, bundle in (("seg", segmentation), ("cls", classification)):
        for item in _test_items(bundle):
            case_id = f"{prefix}_{item['case_id']}"
            shutil.copy(item["image"], folder / f"{case_id}.nii.gz")
            known[case_id] = {"label": item["label"], "class_label": item.get("class_label"), "cohort": prefix}
    first = _test_items(segmentation)[0]
    image = nib.load(first["image"])
    case_id = f"seg_{first['case_id']}_dicom"
    write_dicom_series(np.asanyarray(image.dataobj), image.affine, folder / case_id, patient_id=case_id)
    known[case_id] = {"label": first["label"], "class_label": first.get("class_label"), "cohort": "dicom",
                      "copy_of": f"seg_{first['case_id']}"}
    if SHARED.is_dir():
        shutil.copy(SHARED / "example_ct.nii.gz", folder / "real_example_ct.nii.gz")
        shutil.copytree(SHARED / "example_ct_dicom", folder / "real_example_ct_dicom")
        known["real_example_ct"] = known["real_example_ct_dicom"] = {}
    return known


COHORTS = {"seg": "the segmenter's own held-out phantoms", "cls": "the classification cohort's held-out phantoms",
           "dicom": "a held-out phantom written as a DICOM series"}


def score(output: Path, known: dict[str, dict], labels: list[str]) -> dict[str, Any]:
    """Score the run against what is known about its phantoms.

    Segmentation: Dice per organ and case, averaged per cohort (``dice``: the segmenter's own
    test split, the classification cohort it never trained on, the DICOM copy); quality
    control against that answer (``qc``: an organ below :data:`DICE_BAR` is what it should
    flag). Classification: accuracy, AUC and calibration on its own held-out phantoms. Encoder
    sharing: the cases on which every head read the one encoder pass (``encoder``).
    """
    import nibabel as nib

    from volumes.data.io import load_label, load_volume
    from volumes.segmentation import per_case_metrics

    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    truths, probabilities, raw = [], [], []
    cases: dict[str, dict[str, Any]] = {}
    for row in rows:
        info = known.get(row["case_id"], {})
        if row["task"] == "segmentation" and info.get("label"):
            mask = np.asanyarray(nib.load(output / row["outputs"]["segmentation"]).dataobj)
            # the ground truth on the input's stored grid, as the mask is written
            source = load_volume(row["source"], orientation=None)
            reference = np.asarray(load_label(info["label"], like=source, orientation=None)[0])
            metrics = per_case_metrics(mask, reference, [1.0, 1.0, 1.0], labels)
            organs = {k[len("dice_"):]: round(v, 4) for k, v in metrics.items()
                      if k.startswith("dice_") and np.isfinite(v)}
            cases[row["case_id"]] = {"cohort": info["cohort"], "dice": organs,
                                     "mean_dice": float(np.mean(list(organs.values()))),
                                     "qc": (row.get("quality") or {}).get("flag")}
        if row["task"] == "classification" and row["case_id"].startswith("cls_") and info.get("class_label") is not None:
            truths.append(int(info["class_label"]))
            probabilities.append(list(row["probabilities"].values()))
            raw.append(list(row.get("probabilities_uncalibrated", row["probabilities"]).values()))
    result: dict[str, Any] = {"cases": cases, "dice": {}}
    for cohort in COHORTS:
        values = [c["mean_dice"] for c in cases.values() if c["cohort"] == cohort]
        if values:
            result["dice"][cohort] = {"cases": len(values), "mean": float(np.mean(values))}
    flags = {row["case_id"]: row["quality"]["flag"] for row in rows
             if row["task"] == "segmentation" and row.get("quality")}
    if flags:  # segmentation quality control (docs/QC.md): the cases it sends to a person
        result["qc_review"] = sorted(case for case, flag in flags.items() if flag == "review")
        result["qc_checked"] = len(flags)
        result["qc"] = qc_against_truth(cases)
    result["encoder"] = encoder_sharing(rows)
    if truths:
        # the last class's score; accuracy at the 0.5 threshold before and after calibration
        # (Platt's intercept moves it)
        raw_scores = [v[-1] for v in raw]
        for name, values in (("accuracy_uncalibrated", raw_scores), ("accuracy", [v[-1] for v in probabilities])):
            result[name] = float(np.mean([int(s >= 0.5) == t for s, t in zip(values, truths)]))
        from monai.metrics import compute_roc_auc
        import torch

        if len(set(truths)) == 2:  # the uncalibrated scores: the same ranking, without ties from rounding
            result["auc"] = float(compute_roc_auc(torch.tensor(raw_scores), torch.tensor(truths)))
        result["classified_cases"] = len(truths)
        from volumes.calibration import brier_score, expected_calibration_error

        # the calibration was fitted on the validation split at training (model.calibration.json)
        for name, values in (("uncalibrated", raw), ("calibrated", probabilities)):
            result[f"ece_{name}"] = expected_calibration_error(np.array(values), np.array(truths))
            result[f"brier_{name}"] = brier_score(np.array(values), np.array(truths))
    return result


def qc_against_truth(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Quality control's flags against the known answer, per cohort and over all scored cases.

    A case needs review when one of its organs has Dice below :data:`DICE_BAR`. ``flagged``
    / ``flagged_right``: cases flagged, and how many of them need review; ``passed`` /
    ``passed_right``: cases passed, and how many of them do not.
    """
    table: dict[str, Any] = {}
    for cohort in (*COHORTS, "all"):
        part = [c for c in cases.values() if c["qc"] and cohort in (c["cohort"], "all")]
        if not part:
            continue
        bad = [min(c["dice"].values(), default=1.0) < DICE_BAR for c in part]
        flagged = [c["qc"] == "review" for c in part]
        table[cohort] = {"cases": len(part), "below_bar": int(sum(bad)),
                         "flagged": int(sum(flagged)), "flagged_right": int(sum(f and b for f, b in zip(flagged, bad))),
                         "passed": int(len(part) - sum(flagged)),
                         "passed_right": int(sum(not f and not b for f, b in zip(flagged, bad)))}
    return table


def encoder_sharing(rows: list[dict]) -> dict[str, Any]:
    """How often the encoder ran once for every head of a case (``encoder_sharing`` in the rows)."""
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case_id"], []).append(row)
    once = [case for case, case_rows in by_case.items()
            if len(case_rows) > 1 and all(r.get("encoder_sharing") for r in case_rows)]
    encoded_again = sum(r["encoder_sharing"]["encoded_again"] for case in once for r in by_case[case])
    return {"cases": len(by_case), "encoded_once": len(once), "slices_encoded_again": int(encoded_again)}


def fitted_calibration(bundle: Path) -> dict[str, Any] | None:
    """What training fitted for the classifier (its ``model.calibration.json``), None without one."""
    from volumes.calibration import calibration_path

    path = calibration_path(bundle / "models" / "model.pt")
    if not path.is_file():
        return None
    fitted = json.loads(path.read_text())
    return {k: fitted.get(k) for k in ("method", "temperature", "bias", "separable", "cases", "reason")}


def _calibration_said(fitted: dict[str, Any] | None) -> str:
    """One phrase on which calibration training chose and why (:func:`fitted_calibration`)."""
    if fitted is None:
        return "no calibration (no model.calibration.json)"
    method = fitted.get("method") or "temperature scaling"
    if method == "none":
        said = "no calibration"
    else:
        said = f"{method} (T = {fitted['temperature']:.2f}"
        if fitted.get("bias"):
            said += f", intercept {fitted['bias'][-1]:+.2f}"
        said += ")"
    if fitted.get("reason"):
        return f"{said}: {fitted['reason']}"
    return f"{said} fitted on the {fitted['cases']} validation phantoms"


def run_inference(bundles: list[Path], inputs: Path, output: Path, *, workers: int | None = None) -> int:
    """``volumes infer --bundle ... --input inputs --output output``, called directly."""
    from volumes.data.discovery import discover_cases
    from volumes.devices import resolve_device
    from volumes.inference import BatchInference, load_bundle

    device = resolve_device("auto")
    models = [load_bundle(bundle, device=device) for bundle in bundles]
    summary = BatchInference(models, output, workers=workers).run([case.to_dict() for case in discover_cases(inputs)])
    print(summary.line())
    if summary.failed:
        print(f"failed cases are listed in {summary.output_dir / 'failures.csv'}")
    return 0 if summary.ok else 1


def _dice_said(result: dict[str, Any]) -> str:
    """The segmentation line: Dice per cohort, the DICOM copy beside its NIfTI."""
    dice = result["dice"]
    if not dice:
        return "segmentation: no phantom case scored"
    parts = []
    for cohort in ("seg", "cls"):
        if cohort in dice:
            parts.append(f"{dice[cohort]['mean']:.3f} on {COHORTS[cohort]} ({dice[cohort]['cases']})")
    copies = [(case, c) for case, c in result["cases"].items() if c["cohort"] == "dicom"]
    for case, c in copies:
        original = result["cases"].get(case[: -len("_dicom")])
        beside = f" (its NIfTI: {original['mean_dice']:.3f})" if original else ""
        parts.append(f"{c['mean_dice']:.3f} on {case}, {COHORTS['dicom']}{beside}")
    return "segmentation: mean Dice " + "; ".join(parts)


def _qc_said(result: dict[str, Any]) -> str:
    """Quality control's flags against the known answer (an organ below DICE_BAR needs review)."""
    review = result["qc_review"]
    lines = [f"quality control flagged {len(review)} of {result['qc_checked']} segmentations for review; against the "
             f"known answer (a case with an organ below Dice {DICE_BAR} needs review):"]
    for cohort, t in result.get("qc", {}).items():
        if cohort != "all":
            lines.append(f"  {COHORTS[cohort]}: {t['below_bar']} of {t['cases']} need review; flagged {t['flagged']} "
                         f"({t['flagged_right']} rightly), passed {t['passed']} ({t['passed_right']} rightly)")
    unscored = sorted(set(review) - set(result["cases"]))
    if unscored:
        lines.append(f"  flagged without a known answer: {', '.join(unscored)}")
    return "\n".join(lines)


def run_demo(out: str | Path, *, quick: bool = False, workers: int | None = None) -> int:
    """The whole main job; returns 0 when every case was done, 1 when some failed (as ``volumes infer``)."""
    out = Path(out)
    start = time.perf_counter()
    encoder = write_encoder(out / "encoder" / "encoder.safetensors", QUICK_ENCODER_KWARGS if quick else ENCODER_KWARGS)
    one_encoder = {"encoder": ENCODER, "encoder_weights": str(encoder.resolve())}
    seg_settings = {**(QUICK_SEGMENTATION if quick else SEGMENTATION), **one_encoder}
    cls_settings = {**(QUICK_CLASSIFICATION if quick else CLASSIFICATION), **one_encoder}
    segmentation = copy_bundle("dinov2_unet_segmentation", out / "bundles" / "dinov2_unet_segmentation", seg_settings)
    classification = copy_bundle("dinov2_slice_classification", out / "bundles" / "dinov2_slice_classification",
                                 cls_settings)
    print(f"[0/5] one encoder for both heads: {ENCODER} {seg_settings['encoder_model_kwargs']}, random-initialised "
          f"(no model hub here), in {encoder}; slices prepared as {seg_settings['preprocessing_config']}", flush=True)
    print(f"[1/5] training the segmentation bundle briefly ({_settings_said(seg_settings)}) in {segmentation}",
          flush=True)
    train_bundle(segmentation)
    print(f"[2/5] training the classification bundle briefly ({_settings_said(cls_settings)}) in {classification}",
          flush=True)
    train_bundle(classification)
    inputs = out / "input"
    known = gather_inputs(inputs, segmentation, classification)
    real = "with" if SHARED.is_dir() else "without (../shared/data not found)"
    print(f"[3/5] volumes infer on {len(known)} cases in {inputs} ({real} the real example CT and DICOM series)",
          flush=True)
    output = out / "infer"
    code = run_inference([segmentation, classification], inputs, output, workers=workers)
    print("[4/5] scoring the phantom cases against their ground truth", flush=True)
    labels = json.loads((segmentation / "configs" / "inference.json").read_text())["labels"]
    result = score(output, known, labels)
    lines = [_dice_said(result)]
    if "accuracy" in result:
        result["calibration"] = fitted_calibration(classification)
        auc = f", AUC {result['auc']:.3f}" if "auc" in result else ""
        lines.append(f"classification: accuracy {result['accuracy_uncalibrated']:.3f} -> {result['accuracy']:.3f}"
                     f"{auc} over {result['classified_cases']} held-out phantoms, ECE {result['ece_uncalibrated']:.3f}"
                     f" -> {result['ece_calibrated']:.3f} and Brier {result['brier_uncalibrated']:.3f} -> "
                     f"{result['brier_calibrated']:.3f} with {_calibration_said(result['calibration'])}")
    if "qc_checked" in result:
        lines.append(_qc_said(result))
    shared = result["encoder"]
    lines.append(f"encoder: ran once for both heads on {shared['encoded_once']} of {shared['cases']} cases "
                 f"({shared['slices_encoded_again']} slices encoded a second time)")
    from volumes.apps.demo_real import STS, real_patients, real_said

    if STS.is_dir() and not quick:
        print(f"[5/5] real patients: a short training on sarcoma CT and MR ({STS}), scored on patients it never "
              "saw", flush=True)
        result["real_patients"] = real_patients(out, {**one_encoder, "encoder_model_kwargs": ENCODER_KWARGS},
                                                workers=workers)
        lines.append(real_said(result["real_patients"]))
    else:
        print("[5/5] real patients: skipped (" + ("--quick" if quick else f"{STS} not found") + ")", flush=True)
    (out / "demo_scores.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; open {output / 'report.html'}")
    return code


def _settings_said(settings: dict[str, Any]) -> str:
    """The training settings worth printing (the encoder's are printed once, above)."""
    return ", ".join(f"{k}={v}" for k, v in settings.items()
                     if k not in ("encoder", "encoder_weights", "encoder_model_kwargs", "preprocessing_config"))
