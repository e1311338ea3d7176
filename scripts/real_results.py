"""Segmentation on real patients: 5-fold cross-validation on sts_sarcoma, ours beside nnU-Net v2.

    .venv/bin/python scripts/real_results.py                       # every stage, resumed
    .venv/bin/python scripts/real_results.py --methods ours        # one method
    .venv/bin/python scripts/real_results.py --report-only         # docs/REAL_DATA.md from the JSON

Stages, each kept as a small JSON file under ``docs/real_data/`` (committed), so a rerun
on another machine resumes where the last stopped instead of starting over:

1. ``folds.json``: the cases checked and their patients dealt to 5 folds
   (``volumes datalist``; a patient's CT and MR share a fold).
2. per method and fold, ``<method>/fold<k>.json``: training wall-clock, then inference
   on the fold's test patients as a user runs it (``volumes infer`` for ours,
   ``nnUNetPredictor`` for nnU-Net), each in its own process so its peak memory is its
   own; per case Dice, HD95 (mm) and surface Dice at 2 mm against the manual mask, in
   the image's own grid.
3. ``docs/REAL_DATA.md``: the tables, regenerated from the JSON files.

Big outputs (models, masks, logs) go under ``--work`` (default ``runs/real``), not into git.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_report import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "sts_sarcoma"
RESULTS = ROOT / "docs" / "real_data"
BUNDLE = ROOT / "bundles" / "dinov2_unet_segmentation"
TEMPLATES = {"images": "{patient}/{modality}.nii.gz", "labels": "{patient}/{modality}_gtv.nii.gz"}
SURFACE_MM = 2.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def write_json(path: Path, content: dict) -> None:
    from volumes.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(content, indent=1) + "\n")


def run_measured(command: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run ``command`` (output to ``log``); its wall-clock seconds and peak resident memory (MB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{command[:4]}... failed with exit code {code}; see {log}")
    return seconds, usage.ru_maxrss / 1024.0


# ----------------------------------------------------------------- stage 1: folds


def prepare(work: Path, folds: int, seed: int) -> Path:
    from volumes.data.labelled import prepare_datalist, read_datalist

    datalist = prepare_datalist(DATA, work / "datalist.json", folds=folds, seed=seed, **TEMPLATES)
    content = read_datalist(datalist)
    record = {
        "data": "../shared/data/sts_sarcoma (IBSI-2 phase 3 crops of TCIA Soft-tissue-Sarcoma)",
        "command": f"volumes datalist --data ../shared/data/sts_sarcoma --images '{TEMPLATES['images']}' "
                   f"--labels '{TEMPLATES['labels']}' --folds {folds} --seed {seed}",
        "labels": content["labels"], "median_spacing": content["median_spacing"],
        "patients": {e["patient"]: e["fold"] for e in content["training"]},
        "cases": [{k: e[k] for k in ("case_id", "patient", "modality", "fold", "shape", "spacing")}
                  for e in content["training"]],
    }
    write_json(RESULTS / "folds.json", record)
    return datalist


def test_list(datalist: Path, fold: int, work: Path) -> tuple[Path, list[dict]]:
    from volumes.data.labelled import fold_items

    items = fold_items(datalist, fold, "test")
    path = work / "folds" / f"fold{fold}_test.json"
    write_json(path, {"test": items})
    return path, items


def score(items: list[dict], masks: dict[str, Path], labels: list[str]) -> list[dict]:
    """Per case Dice, HD95 and surface Dice of one label (volumes.segmentation.score_label_maps), flat keys."""
    from volumes.segmentation import score_label_maps

    name = labels[1]
    rows = []
    for row in score_label_maps(items, masks, labels, surface_tolerance_mm=SURFACE_MM):
        rows.append({"case_id": row["case_id"], "patient": row["patient"], "modality": row["modality"],
                     "dice": row[f"dice_{name}"], "hd95_mm": row[f"hd95_mm_{name}"],
                     "nsd_2mm": row[f"nsd_{SURFACE_MM:g}mm_{name}"], "truth_ml": row["truth_ml"],
                     "pred_ml": row["pred_ml"]})
    return rows


# ----------------------------------------------------------------- ours


def our_bundle(datalist: Path, work: Path) -> Path:
    from volumes.bundle import datalist_labels, plan_preprocessing, write_derived_bundle

    values = {"labels": datalist_labels(datalist, []), "preprocessing_config": plan_preprocessing(datalist, {})}
    return write_derived_bundle(BUNDLE, work / "ours" / "bundle", values)


def run_ours(datalist: Path, work: Path, fold: int | str, args: argparse.Namespace, method: str = "ours") -> dict:
    from volumes.bundle import datalist_labels

    bundle = our_bundle(datalist, work)
    name = f"fold{fold}"
    fold_dir = work / method / name
    overrides = ["--bundle_root", str(fold_dir), "--datalist", str(datalist), "--fold", str(fold),
                 "--epochs", str(args.epochs), "--validation_interval", str(args.validation_interval),
                 "--encoder", args.encoder]
    encoder_weights = args.encoder_weights
    if method == "ours_pretrained":
        encoder_weights = str(pretrained_encoder(work))
    if encoder_weights:
        overrides += ["--encoder_weights", str(encoder_weights)]
    train_s, train_mb = run_measured(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.json"),
         "--meta_file", str(bundle / "configs" / "metadata.json"),
         "--logging_file", str(bundle / "configs" / "logging.conf"), *overrides],
        fold_dir / "train.log")
    record = {"fold": fold, "train_s": round(train_s, 1), "train_peak_mb": round(train_mb),
              "settings": json.loads((fold_dir / "models" / "model.settings.json").read_text()),
              "epochs": args.epochs, "encoder": args.encoder, "encoder_weights": encoder_weights}
    if fold == "final":
        return record
    tests, items = test_list(datalist, int(fold), work)
    out = fold_dir / "pred"
    infer_s, infer_mb = run_measured(
        [sys.executable, "-m", "volumes", "infer", "--bundle", str(bundle), "--weights",
         str(fold_dir / "models" / "model.pt"), "--input", str(tests), "--output", str(out), "--no-figures",
         "--no-progress"], fold_dir / "infer.log")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    seconds = {r["case_id"]: sum(r.get("timings_s", {}).values()) for r in rows}
    masks = {item["case_id"]: next((out / item["case_id"]).glob("*_seg.nii.gz"), out / item["case_id"] / "missing")
             for item in items}
    cases = score(items, masks, datalist_labels(datalist, []))
    for case in cases:
        case["seconds"] = round(seconds.get(case["case_id"], float("nan")), 2)
    record.update({"infer_s": round(infer_s, 1), "infer_peak_mb": round(infer_mb), "cases": cases})
    return record


# ----------------------------------------------------------------- pretraining on the real archive


SHARED = ROOT.parent / "shared" / "data"
# the collapse guard logs but does not stop this run (a patience longer than the run): the encoder is judged
# by the 5-fold table, and the collapse metrics are kept in its curves
PRETRAIN_ARGS = ["--preset", "auto", "--size", "112", "--batch-size", "32", "--centering", "sinkhorn",
                 "--prototypes", "256", "--checkpoint-every", "50", "--log-every", "5", "--collapse-patience", "100000"]


def pretrain_corpus(work: Path) -> Path:
    """The unlabelled archive, CT and MR at once, each with its modality: every sts_sarcoma image (masks
    unused: the same patients as the folds' test patients, so this is pretraining on the site's own
    archive, as a hospital team would), the unlabelled prostate MR and the example CT."""
    from volumes.data.labelled import read_datalist

    items = [{"image": e["image"], "modality": e["modality"]} for e in read_datalist(work / "datalist.json")["training"]]
    items += [{"image": str(p.resolve()), "modality": "MR"} for p in sorted((SHARED / "unlabelled_mr").glob("*.nii.gz"))]
    example = SHARED / "totalsegmentator_example" / "example_ct.nii.gz"
    if example.is_file():
        items.append({"image": str(example.resolve()), "modality": "CT"})
    path = work / "pretrain" / "corpus.json"
    write_json(path, {"training": items})
    return path


def run_pretraining(work: Path, steps: int) -> dict:
    """``volumes pretrain --preset auto`` on the corpus, resumed from its checkpoint when one is there."""
    corpus = pretrain_corpus(work)
    out = work / "pretrain" / "run"
    resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
    seconds, peak = run_measured([sys.executable, "-m", "volumes", "pretrain", "--data", str(corpus), "--out", str(out),
                                  "--steps", str(steps), "--no-progress", *PRETRAIN_ARGS, *resume],
                                 work / "pretrain" / "pretrain.log")
    summary = json.loads((out / "encoder.json").read_text())
    return {"steps": steps, "seconds_this_run": round(seconds), "peak_mb": round(peak), "corpus": len(
        json.loads(corpus.read_text())["training"]), "arguments": PRETRAIN_ARGS, "encoder": summary}


def pretrained_encoder(work: Path) -> Path:
    weights = work / "pretrain" / "run" / "encoder.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{weights}: run the pretraining stage first (--methods pretrain)")
    return weights


# ----------------------------------------------------------------- nnU-Net v2


NNUNET_IDS = {"CT": 501, "MR": 502}
# iterations per epoch (stock: 250): on 2 CPU cores one 3d_fullres iteration takes tens of seconds, so a
# matched budget is a few short epochs (scripts/nnunet_baseline.py fits the poly schedule into it)
NNUNET_ITERATIONS = 2


def nnunet_env(work: Path) -> dict:
    base = work / "nnunet"
    return {"nnUNet_raw": str(base / "raw"), "nnUNet_preprocessed": str(base / "preprocessed"),
            "nnUNet_results": str(base / "results"), "nnUNet_compile": "f", "nnUNet_n_proc_DA": "1"}


def nnunet_tool(name: str) -> str:
    tool = Path(sys.executable).with_name(name)
    if not tool.is_file():
        raise SystemExit(f"{tool} not found: install the nnunet extra (VOLUMES_EXTRAS=...,nnunet bash scripts/setup.sh)")
    return str(tool)


def nnunet_prepare(datalist: Path, work: Path) -> None:
    """Raw datasets (one per modality, our folds as splits) and nnU-Net's own planning and preprocessing."""
    env = nnunet_env(work)
    for modality, dataset_id in NNUNET_IDS.items():
        run_measured([sys.executable, str(ROOT / "scripts" / "nnunet_baseline.py"), "convert", "--datalist",
                      str(datalist), "--modality", modality, "--dataset-id", str(dataset_id)],
                     work / "nnunet" / "convert.log", env)
    plans = [Path(env["nnUNet_preprocessed"]) / f"Dataset{i:03d}_STS{m}" / "nnUNetPlans.json" for m, i in NNUNET_IDS.items()]
    if not all(p.is_file() for p in plans):
        run_measured([nnunet_tool("nnUNetv2_plan_and_preprocess"), "-d", *map(str, NNUNET_IDS.values()), "-c",
                      "3d_fullres", "-np", "1", "--verify_dataset_integrity"], work / "nnunet" / "plan.log", env)


