#!/usr/bin/env python
"""Regenerate docs/RESULTS.md: every evaluation protocol x backbone on AdrenalMNIST3D and phantom tasks.

Protocols (volumes.evaluation): weighted kNN (k = 10, 20), few-shot logistic regression
(n = 1, 2, 4, 8, 16 per class, 5 seeded draws), linear probe (CLS; CLS + mean patch;
last four blocks' CLS; L2 chosen on validation), and end to end: full fine-tuning with
layer-wise learning-rate decay, LoRA (peft, qkv + MLP) and BitFit.

Backbones: DINOv2 ViT-S/14 and ViT-B/14, each with and without registers, DINOv3 ViT-S/16,
and ResNet-50 (timm's supervised ImageNet CNN) through the same encoder interface.

Data:

* AdrenalMNIST3D (../shared/data/medmnist3d, official split, 28³): volume task;
* phantom hepatomegaly (``PhantomConfig.classification_demo()``, generated here): volume task;
* phantom liver-lesion slices (lesion task, larger lesions): 2D slice task, frozen protocols.

No model hub is reachable where this runs, so by default every encoder is randomly
initialised, and the ViTs are cut to 4 blocks (``model_kwargs={"depth": 4}``) to fit
a 2-core CPU; with ``--weights KEY=FILE`` (or ``--pretrained``) a backbone gets real
weights at full depth and the same protocols run unchanged.

Run from the repository root::

    .venv/bin/python scripts/evaluation_results.py                     # full run, writes docs/RESULTS.md
    .venv/bin/python scripts/evaluation_results.py --quick --output /tmp/quick.md   # smoke run
    .venv/bin/python scripts/evaluation_results.py --weights dinov2_s=dinov2_vits14_pretrain.pth
    .venv/bin/python scripts/evaluation_results.py --render-from runs/evaluation_results.json  # text only
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from volumes.reporting import command_line, format_params as fmt_params, machine_line, quick_subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file from a checkout without installing

DEFAULT_DATA = REPO.parent / "shared" / "data" / "medmnist3d" / "adrenalmnist3d.npz"
DEFAULT_OUTPUT = REPO / "docs" / "RESULTS.md"

# MedMNIST v2 (Yang et al., Scientific Data 2023), AdrenalMNIST3D test AUC / ACC.
PUBLISHED = [
    ("ResNet-18 (3D)", 0.827, 0.721),
    ("ResNet-50 (3D)", 0.828, 0.745),
    ("ResNet-18 (ACS)", 0.839, 0.754),
    ("auto-sklearn", 0.828, 0.802),
]


@dataclass(frozen=True)
class Backbone:
    key: str
    label: str
    timm_name: str
    random_kwargs: dict = field(default_factory=dict)  # model_kwargs for the random-init CPU budget


VIT_BUDGET = {"depth": 4}
BACKBONES = (
    Backbone("dinov2_s", "DINOv2 ViT-S/14", "vit_small_patch14_dinov2", VIT_BUDGET),
    Backbone("dinov2_s_reg", "DINOv2 ViT-S/14 reg4", "vit_small_patch14_reg4_dinov2", VIT_BUDGET),
    Backbone("dinov2_b", "DINOv2 ViT-B/14", "vit_base_patch14_dinov2", VIT_BUDGET),
    Backbone("dinov2_b_reg", "DINOv2 ViT-B/14 reg4", "vit_base_patch14_reg4_dinov2", VIT_BUDGET),
    Backbone("dinov3_s", "DINOv3 ViT-S/16", "vit_small_patch16_dinov3", VIT_BUDGET),
    Backbone("resnet50", "ResNet-50", "resnet50", {}),
)


@dataclass(frozen=True)
class Task:
    key: str
    title: str
    kind: str  # volume | slice
    base_size: int  # slice side before rounding to the encoder's patch
    end_to_end: bool


TASKS = (
    Task("adrenal", "AdrenalMNIST3D (volume classification)", "volume", 28, True),
    Task("hepatomegaly", "Phantom hepatomegaly (volume classification)", "volume", 28, True),
    Task("lesion_slices", "Phantom liver-lesion slices (2D slice classification)", "slice", 70, False),
)
ROW_ORDER = [("knn", "k=10"), ("knn", "k=20"), *[("fewshot", f"n={n}") for n in (1, 2, 4, 8, 16)],
             ("linear", "cls"), ("linear", "cls_patch_mean"), ("linear", "last4_cls"),
             ("finetune", None), ("lora", None), ("bitfit", None)]
ROW_LABELS = {"knn": "kNN", "fewshot": "few-shot", "linear": "linear probe", "finetune": "fine-tune (LLRD)",
              "lora": "LoRA r=8", "bitfit": "BitFit"}


# --------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="AdrenalMNIST3D .npz")
    parser.add_argument("--backbones", nargs="+", default=[b.key for b in BACKBONES],
                        choices=[b.key for b in BACKBONES])
    parser.add_argument("--tasks", nargs="+", default=[t.key for t in TASKS], choices=[t.key for t in TASKS])
    parser.add_argument("--weights", nargs="+", default=[], metavar="KEY=FILE",
                        help="real weights for a backbone (full depth), e.g. dinov2_s=dinov2_vits14_pretrain.pth")
    parser.add_argument("--pretrained", action="store_true", help="timm hub weights for every backbone (network)")
    parser.add_argument("--encoder-seed", type=int, default=0, help="seed of the random encoders")
    parser.add_argument("--phantom-cases", type=int, default=80, help="hepatomegaly cohort size")
    parser.add_argument("--lesion-cases", type=int, default=60, help="lesion cohort size")
    parser.add_argument("--draws", type=int, default=5, help="few-shot draws per n")
    parser.add_argument("--e2e-seeds", nargs="+", type=int, default=[0], help="end-to-end runs per protocol")
    parser.add_argument("--e2e-epochs", type=int, default=2)
    parser.add_argument("--adrenal-max-train", type=int, default=96,
                        help="end to end on AdrenalMNIST3D: stratified subset of the 1188 training volumes")
    parser.add_argument("--phantom-max-train", type=int, default=16,
                        help="end to end on the phantoms: stratified subset of the training volumes")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="embedding cache (default: a fresh temporary folder, so the first pass is cold)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the phantom cohorts go (default: temporary)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--output", type=Path, default=None, help=f"markdown file (default {DEFAULT_OUTPUT})")
    parser.add_argument("--json", type=Path, default=None, help="also write every run as JSON here")
    parser.add_argument("--render-from", type=Path, default=None,
                        help="re-render the markdown from a --json file of an earlier run (computes nothing)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 backbones, subsets, 1 epoch; writes nothing unless --output")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.weight_files = {}
    for entry in args.weights:
        key, sep, path = entry.partition("=")
        if not sep or key not in {b.key for b in BACKBONES}:
            parser.error(f"--weights wants KEY=FILE with KEY in {[b.key for b in BACKBONES]}, got {entry!r}")
        args.weight_files[key] = path
    if args.pretrained and args.weight_files:
        parser.error("--pretrained and --weights do not go together")
    if args.quick:
        args.backbones = [k for k in args.backbones if k in ("dinov2_s", "resnet50")] or args.backbones[:1]
        args.phantom_cases, args.lesion_cases = min(args.phantom_cases, 40), min(args.lesion_cases, 24)
        args.e2e_epochs, args.draws = 1, min(args.draws, 2)
        args.adrenal_max_train, args.phantom_max_train = 32, 12
    elif args.output is None:
        args.output = DEFAULT_OUTPUT
    return args




# --------------------------------------------------------------------------- data
def round_to_patch(base: int, patch: int) -> int:
    return max(patch, round(base / patch) * patch)


def phantom_cohorts(work: Path, args: argparse.Namespace, tasks: Sequence[str]) -> dict[str, Path]:
    from volumes.data.phantoms import PhantomConfig, write_cohort

    out = {}
    show = not args.no_progress
    if "hepatomegaly" in tasks:
        out["hepatomegaly"] = write_cohort(work / "hepatomegaly", args.phantom_cases, seed=0,
                                           config=PhantomConfig.classification_demo(), splits=(0.5, 0.2, 0.3),
                                           progress=show)
    if "lesion_slices" in tasks:
        out["lesion_slices"] = write_cohort(work / "lesion", args.lesion_cases, seed=1, config=LESION_CONFIG(),
                                            splits=(0.5, 0.2, 0.3), progress=show)
    return out


def LESION_CONFIG():  # noqa: N802 - a constant that needs an import
    from volumes.data.phantoms import PhantomConfig

    # classification_demo's geometry and enhancement, with lesions large enough to span a patch or two
    return PhantomConfig.classification_demo(task="lesion", lesion_diameter_mm=(35.0, 50.0),
                                             lesion_contrast_hu=(40.0, 60.0))


def load_task(task: Task, args: argparse.Namespace, cohorts: dict[str, Path], patch: int):
    from volumes.evaluation.data import load_evaluation_data

    size = round_to_patch(task.base_size, patch)
    if task.key == "adrenal":
        data = load_evaluation_data(args.data, size=size)
        if args.quick:
            data.splits = {s: quick_subset(items, {"train": 48, "val": 16, "test": 32}[s])
                           for s, items in data.splits.items()}
        return data
    if task.key == "hepatomegaly":
        return load_evaluation_data(cohorts["hepatomegaly"], preset="liver", size=size)
    return load_evaluation_data(cohorts["lesion_slices"], task="slice", slice_label="lesion", slice_within="liver",
                                preset="liver", size=size)


# --------------------------------------------------------------------------- running
def run_all(args: argparse.Namespace, cache_dir: Path, cohorts: dict[str, Path], say) -> dict[str, Any]:
    from volumes.evaluation.finetune import FinetuneConfig
    from volumes.encoders import EncoderConfig
    from volumes.evaluation.runner import Evaluator

    backbones = [b for b in BACKBONES if b.key in args.backbones]
    tasks = [t for t in TASKS if t.key in args.tasks]
    records: dict[str, Any] = {"results": [], "embedding": [], "sizes": {}, "data": {}, "slice_counts": {}}
    for task in tasks:
        for backbone in backbones:
            weights = args.weight_files.get(backbone.key)
            real = weights is not None or args.pretrained
            spec = EncoderConfig(backbone.timm_name, weights=weights, pretrained=args.pretrained,
                               model_kwargs={} if real else dict(backbone.random_kwargs), seed=args.encoder_seed)
            encoder = spec.build(mode="frozen")
            data = load_task(task, args, cohorts, encoder.patch_size)
            records["sizes"][(task.key, backbone.key)] = data.settings["size"]
            records["data"][task.key] = {"counts": data.counts(), "kind": data.kind, "task": data.task,
                                         "positives": {s: sum(data.labels(s)) for s in data.splits}}
            evaluator = Evaluator(data, spec, cache_dir=cache_dir, progress=not args.no_progress, encoder=encoder)
            cold = evaluator.embed()
            warm = evaluator.embed()
            records["embedding"].append({"task": task.key, "backbone": backbone.key, "cold": cold, "warm": warm})
            if task.kind == "slice":
                rows = evaluator.features("cls")
                records["slice_counts"][task.key] = {**{s: len(rows[s]) for s in rows},
                                                     "test_pos": int(rows["test"].y.sum())}
            say(f"{task.key} / {backbone.key}: embeddings {cold['seconds']:.1f} s cold "
                f"({cold['encoded_slices']} slices encoded), {warm['seconds']:.1f} s from the cache")
            results = evaluator.knn((10, 20))
            results += evaluator.fewshot((1, 2, 4, 8, 16), draws=args.draws)
            results += evaluator.linear()
            if task.end_to_end:
                max_train = args.adrenal_max_train if task.key == "adrenal" else args.phantom_max_train
                batch = 16 if task.key == "adrenal" else 8
                for method in ("finetune", "lora", "bitfit"):
                    config = FinetuneConfig(method=method, epochs=args.e2e_epochs, batch_size=batch)
                    results.append(evaluator.finetune(config, seeds=args.e2e_seeds, max_train=max_train))
            for result in results:
                records["results"].append({"task": task.key, "backbone": backbone.key, **result.to_dict()})
                auc = result.stat("test_auc")
                say(f"  {result.protocol:>8} {result.variant:<16} AUC {auc[0]:.3f} ± {auc[1]:.3f}  "
                    f"{result.trainable_params} params  {result.seconds:.1f} s")
            del evaluator, encoder
    return records


# --------------------------------------------------------------------------- report
def cell(values: Sequence[float]) -> str:
    from volumes.metrics import mean_std

    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {std:.3f}"


def find(records: dict, task: str, backbone: str, protocol: str, variant: str | None) -> dict | None:
    for r in records["results"]:
        if (r["task"], r["backbone"], r["protocol"]) == (task, backbone, protocol) and (
                variant is None or r["variant"] == variant):
            return r
    return None


def metric_table(records: dict, task: Task, backbones: list[Backbone], key: str) -> str:
    head = "| protocol | " + " | ".join(b.label for b in backbones) + " |"
    lines = [head, "|---|" + "---|" * len(backbones)]
    for protocol, variant in ROW_ORDER:
        if not task.end_to_end and protocol in ("finetune", "lora", "bitfit"):
            continue
        cells = []
        for b in backbones:
            r = find(records, task.key, b.key, protocol, variant)
            cells.append(cell([run[key] for run in r["runs"]]) if r else "–")
        name = ROW_LABELS[protocol] + (f" {variant}" if variant else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(records: dict, tasks: list[Task], backbones: list[Backbone]) -> str:
    lines = ["| data | protocol | " + " | ".join(b.label for b in backbones) + " |",
             "|---|---|" + "---|" * len(backbones)]
    groups = [("kNN (k=10, 20)", ("knn",)), ("few-shot (5 n × draws)", ("fewshot",)),
              ("linear probe (3 feature kinds, L2 sweep)", ("linear",)),
              ("fine-tune", ("finetune",)), ("LoRA", ("lora",)), ("BitFit", ("bitfit",))]
    for task in tasks:
        emb = {e["backbone"]: e for e in records["embedding"] if e["task"] == task.key}
        lines.append(f"| {task.key} | embeddings, first run (cold cache) | "
                     + " | ".join(f"{emb[b.key]['cold']['seconds']:.1f} s" if b.key in emb else "–" for b in backbones)
                     + " |")
        for label, protocols in groups:
            if not task.end_to_end and protocols[0] in ("finetune", "lora", "bitfit"):
                continue
            cells = []
            for b in backbones:
                total = [r["seconds"] for r in records["results"]
                         if r["task"] == task.key and r["backbone"] == b.key and r["protocol"] in protocols]
                cells.append(f"{sum(total):.1f} s" if total else "–")
            lines.append(f"| {task.key} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_depth_params(backbones: Sequence[Backbone]) -> dict[str, dict[str, int]]:
    """Encoder parameters each end-to-end method trains at the backbone's full depth (counted, not run)."""
    from volumes.evaluation.finetune import FinetuneConfig, count_parameters, prepare_encoder
    from volumes.encoders import EncoderConfig

    out: dict[str, dict[str, int]] = {}
    for b in backbones:
        out[b.key] = {}
        for method in ("finetune", "lora", "bitfit"):
            encoder = EncoderConfig(b.timm_name).build(mode="finetune")
            prepare_encoder(encoder, FinetuneConfig(method=method))
            out[b.key][method] = count_parameters(encoder)
            out[b.key]["depth"] = encoder.depth
    return out


