#!/usr/bin/env python
"""How well does the quality-control flag find bad segmentations? Held-out phantoms with controlled corruptions.

1. A segmentation bundle trained on phantoms (``--bundle``, or trained here with the demo's
   settings: a frozen random-init 4-block ViT-S/14 at 112 px, 32 epochs); its training
   fits the QC reference on its training and validation splits (``models/model.qc.json``).
2. Held-out phantoms: the bundle's test split and ``--extra-cases`` new ones (other seeds),
   each clean and under every corruption of :data:`CONDITIONS`
   (:mod:`volumes.data.corruptions`: noise, blur, truncated field of view, values without
   the rescale intercept, an MR-like contrast, a removed organ), written as NIfTI.
3. ``volumes infer`` (:class:`volumes.inference.BatchInference`) with the bundle over all of
   them: masks and QC flags as users get them.
4. Dice per organ against the (equally corrupted) labels in the original grid; an organ
   "needs review" when its Dice is below 0.8 (an organ absent from both counts as Dice 1).
   Reported: the AUROC of the organ score (and of each sign alone) for Dice < 0.8, the flag's
   sensitivity and false-alarm rate, the false-alarm rate on clean cases, per condition, and
   a figure of score against Dice.

Run from the repository root (about 15 min on 2 CPU cores, training included)::

    .venv/bin/python scripts/qc_study.py --out runs/qc_study --doc docs/QC_STUDY.md --figure docs/qc_score_vs_dice.png

The encoders are random-initialised (no model hub here): the signs measure a phantom-trained
decoder on random features, not DINOv2.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from volumes.reporting import command_line, machine_line, markdown_table  # noqa: E402

CONDITIONS: dict[str, tuple[str, dict] | None] = {
    "clean": None,
    "noise 40 HU": ("noise", {"sigma_hu": 40.0}),
    "noise 150 HU": ("noise", {"sigma_hu": 150.0}),
    "blur 2 mm": ("blur", {"sigma_mm": 2.0}),
    "blur 6 mm": ("blur", {"sigma_mm": 6.0}),
    "FOV 70%": ("truncate", {"keep": 0.7}),
    "FOV 45%": ("truncate", {"keep": 0.45}),
    "no intercept (HU+1024)": ("no_intercept", {}),
    "MR-like contrast": ("mr_like", {}),
    "spleen removed": ("remove_organ", {"organ": 2}),
    "left kidney removed": ("remove_organ", {"organ": 3}),
}
SIGNS = ("ood", "volume", "margin", "agreement", "fragments")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "qc_study", help="work folder")
    parser.add_argument("--bundle", type=Path, help="a trained segmentation bundle (default: train one in --out)")
    parser.add_argument("--extra-cases", type=int, default=15, help="held-out phantoms besides the test split")
    parser.add_argument("--seed", type=int, default=5000, help="first seed of the extra phantoms")
    parser.add_argument("--no-test-split", dest="test_split", action="store_false",
                        help="only the extra phantoms (e.g. when the test split was looked at while developing)")
    parser.add_argument("--doc", type=Path, help="write the results page here (markdown)")
    parser.add_argument("--figure", type=Path, help="write the score-vs-Dice figure here (PNG)")
    return parser.parse_args(argv)


def train(out: Path) -> tuple[Path, float]:
    from volumes.apps.demo import SEGMENTATION, copy_bundle, train_bundle

    bundle = copy_bundle("dinov2_unet_segmentation", out / "bundle", SEGMENTATION)
    start = time.perf_counter()
    train_bundle(bundle)
    return bundle, time.perf_counter() - start


def held_out_cases(bundle: Path, out: Path, extra: int, seed: int, test_split: bool = True) -> list[dict]:
    """The bundle's test split (unless ``test_split`` is False) and ``extra`` new phantoms: ``{case_id, image, label}``."""
    from volumes.bundle import datalist_section
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case

    cases = [{"case_id": f"test_{i['case_id']}", "image": i["image"], "label": i["label"]}
             for i in datalist_section(bundle / "data" / "phantoms" / "datalist.json", "test")] if test_split else []
    # the bundle's cohort settings (its task decides the organ volumes' distribution)
    infos = json.loads((bundle / "data" / "phantoms" / "cases.json").read_text())
    config = PhantomConfig.segmentation_demo(task=next(iter(infos.values()))["task"])
    for n in range(extra):
        entry = write_case(generate_phantom(seed + n, config), out / "extra", f"extra_{seed + n}")
        cases.append({"case_id": f"extra_{seed + n}", "image": str(out / "extra" / entry["image"]),
                      "label": str(out / "extra" / entry["label"])})
    return cases