def run_nnunet(datalist: Path, work: Path, fold: int | str, args: argparse.Namespace) -> dict:
    """nnU-Net 3d_fullres per modality, trained for the wall-clock ours took on this fold, then nnUNetv2_predict."""
    from volumes.bundle import datalist_labels
    from volumes.data.labelled import fold_items

    fold = int(fold)
    nnunet_prepare(datalist, work)
    ours = sorted((RESULTS / "ours").glob("fold[0-9]*.json"))
    if not ours:
        raise SystemExit(f"{RESULTS / 'ours'}: run ours first (its training time is nnU-Net's budget)")
    # the median over ours' folds: one budget for every fold, robust to a fold timed on a busy machine
    budget = float(np.median([json.loads(p.read_text())["train_s"] for p in ours]))
    training = fold_items(datalist, fold, "training") + fold_items(datalist, fold, "validation")
    env = nnunet_env(work)
    from importlib.metadata import version

    record: dict = {"fold": fold, "budget_s": budget, "per_modality": {}, "cases": [],
                    "nnunetv2": version("nnunetv2"), "timm": version("timm")}
    labels = datalist_labels(datalist, [])
    for modality, dataset_id in NNUNET_IDS.items():
        # ours trains one model on both modalities; nnU-Net one per modality, sharing the budget by cases
        share = sum(e["modality"] == modality for e in training) / len(training)
        train_log = work / "nnunet" / f"fold{fold}_{modality}_train.log"
        train_log.unlink(missing_ok=True)
        train_s, train_mb = run_measured(
            [sys.executable, str(ROOT / "scripts" / "nnunet_baseline.py"), "train", "--dataset-id", str(dataset_id),
             "--modality", modality, "--fold", str(fold), "--budget-s", f"{budget * share:.0f}", "--iterations",
             str(NNUNET_ITERATIONS)], train_log, env)
        done = json.loads((Path(env["nnUNet_results"]) / f"Dataset{dataset_id:03d}_STS{modality}" /
                           "nnUNetTrainerBudget__nnUNetPlans__3d_fullres" / f"fold_{fold}" / "budget.json").read_text())
        items = fold_items(datalist, fold, "test", modality=modality)
        inputs = work / "nnunet" / f"fold{fold}_{modality}_in"
        outputs = work / "nnunet" / f"fold{fold}_{modality}_out"
        inputs.mkdir(parents=True, exist_ok=True)
        for item in items:
            link = inputs / f"{item['case_id']}_0000.nii.gz"
            if not link.exists():
                link.symlink_to(Path(item["image"]).resolve())
        infer_s, infer_mb = run_measured(
            [nnunet_tool("nnUNetv2_predict"), "-i", str(inputs), "-o", str(outputs), "-d", str(dataset_id), "-c",
             "3d_fullres", "-f", str(fold), "-tr", "nnUNetTrainerBudget", "-device", "cpu", "--disable_tta",
             "-npp", "1", "-nps", "1"], work / "nnunet" / f"fold{fold}_{modality}_predict.log", env)
        cases = score(items, {i["case_id"]: outputs / f"{i['case_id']}.nii.gz" for i in items}, labels)
        for case in cases:
            case["seconds"] = round(infer_s / len(items), 2)
        record["cases"] += cases
        record["per_modality"][modality] = {
            **done, "process_s": round(train_s, 1),
            "train_peak_mb": round(train_mb), "infer_s": round(infer_s, 1), "infer_peak_mb": round(infer_mb),
            "test_cases": len(items), "tta": False}
    record["train_s"] = round(sum(m["process_s"] for m in record["per_modality"].values()), 1)
    return record


