#!/usr/bin/env python
"""The segmentation bundle trained once per 2D decoder: Dice and HD95 on the phantom test split and the real CT.

For each ``--decoders`` entry (``unetr``, ``light``), as ``python -m volumes demo`` trains the
segmentation bundle:

1. ``volumes.apps.demo.copy_bundle`` with the demo's settings (``volumes.apps.demo.SEGMENTATION``:
   a 4-block ViT-S/14, 32 epochs, validation every 16) plus ``decoder`` and ``seed``;
2. ``volumes.apps.demo.train_bundle`` (``configs/train.json``), in a child process, timed;
3. the bundle's ``configs/evaluate.json`` on the phantom test split (Dice and HD95 per organ
   from its ``MetricsSaver`` files in ``eval/``);
4. the real TotalSegmentator example CT (``--data-dir``), whole volume: the bundle's
   ``inference.json`` network (its checkpoint, settings checked), preprocessing, slab
   inferer and postprocessing; Dice and HD95 per organ in the original image space against
   the TotalSegmentator reference remapped as ``scripts/segmentation_results.py`` does;
5. ``scripts/segmentation_results.py --checkpoint <bundle>/models/model.pt --rows a``: its
   row (a), Dice on the CT's test slices (written to ``<work-dir>/<decoder>/segmentation_results.md``).

The encoder is random-initialised and frozen (no model hub here): the numbers compare
decoders, not DINOv2. Prints a markdown summary and writes it to ``<work-dir>/summary.md``.

Run from the repository root::

    python scripts/decoder_comparison.py --work-dir /tmp/decoders            # both decoders, seed 0
    python scripts/decoder_comparison.py --work-dir /tmp/decoders --seed 1 --skip-existing
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file from a checkout without installing

NAME = "dinov2_unet_segmentation"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "totalsegmentator_example"
ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae")


def run(cmd: Sequence[str], log: Path) -> float:
    """Run ``cmd`` from the repository root with its output in ``log``; returns the wall time in s."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(list(cmd), cwd=str(REPO), stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); {log}:\n{tail}")
    return time.perf_counter() - start


def read_raw(path: Path) -> dict[str, list[float]]:
    """A ``MetricsSaver`` ``*_raw.csv`` (filename, class0.. one column per organ, mean) -> column -> values."""
    with open(path) as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], [r for r in rows[1:] if r]
    return {name: [float(r[i]) for r in body] for i, name in enumerate(header) if i > 0}


def phantom_test_metrics(bundle: Path) -> dict[str, Any]:
    """Mean Dice / HD95 per organ over the test cases (``nan`` cases skipped), from ``eval/``."""
    import numpy as np

    out: dict[str, Any] = {}
    for metric, key in (("dice", "val_mean_dice"), ("hd95", "val_hd95_mm")):
        columns = read_raw(bundle / "eval" / f"{key}_raw.csv")
        organs = [c for c in columns if c != "mean"]
        if len(organs) != len(ORGANS):
            raise SystemExit(f"{bundle}/eval/{key}_raw.csv: expected {len(ORGANS)} organ columns, got {organs}")
        per_organ = {name: float(np.nanmean(columns[c])) for name, c in zip(ORGANS, organs)}
        per_case = np.nanmean(np.array([columns[c] for c in organs]), axis=0)
        out[metric] = {**per_organ, "mean": float(np.nanmean(list(per_organ.values()))),
                       "cases": [round(float(v), 4) for v in per_case]}
    return out


def real_ct_metrics(bundle: Path, data_dir: Path, work: Path) -> dict[str, Any]:
    """Dice / HD95 per organ of the bundle's network on the whole real CT, in its original space."""
    import importlib.util

    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    from volumes.arrays import spacing_mm
    from volumes.segmentation import per_case_metrics, segmentation_postprocessing, segmentation_transforms

    spec = importlib.util.spec_from_file_location("segmentation_results", REPO / "scripts" / "segmentation_results.py")
    results = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = results  # its dataclasses look their module up
    spec.loader.exec_module(results)

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    labels = list(parser.get_parsed_content("labels"))
    mapping = results.label_mapping(data_dir / results.CLASS_MAP_FILE, labels)
    seg = nib.load(data_dir / results.SEG_FILE)
    lookup = np.zeros(int(np.asarray(seg.dataobj).max()) + 1, dtype=np.uint8)
    for ts_id, ours in mapping.items():
        if ts_id < len(lookup):
            lookup[ts_id] = ours
    reference_path = work / "real_ct_reference.nii.gz"
    nib.save(nib.Nifti1Image(lookup[np.asarray(seg.dataobj).astype(np.int64)], seg.affine), reference_path)

    network = parser.get_parsed_content("network").eval()
    config = parser.get_parsed_content("preprocessing_config")
    transform = segmentation_transforms(config, network.encoder.patch_size)
    post = segmentation_postprocessing(transform, len(labels), metrics=False)
    inferer = parser.get_parsed_content("inferer")
    data = transform({"image": str(data_dir / results.CT_FILE), "label": str(reference_path), "case_id": "ct"})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    pred = np.asarray(post(data)["pred"][0])
    reference = np.asarray(data["original_label"][0]).astype(np.int64)
    row = per_case_metrics(pred, reference, spacing_mm(data["original_label"].affine), labels)
    dice = {name: row[f"dice_{name}"] for name in ORGANS}
    hd95 = {name: row[f"hd95_mm_{name}"] for name in ORGANS}
    return {"dice": {**dice, "mean": float(np.nanmean(list(dice.values())))},
            "hd95": {**hd95, "mean": float(np.nanmean([v for v in hd95.values() if math.isfinite(v)]))}}


