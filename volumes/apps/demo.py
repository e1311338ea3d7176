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

from volumes.paths import bundle_dir, shared_data_dir

SHARED = shared_data_dir() / "totalsegmentator_example"

# "Briefly": a 4-block encoder for the segmenter, 32 epochs (the segmentation bundle's
# test reaches Dice 0.88 with exactly this), fewer epochs for the classifier.
SEGMENTATION = {"encoder_model_kwargs": {"depth": 4}, "epochs": 32, "validation_interval": 16}
CLASSIFICATION = {"epochs": 20}
QUICK_SEGMENTATION = {"encoder_model_kwargs": {"depth": 2}, "epochs": 2, "validation_interval": 2,
                      "phantom_cases": 8, "preprocessing_config#size": 56}
QUICK_CLASSIFICATION = {"encoder_model_kwargs": {"depth": 2}, "epochs": 2, "phantom_cases": 12,
                        "preprocessing_config#size": 56}


def _set(config: dict, key: str, value: Any) -> None:
    """``config[key] = value`` with MONAI's ``a#b`` paths."""
    *parents, last = key.split("#")
    for part in parents:
        config = config[part]
    config[last] = value


def copy_bundle(name: str, target: Path, settings: dict[str, Any]) -> Path:
    """Copy a bundle (configs, docs) to ``target`` and write ``settings`` into all its configs."""
    if (target / "configs").is_dir():
        shutil.rmtree(target / "configs")
    shutil.copytree(bundle_dir(name), target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("models", "data", "eval", "cache", "runs"))
    for config_file in (target / "configs").glob("*.json"):
        config = json.loads(config_file.read_text())
        for key, value in settings.items():
            if key.split("#")[0] in config:
                _set(config, key, value)
        config_file.write_text(json.dumps(config, indent=4) + "\n")
    return target


def train_bundle(bundle: Path) -> None:
    """``python -m monai.bundle run --config_file configs/train.json`` on the bundle copy."""
    from monai.bundle import run

    configs = bundle / "configs"
    run(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), bundle_root=str(bundle))


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
            known[case_id] = {"label": item["label"], "class_label": item.get("class_label")}
    first = _test_items(segmentation)[0]
    image = nib.load(first["image"])
    case_id = f"seg_{first['case_id']}_dicom"
    write_dicom_series(np.asanyarray(image.dataobj), image.affine, folder / case_id, patient_id=case_id)
    known[case_id] = {"label": first["label"], "class_label": first.get("class_label")}
    if SHARED.is_dir():
        shutil.copy(SHARED / "example_ct.nii.gz", folder / "real_example_ct.nii.gz")
        shutil.copytree(SHARED / "example_ct_dicom", folder / "real_example_ct_dicom")
        known["real_example_ct"] = known["real_example_ct_dicom"] = {}
    return known


def score(output: Path, known: dict[str, dict], labels: list[str]) -> dict[str, Any]:
    """Dice of phantom masks against their ground truth; accuracy and AUC of the classifier."""
    import nibabel as nib

    from volumes.data.io import load_label, load_volume
    from volumes.segmentation import per_case_metrics

    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    dice, truths, probabilities, raw = [], [], [], []
    for row in rows:
        info = known.get(row["case_id"], {})
        if row["task"] == "segmentation" and info.get("label"):
            mask = np.asanyarray(nib.load(output / row["outputs"]["segmentation"]).dataobj)
            # the ground truth on the input's stored grid, as the mask is written
            source = load_volume(row["source"], orientation=None)
            reference = np.asarray(load_label(info["label"], like=source, orientation=None)[0])
            metrics = per_case_metrics(mask, reference, [1.0, 1.0, 1.0], labels)
            dice.append(np.nanmean([v for k, v in metrics.items() if k.startswith("dice_")]))
        if row["task"] == "classification" and row["case_id"].startswith("cls_") and info.get("class_label") is not None:
            truths.append(int(info["class_label"]))
            probabilities.append(list(row["probabilities"].values()))
            raw.append(list(row.get("probabilities_uncalibrated", row["probabilities"]).values()))
    result: dict[str, Any] = {"phantom_cases_scored": len(dice), "mean_dice": float(np.mean(dice)) if dice else None}
    flags = {row["case_id"]: row["quality"]["flag"] for row in rows
             if row["task"] == "segmentation" and row.get("quality")}
    if flags:  # segmentation quality control (docs/QC.md): the cases it sends to a person
        result["qc_review"] = sorted(case for case, flag in flags.items() if flag == "review")
        result["qc_checked"] = len(flags)
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