def params_table(records: dict, backbones: list[Backbone], task_key: str) -> str:
    lines = ["| protocol | " + " | ".join(b.label for b in backbones) + " |", "|---|" + "---|" * len(backbones)]
    rows = [("kNN", "knn", "k=10"), ("few-shot / linear probe on CLS", "linear", "cls"),
            ("linear probe on CLS + mean patch", "linear", "cls_patch_mean"),
            ("linear probe on last four CLS", "linear", "last4_cls"),
            ("fine-tune (encoder + head)", "finetune", None), ("LoRA (adapters + head)", "lora", None),
            ("BitFit (biases + head)", "bitfit", None)]
    for label, protocol, variant in rows:
        cells = []
        for b in backbones:
            r = find(records, task_key, b.key, protocol, variant)
            cells.append(fmt_params(r["trainable_params"]) if r else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    full = records.get("full_depth", {})
    if full:
        lines.append("| *at full depth (blocks / stages)* | " + " | ".join(
            f"*{full[b.key]['depth']}*" for b in backbones) + " |")
        for label, method in (("fine-tune encoder", "finetune"), ("LoRA adapters", "lora"), ("BitFit biases", "bitfit")):
            lines.append(f"| {label}, full depth | " + " | ".join(fmt_params(full[b.key][method]) for b in backbones)
                         + " |")
    return "\n".join(lines)


def cache_table(records: dict, tasks: list[Task], backbones: list[Backbone]) -> tuple[str, float, float]:
    lines = ["| data | backbone | volumes | slices encoded (cold) | cold | warm (cache) | speed-up | hits / misses (warm) |",
             "|---|---|---|---|---|---|---|---|"]
    cold_total = warm_total = 0.0
    labels = {b.key: b.label for b in backbones}
    for task in tasks:
        for e in records["embedding"]:
            if e["task"] != task.key:
                continue
            cold, warm = e["cold"], e["warm"]
            cold_total += cold["seconds"]
            warm_total += warm["seconds"]
            lines.append(f"| {task.key} | {labels[e['backbone']]} | {cold['cases']} | {cold['encoded_slices']} "
                         f"| {cold['seconds']:.1f} s | {warm['seconds']:.1f} s | {cold['seconds'] / warm['seconds']:.1f}× "
                         f"| {warm['cache_hits']} / {warm['cache_misses']} |")
    return "\n".join(lines), cold_total, warm_total




def render(records: dict, args: argparse.Namespace, argv: Sequence[str] | None, ctx: dict) -> str:
    import monai
    import peft
    import timm
    import torch

    backbones = [b for b in BACKBONES if b.key in args.backbones]
    tasks = [t for t in TASKS if t.key in args.tasks]
    random_keys = [b.key for b in backbones if b.key not in args.weight_files and not args.pretrained]
    random_note = (
        "**Every encoder here is randomly initialised** (seed "
        f"{args.encoder_seed}; DINOv2/DINOv3 LayerScale set to 1.0 and ResNet blocks without zero-initialised last "
        "BatchNorm, so the random networks do not skip their blocks), and the ViTs keep only their first 4 blocks "
        "(`model_kwargs={\"depth\": 4}`) to fit a 2-core CPU. No model hub can be reached from the machine these "
        "numbers come from. The rows therefore compare the *protocols* on random features of each architecture, "
        "not DINOv2, DINOv3 or (for the ResNet-50, timm's supervised baseline) ImageNet pretraining. "
        "With real weights (`--weights KEY=FILE` per backbone, or "
        "`--pretrained` for timm's hub) the same script runs the same protocols at full depth."
        if len(random_keys) == len(backbones) else
        "Encoders: " + ", ".join(
            f"{b.label}: " + (f"`{args.weight_files[b.key]}` (full depth)" if b.key in args.weight_files else
                              "timm hub weights (full depth)" if args.pretrained else
                              "random init, first 4 blocks" if b.random_kwargs else "random init")
            for b in backbones) + "."
    )
    out = ["# Evaluation protocols: results\n",
           f"Generated by `scripts/evaluation_results.py` on {ctx['date']} in {ctx['total'] / 60:.1f} min. "
           "Reproduce from the repository root:\n",
           f"```bash\n{command_line('evaluation_results.py', argv)}\n```\n",
           "The same protocols for one encoder and one data set: `python -m volumes evaluate` "
           "(see the README). The foundation-model zoo (SAM, CLIP, BiomedCLIP's ViT-B, BLIP next to DINOv2 and "
           "ResNet-50, with the attention-head protocol, peak memory and slices/s per encoder): "
           "[ZOO_RESULTS.md](ZOO_RESULTS.md), from `scripts/zoo_results.py`.\n",
           random_note + "\n"]

    sizes = records["sizes"]
    for task in tasks:
        info = records["data"][task.key]
        counts = info["counts"]
        pos = info["positives"]
        out.append(f"## {task.title}\n")
        if task.key == "adrenal":
            out.append(
                f"Official MedMNIST split: {counts['train']} / {counts['val']} / {counts['test']} train / val / test "
                f"volumes of 28³ ({pos['test']} of {counts['test']} test volumes hyperplasia, so always answering "
                f"\"normal\" scores ACC {1 - pos['test'] / counts['test']:.3f}). Slices along MedMNIST's frame axis, "
                f"each {sizes.get((task.key, backbones[0].key))} px for the /14 ViTs (2 × 2 patches), 32 px for "
                "DINOv3's /16 and the ResNet's /32 grid; frozen features are the mean over a volume's 28 slices.\n")
        elif task.key == "hepatomegaly":
            out.append(
                f"`PhantomConfig.classification_demo()` (liver cranio-caudal span; 96 × 96 × 5 mm in-plane, "
                f"portal-venous phase, liver window), {args.phantom_cases} cases, seed 0, stratified "
                f"{counts['train']} / {counts['val']} / {counts['test']} train / val / test volumes "
                f"({pos['test']} positive in test); axial slices resized to 28 px (/14 ViTs) or 32 px.\n")
        else:
            lesion = records["slice_counts"][task.key]
            out.append(
                f"Phantom lesion task with `classification_demo` geometry and 35-50 mm lesions 40-60 HU below the "
                f"liver, {args.lesion_cases} cases (seed 1) split by case {counts['train']} / {counts['val']} / "
                f"{counts['test']}; each axial slice that shows the liver is one example, labelled by whether it "
                f"holds lesion voxels (`--task slice --slice-label lesion`): {lesion['train']} / {lesion['val']} / "
                f"{lesion['test']} train / val / test slices, {lesion['test_pos']} of the test slices with lesion. "
                f"Slices at {sizes.get((task.key, backbones[0].key))} px (/14) or 64 px (/16, /32). "
                "Frozen protocols only (the end-to-end ones are left out of the CPU budget here).\n")
        out.append("Test ROC AUC (mean ± sample std over few-shot draws / end-to-end seeds; kNN and the linear "
                   "probe are deterministic given the features, one run):\n")
        out.append(metric_table(records, task, backbones, "test_auc") + "\n")
        out.append("Test accuracy (argmax):\n")
        out.append(metric_table(records, task, backbones, "test_acc") + "\n")
        skipped = sorted({f"{r['variant']} ({r['details']['skipped']})" for r in records["results"]
                          if r["task"] == task.key and r["details"].get("skipped")})
        if skipped:
            out.append("Few-shot sizes not run (\"–\"): " + "; ".join(skipped) + ".\n")
        if task.key == "adrenal":
            out.append("Published MedMNIST v2 baselines for AdrenalMNIST3D (Yang et al., Scientific Data 2023; "
                       "trained on the full training split for 100 epochs, pretrained where applicable):\n")
            out.append("| model | test AUC | test ACC |\n|---|---|---|")
            out.append("\n".join(f"| {name} | {auc:.3f} | {acc:.3f} |" for name, auc, acc in PUBLISHED))
            out.append(f"| always \"normal\" (majority class) | 0.500 | {1 - pos['test'] / counts['test']:.3f} |\n")

    params_task = next((t.key for t in tasks if t.end_to_end), tasks[0].key)
    out.append("## Trainable parameters\n")
    out.append("Parameters each protocol fits for a binary task (the head included; kNN fits none), for the "
               "encoders used here (ViTs cut to 4 blocks). The last rows count the encoder parameters each "
               "end-to-end method would train at the backbone's full depth (built and counted, not trained).\n")
    out.append(params_table(records, backbones, params_task) + "\n")

    table, cold_total, warm_total = cache_table(records, tasks, backbones)
    out.append("## Embedding cache: second-run speed-up\n")
    out.append(
        "Every data set is embedded twice per backbone through `volumes.evaluation.evaluation_embedder` (the "
        "`SliceEmbedder` writing to `volumes.cache.EmbeddingCache`); the first pass starts from an empty cache "
        "folder, the second reads every volume back. Both passes load and prepare every volume (the key hashes "
        "the prepared voxels), so the second pass is what remains once no encoder runs. Constant slices (the empty "
        "background of AdrenalMNIST3D volumes) are encoded once per batch of 8 volumes.\n")
    out.append(table + "\n")
    out.append(f"In total {cold_total:.0f} s cold vs {warm_total:.0f} s warm: {cold_total / warm_total:.1f}× faster "
               "the second time.\n")

    out.append("## Wall time\n")
    out.append(f"Seconds on {ctx['machine']}; protocol times exclude the embeddings.\n")
    out.append(time_table(records, tasks, backbones) + "\n")

    e2e = ", ".join(f"{t.key}: {args.adrenal_max_train if t.key == 'adrenal' else args.phantom_max_train} training "
                    "volumes" for t in tasks if t.end_to_end)
    out.append("## Protocol settings and CPU budget\n")
    out.append(
        f"""- Frozen features (one encoder pass per volume, cached): class token, mean patch token and the class
  tokens of the last four blocks through the final norm (a CNN: global average pools of its last four stages).
  Standardised with training-split statistics before every frozen protocol (a random encoder's features share a
  large offset that would swamp cosine similarity); volume tasks average a volume's slice features.
- kNN: cosine similarity, the k nearest training rows vote with weight exp(sim / 0.07), k = 10 and 20, scored on test.
- Few-shot: n = 1, 2, 4, 8, 16 training examples per class drawn with seeds 0..{args.draws - 1}
  (`volumes.evaluation.fewshot.fewshot_indices`, stratified, reproducible); logistic regression with a fixed L2
  of 0.1 on CLS features; mean ± std over the draws.
- Linear probe: multinomial logistic regression (L-BFGS, float64), L2 in {{1, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001,
  0.0001}} chosen by validation AUC, then scored on test.
- End to end (`volumes.evaluation.finetune`): encoder → fixed per-feature standardisation (measured on training
  slices with the starting encoder) → mean aggregator with a linear head; AdamW, head lr 1e-2, weight decay 0.05,
  gradient clip 1. Fine-tune: every encoder parameter, lr 1e-5 at the top block decaying ×0.75 per block below
  (layer-wise decay). LoRA: peft rank 8, alpha 16 on attention qkv and MLP fc1/fc2 of every block (ResNet: the
  convolutions of its residual stages), lr 3e-4. BitFit: encoder biases only (ResNet: BatchNorm shifts), lr 3e-4.
  The encoder stays in eval mode (frozen BatchNorm statistics). Best epoch by validation AUC, scored on test.
- **CPU budget**: end-to-end runs use {args.e2e_epochs} epoch(s), seed(s) {', '.join(map(str, args.e2e_seeds))} and a
  stratified subset of the training split ({e2e}); validation and test splits are complete. With one seed the
  end-to-end rows have no ±. The frozen protocols use the whole training split. On a GPU, raise
  `--e2e-epochs`, `--e2e-seeds` and the `--*-max-train` options.
- Software: torch {torch.__version__}, timm {timm.__version__}, MONAI {monai.__version__}, peft {peft.__version__},
  Python {platform.python_version()}.

## Reading the numbers
""")
    if random_keys:
        out.append("- Random features: what separates the classes is what a random projection of the slices keeps "
                   "(the shape of the AdrenalMNIST3D masks, the liver's extent in the phantoms). How pretrained "
                   "weights rank the backbones has not been measured here.")
    if "adrenal" in args.tasks:
        val = records["data"]["adrenal"]["counts"]["val"]
        out.append(f"- The AdrenalMNIST3D validation split has {val} volumes, so the L2 and best-epoch choices are "
                   "noisy. The published baselines train 3D CNNs on the whole training split for 100 epochs; the "
                   f"end-to-end rows here see {args.adrenal_max_train} volumes for {args.e2e_epochs} epoch(s).")
    if any(t.end_to_end for t in tasks):
        out.append("- End-to-end accuracy is taken at argmax after a few optimiser steps; a head that has not "
                   "settled yet can rank the test cases well (AUC) and still put most of them in one class (ACC).")
    if "lesion_slices" in args.tasks:
        out.append("- The lesion slices are the hard case for random features: a lesion changes one or two patches "
                   "of a slice, while the liver's cross-section changes from slice to slice.")
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def render_from(path: Path, output: Path | None) -> int:
    """Markdown from a ``--json`` file: the run's own arguments, records and context; nothing recomputed."""
    from volumes.atomic import atomic_write_bytes

    payload = json.loads(path.read_text())
    run_argv = payload["argv"]
    args = parse_args(run_argv)
    records = {**payload, "sizes": {tuple(k.split("/")): v for k, v in payload["sizes"].items()}}
    text = render(records, args, run_argv, payload["context"])
    target = output or args.output or DEFAULT_OUTPUT
    atomic_write_bytes(target, lambda f: f.write(text.encode()))
    print(f"wrote {target}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_from is not None:
        return render_from(args.render_from, args.output)
    import torch

    torch.set_num_threads(args.threads)
    machine = machine_line(args.threads)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(message, flush=True)

    temp_dirs = []
    cache_dir = args.cache_dir
    if cache_dir is None:
        cache_dir = Path(tempfile.mkdtemp(prefix="volumes-eval-cache-"))
        temp_dirs.append(cache_dir)
    work = args.work_dir
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="volumes-eval-phantoms-"))
        temp_dirs.append(work)
    try:
        say(f"phantom cohorts in {work}, embedding cache {cache_dir}")
        cohorts = phantom_cohorts(work, args, args.tasks)
        records = run_all(args, cache_dir, cohorts, say)
        records["full_depth"] = full_depth_params([b for b in BACKBONES if b.key in args.backbones])
    finally:
        for folder in temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)
    total = time.perf_counter() - started
    ctx = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine, "total": total}
    text = render(records, args, argv, ctx)
    say(f"total {total / 60:.1f} min")
    if args.output is not None:
        from volumes.atomic import atomic_write_bytes

        atomic_write_bytes(args.output, lambda f: f.write(text.encode()))
        say(f"wrote {args.output}")
    else:
        print(text)
    if args.json is not None:
        from volumes.atomic import atomic_write_bytes

        payload = {**records, "sizes": {f"{t}/{b}": s for (t, b), s in records["sizes"].items()},
                   "argv": list(sys.argv[1:] if argv is None else argv), "context": ctx}
        blob = json.dumps(payload, indent=1, default=str)
        atomic_write_bytes(args.json, lambda f: f.write(blob.encode()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