def test_slices_row(md: Path) -> dict[str, float]:
    """Row (a) of ``segmentation_results.py``'s table: Dice on the CT's test slices (liver..kidneys, mean, aorta, vertebrae)."""
    for line in md.read_text().splitlines():
        if line.startswith("| (a) SliceSegmenter, phantom-trained"):
            cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
            keys = ("liver", "spleen", "kidney_left", "kidney_right", "mean4", "aorta", "vertebrae")
            return {k: float(v) if v not in ("–", "") else math.nan for k, v in zip(keys, cells[2:9])}
    raise SystemExit(f"{md}: no row (a)")


def compare(decoder: str, args: argparse.Namespace) -> dict[str, Any]:
    from volumes.apps.demo import SEGMENTATION, copy_bundle

    work = args.work_dir / decoder
    bundle = work / "bundle"
    result_file, trained_file = work / "result.json", work / "trained.json"
    if args.skip_existing and result_file.is_file():
        return json.loads(result_file.read_text())
    configs = bundle / "configs"
    python = sys.executable
    if args.skip_existing and trained_file.is_file():  # trained already: evaluate again
        train_s = json.loads(trained_file.read_text())["train_s"]
    else:
        work.mkdir(parents=True, exist_ok=True)
        copy_bundle(NAME, bundle, {**SEGMENTATION, "decoder": decoder, "seed": args.seed})
        train_s = run([python, "-c", f"from pathlib import Path; from volumes.apps.demo import train_bundle; "
                       f"train_bundle(Path({str(bundle)!r}))"], work / "train.log")
        trained_file.write_text(json.dumps({"train_s": train_s}) + "\n")
    print(f"{decoder}: trained in {train_s:.0f} s", flush=True)
    if not (args.skip_existing and (bundle / "eval" / "val_mean_dice_raw.csv").is_file()):
        run([python, "-m", "monai.bundle", "run", "--config_file",
             f"['{configs / 'train.json'}','{configs / 'evaluate.json'}']", "--meta_file",
             str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
             "--bundle_root", str(bundle)], work / "evaluate.log")
    result = {"decoder": decoder, "seed": args.seed, "train_s": train_s, "phantom_test": phantom_test_metrics(bundle)}
    print(f"{decoder}: phantom test {result['phantom_test']['dice']}", flush=True)
    if args.data_dir.is_dir():
        result["real_ct"] = real_ct_metrics(bundle, args.data_dir, work)
        md = work / "segmentation_results.md"
        run([python, str(REPO / "scripts" / "segmentation_results.py"), "--checkpoint", str(bundle / "models" / "model.pt"),
             "--rows", "a", "--budget-s", "5", "--data-dir", str(args.data_dir), "--output", str(md),
             "--work-dir", str(work / "segmentation_results")], work / "segmentation_results.log")
        result["real_ct_test_slices"] = test_slices_row(md)
    else:
        print(f"{decoder}: real CT skipped, no folder {args.data_dir}", flush=True)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def fmt(v: float, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def summary(results: list[dict[str, Any]]) -> str:
    lines = []
    head = "| decoder | " + " | ".join(ORGANS) + " | mean |"
    rule = "|---|" + "---|" * (len(ORGANS) + 1)
    for title, part, metric, digits in (("Phantom test split, Dice", "phantom_test", "dice", 3),
                                        ("Phantom test split, HD95 (mm)", "phantom_test", "hd95", 1),
                                        ("Real CT (whole volume), Dice", "real_ct", "dice", 3),
                                        ("Real CT (whole volume), HD95 (mm)", "real_ct", "hd95", 1)):
        rows = [r for r in results if part in r]
        if not rows:
            continue
        lines += ["", f"{title}:", "", head, rule]
        for r in rows:
            values = r[part][metric]
            lines.append(f"| {r['decoder']} (seed {r['seed']}) | "
                         + " | ".join(fmt(values[o], digits) for o in (*ORGANS, "mean")) + " |")
    rows = [r for r in results if "real_ct_test_slices" in r]
    if rows:
        keys = ("liver", "spleen", "kidney_left", "kidney_right", "mean4", "aorta", "vertebrae")
        lines += ["", "Real CT, test slices (segmentation_results.py row (a)), Dice:", "",
                  "| decoder | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in rows:
            lines.append(f"| {r['decoder']} (seed {r['seed']}) | "
                         + " | ".join(fmt(r["real_ct_test_slices"][k]) for k in keys) + " |")
    lines += ["", "| decoder | training wall time (s) | phantom test Dice per case |", "|---|---|---|"]
    for r in results:
        lines.append(f"| {r['decoder']} (seed {r['seed']}) | {r['train_s']:.0f} | {r['phantom_test']['dice']['cases']} |")
    return "\n".join(lines).lstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="one bundle copy per decoder under it")
    parser.add_argument("--decoders", nargs="+", default=["unetr", "light"], choices=["unetr", "light"])
    parser.add_argument("--seed", type=int, default=0, help="the bundle's seed (set_determinism)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="TotalSegmentator example folder")
    parser.add_argument("--skip-existing", action="store_true",
                        help="reuse <work-dir>/<decoder>/result.json, or its trained model (trained.json)")
    args = parser.parse_args(argv)
    args.work_dir = args.work_dir.resolve()
    results = [compare(d, args) for d in args.decoders]
    text = summary(results)
    (args.work_dir / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