def fitted_calibration(bundle: Path) -> dict[str, Any] | None:
    """What training fitted for the classifier (its ``model.calibration.json``), None without one."""
    from volumes.calibration import calibration_path

    path = calibration_path(bundle / "models" / "model.pt")
    if not path.is_file():
        return None
    fitted = json.loads(path.read_text())
    return {k: fitted.get(k) for k in ("method", "temperature", "bias", "separable", "cases")}


def _calibration_said(fitted: dict[str, Any] | None) -> str:
    """One phrase on how the classifier was calibrated (:func:`fitted_calibration`)."""
    if fitted is None:
        return "no calibration (no model.calibration.json)"
    said = f"{fitted.get('method') or 'temperature scaling'} (T = {fitted['temperature']:.2f}"
    if fitted.get("bias"):
        said += f", intercept {fitted['bias'][-1]:+.2f}"
    said += f") fitted on the {fitted['cases']} validation phantoms"
    if fitted.get("separable"):
        said += ", all of them classified correctly"
    return said


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


def run_demo(out: str | Path, *, quick: bool = False, workers: int | None = None) -> int:
    """The whole main job; returns 0 when every case was done, 1 when some failed (as ``volumes infer``)."""
    out = Path(out)
    start = time.perf_counter()
    seg_settings = QUICK_SEGMENTATION if quick else SEGMENTATION
    cls_settings = QUICK_CLASSIFICATION if quick else CLASSIFICATION
    segmentation = copy_bundle("dinov2_unet_segmentation", out / "bundles" / "dinov2_unet_segmentation", seg_settings)
    classification = copy_bundle("dinov2_slice_classification", out / "bundles" / "dinov2_slice_classification",
                                 cls_settings)
    print(f"[1/4] training the segmentation bundle briefly ({seg_settings}) in {segmentation}", flush=True)
    train_bundle(segmentation)
    print(f"[2/4] training the classification bundle briefly ({cls_settings}) in {classification}", flush=True)
    train_bundle(classification)
    inputs = out / "input"
    known = gather_inputs(inputs, segmentation, classification)
    real = "with" if SHARED.is_dir() else "without (../shared/data not found)"
    print(f"[3/4] volumes infer on {len(known)} cases in {inputs} ({real} the real example CT and DICOM series)",
          flush=True)
    output = out / "infer"
    code = run_inference([segmentation, classification], inputs, output, workers=workers)
    print("[4/4] scoring the phantom cases against their ground truth", flush=True)
    labels = json.loads((segmentation / "configs" / "inference.json").read_text())["labels"]
    result = score(output, known, labels)
    summary = (f"segmentation: mean Dice {result['mean_dice']:.3f} over {result['phantom_cases_scored']} phantom cases"
               if result["mean_dice"] is not None else "segmentation: no phantom case scored")
    if "accuracy" in result:
        result["calibration"] = fitted_calibration(classification)
        auc = f", AUC {result['auc']:.3f}" if "auc" in result else ""
        summary += (f"; classification: accuracy {result['accuracy_uncalibrated']:.3f} -> {result['accuracy']:.3f}"
                    f"{auc} over "
                    f"{result['classified_cases']} held-out phantoms, ECE {result['ece_uncalibrated']:.3f} -> "
                    f"{result['ece_calibrated']:.3f} and Brier {result['brier_uncalibrated']:.3f} -> "
                    f"{result['brier_calibrated']:.3f} with {_calibration_said(result['calibration'])}")
    if "qc_checked" in result:
        review = result["qc_review"]
        summary += (f"; quality control flagged {len(review)} of {result['qc_checked']} segmentations for review"
                    + (f" ({', '.join(review[:6])}{', ...' if len(review) > 6 else ''})" if review else ""))
    (out / "demo_scores.json").write_text(json.dumps(result, indent=1) + "\n")
    print(summary)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; open {output / 'report.html'}")
    return code
