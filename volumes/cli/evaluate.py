"""``volumes evaluate``: kNN / few-shot / linear probe / attention head / fine-tune / LoRA / BitFit (:mod:`volumes.evaluation`)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    protocols = ["knn", "fewshot", "linear", "attention", "finetune", "lora", "bitfit"]
    ev = sub.add_parser(
        "evaluate", help="kNN / few-shot / linear probe / attention head / fine-tune / LoRA / BitFit evaluation of an encoder",
        description="Foundation-model evaluation protocols on volume labels (slice features pooled or aggregated) "
                    "or per-slice labels (--task slice). Frozen protocols read the embedding cache.",
    )
    ev.add_argument("--protocol", nargs="+", required=True, choices=protocols, help="one or more protocols")
    ev.add_argument("--encoder", default="vit_small_patch14_dinov2", help="timm DINOv2/DINOv3 ViT, CNN (e.g. resnet50) or zoo model (samvit_base_patch16, vit_base_patch16_clip_224, ...)")
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
    ev.add_argument("--head-pool", type=int, default=4, help="attention head: patch-grid cells per side per slice")
    ev.add_argument("--head-depth", type=int, default=1, help="attention head: transformer layers")
    ev.add_argument("--head-dim", type=int, default=128, help="attention head: width")
    ev.add_argument("--head-epochs", type=int, default=20, help="attention head: epochs (best validation epoch kept)")
    ev.add_argument("--max-train", type=int, default=None, help="end to end: stratified subset of the training set")
    ev.add_argument("--cache-dir", default=None, help="embedding cache (default: $VOLUMES_CACHE_DIR or ~/.cache/...)")
    ev.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ev.add_argument("--out", default=None, help="folder for results.json and results.md (written atomically)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(run=run)


def _json_object(option: str, text: str | None) -> dict:
    import json

    from volumes.errors import ConfigError

    try:
        value = json.loads(text) if text else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ConfigError(option, text, "a JSON object, e.g. '{\"depth\": 4}'")
    return value


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from volumes.cache import default_cache_dir
    from volumes.devices import resolve_device
    from volumes.errors import ConfigError
    from volumes.evaluation.data import load_evaluation_data
    from volumes.evaluation.linear import DEFAULT_L2_GRID
    from volumes.encoders import EncoderConfig
    from volumes.evaluation.runner import Evaluator, results_markdown
    from volumes.evaluation.session import ProtocolOptions, evaluation_report, run_protocols, write_results

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_kwargs = _json_object("--model-kwargs", args.model_kwargs)
    if args.pretrained and args.weights:
        raise ConfigError("--pretrained", True, "not together with --weights")
    if args.max_train is not None and args.max_train < 2:
        raise ConfigError("--max-train", args.max_train, "at least 2 training samples")
    data = load_evaluation_data(
        args.data, task=args.task, preset=args.preset, axis=args.axis, channel_mode=args.channel_mode,
        size=args.size or None, label_key=args.label_key, slice_label=args.slice_label,
        slice_within=args.slice_within, seed=args.split_seed,
    )
    spec = EncoderConfig(args.encoder, weights=args.weights, pretrained=args.pretrained, model_kwargs=model_kwargs,
                       seed=args.encoder_seed, chunk_size=args.chunk_size)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    evaluator = Evaluator(data, spec, cache_dir=cache_dir, device=resolve_device(args.device),
                          progress=not args.no_progress, standardize=not args.no_standardize)
    counts = ", ".join(f"{split} {n}" for split, n in data.counts().items())
    weights = args.weights or ("timm hub" if args.pretrained else "random init")
    print(f"{data.name}: {data.task} task, {data.num_classes} classes, {counts} cases; "
          f"encoder {args.encoder} ({weights}), {evaluator.patch_size}-px patches")
    options = ProtocolOptions(
        ks=args.k, temperature=args.temperature, shots=args.shots, draws=args.draws, fewshot_l2=args.fewshot_l2,
        features=args.features or ["cls", "cls_patch_mean", "last4_cls"], l2_grid=args.l2_grid or list(DEFAULT_L2_GRID),
        finetune=dict(epochs=args.epochs, batch_size=args.batch_size, head_lr=args.head_lr,
                      encoder_lr=args.encoder_lr, layer_decay=args.layer_decay, lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha, aggregator=args.aggregator),
        seeds=args.seeds, max_train=args.max_train,
        attention=dict(pool=args.head_pool, depth=args.head_depth, dim=args.head_dim, epochs=args.head_epochs,
                       batch_size=args.batch_size),
    )
    started = time.perf_counter()
    results, embedding = run_protocols(evaluator, args.protocol, options)
    table = results_markdown(results)
    print(table)
    print(f"total {time.perf_counter() - started:.1f} s")
    if args.out:
        report = evaluation_report(evaluator, results, embedding, data_path=args.data)
        json_path, md_path = write_results(args.out, report, table)
        print(f"wrote {json_path} and {md_path}")
    return 0