# ----------------------------------------------------------------- the stages


def stage(method: str, fold: int | str, run, *args) -> dict:
    path = RESULTS / method / f"fold{fold}.json"
    if path.is_file():
        print(f"[{method} fold {fold}] done before: {path.relative_to(ROOT)}")
        return json.loads(path.read_text())
    print(f"[{method} fold {fold}] running ({time.strftime('%H:%M:%S')})", flush=True)
    start = time.perf_counter()
    record = run(*args)
    record.update({"machine": cpu_name(), "wall_s": round(time.perf_counter() - start, 1),
                   "date": time.strftime("%Y-%m-%d")})
    write_json(path, record)
    print(f"[{method} fold {fold}] done in {record['wall_s']:.0f} s", flush=True)
    return record


def run_ours_pretrained(datalist: Path, work: Path, fold: int | str, args: argparse.Namespace) -> dict:
    return run_ours(datalist, work, fold, args, method="ours_pretrained")


METHODS = {"ours": run_ours, "nnunet": run_nnunet, "ours_pretrained": run_ours_pretrained}


def main(argv: list[str] | None = None) -> int:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "real")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--folds", nargs="+", default=["0", "1", "2", "3", "4"],
                        help="folds to run; 'final' trains ours on every patient (the shipped model)")
    parser.add_argument("--num-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--validation-interval", type=int, default=5)
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2")
    parser.add_argument("--encoder-weights", default=None, help="a pretrained encoder (volumes pretrain's export)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the stage JSON files go")
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="first run (or resume) volumes pretrain on the real archive up to this many steps")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    RESULTS = args.results
    if not args.report_only:
        datalist = prepare(args.work, args.num_folds, args.seed)
        if args.pretrain_steps:
            record = run_pretraining(args.work, args.pretrain_steps)
            write_json(RESULTS / "pretrain.json", {**record, "machine": cpu_name(), "date": time.strftime("%Y-%m-%d")})
        for method in args.methods:
            for fold in args.folds:
                stage(method, fold, METHODS[method], datalist, args.work, fold, args)
    print(report(args.work, RESULTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
