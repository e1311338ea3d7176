#!/usr/bin/env python
"""AdrenalMNIST3D results: slice aggregators on frozen DINOv2 slice embeddings vs a 3D CNN.

On the official MedMNIST train/val/test split, for each aggregator (``transformer``,
``gnn``, ``mean``, ``attention_mil``) and each seed:

1. slice embeddings of every volume come from a frozen DINOv2 ViT (computed once, for
   all aggregators and seeds, through :class:`volumes.embedding.SliceEmbedder`
   and kept in a :class:`volumes.cache.EmbeddingCache`);
2. the aggregator trains with MONAI's ``SupervisedTrainer``; a ``SupervisedEvaluator``
   with the ``ROCAUC`` handler scores the validation split after every epoch, and the
   epoch with the best validation AUC is the model kept (as the classification bundle does);
3. that model is scored on the test split (AUC and accuracy).

Then a MONAI 3D ResNet-18 trains from scratch on the voxels with the same engines,
split, epochs, batch size and optimiser. Results (mean ± std over seeds) are printed
and written as a markdown table next to the published MedMNIST v2 baselines.

Seeds change the aggregator's (or the ResNet's) initialisation and the training data
order. The encoder is drawn once (``--encoder-seed``) and is the same for every seed:
redrawing it would mean re-embedding every volume per seed.

Run from the repository root::

    .venv/bin/python scripts/adrenal_results.py            # full run (~11 min on 2 shared CPU cores)
    .venv/bin/python scripts/adrenal_results.py --quick --output /tmp/quick.md   # smoke run, ~30 s
    .venv/bin/python scripts/adrenal_results.py --weights dinov2_vits14.pth      # real weights
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from volumes.reporting import command_line, format_params as fmt_params, machine_line, quick_subset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the companion module, also when loaded by path
from adrenal_report import render_markdown, results_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file from a checkout without installing

DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "medmnist3d"
DEFAULT_OUTPUT = REPO / "bundles" / "dinov2_slice_classification" / "docs" / "RESULTS_adrenalmnist3d.md"
AGGREGATOR_LABELS = {
    "transformer": "slice transformer",
    "gnn": "slice GNN (SAGE, chain graph)",
    "mean": "mean pooling + linear",
    "attention_mil": "gated attention MIL",
}
QUICK_PER_CLASS = {"train": 16, "val": 8, "test": 8}


# --------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="AdrenalMNIST3D: DINOv2 slice embeddings + aggregators vs a 3D ResNet-18 from scratch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=None,
                        help=f"MedMNIST 3D .npz (default: {DEFAULT_DATA_DIR}/adrenalmnist3d[_64].npz by --size)")
    parser.add_argument("--size", type=int, choices=(28, 64), default=28, help="volume size when --data is not given")
    parser.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=0,
                        help="stored axis that becomes the slicing axis (0 = MedMNIST's frame axis)")
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2", help="timm DINOv2/DINOv3 name")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, default=None,
                         help="local encoder weights (timm, Meta or Hugging Face format; see volumes.encoders.weights)")
    weights.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network access)")
    parser.add_argument("--encoder-seed", type=int, default=0, help="seed of the random encoder (no weights given)")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='timm options as JSON, e.g. \'{"depth": 4}\' (a random or pretrained short encoder)')
    parser.add_argument("--slice-size", type=int, default=None,
                        help="in-plane slice size for the encoder (default: 2x the volume size, on the patch grid)")
    parser.add_argument("--aggregators", nargs="+", default=list(AGGREGATOR_LABELS), choices=list(AGGREGATOR_LABELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8, help="epochs for every method (best epoch by val AUC)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (all methods)")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (all methods)")
    parser.add_argument("--baseline", choices=("resnet18", "none"), default="resnet18",
                        help="3D CNN trained from scratch on the voxels")
    parser.add_argument("--baseline-width", type=float, default=0.5,
                        help="widen_factor of MONAI's ResNet-18 (1.0 = 64..512 channels)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="embedding cache (default: $VOLUMES_CACHE_DIR or ~/.cache/volumes/embeddings)")
    parser.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is fastest on a shared 2-core machine (see the results doc)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"markdown file to write (default: {DEFAULT_OUTPUT}; none with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32/16/16 cases, 2 epochs, 2 seeds, no persistent cache unless --cache-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.seeds = args.seeds[:2]
        if args.cache_dir is None:
            args.no_cache = True
    elif args.output is None:
        args.output = DEFAULT_OUTPUT
    if args.data is None:
        args.data = DEFAULT_DATA_DIR / ("adrenalmnist3d.npz" if args.size == 28 else f"adrenalmnist3d_{args.size}.npz")
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1 or not args.seeds:
        parser.error("--epochs, --batch-size and --threads must be >= 1, and --seeds not empty")
    return args




# --------------------------------------------------------------------------- data
def default_slice_size(volume_size: int, patch: int) -> int:
    """Twice the volume size (at least 56 px) on the patch grid: 28 -> 56 for DINOv2's 14 px patches."""
    return max(patch, round(max(2 * volume_size, 56) / patch) * patch)