def write_inputs(cases: list[dict], folder: Path) -> dict[str, dict]:
    """Every case under every condition as NIfTI in ``folder``; case id -> condition, source, label array."""
    import nibabel as nib

    from volumes.data.corruptions import corrupt

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    known = {}
    for index, case in enumerate(cases):
        image_file, label_file = nib.load(case["image"]), nib.load(case["label"])
        image = np.asanyarray(image_file.dataobj).astype(np.float32)
        label = np.asanyarray(label_file.dataobj).astype(np.uint8)
        for c, (condition, spec) in enumerate(CONDITIONS.items()):
            img, lab, affine = (image, label, image_file.affine) if spec is None else corrupt(
                spec[0], image, label, image_file.affine, seed=1000 * index + c, **spec[1])
            case_id = f"c{c:02d}__{case['case_id']}"
            data = np.clip(np.rint(img), -32768, 32767).astype(np.int16)
            nib.save(nib.Nifti1Image(data, affine), folder / f"{case_id}.nii.gz")
            known[case_id] = {"condition": condition, "case": case["case_id"], "label": lab}
    return known


def organ_rows(output: Path, known: dict[str, dict], labels: list[str]) -> list[dict]:
    """One row per (case, organ): condition, Dice, predicted volume, QC score, flag, z per sign."""
    import nibabel as nib

    from volumes.quality import dice_per_organ

    rows = []
    for line in (output / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        info = known[row["case_id"]]
        mask = np.asanyarray(nib.load(output / row["outputs"]["segmentation"]).dataobj)
        dice = dice_per_organ(mask, info["label"], labels)
        quality = row["quality"]
        for organ, value in dice.items():
            qc = quality["organs"][organ]
            rows.append({"case_id": row["case_id"], "condition": info["condition"], "organ": organ, "dice": value,
                         "present": bool((info["label"] == labels.index(organ)).any()),
                         "volume_ml": row["organ_volumes_ml"][organ], "score": qc["score"], "flag": qc["flag"],
                         "case_flag": quality["flag"], "case_score": quality["score"],
                         "z": {**qc["z"], "ood": quality["ood_z"] or 0.0}, "reasons": qc["reasons"]})
    return rows


def _rate(values: Sequence[bool]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def summarise(rows: list[dict], reference: dict) -> dict[str, Any]:
    from volumes.metrics import binary_auc
    from volumes.quality import DICE_BAR

    bad = [r["dice"] < DICE_BAR for r in rows]
    scores = [r["score"] for r in rows]
    flagged = [r["flag"] == "review" for r in rows]
    clean = [r for r in rows if r["condition"] == "clean"]
    clean_cases = {r["case_id"]: r["case_flag"] == "review" for r in clean}
    cases: dict[str, dict] = {}
    for r in rows:  # a case needs review when any of its organs has Dice < 0.8
        case = cases.setdefault(r["case_id"], {"score": r["case_score"], "flag": r["case_flag"] == "review",
                                               "bad": False})
        case["bad"] |= r["dice"] < DICE_BAR
    case_bad = [c["bad"] for c in cases.values()]
    result = {
        "organs": len(rows), "below_bar": int(sum(bad)), "auroc": binary_auc(scores, bad),
        "cases": len(cases), "cases_below_bar": int(sum(case_bad)),
        "case_auroc": binary_auc([c["score"] for c in cases.values()], case_bad),
        "case_sensitivity": _rate([c["flag"] for c in cases.values() if c["bad"]]),
        "case_false_alarm_rate": _rate([c["flag"] for c in cases.values() if not c["bad"]]),
        "auroc_by_sign": {s: binary_auc([r["z"].get(s, 0.0) for r in rows], bad) for s in SIGNS},
        "sensitivity": _rate([f for f, b in zip(flagged, bad) if b]),
        "false_alarm_rate": _rate([f for f, b in zip(flagged, bad) if not b]),
        "clean_organ_false_alarm_rate": _rate([r["flag"] == "review" for r in clean if r["dice"] >= DICE_BAR]),
        "clean_case_flag_rate": _rate(list(clean_cases.values())), "clean_cases": len(clean_cases),
        "threshold": reference["threshold"], "validation": reference["validation"], "conditions": {},
    }
    for condition in CONDITIONS:
        part = [r for r in rows if r["condition"] == condition]
        cases = {r["case_id"]: r["case_flag"] == "review" for r in part}
        result["conditions"][condition] = {
            "cases": len(cases), "mean_dice": float(np.mean([r["dice"] for r in part])),
            "below_bar": _rate([r["dice"] < DICE_BAR for r in part]),
            "flagged": _rate([r["flag"] == "review" for r in part]),
            "sensitivity": _rate([r["flag"] == "review" for r in part if r["dice"] < DICE_BAR]),
            "false_alarms": _rate([r["flag"] == "review" for r in part if r["dice"] >= DICE_BAR]),
            "cases_flagged": _rate(list(cases.values())),
        }
    removed = [r for r in rows if r["condition"].endswith("removed") and not r["present"]]
    result["removed_organs"] = {"organs": len(removed), "flagged": _rate([r["flag"] == "review" for r in removed]),
                                "predicted_empty": _rate([r["volume_ml"] == 0 for r in removed]),
                                "dice_below_bar": _rate([r["dice"] < DICE_BAR for r in removed])}
    return result


def figure(rows: list[dict], threshold: float, path: Path) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from volumes.quality import DICE_BAR

    fig = Figure(figsize=(14, 5), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=(1.35, 1.0), wspace=0.45)
    ax, roc = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    cmap = matplotlib.colormaps["tab20"]
    floor = 0.1  # a score of 0 (every sign on the good side) is drawn at the bottom of the log axis
    for i, condition in enumerate(CONDITIONS):
        part = [r for r in rows if r["condition"] == condition]
        ax.scatter([r["dice"] for r in part], [max(r["score"], floor) for r in part], s=12, alpha=0.7,
                   color=cmap(i / max(len(CONDITIONS) - 1, 1)), label=condition, edgecolors="none")
    ax.axhline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
    ax.axvline(DICE_BAR, color="0.5", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_ylim(floor * 0.8, max(r["score"] for r in rows) * 1.5)
    ax.set_xlabel("organ Dice against the (corrupted) labels")
    ax.set_ylabel(f"QC score (largest z of the signs; < {floor} drawn at {floor})")
    ax.set_title("QC score vs Dice, held-out phantoms")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    bad = np.array([r["dice"] < DICE_BAR for r in rows])
    for name, values in [("score", [r["score"] for r in rows])] + [(s, [r["z"].get(s, 0.0) for r in rows]) for s in SIGNS]:
        v = np.asarray(values, np.float64)
        order = np.argsort(-v, kind="stable")
        tpr = np.concatenate([[0.0], np.cumsum(bad[order]) / max(bad.sum(), 1)])
        fpr = np.concatenate([[0.0], np.cumsum(~bad[order]) / max((~bad).sum(), 1)])
        roc.plot(fpr, tpr, linewidth=2.0 if name == "score" else 1.0, label=name)
    roc.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
    roc.set_xlabel("false-alarm rate (organs with Dice >= 0.8)")
    roc.set_ylabel("sensitivity (organs with Dice < 0.8)")
    roc.set_title("ROC of the score and of each sign alone")
    roc.legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.11, top=0.93)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _f(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def render(result: dict, context: dict) -> str:
    v = result["validation"]
    lines = [
        "# Quality control of segmentations: the study",
        "",
        f"Generated by `scripts/qc_study.py` on {context['date']} in {context['minutes']:.1f} min "
        f"({context['machine']}). Reproduce from the repository root:",
        "", "```bash", context["command"], "```", "",
        "What the flag is and how it is fitted: [QC.md](QC.md#how-it-works). The segmentation bundle was trained with "
        f"the demo's settings ({context['training']}); its QC reference was fitted at the end of training on "
        f"{v['training_cases']} training and {v['cases']} validation cases: threshold **{result['threshold']:.2f}** "
        f"({v['threshold_rule']}; validation AUROC {_f(v['auroc'])}, {v['organs_below_dice_bar']} of {v['organs']} "
        "validation organs below Dice 0.8).",
        "",
        f"Held-out phantoms: {context['cases']} cases ({context['split']}{context['extra']} new phantoms of the "
        f"bundle's cohort settings, seeds from {context['seed']}), "
        f"each clean and under {len(CONDITIONS) - 1} corruptions, {result['organs']} organ results in all, "
        f"{result['below_bar']} of them with Dice < 0.8.",
        "",
        "| | value |", "|---|---:|",
        f"| AUROC of the organ score for Dice < 0.8 | **{_f(result['auroc'])}** |",
        f"| sensitivity of the flag (organs with Dice < 0.8 flagged) | {_f(result['sensitivity'])} |",
        f"| false-alarm rate (organs with Dice >= 0.8 flagged), all conditions | {_f(result['false_alarm_rate'])} |",
        f"| false-alarm rate on clean cases (organs with Dice >= 0.8 flagged) | **{_f(result['clean_organ_false_alarm_rate'])}** |",
        f"| clean cases flagged (any organ or the image) | {round(result['clean_case_flag_rate'] * result['clean_cases'])} "
        f"of {result['clean_cases']} |",
        f"| case level: AUROC of the case score for 'some organ has Dice < 0.8' ({result['cases_below_bar']} of "
        f"{result['cases']} cases) | {_f(result['case_auroc'])} |",
        f"| case level: sensitivity / false-alarm rate of the case flag | {_f(result['case_sensitivity'])} / "
        f"{_f(result['case_false_alarm_rate'])} |",
        "", "AUROC of each sign alone (its z-score; `ood` is the case's) for an organ's Dice < 0.8:", "",
        markdown_table(list(SIGNS), [[_f(result["auroc_by_sign"][s]) for s in SIGNS]], "r" * len(SIGNS)),
        "", "Per condition (organ rows; 'flagged' counts organs, 'cases flagged' counts cases with any flag):", "",
    ]
    rows = [[c, str(d["cases"]), _f(d["mean_dice"]), _f(d["below_bar"], ".2f"), _f(d["flagged"], ".2f"),
             _f(d["sensitivity"], ".2f"), _f(d["false_alarms"], ".2f"), _f(d["cases_flagged"], ".2f")]
            for c, d in result["conditions"].items()]
    lines.append(markdown_table(["condition", "cases", "mean Dice", "Dice < 0.8", "flagged", "sensitivity",
                                 "false alarms", "cases flagged"], rows))
    r = result["removed_organs"]
    lines += ["", f"Removed organs ({r['organs']}: the spleen or the left kidney replaced by fat): the model predicted "
              f"nothing for {_f(r['predicted_empty'], '.2f')} of them (Dice 1 by convention) and hallucinated the organ "
              f"in the rest (Dice 0: {_f(r['dice_below_bar'], '.2f')} below 0.8); QC flagged {_f(r['flagged'], '.2f')} "
              "of them (an organ not found is flagged for its implausible volume, which counts as a false alarm above "
              "when the model correctly found nothing).", "",
              f"![QC score against Dice, and ROC curves]({context['figure']})", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from volumes.data.phantoms import LABEL_NAMES
    from volumes.inference import BatchInference, load_bundle

    start = time.perf_counter()
    threads = torch.get_num_threads()
    context = {"machine": machine_line(threads), "command": command_line("qc_study.py", argv),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.bundle is None:
        print("[1/4] training the segmentation bundle (demo settings)", flush=True)
        bundle, seconds = train(args.out)
        context["training"] = f"trained here in {seconds / 60:.1f} min"
    else:
        bundle = args.bundle
        context["training"] = f"the bundle in {bundle}"
    from volumes.apps.demo import SEGMENTATION

    context["training"] = f"{SEGMENTATION}, {context['training']}"
    print("[2/4] writing the held-out cases under every condition", flush=True)
    cases = held_out_cases(bundle, args.out, args.extra_cases, args.seed, args.test_split)
    known = write_inputs(cases, args.out / "inputs")
    context.update(cases=len(cases), extra=args.extra_cases, seed=args.seed,
                   split="the bundle's test split and " if args.test_split else "")
    print(f"[3/4] volumes infer on {len(known)} inputs", flush=True)
    model = load_bundle(bundle, device="cpu")
    output = args.out / "infer"
    if output.exists():
        shutil.rmtree(output)
    from volumes.data.discovery import discover_cases

    summary = BatchInference([model], output, figures=False).run([c.to_dict() for c in discover_cases(args.out / "inputs")])
    print(summary.line(), flush=True)
    print("[4/4] scoring", flush=True)
    labels = list(LABEL_NAMES)
    rows = organ_rows(output, known, labels)
    reference = json.loads((bundle / "models" / "model.qc.json").read_text())
    result = summarise(rows, reference)
    context["minutes"] = (time.perf_counter() - start) / 60
    figure_path = args.figure or args.out / "qc_score_vs_dice.png"
    figure(rows, result["threshold"], figure_path)
    (args.out / "qc_study.json").write_text(json.dumps({"result": result, "rows": rows}, indent=1, default=str) + "\n")
    doc = args.doc or args.out / "QC_STUDY.md"
    context["figure"] = Path(figure_path).name if doc.parent.resolve() == Path(figure_path).parent.resolve() else str(figure_path)
    text = render(result, context)
    doc.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
