#!/usr/bin/env python
"""Regenerate docs/ZOO_RESULTS.md: the foundation-model zoo x every evaluation protocol, measured in one run.

Encoders (``--encoders``): DINOv2 ViT-S/14, SAM ViT-B (timm ``samvit_base_patch16``), CLIP ViT-B/16
(``vit_base_patch16_clip_224``), ViT-B/16 (``vit_base_patch16_224``: the architecture of BiomedCLIP's
tower, ViT IN-21k and MAE), BLIP ViT-B/16 (``vit_base_patch16_384``) and ResNet-50.
Protocols: kNN (k=20), few-shot (n=4, seeded draws), linear probe (CLS), frozen backbone + attention head
(Huix et al.), fine-tune (LLRD), LoRA and BitFit. Tasks: AdrenalMNIST3D (28³, volume labels) and the
phantom hepatomegaly task (volume labels).

Each encoder runs in its own process, so its peak memory (the process's maximum resident set) is its own;
the same process measures trainable parameters and wall time per protocol and the encoder's throughput
(slices/s of the frozen forward at the task's slice size, after one warm-up pass).

No model hub is reachable where this was written: by default every encoder is randomly initialised and
cut to ``--depth`` blocks (say so wherever the numbers are quoted). ``--weights KEY=FILE`` gives one
encoder real weights at full depth (e.g. ``sam_b=sam_vit_b_01ec64.pth``, ``biomedclip=DIR``,
``blip_b=DIR``, ``clip_b16=open_clip_pytorch_model.bin``), and the same protocols run unchanged.

From the repository root::

    .venv/bin/python scripts/zoo_results.py                               # writes docs/ZOO_RESULTS.md
    .venv/bin/python scripts/zoo_results.py --quick --output /tmp/zoo.md  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "medmnist3d" / "adrenalmnist3d.npz"
DEFAULT_OUTPUT = REPO / "docs" / "ZOO_RESULTS.md"

#: key -> (label, timm name, random-init kwargs besides depth)
ENCODERS: dict[str, tuple[str, str, dict]] = {
    "dinov2_s": ("DINOv2 ViT-S/14", "vit_small_patch14_dinov2", {}),
    "sam_b": ("SAM ViT-B/16", "samvit_base_patch16", {"global_attn_indexes": [1, 3]}),
    "clip_b16": ("CLIP ViT-B/16", "vit_base_patch16_clip_224", {}),
    "biomedclip": ("ViT-B/16 (BiomedCLIP / IN-21k / MAE)", "vit_base_patch16_224", {}),
    "blip_b": ("BLIP ViT-B/16", "vit_base_patch16_384", {}),
    "resnet50": ("ResNet-50", "resnet50", {}),
}
PROTOCOLS = ("knn", "fewshot", "linear", "attention", "finetune", "lora", "bitfit")
LABELS = {"knn": "kNN k=20", "fewshot": "few-shot n=4", "linear": "linear probe (CLS)",
          "attention": "attention head (frozen)", "finetune": "fine-tune (LLRD)", "lora": "LoRA r=8", "bitfit": "BitFit"}
TASKS = {"adrenal": "AdrenalMNIST3D (volume classification, 28³)",
         "hepatomegaly": "Phantom hepatomegaly (volume classification)"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="AdrenalMNIST3D .npz")
    parser.add_argument("--adrenal-subset", nargs=3, type=int, default=None, metavar=("TRAIN", "VAL", "TEST"),
                        help="AdrenalMNIST3D: the first TRAIN / VAL / TEST volumes of each class of the official "
                             "splits (default: the whole splits)")
    parser.add_argument("--weights", nargs="+", default=[], metavar="KEY=FILE", help="real weights, full depth")
    parser.add_argument("--depth", type=int, default=4, help="blocks kept of a random-initialised ViT")
    parser.add_argument("--size", type=int, default=0,
                        help="slice size (0: 28 rounded to the encoder's patch, e.g. 28 for /14, 32 for /16)")
    parser.add_argument("--phantom-cases", type=int, default=80)
    parser.add_argument("--max-train", type=int, default=64, help="end to end: stratified training subset")
    parser.add_argument("--e2e-epochs", type=int, default=1)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the records here")
    parser.add_argument("--render-from", nargs="+", type=Path, default=None, metavar="JSON",
                        help="render the markdown from --json files of earlier runs with the same settings (their "
                             "encoders side by side; computes nothing)")
    parser.add_argument("--quick", action="store_true", help="subsets of AdrenalMNIST3D, 2 encoders, 24 phantoms")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one encoder in this process
    parser.add_argument("--cohort", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.weight_files = {}
    for entry in args.weights:
        key, sep, path = entry.partition("=")
        if not sep or key not in ENCODERS:
            parser.error(f"--weights wants KEY=FILE with KEY in {list(ENCODERS)}, got {entry!r}")
        args.weight_files[key] = path
    if args.quick:
        args.encoders = [k for k in args.encoders if k in ("dinov2_s", "sam_b")] or args.encoders[:1]
        args.phantom_cases, args.max_train, args.head_epochs, args.draws = 24, 16, 3, 2
    elif args.output is None and args.one is None:
        args.output = DEFAULT_OUTPUT
    return args


# --------------------------------------------------------------------------- one encoder (child process)
def spec_of(key: str, args: argparse.Namespace):
    from volumes.encoders import EncoderConfig

    _, name, extra = ENCODERS[key]
    weights = args.weight_files.get(key)
    kwargs = {} if weights or name == "resnet50" else {"depth": args.depth, **extra}
    return EncoderConfig(name, weights=weights, model_kwargs=kwargs, chunk_size=64)


def throughput(encoder: Any, size: int, n: int = 64) -> float:
    """Slices/s of the frozen forward on ``n`` random slices of ``size`` px, after one warm-up pass."""
    import torch

    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    encoder(x[:8])
    start = time.perf_counter()
    encoder(x)
    return n / (time.perf_counter() - start)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from volumes.evaluation.attention_head import AttentionHeadConfig
    from volumes.evaluation.data import load_evaluation_data
    from volumes.evaluation.finetune import FinetuneConfig, count_parameters
    from volumes.evaluation.runner import Evaluator
    from volumes.reporting import quick_subset

    torch.set_num_threads(args.threads)
    key = args.one
    spec = spec_of(key, args)
    record: dict[str, Any] = {"key": key, "name": spec.name, "weights": spec.weights, "model_kwargs": spec.model_kwargs,
                              "tasks": {}}
    for task in args.tasks:
        encoder = spec.build(mode="frozen")
        patch = encoder.patch_size
        size = args.size or max(patch, round(28 / patch) * patch)
        if task == "adrenal":
            data = load_evaluation_data(args.data, size=size)
            subset = args.adrenal_subset or ((24, 8, 16) if args.quick else None)
            if subset is not None:
                per_class = dict(zip(("train", "val", "test"), subset))
                data.splits = {s: quick_subset(items, per_class[s]) for s, items in data.splits.items()}
        else:
            data = load_evaluation_data(args.cohort, preset="liver", size=size)
        evaluator = Evaluator(data, spec, progress=False, encoder=encoder)
        out: dict[str, Any] = {"size": size, "counts": data.counts(), "results": [],
                               "encoder_params": count_parameters(encoder.backbone, trainable_only=False),
                               "slices_per_s": throughput(encoder, size)}
        start = time.perf_counter()
        embedding = evaluator.embed() if {"knn", "fewshot", "linear"} & set(args.protocols) else None
        out["embed_seconds"] = time.perf_counter() - start if embedding else None
        results = []
        if "knn" in args.protocols:
            results += evaluator.knn((20,))
        if "fewshot" in args.protocols:
            results += evaluator.fewshot((4,), draws=args.draws)
        if "linear" in args.protocols:
            results += evaluator.linear(("cls",))
        if "attention" in args.protocols:
            results.append(evaluator.attention_head(AttentionHeadConfig(pool=2, epochs=args.head_epochs)))
        for method in ("finetune", "lora", "bitfit"):
            if method in args.protocols:
                config = FinetuneConfig(method=method, epochs=args.e2e_epochs, batch_size=16)
                results.append(evaluator.finetune(config, max_train=args.max_train))
        out["results"] = [r.to_dict() for r in results]
        record["tasks"][task] = out
        print(f"{key} / {task}: " + ", ".join(f"{r.protocol} {r.stat('test_auc')[0]:.3f}" for r in results), flush=True)
    # ru_maxrss is KiB on Linux: the peak of this process, which ran only this encoder
    record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


# --------------------------------------------------------------------------- parent: cohort, children, report
def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def render(records: list[dict], args: argparse.Namespace, argv: Sequence[str], ctx: dict) -> str:
    from volumes.metrics import mean_std

    commands = ctx.get("commands") or [" ".join([".venv/bin/python scripts/zoo_results.py", *argv])]
    command = "\n".join(commands)
    random = [r["key"] for r in records if not r["weights"]]
    out = ["# Foundation-model zoo: every encoder x protocol\n",
           f"Generated by `scripts/zoo_results.py` on {ctx['date']} in {ctx['total'] / 60:.1f} min on {ctx['machine']}. "
           "Reproduce from the repository root:\n", f"```bash\n{command}\n```\n"]
    if random:
        out.append(f"**Randomly initialised encoders** ({', '.join(random)}): no model hub is reachable from the "
                   f"machine these numbers come from; the ViTs keep their first {args.depth} blocks to fit a CPU. "
                   "The rows compare protocols and architectures on random features, not SAM, CLIP, BLIP, "
                   "BiomedCLIP or DINOv2 pretraining. `--weights KEY=FILE` reruns an encoder with its real "
                   "checkpoint at full depth (formats: README, *Foundation-model zoo*).\n")
    for task, title in TASKS.items():
        if task not in args.tasks:
            continue
        first = records[0]["tasks"][task]
        counts = first["counts"]
        out.append(f"## {title}\n")
        subset = " (the first of each class of the official splits: `--adrenal-subset`)" if (
            task == "adrenal" and (args.adrenal_subset or args.quick)) else ""
        out.append(f"{counts['train']} / {counts['val']} / {counts['test']} train / val / test volumes{subset}; end-to-end "
                   f"methods train on a stratified subset of {args.max_train} for {args.e2e_epochs} epoch(s), the "
                   f"attention head {args.head_epochs} epochs on 2 x 2 pooled tokens per slice. Test ROC AUC "
                   "(few-shot: mean ± std over draws):\n")
        head = "| protocol | " + " | ".join(ENCODERS[r["key"]][0] for r in records) + " |"
        lines = [head, "|---|" + "---|" * len(records)]
        for protocol in args.protocols:
            cells = []
            for r in records:
                found = [x for x in r["tasks"][task]["results"] if x["protocol"] == protocol]
                if not found:
                    cells.append("–")
                    continue
                values = [run["test_auc"] for run in found[0]["runs"]]
                mean, std = mean_std(values)
                cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if len(values) > 1 else ""))
            lines.append(f"| {LABELS[protocol]} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines) + "\n")
        out.append("Trainable parameters / wall time of each protocol (frozen protocols exclude the embedding pass):\n")
        lines = [head, "|---|" + "---|" * len(records)]
        for protocol in args.protocols:
            cells = []
            for r in records:
                found = [x for x in r["tasks"][task]["results"] if x["protocol"] == protocol]
                cells.append(f"{fmt_params(found[0]['trainable_params'])} / {found[0]['seconds']:.1f} s" if found
                             else "–")
            lines.append(f"| {LABELS[protocol]} | " + " | ".join(cells) + " |")
        lines.append("| slice size (px) | " + " | ".join(str(r["tasks"][task]["size"]) for r in records) + " |")
        lines.append("| embedding pass (s) | " + " | ".join(
            f"{r['tasks'][task]['embed_seconds']:.1f}" if r["tasks"][task]["embed_seconds"] else "–" for r in records)
            + " |")
        lines.append("| frozen forward (slices/s) | " + " | ".join(
            f"{r['tasks'][task]['slices_per_s']:.0f}" for r in records) + " |")
        out.append("\n".join(lines) + "\n")
    out.append("## Per encoder\n")
    lines = ["| encoder | timm name | encoder parameters (as run) | peak memory (process RSS) |", "|---|---|---|---|"]
    for r in records:
        task = next(iter(r["tasks"].values()))
        lines.append(f"| {ENCODERS[r['key']][0]} | `{r['name']}` | {fmt_params(task['encoder_params'])} "
                     f"| {r['peak_rss_mib']:.0f} MiB |")
    out.append("\n".join(lines) + "\n")
    out.append("Peak memory is the maximum resident set of the process that ran the encoder through every task and "
               "protocol (data, features and the Python / torch runtime included). The machine was shared with "
               "other jobs: wall times and slices/s are indicative only.\n")
    return "\n".join(out)


def render_from(paths: Sequence[Path], output: Path | None) -> int:
    """One report from several ``--json`` files (e.g. an encoder rerun alone): records joined in file order."""
    from volumes.atomic import atomic_write_bytes

    payloads = [json.loads(Path(p).read_text()) for p in paths]
    records = [r for payload in payloads for r in payload["records"]]
    argv = payloads[0]["argv"]
    args = parse_args(argv)
    ctx = {**payloads[0]["context"], "total": sum(p["context"]["total"] for p in payloads),
           "commands": [" ".join([".venv/bin/python scripts/zoo_results.py", *p["argv"]]) for p in payloads]}
    text = render(records, args, argv, ctx)
    target = output or DEFAULT_OUTPUT
    atomic_write_bytes(target, lambda f: f.write(text.encode()))
    print(f"wrote {target}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one is not None:
        record = run_one(args)
        args.record.write_text(json.dumps(record, default=str))
        return 0
    if args.render_from:
        return render_from(args.render_from, args.output)
    import torch

    from volumes.atomic import atomic_write_bytes
    from volumes.reporting import cpu_model

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="volumes-zoo-") as tmp:
        cohort = None
        if "hepatomegaly" in args.tasks:
            from volumes.data.phantoms import PhantomConfig, write_cohort

            cohort = write_cohort(Path(tmp) / "phantoms", args.phantom_cases, seed=0,
                                  config=PhantomConfig.classification_demo(), splits=(0.5, 0.2, 0.3), progress=False)
        records = []
        for key in args.encoders:
            record_path = Path(tmp) / f"{key}.json"
            child = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", key, "--record", str(record_path)]
            if cohort is not None:
                child += ["--cohort", str(cohort)]
            done = subprocess.run(child, env={**os.environ, "PYTHONPATH": str(REPO)})
            if done.returncode != 0:  # one encoder failing (or killed) leaves the others' columns
                print(f"{key}: exit status {done.returncode}; left out of the tables", flush=True)
                continue
            records.append(json.loads(record_path.read_text()))
        if not records:
            raise SystemExit("no encoder finished")
    total = time.perf_counter() - started
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    ctx = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "total": total,
           "machine": f"{os.cpu_count()} CPU cores ({cpu_model()}), no GPU, shared (load average at the end: {load}), "
                      f"torch {torch.__version__}, {args.threads} thread(s)"}
    text = render(records, args, argv, ctx)
    if args.output is not None:
        atomic_write_bytes(args.output, lambda f: f.write(text.encode()))
        print(f"wrote {args.output}")
    else:
        print(text)
    if args.json is not None:
        blob = json.dumps({"records": records, "context": ctx, "argv": argv}, indent=1, default=str)
        atomic_write_bytes(args.json, lambda f: f.write(blob.encode()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