# --------------------------------------------------------------------------- embeddings
def blank_sharing_embedder(network, transform, preprocessing: dict[str, Any], **kwargs: Any):
    """A :class:`~volumes.embedding.SliceEmbedder` whose features encode each distinct blank slice once per run.

    The encoder embeds every slice on its own, so a slice of constant value (the empty
    background slices that make up ~60% of an AdrenalMNIST3D mask volume) always gets the
    same embedding: :class:`BlankSharingFeatures` computes it once and reuses it. Same cache
    keys as the plain embedder of ``network``.
    """
    from volumes.embedding import SliceEmbedder

    return SliceEmbedder(blank_sharing_features(network), transform, preprocessing, **kwargs)


def blank_sharing_features(network):
    """:class:`~volumes.embedding.ClassifierFeatures` of an axial ``network`` with blank slices shared."""
    import torch
    from monai.data import MetaTensor

    from volumes.embedding import ClassifierFeatures
    from volumes.networks import slice_spacing_mm

    class BlankSharingFeatures(ClassifierFeatures):
        def __init__(self, network):
            super().__init__(network)
            self._blank: dict[tuple[float, ...], torch.Tensor] = {}  # blank value per channel -> embedding

        def _embed(self, volume: torch.Tensor, device: torch.device) -> torch.Tensor:
            self.encoded_slices += int(volume.shape[-1])
            x, _, _ = self.network.embed(volume.to(device))
            return x[0].cpu()

        def compute(self, images, device):
            if tuple(self.network.planes) != ("axial",):
                return super().compute(images, device)
            return [self._one(image, device) for image in images]

        def _one(self, image: torch.Tensor, device: torch.device) -> dict:
            plain = image.as_tensor() if isinstance(image, MetaTensor) else image
            depth = plain.shape[-1]
            per_slice = plain.reshape(plain.shape[0], -1, depth)
            low, high = per_slice.amin(dim=1), per_slice.amax(dim=1)  # [C, D]
            blank = (low == high).all(dim=0)
            rows: list[torch.Tensor | None] = [None] * depth
            busy = (~blank).nonzero().flatten()
            if busy.numel():
                for index, row in zip(busy.tolist(), self._embed(plain[None][..., busy], device)):
                    rows[index] = row
            for index in blank.nonzero().flatten().tolist():
                value = tuple(low[:, index].tolist())
                if value not in self._blank:
                    self._blank[value] = self._embed(plain[None][..., index : index + 1], device)[0]
                rows[index] = self._blank[value]
            spacing = slice_spacing_mm(image.unsqueeze(0), 4)[0].cpu()  # positions: slice index x spacing
            positions = torch.arange(depth, dtype=torch.float32) * spacing
            return {"embedding": torch.stack(rows).numpy(), "positions": positions.numpy()}

    return BlankSharingFeatures(network)


# --------------------------------------------------------------------------- training
@dataclass
class RunResult:
    method: str
    seed: int
    params: int
    val_auc: float
    best_epoch: int
    test_auc: float
    test_acc: float
    seconds: float


@dataclass
class MethodSummary:
    method: str
    label: str
    params: int
    runs: list[RunResult] = field(default_factory=list)

    def stat(self, name: str) -> tuple[float, float]:
        values = [getattr(r, name) for r in self.runs]
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.runs)


def train_and_test(
    network,
    train_loader,
    val_loader,
    test_loader,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    prepare_batch,
    on_epoch: Callable[[int, float], None],
) -> tuple[float, int, float, float]:
    """MONAI SupervisedTrainer + SupervisedEvaluator; the best-val-AUC epoch is scored on test.

    Returns ``(best val AUC, best epoch, test AUC, test accuracy)``.
    """
    import ignite.metrics
    import torch
    from ignite.engine import Events
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import ROCAUC, ValidationHandler, from_engine

    from volumes.classification import ClassificationPostd, accuracy_output

    device = torch.device("cpu")
    postprocessing = ClassificationPostd(num_classes=2)

    def evaluator(loader, prefix: str) -> SupervisedEvaluator:
        return SupervisedEvaluator(
            device=device,
            val_data_loader=loader,
            network=network,
            prepare_batch=prepare_batch,
            postprocessing=postprocessing,
            key_val_metric={f"{prefix}_auc": ROCAUC(output_transform=from_engine(["pred", "label"]))},
            additional_metrics={f"{prefix}_acc": ignite.metrics.Accuracy(output_transform=accuracy_output)},
            amp=False,
        )

    validator = evaluator(val_loader, "val")
    best: dict[str, Any] = {}

    @validator.on(Events.EPOCH_COMPLETED)
    def keep_best(engine) -> None:  # runs after MONAI's own best-metric bookkeeping
        if engine.state.best_metric_epoch == engine.state.epoch:
            best["state"] = {k: v.detach().clone() for k, v in network.state_dict().items()}

    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=torch.optim.AdamW(
            [p for p in network.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        ),
        loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=prepare_batch,
        postprocessing=postprocessing,
        train_handlers=[ValidationHandler(validator=validator, interval=1, epoch_level=True)],
        amp=False,
    )

    @trainer.on(Events.EPOCH_COMPLETED)
    def report(engine) -> None:
        on_epoch(engine.state.epoch, float(validator.state.metrics["val_auc"]))

    trainer.run()
    network.load_state_dict(best["state"])
    tester = evaluator(test_loader, "test")
    tester.run()
    return (
        float(validator.state.best_metric),
        int(validator.state.best_metric_epoch),
        float(tester.state.metrics["test_auc"]),
        float(tester.state.metrics["test_acc"]),
    )


