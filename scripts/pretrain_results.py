#!/usr/bin/env python
"""Self-supervised vs random encoders on every probe we have: writes docs/PRETRAIN_RESULTS.md.

In one run, on this machine, with the same architecture (ViT-S/14 cut to ``--depth``
blocks) for both columns:

1. **Pretraining** with ``volumes pretrain`` from the random initialisation (seed 0) that
   is also the "random" column:
   (a) CT: the segmentation phantoms, the training and validation splits of the
   hepatomegaly and lesion phantom cohorts, and the real example CT when ``../shared`` is
   there (test splits are never seen), at ``--size`` px, ``--ct-steps`` steps;
   (b) AdrenalMNIST3D's training split at ``--adrenal-size`` px, ``--adrenal-steps`` steps.
2. **Probes**, random vs pretrained: kNN (k = 20) and linear probe (CLS, L2 on validation)
   on the phantom hepatomegaly volume task and the phantom lesion slice task (encoder (a),
   slices prepared as in pretraining); AdrenalMNIST3D test AUC of kNN, the linear probe and
   a slice transformer (``scripts/adrenal_results.py``, encoder (b)); the segmentation
   bundle's phantom-test Dice and the real example CT's Dice (TotalSegmentator masks) with
   the frozen encoder (a) and the demo's decoder budget (``scripts/decoder_comparison.py``'s
   evaluation).
3. **Cost**: seconds per step, slices/s, views/s and peak memory of a pretraining step for
   the full 12-block ViT-S/14 at 112 and 224 px (``--cost-sizes``).

A benchmark, not a test: every figure is measured in the run that writes the file, with
the CPU named. Run from the repository root::

    .venv/bin/python scripts/pretrain_results.py --work-dir /tmp/pretrain_results
    .venv/bin/python scripts/pretrain_results.py --quick --work-dir /tmp/pr_quick --output /tmp/pr_quick.md
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from volumes.reporting import command_line, machine_line  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
ADRENAL = SHARED / "medmnist3d" / "adrenalmnist3d.npz"
REAL_CT = SHARED / "totalsegmentator_example"
ENCODER = "vit_small_patch14_dinov2"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--output", type=Path, default=REPO / "docs" / "PRETRAIN_RESULTS.md")
    p.add_argument("--depth", type=int, default=4, help="ViT-S/14 blocks kept (both columns)")
    p.add_argument("--preset", default="ct_abdomen_windows", help="CT slice preparation (pretraining and probes)")
    p.add_argument("--size", type=int, default=112, help="CT slice size")
    p.add_argument("--ct-steps", type=int, default=600)
    p.add_argument("--adrenal-size", type=int, default=56)
    p.add_argument("--adrenal-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--continue-steps", type=int, default=0,
                   help="continue encoder (a) for this many steps (--weights) and probe it again: does it keep what it had?")
    p.add_argument("--phantom-cases", type=int, default=60, help="hepatomegaly and lesion cohort sizes")
    p.add_argument("--cost-sizes", type=int, nargs="*", default=[112, 224])
    p.add_argument("--cost-steps", type=int, default=4)
    p.add_argument("--skip", nargs="*", default=[], choices=["segmentation", "adrenal", "cost"])
    p.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
    p.add_argument("--quick", action="store_true", help="tiny steps and cohorts: a smoke run of the script")
    args = p.parse_args(argv)
    if args.quick:
        args.ct_steps, args.adrenal_steps, args.phantom_cases, args.cost_steps = 4, 4, 16, 1
        args.cost_sizes = args.cost_sizes[:1]
    return args


# ---------------------------------------------------------------------- data
def cohorts(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    from volumes.bundle import ensure_phantom_cohort
    from volumes.data.phantoms import PhantomConfig, write_cohort

    lesion = PhantomConfig.classification_demo(task="lesion", lesion_diameter_mm=(35.0, 50.0),
                                               lesion_contrast_hu=(40.0, 60.0))
    return {
        "segmentation": Path(ensure_phantom_cohort(work / "seg", n=24, kind="segmentation")),
        "hepatomegaly": write_cohort(work / "hepatomegaly", args.phantom_cases, seed=0,
                                     config=PhantomConfig.classification_demo(), splits=(0.5, 0.2, 0.3), progress=False),
        "lesion": write_cohort(work / "lesion", args.phantom_cases, seed=1, config=lesion, splits=(0.5, 0.2, 0.3),
                               progress=False),
    }


def pretraining_csv(work: Path, lists: dict[str, Path]) -> tuple[Path, int]:
    """The unlabelled CT set: every non-test image of the phantom cohorts, plus the real CT."""
    from volumes.bundle import datalist_section

    images = []
    for datalist in lists.values():
        for section in ("training", "validation"):
            try:
                images += [item["image"] for item in datalist_section(datalist, section)]
            except Exception:  # a cohort without that section
                continue
    if (REAL_CT / "example_ct.nii.gz").is_file():
        images.append(str(REAL_CT / "example_ct.nii.gz"))
    path = work / "pretrain_ct.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image"])
        writer.writerows([[str(Path(i).resolve())] for i in images])
    return path, len(images)


# ---------------------------------------------------------------------- steps
def cached(path: Path, compute) -> Any:
    """``compute()``'s result, kept in ``path`` (JSON) so a rerun of the script reuses what it measured."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1, default=str) + "\n")
    return value


