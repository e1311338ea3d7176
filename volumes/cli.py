"""The ``volumes`` command line.

    python -m volumes demo --out runs/demo          the main job: train both bundles briefly on
                                                    phantoms, then batch inference with a report
    python -m volumes phantoms --out DIR --n N      write a synthetic CT cohort
    python -m volumes embed --input SRC --out DIR   embed every slice of every case
    python -m volumes infer --bundle B [--bundle B2] --input SRC --output DIR
                                                    batch inference: masks, DICOM SEG, predictions,
                                                    failures.csv, report.html (also under torchrun)
    python -m volumes cache info|prune              inspect or trim the embedding cache
    python -m volumes evaluate --protocol knn --encoder NAME --data DATALIST
                                                    kNN / few-shot / linear probe / fine-tune /
                                                    LoRA / BitFit on volume or slice labels
    python -m volumes pacs listen|pull|run|status --config node.yaml
                                                    DICOM node: receive or pull studies, send SEG + SR back
    python -m volumes bench [--sections a b c d e f] [--out runs/bench]
                                                    speed and memory: encoder vs timm, pipeline,
                                                    memory, cache, 3D peers, CUDA variants

Each command imports its heavy modules only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from volumes.errors import VolumesError


def _add_embed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2", help="timm DINOv2/DINOv3 model name")
    parser.add_argument("--weights", default=None, help="local weights: timm file, Meta checkpoint or Hugging Face dir")
    parser.add_argument("--pretrained", action="store_true", help="download timm's hub weights (needs network)")
    parser.add_argument("--preset", default="soft_tissue", help="intensity preset: CT window name, ct_three_windows or mr")
    parser.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    parser.add_argument("--channel-mode", default="repeat", choices=["repeat", "2.5d", "windows"])
    parser.add_argument("--size", type=int, default=224, help="in-plane size of the longer side (0: keep, pad only)")
    parser.add_argument("--chunk-size", type=int, default=32, help="slices per encoder pass (bounds memory)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def _embed_config(args: argparse.Namespace):
    from volumes.embedding import EmbedConfig

    return EmbedConfig(
        encoder=args.encoder, weights=args.weights, pretrained=args.pretrained, preset=args.preset, axis=args.axis,
        channel_mode=args.channel_mode, size=args.size or None, chunk_size=args.chunk_size, device=args.device,
    )


def cmd_embed(args: argparse.Namespace) -> int:
    from volumes.data.discovery import discover_cases
    from volumes.embedding import embed_cases, summarize

    cases = discover_cases(args.input)
    rows = embed_cases(cases, args.out, _embed_config(args))
    print(summarize(rows, args.out))
    return 1 if any("error" in r for r in rows) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from volumes.demo import run_demo

    return run_demo(args.out, quick=args.quick, workers=args.workers)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from volumes.atomic import atomic_write_bytes
    from volumes.embedding import resolve_device
    from volumes.errors import ConfigError
    from volumes.evaluation.data import load_evaluation_data
    from volumes.evaluation.finetune import METHODS, FinetuneConfig
    from volumes.evaluation.runner import EncoderSpec, Evaluator, results_markdown

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except ValueError:
        raise ConfigError("--model-kwargs", args.model_kwargs, "a JSON object, e.g. '{\"depth\": 4}'") from None
    if not isinstance(model_kwargs, dict):
        raise ConfigError("--model-kwargs", args.model_kwargs, "a JSON object, e.g. '{\"depth\": 4}'")
    if args.pretrained and args.weights:
        raise ConfigError("--pretrained", True, "not together with --weights")
    if args.max_train is not None and args.max_train < 2:
        raise ConfigError("--max-train", args.max_train, "at least 2 training samples")
    data = load_evaluation_data(
        args.data, task=args.task, preset=args.preset, axis=args.axis, channel_mode=args.channel_mode,
        size=args.size or None, label_key=args.label_key, slice_label=args.slice_label,
        slice_within=args.slice_within, seed=args.split_seed,
    )
    spec = EncoderSpec(args.encoder, weights=args.weights, pretrained=args.pretrained, model_kwargs=model_kwargs,
                       seed=args.encoder_seed, chunk_size=args.chunk_size)
    cache_dir = None
    if not args.no_cache:
        from volumes.cache import default_cache_dir

        cache_dir = args.cache_dir or default_cache_dir()
    evaluator = Evaluator(data, spec, cache_dir=cache_dir, device=resolve_device(args.device),
                          progress=not args.no_progress, standardize=not args.no_standardize)
    counts = ", ".join(f"{split} {n}" for split, n in data.counts().items())
    weights = args.weights or ("timm hub" if args.pretrained else "random init")
    print(f"{data.name}: {data.task} task, {data.num_classes} classes, {counts} cases; "
          f"encoder {args.encoder} ({weights}), {evaluator.patch_size}-px patches")
    started = time.perf_counter()
    embedding = None
    results = []
    frozen = [p for p in args.protocol if p not in METHODS]
    if frozen:
        embedding = evaluator.embed()
        print(f"embeddings: {embedding['seconds']:.1f} s, {embedding['encoded_slices']} slices encoded, "
              f"cache hits {embedding['cache_hits']} / misses {embedding['cache_misses']}"
              + (f" ({cache_dir})" if cache_dir else " (no cache)"))
    kinds = args.features or ["cls", "cls_patch_mean", "last4_cls"]
    for protocol in args.protocol:
        if protocol == "knn":
            results += evaluator.knn(args.k, temperature=args.temperature, features=kinds[0])
        elif protocol == "fewshot":
            results += evaluator.fewshot(args.shots, draws=args.draws, features=kinds[0], l2=args.fewshot_l2)
        elif protocol == "linear":
            results += evaluator.linear(kinds, l2_grid=args.l2_grid or _default_l2_grid())
        else:
            config = FinetuneConfig(
                method=protocol, epochs=args.epochs, batch_size=args.batch_size, head_lr=args.head_lr,
                encoder_lr=args.encoder_lr, layer_decay=args.layer_decay, lora_rank=args.lora_rank,
                lora_alpha=args.lora_alpha, aggregator=args.aggregator,
            )
            results.append(evaluator.finetune(config, seeds=args.seeds, max_train=args.max_train))
    table = results_markdown(results)
    print(table)
    print(f"total {time.perf_counter() - started:.1f} s")
    if args.out:
        out = Path(args.out)
        report = {
            "argv": sys.argv[1:],
            "data": {"path": str(args.data), "task": data.task, "counts": data.counts(), "settings": data.settings,
                     "num_classes": data.num_classes},
            "encoder": {"name": spec.name, "weights": spec.weights, "pretrained": spec.pretrained,
                        "model_kwargs": spec.model_kwargs, "seed": spec.seed, "weights_id": evaluator.encoder.weights_id},
            "embedding": embedding,
            "results": [r.to_dict() for r in results],
        }
        text = json.dumps(report, indent=1, default=str)
        atomic_write_bytes(out / "results.json", lambda f: f.write(text.encode()))
        atomic_write_bytes(out / "results.md", lambda f: f.write((table + "\n").encode()))
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def _default_l2_grid() -> list[float]:
    from volumes.evaluation.linear import DEFAULT_L2_GRID

    return list(DEFAULT_L2_GRID)


def _add_evaluate_parser(sub) -> None:
    protocols = ["knn", "fewshot", "linear", "finetune", "lora", "bitfit"]
    ev = sub.add_parser(
        "evaluate", help="kNN / few-shot / linear probe / fine-tune / LoRA / BitFit evaluation of an encoder",
        description="Foundation-model evaluation protocols on volume labels (slice features pooled or aggregated) "
                    "or per-slice labels (--task slice). Frozen protocols read the embedding cache.",
    )
    ev.add_argument("--protocol", nargs="+", required=True, choices=protocols, help="one or more protocols")
    ev.add_argument("--encoder", default="vit_small_patch14_dinov2", help="timm DINOv2/DINOv3 ViT or CNN (e.g. resnet50)")
    ev.add_argument("--weights", default=None, help="local weights file or Hugging Face dir (default: random init)")
    ev.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network)")
    ev.add_argument("--model-kwargs", default=None, help='JSON for timm.create_model, e.g. \'{"depth": 4}\'')
    ev.add_argument("--encoder-seed", type=int, default=0, help="seed of a random-initialised encoder")
    ev.add_argument("--data", required=True, help="MONAI datalist JSON or MedMNIST 3D .npz")
    ev.add_argument("--task", default="volume", choices=["volume", "slice"])
    ev.add_argument("--slice-label", default=None,
                    help="slice task labels: datalist (items' slice_labels), lesion (phantom cases.json), "
                         "an organ name or label:N (label map)")
    ev.add_argument("--slice-within", default=None, help="keep slices holding this organ / label:N (all: every slice)")
    ev.add_argument("--label-key", default="class_label", help="item key of the class label")
    ev.add_argument("--split-seed", type=int, default=0, help="seed of the validation share when the datalist has none")
    ev.add_argument("--preset", default=None, help="intensity preset for datalist volumes (default soft_tissue)")
    ev.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    ev.add_argument("--channel-mode", default="repeat", choices=["repeat", "2.5d", "windows"])
    ev.add_argument("--size", type=int, default=224, help="in-plane slice size (0: keep, pad only)")
    ev.add_argument("--chunk-size", type=int, default=64, help="slices per encoder pass")
    ev.add_argument("--features", nargs="+", default=None, choices=["cls", "cls_patch_mean", "last4_cls"],
                    help="frozen feature kinds (linear: all listed, default all three; knn/fewshot: the first, default cls)")
    ev.add_argument("--k", nargs="+", type=int, default=[10, 20], help="kNN neighbours")
    ev.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    ev.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="few-shot examples per class")
    ev.add_argument("--draws", type=int, default=5, help="few-shot draws per shot count")
    ev.add_argument("--fewshot-l2", type=float, default=0.1, help="few-shot logistic regression L2")
    ev.add_argument("--l2-grid", nargs="+", type=float, default=None, help="linear-probe L2 values tried on val")
    ev.add_argument("--no-standardize", action="store_true", help="do not standardise frozen features")
    ev.add_argument("--seeds", nargs="+", type=int, default=[0], help="end-to-end runs (one per seed)")
    ev.add_argument("--epochs", type=int, default=3)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--head-lr", type=float, default=1e-2)
    ev.add_argument("--encoder-lr", type=float, default=None,
                    help="encoder lr (default: 1e-5 finetune, 3e-4 lora/bitfit)")
    ev.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (finetune)")
    ev.add_argument("--lora-rank", type=int, default=8)
    ev.add_argument("--lora-alpha", type=float, default=16.0)
    ev.add_argument("--aggregator", default="mean", help="volume aggregator for end-to-end training")
    ev.add_argument("--max-train", type=int, default=None, help="end to end: stratified subset of the training set")
    ev.add_argument("--cache-dir", default=None, help="embedding cache (default: $VOLUMES_CACHE_DIR or ~/.cache/...)")
    ev.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ev.add_argument("--out", default=None, help="folder for results.json and results.md (written atomically)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="volumes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: train both bundles briefly on phantoms, then volumes infer")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--quick", action="store_true", help="tiny networks and cohorts (a smoke test, under a minute on 2 cores)")
    demo.add_argument("--workers", type=int, default=None,
                      help="prefetch threads of volumes infer (default: 1 on CUDA, 0 on CPU)")
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("phantoms", help="write a synthetic CT phantom cohort (see: phantoms --help)", add_help=False)
    sub.add_parser("cache", help="inspect or prune the embedding cache (see: cache --help)", add_help=False)

    embed = sub.add_parser("embed", help="embed every slice of every case")
    embed.add_argument("--input", required=True, help="folder, datalist JSON or CSV of cases")
    embed.add_argument("--out", required=True, help="output folder")
    _add_embed_options(embed)
    embed.set_defaults(func=cmd_embed)

    _add_evaluate_parser(sub)
    from volumes.inference.command import add_infer_parser

    add_infer_parser(sub)
    from volumes.bench import add_bench_parser

    add_bench_parser(sub)
    from volumes.pacs.command import add_parser as add_pacs_parser

    add_pacs_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "phantoms":
        from volumes.data.phantoms import phantoms_main

        return phantoms_main(argv[1:])
    if argv and argv[0] == "cache":
        from volumes.cache import cache_main

        return cache_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VolumesError as exc:
        print(f"volumes {args.command}: {exc}", file=sys.stderr)
        return 2