def count_trainable(network) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from monai.data import DataLoader
    from monai.transforms import Compose
    from monai.utils import set_determinism
    from tqdm.auto import tqdm

    from volumes.aggregators import build_aggregator
    from volumes.classification import EmbeddingBatch, collate_embeddings
    from volumes.data.medmnist import load_medmnist3d
    from volumes.encoders import SliceEncoder
    from volumes.networks import SliceClassifier
    from volumes.transforms import PrepareSlicesd

    progress = not args.no_progress
    machine = machine_line(args.threads)  # load average before this script adds to it

    def say(message: str) -> None:
        tqdm.write(message) if progress else print(message, flush=True)

    # ---- data
    splits = {split: load_medmnist3d(args.data, split, slice_axis=args.slice_axis) for split in ("train", "val", "test")}
    if args.quick:
        splits = {split: quick_subset(items, QUICK_PER_CLASS[split]) for split, items in splits.items()}
    volume_size = int(splits["train"][0]["image"].shape[-1])
    counts = " / ".join(str(len(items)) for items in splits.values())
    say(f"data: {args.data} ({volume_size}³), train/val/test = {counts}")

    # ---- embeddings, once
    torch.manual_seed(args.encoder_seed)
    encoder = SliceEncoder(args.encoder, weights=args.weights, pretrained=args.pretrained, chunk_size=64,
                           model_kwargs=args.model_kwargs or None)
    network = SliceClassifier(num_classes=2, encoder=encoder, aggregator="mean")
    slice_size = args.slice_size or default_slice_size(volume_size, encoder.patch_size)
    preprocessing = {
        "dataset": "medmnist3d", "intensity": "uint8/255", "slice_axis": args.slice_axis, "axis": "axial",
        "channel_mode": "repeat", "size": slice_size,
    }
    transform = Compose([PrepareSlicesd("image", axis="axial", channel_mode="repeat",
                                        patch_size=encoder.patch_size, size=slice_size)])
    embedder = blank_sharing_embedder(
        network, transform, preprocessing, cache_dir=None if args.no_cache else (args.cache_dir or _default_cache()),
        label_key="class_label", progress=progress,
    )
    t0 = time.perf_counter()
    embedded = {split: embedder(items) for split, items in splits.items()}
    embed_seconds = time.perf_counter() - t0
    cache_stats = embedder.cache.stats if embedder.cache is not None else None
    total_slices = sum(len(items) for items in splits.values()) * volume_size
    embed_note = f"{embedder.encoded_slices} of {total_slices} slices through the encoder"
    if cache_stats is not None:
        embed_note += f", cache hits {cache_stats['hits']} / misses {cache_stats['misses']}"
    say(f"embeddings: {embed_seconds:.1f} s ({embed_note})")
    embed_dim = network.embed_dim

    # ---- runs
    methods = list(args.aggregators) + (["resnet18"] if args.baseline == "resnet18" else [])
    summaries: list[MethodSummary] = []
    bar = tqdm(total=len(methods) * len(args.seeds) * args.epochs, desc="training", unit="epoch", disable=not progress)
    baseline_desc = None
    plain = {
        split: [{"image": item["image"].as_tensor(), "label": item["class_label"]} for item in items]
        for split, items in splits.items()
    }
    for method in methods:
        summary: MethodSummary | None = None
        for seed in args.seeds:
            set_determinism(seed=seed)
            order = torch.Generator().manual_seed(seed)
            if method == "resnet18":
                from monai.networks.nets import resnet18

                model = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, conv1_t_stride=2,
                                 widen_factor=args.baseline_width)
                data, collate, prepare = plain, None, None
                label = f"ResNet-18 3D from scratch (MONAI, width ×{args.baseline_width:g})"
                baseline_desc = (
                    f"`monai.networks.nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, "
                    f"conv1_t_stride=2, widen_factor={args.baseline_width:g})` ({fmt_params(count_trainable(model))} "
                    f"parameters) on the [0, 1] voxels, trained from scratch. `conv1_t_stride=2` and the width "
                    f"keep {len(args.seeds)} seeds × {args.epochs} epochs within the CPU budget: on one core here the default stride-1 "
                    "full-width network trains at ~5 volumes/s (~4 min per epoch), stride 2 at full width at "
                    "~30 volumes/s (~40 s per epoch), this one at ~100 volumes/s (~12 s per epoch). DenseNet121 3D "
                    "does not fit 28³ volumes (its last transition pooling needs a larger grid)."
                )
            else:
                model = build_aggregator(method, embed_dim, 2)
                data, collate, prepare = embedded, collate_embeddings, EmbeddingBatch()
                encoder_label = "DINOv2 ViT-S/14" if args.encoder == "vit_small_patch14_dinov2" else args.encoder
                random_init = "random-init " if not (args.weights or args.pretrained) else ""
                label = f"{encoder_label} {random_init}frozen + {AGGREGATOR_LABELS[method]}"
            if summary is None:
                summary = MethodSummary(method, label, count_trainable(model))
            collate_kwargs = {"collate_fn": collate} if collate is not None else {}
            loaders = [
                DataLoader(data[split], batch_size=args.batch_size, shuffle=split == "train", num_workers=0,
                           generator=order if split == "train" else None, **collate_kwargs)
                for split in ("train", "val", "test")
            ]
            bar.set_postfix_str(f"{method} seed {seed}")

            def on_epoch(epoch: int, val_auc: float, method=method, seed=seed) -> None:
                bar.update(1)
                bar.set_postfix_str(f"{method} seed {seed} epoch {epoch} val AUC {val_auc:.3f}")

            kwargs = {"prepare_batch": prepare} if prepare is not None else {"prepare_batch": _default_prepare_batch()}
            t_run = time.perf_counter()
            val_auc, best_epoch, test_auc, test_acc = train_and_test(
                model, *loaders, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                on_epoch=on_epoch, **kwargs,
            )
            result = RunResult(method, seed, summary.params, val_auc, best_epoch, test_auc, test_acc,
                               time.perf_counter() - t_run)
            summary.runs.append(result)
            say(f"{method:>13} seed {seed}: val AUC {val_auc:.3f} (epoch {best_epoch}), "
                f"test AUC {test_auc:.3f}, test ACC {test_acc:.3f}, {result.seconds:.0f} s")
        summaries.append(summary)
    bar.close()

    # ---- report
    test_labels = [item["class_label"] for item in splits["test"]]
    majority_acc = max(test_labels.count(0), test_labels.count(1)) / len(test_labels)
    table = results_table(summaries, embed_seconds, majority_acc)
    total_seconds = time.perf_counter() - started
    print()
    print(table)
    print(f"\nembeddings {embed_seconds:.0f} s ({embed_note}); total {total_seconds / 60:.1f} min")
    if args.output is not None:
        weights_state = (f"weights file {args.weights.name}" if args.weights else
                         "timm hub weights" if args.pretrained else "random init")
        ctx = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command_line("adrenal_results.py", argv), "random_encoder": not (args.weights or args.pretrained),
            "encoder_state": weights_state, "encoder_seed": args.encoder_seed, "encoder": args.encoder,
            "seeds": args.seeds, "counts": counts, "volume_size": volume_size, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "embed_seconds": embed_seconds, "embed_note": embed_note, "machine": machine,
            "total_seconds": total_seconds, "data_name": args.data.name, "slice_axis": args.slice_axis,
            "slice_size": slice_size, "patch": encoder.patch_size, "embed_dim": embed_dim, "baseline_desc": baseline_desc,
            "majority_acc": majority_acc, "test_normal": test_labels.count(0), "test_total": len(test_labels),
            "val_total": len(splits["val"]), "val_positive": sum(item["class_label"] for item in splits["val"]),
            "baseline_gap": (", and the 3D ResNet-18 here is narrower and strides its first convolution"
                             if args.baseline == "resnet18" else ""),
        }
        from volumes.atomic import atomic_write_bytes

        text = render_markdown(ctx, summaries)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.output, lambda f: f.write(text.encode()))
        print(f"wrote {args.output}")
    return 0


def _default_cache() -> Path:
    from volumes.cache import default_cache_dir

    return default_cache_dir()


def _default_prepare_batch():
    from monai.engines.utils import default_prepare_batch

    return default_prepare_batch


if __name__ == "__main__":
    raise SystemExit(main())