def pretrain(work: Path, data: Path, *, steps: int, size: int, preset: str | None, args, name: str,
             weights: Path | None = None) -> dict[str, Any]:
    from volumes.pretrain import PretrainConfig, pretrain as run
    from volumes.transforms import WINDOW_SETS

    out = work / name
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    config = PretrainConfig(data=str(data), out=str(out), model_kwargs={"depth": args.depth}, size=size,
                            preset=preset, channel_mode="windows" if preset in WINDOW_SETS else "repeat",
                            steps=steps, batch_size=args.batch_size, checkpoint_every=max(10, steps // 5),
                            log_every=max(1, steps // 100), slices_per_volume=32, collapse_patience=10 ** 9,
                            weights=str(weights) if weights is not None else None)
    result = run(config)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {"encoder": str(result.encoder), "steps": result.steps, "seconds": result.seconds,
               "slices_per_s": result.slices_per_s, "images_per_s": result.images_per_s,
               "first": metrics[0], "last": metrics[-1], "peak_memory_mb": result.last["peak_memory_mb"]}
    done.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def random_encoder_file(work: Path, depth: int) -> Path:
    """The random column's encoder as a file (seed 0: pretraining's own starting point)."""
    from volumes.apps.demo import write_encoder

    return write_encoder(work / "random" / "encoder.safetensors", {"depth": depth}, seed=0)


def frozen_probes(data, weights: Path, depth: int, cache: Path) -> dict[str, float]:
    from volumes.encoders import EncoderConfig
    from volumes.evaluation.runner import Evaluator

    spec = EncoderConfig(ENCODER, weights=str(weights), model_kwargs={"depth": depth})
    evaluator = Evaluator(data, spec, cache_dir=cache, progress=False)
    evaluator.embed()
    knn = evaluator.knn((20,))[0]
    linear = evaluator.linear(("cls",))[0]
    return {"knn_auc": knn.stat("test_auc")[0], "linear_auc": linear.stat("test_auc")[0],
            "knn_acc": knn.stat("test_acc")[0], "linear_acc": linear.stat("test_acc")[0]}


def phantom_probes(lists: dict[str, Path], weights: Path, args, cache: Path) -> dict[str, dict[str, float]]:
    from volumes.evaluation.data import load_evaluation_data
    from volumes.transforms import WINDOW_SETS

    mode = "windows" if args.preset in WINDOW_SETS else "repeat"
    volume = load_evaluation_data(lists["hepatomegaly"], preset=args.preset, channel_mode=mode, size=args.size)
    slices = load_evaluation_data(lists["lesion"], task="slice", slice_label="lesion", slice_within="liver",
                                  preset=args.preset, channel_mode=mode, size=args.size)
    return {"hepatomegaly": frozen_probes(volume, weights, args.depth, cache),
            "lesion_slices": frozen_probes(slices, weights, args.depth, cache)}


def adrenal_probes(weights: Path, args, cache: Path, work: Path) -> dict[str, float]:
    from volumes.evaluation.data import load_evaluation_data

    data = load_evaluation_data(ADRENAL, size=args.adrenal_size)
    out = frozen_probes(data, weights, args.depth, cache)
    md = work / f"adrenal_{weights.parent.name}.md"
    command = [sys.executable, str(REPO / "scripts" / "adrenal_results.py"), "--weights", str(weights),
               "--model-kwargs", json.dumps({"depth": args.depth}), "--aggregators", "transformer", "--seeds", "0",
               "--baseline", "none", "--slice-size", str(args.adrenal_size), "--no-cache", "--no-progress",
               "--output", str(md)] + (["--quick"] if args.quick else [])
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
    row = next(line for line in md.read_text().splitlines() if line.startswith("| ") and "+ slice transformer" in line)
    out["transformer_auc"] = float(row.split("|")[3].split("±")[0])
    return out


def segmentation(work: Path, weights: Path, args, name: str) -> dict[str, Any]:
    """The segmentation bundle trained as the demo trains it, on the frozen encoder in ``weights``."""
    from volumes.apps.demo import SEGMENTATION, copy_bundle
    from volumes.transforms import WINDOW_SETS

    done = work / f"seg_{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    compare = _module("decoder_comparison")
    bundle = work / f"seg_{name}" / "bundle"
    prep = {"preset": args.preset, "axis": "axial", "channel_mode": "windows" if args.preset in WINDOW_SETS else "repeat",
            "size": args.size}
    settings = {**SEGMENTATION, "encoder_model_kwargs": {"depth": args.depth}, "preprocessing_config": prep,
                "encoder_weights": str(weights)}
    if args.quick:
        settings.update(epochs=1, validation_interval=1, phantom_cases=8)
    copy_bundle("dinov2_unet_segmentation", bundle, settings)
    log = bundle.parent
    train_s = compare.run([sys.executable, "-c", "from pathlib import Path; from volumes.apps.demo import train_bundle; "
                           f"train_bundle(Path({str(bundle)!r}))"], log / "train.log")
    configs = bundle / "configs"
    compare.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                 f"['{configs / 'train.json'}','{configs / 'evaluate.json'}']", "--meta_file",
                 str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
                 "--bundle_root", str(bundle)], log / "evaluate.log")
    result = {"train_s": train_s, "phantom_test_dice": compare.phantom_test_metrics(bundle)["dice"]}
    if REAL_CT.is_dir():
        result["real_ct_dice"] = compare.real_ct_metrics(bundle, REAL_CT, log)["dice"]
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


COST_CHILD = """
import json, sys, time, torch
from volumes.pretrain import PretrainConfig, Pretrainer
from volumes.pretrain.trainer import peak_memory_mb
data, out, size, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
trainer = Pretrainer(PretrainConfig(data=data, out=out, size=size, steps=100, batch_size=batch, num_workers=0,
                                    progress=False, slices_per_volume=64))
batches = iter(trainer.loader())
views = next(batches)
trainer.step(views)  # warm-up
start = time.perf_counter()
for _ in range(steps):
    trainer.step(views)
seconds = (time.perf_counter() - start) / steps
print(json.dumps({"size": size, "batch": batch, "s_per_step": seconds, "slices_per_s": batch / seconds,
                  "views_per_s": batch * (2 + trainer.config.local_crops) / seconds,
                  "peak_memory_mb": peak_memory_mb(trainer.device), "threads": torch.get_num_threads()}))
"""


def cost(work: Path, data: Path, args) -> list[dict[str, Any]]:
    """Seconds per step of the full ViT-S/14 (data loading excluded: the same batch each step)."""
    rows = []
    for size in args.cost_sizes:
        done = subprocess.run([sys.executable, "-c", COST_CHILD, str(data), str(work / f"cost_{size}"), str(size),
                               str(args.cost_steps), str(args.batch_size)], capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            raise SystemExit(f"cost at {size} px failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


# ---------------------------------------------------------------------- report
def _f(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def _delta(a: Any, b: Any) -> str:
    return f"{b - a:+.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "–"


def render(ctx: dict[str, Any]) -> str:
    r = ctx["results"]
    lines = [
        "# Self-supervised pretraining vs random initialisation: measured",
        "",
        f"Generated by `scripts/pretrain_results.py` on {ctx['date']} in {ctx['minutes']:.1f} min on {ctx['machine']}. "
        f"Reproduce from the repository root:",
        "",
        "```bash",
        ctx["command"],
        "```",
        "",
        *([ctx["note"], ""] if ctx.get("note") else []),
        f"Both columns are the same network: ViT-S/14 (`{ENCODER}`) cut to {ctx['depth']} blocks, the random "
        "initialisation of seed 0 with LayerScale 1.0. The pretrained column is that network after "
        "`volumes pretrain` (DINO + iBOT + KoLeo, 2 global and 4 local crops, batch "
        f"{ctx['batch_size']}):",
        "",
    ]
    for key, label in (("ct", "(a) CT"), ("adrenal", "(b) AdrenalMNIST3D")):
        p = r.get(f"pretrain_{key}")
        if p:
            lines.append(f"- {label}: {ctx['data'][key]}; {p['steps']} steps in {p['seconds'] / 60:.1f} min "
                         f"({p['slices_per_s']:.1f} slices/s, {p['images_per_s']:.0f} views/s, data loading included), "
                         f"peak memory of the process so far {p['peak_memory_mb']:.0f} MB; loss {p['first']['loss']:.3f} -> {p['last']['loss']:.3f}, "
                         f"class-token std {p['first']['cls_std']:.4f} -> {p['last']['cls_std']:.4f}, effective rank "
                         f"{p['first']['effective_rank']:.1f} -> {p['last']['effective_rank']:.1f}, teacher entropy "
                         f"{p['first']['teacher_entropy']:.2f} -> {p['last']['teacher_entropy']:.2f} (ln K = "
                         f"{ctx['ln_k']:.2f}).")
    lines += ["", "## Probes", "", "| probe | random | pretrained | change | goal |", "|---|---|---|---|---|"]
    rows = []
    for task, label in (("hepatomegaly", "phantom hepatomegaly (volume), test AUC"),
                        ("lesion_slices", "phantom lesion slices (2D), test AUC")):
        for probe, name in (("knn_auc", "kNN k=20"), ("linear_auc", "linear probe")):
            rows.append((f"{label}: {name}", r["random"]["phantom"][task][probe], r["pretrained"]["phantom"][task][probe],
                         "+0.10"))
    if "adrenal" in r["random"]:
        for probe, name in (("knn_auc", "kNN k=20"), ("linear_auc", "linear probe"),
                            ("transformer_auc", "slice transformer")):
            rows.append((f"AdrenalMNIST3D test AUC: {name}", r["random"]["adrenal"][probe],
                         r["pretrained"]["adrenal"][probe], ">= 0.80"))
    if "segmentation" in r["random"]:
        for key, label in (("phantom_test_dice", "segmentation bundle, phantom test, mean Dice"),
                           ("real_ct_dice", "segmentation bundle, real example CT, mean Dice")):
            if key in r["random"]["segmentation"]:
                rows.append((label, r["random"]["segmentation"][key]["mean"], r["pretrained"]["segmentation"][key]["mean"],
                             "+0.03"))
    for label, a, b, goal in rows:
        lines.append(f"| {label} | {_f(a)} | {_f(b)} | {_delta(a, b)} | {goal} |")
    if r.get("continued"):
        c = r["pretrain_continued"]
        lines += ["", "## Continued pretraining: does it keep what it had?", "",
                  f"Encoder (a) continued for {c['steps']} more steps with `--weights` (heads first for "
                  f"{c['steps'] // 10} steps with the backbone frozen, then everything at a fifth of the learning rate "
                  "with layer-wise decay), probed again:", "",
                  "| probe | (a) at its end | continued | change |", "|---|---|---|---|"]
        for task, label in (("hepatomegaly", "phantom hepatomegaly"), ("lesion_slices", "phantom lesion slices")):
            for probe, name in (("knn_auc", "kNN k=20"), ("linear_auc", "linear probe")):
                a, b = r["pretrained"]["phantom"][task][probe], r["continued"]["phantom"][task][probe]
                lines.append(f"| {label}: {name} | {_f(a)} | {_f(b)} | {_delta(a, b)} |")
    if r.get("cost"):
        lines += ["", "## Cost of a pretraining step (full 12-block ViT-S/14)", "",
                  "The same batch each step (data loading excluded), fp32 on this CPU:", "",
                  "| slice size | batch | s / step | slices / s | views / s | peak memory (RSS) |", "|---|---|---|---|---|---|"]
        for c in r["cost"]:
            lines.append(f"| {c['size']} px | {c['batch']} | {c['s_per_step']:.2f} | {c['slices_per_s']:.1f} | "
                         f"{c['views_per_s']:.0f} | {c['peak_memory_mb']:.0f} MB |")
    lines += ["", "Raw figures: `results.json` in the work folder."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    machine = machine_line(torch.get_num_threads())
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    say = lambda text: print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {text}", flush=True)  # noqa: E731
    lists = cohorts(work, args)
    data, n_ct = pretraining_csv(work, lists)
    results: dict[str, Any] = {"random": {}, "pretrained": {}}
    if "cost" not in args.skip:  # first, while nothing else of this run is going on
        say("cost of a step")
        results["cost"] = cached(work / "cost.json", lambda: cost(work, data, args))
    say(f"pretraining (a) on {n_ct} CT volumes")
    results["pretrain_ct"] = pretrain(work, data, steps=args.ct_steps, size=args.size, preset=args.preset, args=args,
                                      name="pretrain_ct")
    random_file = random_encoder_file(work, args.depth)
    ct_file = Path(results["pretrain_ct"]["encoder"])
    for column, weights in (("random", random_file), ("pretrained", ct_file)):
        say(f"phantom probes, {column}")
        results[column]["phantom"] = cached(work / f"phantom_{column}.json",
                                            lambda: phantom_probes(lists, weights, args, cache))
    if args.continue_steps:
        say(f"continued pretraining of (a) for {args.continue_steps} steps")
        results["pretrain_continued"] = pretrain(work, data, steps=args.continue_steps, size=args.size,
                                                 preset=args.preset, args=args, name="pretrain_continued",
                                                 weights=ct_file)
        results["continued"] = {"phantom": cached(work / "phantom_continued.json", lambda: phantom_probes(
            lists, Path(results["pretrain_continued"]["encoder"]), args, cache))}
    adrenal = ADRENAL.is_file() and "adrenal" not in args.skip
    if adrenal:
        say("pretraining (b) on AdrenalMNIST3D")
        results["pretrain_adrenal"] = pretrain(work, ADRENAL, steps=args.adrenal_steps, size=args.adrenal_size,
                                               preset=None, args=args, name="pretrain_adrenal")
        for column, weights in (("random", random_file), ("pretrained", Path(results["pretrain_adrenal"]["encoder"]))):
            say(f"AdrenalMNIST3D probes, {column}")
            results[column]["adrenal"] = cached(work / f"adrenal_{column}.json",
                                                lambda: adrenal_probes(weights, args, cache, work))
    if "segmentation" not in args.skip:
        for column, weights in (("random", random_file), ("pretrained", ct_file)):
            say(f"segmentation bundle, {column}")
            results[column]["segmentation"] = segmentation(work, weights, args, column)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    import math

    ctx = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "minutes": (time.perf_counter() - started) / 60, "machine": machine, "command": command_line("pretrain_results.py", argv),
           "depth": args.depth, "batch_size": args.batch_size, "note": args.note, "ln_k": math.log(1024), "results": results,
           "data": {"ct": f"{n_ct} CT volumes (phantoms without the test splits, plus the real example CT), "
                          f"{args.preset} at {args.size} px",
                    "adrenal": f"the 1188 training volumes, slices at {args.adrenal_size} px"}}
    text = render(ctx)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
