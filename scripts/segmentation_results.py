#!/usr/bin/env python
"""Organ segmentation on a real CT: the DINOv2 slice segmenter vs MONAI's 3D UNet and SwinUNETR.

Data: the TotalSegmentator example CT in ``../shared/data/totalsegmentator_example``
(``example_ct.nii.gz``, 122 x 101 x 112 voxels of 3 mm) with its reference label map
``example_seg_fast_force_split.nii.gz``. The references are **TotalSegmentator model
predictions**, not manual ground truth. Their ids are remapped to the bundle's labels by
name through ``totalsegmentator_class_map.json`` ("total" map): liver, spleen,
kidney_left, kidney_right, aorta and vertebrae (every ``vertebrae_*`` class; the sacrum is
not one of them) keep their organ; every other class becomes background.

Rows of the table (Dice per organ in the original image space, after inverting the
preprocessing with ``Invertd``):

(a) ``volumes.networks.SliceSegmenter`` (``--decoder``) trained on generated phantoms only: ``--checkpoint``
    (a bundle's ``models/model.pt``), or, without it, trained here with the segmentation
    bundle itself (``python -m monai.bundle run --config_file .../train.json``) on a phantom
    cohort; if that run fails the same schedule runs through the ``volumes.segmentation``
    helpers directly (``--phantom-trainer``).
(b) the same network trained on part of the CT's axial slices: the volume is cut into
    blocks of ``--block`` (16) consecutive slices; even blocks train, odd blocks test.
(c) MONAI ``UNet`` (3D) and (d) MONAI ``SwinUNETR`` trained on the same training slices with
    the same wall-clock budget as (b) (``--budget-s`` each: training runs until the budget is
    spent), evaluated on the same test slices with sliding-window inference.

Every model sees the soft-tissue window (level 40 / width 400 HU, channel 0 of the bundle's input) on the
same in-plane grid (``volumes.transforms.preprocessing`` with the bundle's
``preprocessing_config``); the slice segmenter gets the bundle's ImageNet-normalised
channels (with the default ``ct_three_windows``: soft-tissue, lung and bone windows), the 3D
networks the soft-tissue window as one channel in [0, 1]. Each test block is predicted on its own (no model
sees the slices of another block at test time), and Dice is computed over all test slices
together.

Run from the repository root::

    .venv/bin/python scripts/segmentation_results.py                    # full run, ~17 min on 2 shared CPU cores
    .venv/bin/python scripts/segmentation_results.py --checkpoint bundle/models/model.pt
    .venv/bin/python scripts/segmentation_results.py --budget-s 5 --phantom-epochs 1 --output /tmp/smoke.md

SwinUNETR needs ``einops`` (MONAI imports it lazily); without it row (d) is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from volumes.atomic import atomic_write_bytes
from volumes.reporting import command_line, format_params as fmt_params, load_average, machine_line

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the companion module, also when loaded by path
from segmentation_parts import (  # noqa: E402
    CLASS_MAP_FILE, CT_FILE, INFERENCE_SLAB, LR_SLICE, NEG, POS, ROI_3D, SAMPLES, SEG_FILE, SLAB, WEIGHT_DECAY,
    TrainResult, dice_on, label_map_original, label_mapping, phantom_dice, predict_blocks, prepare_case, slice_batches,
    train_budgeted, volume_batches, windowed,
)

# What tests/test_segmentation_results.py, scripts/decoder_comparison.py and scripts/interactive_results.py
# take from this script (label_mapping and the file names live in segmentation_parts).
__all__ = ["BUNDLE_DECODER", "CLASS_MAP_FILE", "CT_FILE", "SEG_FILE", "checkpoint_decoder", "label_mapping", "main",
           "parse_args", "slice_segmenter"]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file from a checkout without installing

BUNDLE = REPO / "bundles" / "dinov2_unet_segmentation"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "totalsegmentator_example"
DEFAULT_OUTPUT = BUNDLE / "docs" / "RESULTS_totalsegmentator_example.md"

REPORTED = ("liver", "spleen", "kidney_left", "kidney_right")  # the organs of the mean
EXTRA = ("aorta", "vertebrae")  # also labelled and scored, outside the mean
# The bundle's network: SliceSegmenter on a 4-block random-initialised ViT-S/14, frozen.
ENCODER = "vit_small_patch14_dinov2"
ENCODER_KWARGS = {"chunk_size": 32, "model_kwargs": {"depth": 4}}
FEATURE_SIZE = 16
BUNDLE_DECODER = json.loads((BUNDLE / "configs" / "train.json").read_text()).get("decoder", "unetr")
SWIN_DIVISOR = 32  # SwinUNETR needs every input side divisible by 2**5


# --------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Dice per organ on the TotalSegmentator example CT: phantom-trained and CT-trained "
                    "SliceSegmenter vs MONAI 3D UNet and SwinUNETR with the same CPU budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="TotalSegmentator example folder")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="phantom-trained bundle models/model.pt for row (a); without it one is trained here")
    parser.add_argument("--phantom-trainer", choices=("auto", "bundle", "helpers"), default="auto",
                        help="how row (a) is trained without --checkpoint: the bundle's train.json (auto falls "
                             "back to the volumes.segmentation helpers if the bundle run fails)")
    parser.add_argument("--phantom-epochs", type=int, default=12, help="epochs of the phantom training for row (a)")
    parser.add_argument("--phantom-cases", type=int, default=24, help="phantom cohort size (train/val/test 60/20/20)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="bundle root for the phantom training and scratch files (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="training wall-clock budget of each of rows (b), (c), (d), in seconds")
    parser.add_argument("--block", type=int, default=16, help="axial slices per block of the train/test split")
    parser.add_argument("--swin-feature-size", type=int, default=24, help="SwinUNETR feature_size (multiple of 12)")
    parser.add_argument("--lr-3d", type=float, default=1e-3, help="AdamW learning rate of the 3D UNet and SwinUNETR")
    parser.add_argument("--decoder", choices=("auto", "unetr", "light"), default="auto",
                        help="the SliceSegmenter's 2D decoder for rows (a) and (b): auto = the one recorded with "
                             "--checkpoint (model.settings.json; a file without the key = unetr), else the "
                             "bundle's train.json's")
    parser.add_argument("--rows", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits a shared 2-core machine)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to write")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.block < 2 or args.threads < 1 or args.phantom_epochs < 1:
        parser.error("--budget-s must be > 0, --block >= 2, --threads and --phantom-epochs >= 1")
    if args.swin_feature_size % 12:
        parser.error("--swin-feature-size must be a multiple of 12 (SwinUNETR)")
    if args.decoder == "auto":
        args.decoder = checkpoint_decoder(args.checkpoint)
    return args


def checkpoint_decoder(checkpoint: Path | None) -> str:
    """The decoder ``checkpoint`` was trained with (its settings file; without the key: unetr), else the bundle's."""
    from volumes.bundle import OLD_CHECKPOINT_DEFAULTS, settings_path

    if checkpoint is not None and settings_path(checkpoint).is_file():
        saved = json.loads(settings_path(checkpoint).read_text()).get("network", {})
        return saved.get("decoder", OLD_CHECKPOINT_DEFAULTS["network.decoder"])
    return BUNDLE_DECODER


# --------------------------------------------------------------------------- models
def slice_segmenter(num_classes: int, seed: int, decoder: str = BUNDLE_DECODER):
    import torch

    from volumes.networks import SliceSegmenter

    torch.manual_seed(seed)
    return SliceSegmenter(num_classes, encoder=ENCODER, decoder=decoder, feature_size=FEATURE_SIZE, refine=True,
                          encoder_kwargs=json.loads(json.dumps(ENCODER_KWARGS)))


def count_params(network) -> tuple[int, int]:
    return (sum(p.numel() for p in network.parameters() if p.requires_grad),
            sum(p.numel() for p in network.parameters()))


@dataclass
class Row:
    key: str
    label: str
    trained_on: str
    dice: dict[str, float]
    params: tuple[int, int]
    train: TrainResult | None
    infer_s: float
    lr: float | None = None
    note: str = ""

    @property
    def mean(self) -> float:
        return sum(self.dice[o] for o in REPORTED) / len(REPORTED)


def run_phantom_training(args: argparse.Namespace, work_dir: Path, say: Callable[[str], None]
                         ) -> tuple[Path, str, float, int | None]:
    """Train the bundle's network on phantoms. Returns (checkpoint, how, seconds, steps or None)."""
    bundle_root = work_dir / "phantom_bundle"
    checkpoint = bundle_root / "models" / "model.pt"
    start = time.perf_counter()
    if args.phantom_trainer in ("auto", "bundle"):
        cmd = [sys.executable, "-m", "monai.bundle", "run",
               "--config_file", str(BUNDLE / "configs" / "train.json"),
               "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
               "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
               "--bundle_root", str(bundle_root),
               "--encoder_model_kwargs", json.dumps(ENCODER_KWARGS["model_kwargs"]),
               "--epochs", str(args.phantom_epochs), "--validation_interval", str(args.phantom_epochs),
               "--phantom_cases", str(args.phantom_cases), "--seed", str(args.seed), "--decoder", args.decoder]
        shown = " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])
        shown = shown.replace(str(bundle_root), "DIR").replace(str(REPO) + os.sep, "")
        say(f"(a) training on phantoms with the bundle: {shown}")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        log_file = work_dir / "phantom_bundle_train.log"
        with open(log_file, "w") as log:
            proc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode == 0 and checkpoint.is_file():
            from volumes.bundle import datalist_section

            n_train = len(datalist_section(bundle_root / "data" / "phantoms" / "datalist.json", "training"))
            how = (f"the bundle's `train.json`, run as `{shown}` ({args.phantom_epochs} epoch(s) over "
                   f"{n_train} training phantoms; its train wall time includes writing the cohort and one validation)")
            return checkpoint, how, time.perf_counter() - start, args.phantom_epochs * n_train
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        say(f"(a) the bundle run failed (exit {proc.returncode}); last lines of {log_file}:\n{tail}")
        if args.phantom_trainer == "bundle":
            raise SystemExit("--phantom-trainer bundle: the bundle run failed")
        say("(a) falling back to the volumes.segmentation helpers with the bundle's schedule")
        bundle_failed = f"the bundle run failed (exit {proc.returncode}: {_last_error(tail)}), so "
    else:
        bundle_failed = ""
    seconds, steps = train_phantoms_with_helpers(args, bundle_root, checkpoint, say)
    how = (f"{bundle_failed}the `volumes.segmentation` helpers with the bundle's settings "
           f"({args.phantom_epochs} epoch(s) over the training phantoms, {SAMPLES} random slabs of {SLAB} slices per "
           f"phantom per step, AdamW lr {LR_SLICE:g}, weight decay {WEIGHT_DECAY:g}, DiceCE)")
    return checkpoint, how, seconds, steps


def _last_error(tail: str) -> str:
    for line in reversed(tail.splitlines()):
        if "Error" in line or "Exception" in line:
            return line.strip()[:160].replace("|", "/")
    return "see its log"


def train_phantoms_with_helpers(args: argparse.Namespace, bundle_root: Path, checkpoint: Path,
                                say: Callable[[str], None]) -> tuple[float, int]:
    """The bundle's training schedule without the bundle: same cohort, crops, loss, optimiser, epochs."""
    import torch
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from volumes.bundle import datalist_section, ensure_phantom_cohort
    from volumes.data.phantoms import LABEL_NAMES
    from volumes.segmentation import segmentation_transforms, training_crops

    datalist = ensure_phantom_cohort(bundle_root / "data" / "phantoms", n=args.phantom_cases, seed=0,
                                     kind="segmentation")
    set_determinism(seed=args.seed)
    network = slice_segmenter(len(LABEL_NAMES), args.seed, args.decoder)
    preprocessing_config = bundle_preprocessing_config()
    load = segmentation_transforms(preprocessing_config, network.encoder.patch_size, keep_original_label=False)
    crops = training_crops(SLAB, SAMPLES)
    crops.set_random_state(seed=args.seed)
    cases = [load(item) for item in datalist_section(datalist, "training")]
    order = torch.Generator().manual_seed(args.seed)
    queue: list[int] = []
    counter = {"epoch": 0}

    def batch():
        if not queue:
            queue.extend(torch.randperm(len(cases), generator=order).tolist())
            counter["epoch"] += 1
        samples = Compose([crops]).flatten()(dict(cases[queue.pop()]))
        x = torch.stack([s["image"].as_tensor() for s in samples])
        y = torch.stack([s["label"].as_tensor() for s in samples]).long()
        return x, y

    say(f"(a) training on {len(cases)} phantoms for {args.phantom_epochs} epochs with the helpers")
    result = train_budgeted(network, batch, lr=LR_SLICE, steps=args.phantom_epochs * len(cases), name="(a)", log=say)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), checkpoint)
    return result.seconds, result.steps


def bundle_preprocessing_config() -> dict[str, Any]:
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    return dict(train["preprocessing_config"])


# --------------------------------------------------------------------------- report
def fmt_dice(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.3f}"


def render(ctx: dict[str, Any], rows: list[Row]) -> str:
    import monai
    import timm
    import torch

    head = ["model", "trained on", *REPORTED, "**mean (4)**", *EXTRA, "train steps", "train wall s", "s / step",
            "test inference s", "params trainable / total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        steps = str(r.train.steps) if r.train and r.train.steps else ("–" if r.train is None else "see text")
        secs = f"{r.train.seconds:.0f}" if r.train and r.train.seconds else "–"
        per_step = (f"{r.train.seconds / r.train.steps:.2f}" if r.train and r.train.steps and r.key != "a"
                    else "–")  # (a)'s time may include writing the cohort and a validation
        cells = [r.label, r.trained_on, *(fmt_dice(r.dice[o]) for o in REPORTED), f"**{r.mean:.3f}**",
                 *(fmt_dice(r.dice[o]) for o in EXTRA), steps, secs, per_step, f"{r.infer_s:.1f}",
                 f"{fmt_params(r.params[0])} / {fmt_params(r.params[1])}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    voxels = ctx["organ_voxels"]
    vox_rows = "\n".join(
        f"| {name} | {voxels['train'][name]} | {voxels['test'][name]} |" for name in (*REPORTED, *EXTRA))
    losses = "\n".join(
        f"- {r.label}: DiceCE loss {r.train.first_loss:.3f} at the first step, {r.train.last_loss:.3f} "
        f"(mean of the last 10 steps) at the end, AdamW lr {r.lr:g}."
        for r in rows if r.train is not None and r.train.steps and r.lr is not None)
    skipped = "".join(f"\n- {s}" for s in ctx["skipped"])
    phantom = ctx.get("phantom")
    phantom_text = (
        f"On {phantom['n']} held-out test phantoms of its own cohort the same model scores mean Dice "
        f"{phantom['mean']:.3f} over {', '.join(REPORTED)} ("
        + ", ".join(f"{o} {phantom['dice'][o]:.3f}" for o in REPORTED) + "), in the original image space."
        if phantom else "")
    return f"""# Organ segmentation on the TotalSegmentator example CT

Generated by `scripts/segmentation_results.py` on {ctx['date']}. Reproduce from the repository root:

```bash
{ctx['command']}
```

**The references are TotalSegmentator v2 model predictions (the file name says `--fast --force_split`), not manual
ground truth.**
Dice here measures agreement with that model on one CT, not accuracy against annotations. It is one volume, one
split and one seed: no spread over seeds or splits was measured, so small differences between rows are weak evidence.
**The DINOv2 encoder is randomly initialised** (no model hub can be reached from the machine these numbers come
from) and frozen: only the decoder, head and 3D refinement of the slice segmenter train.

## Results

Dice per organ on the test slices (the odd blocks of {ctx['block']} axial slices, {ctx['n_test']} of
{ctx['depth']} slices), in the CT's original space after inverting the preprocessing. "mean (4)" is the mean over
{', '.join(REPORTED)}; {' and '.join(EXTRA)} are labelled and scored too but left out of the mean.
Rows (b), (c) and (d) each trained for a budget of {ctx['budget_s']:g} s of wall-clock time on the training slices
(the step that crosses the budget completes, so the times are a little over it).

{table}

- (a) trained on generated phantoms only ({ctx['phantom_how']}), never on this CT; a shorter schedule than
  `train.json`'s default of {ctx['bundle_epochs']} epochs, to fit the script's time. {phantom_text}
  The phantom organs are smooth blobs with simplified shapes, contrast and surroundings; this row measures how
  far that carries to a real scan. "(a) whole CT" scores the same model on all {ctx['depth']} slices (sliding
  windows of {INFERENCE_SLAB} slices over the whole volume).
- (b) trained on this CT's training slices: SliceSegmenter as in the bundle (`{ENCODER}`, 4 blocks, frozen random
  weights, `decoder={ctx['decoder']!r}`, `feature_size={FEATURE_SIZE}`, `refine=True`), batches of {SAMPLES} slabs of {SLAB} whole slices.
- (c) `monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels={ctx['num_classes']}, channels=(16, 32, 64, 128, 256),
  strides=(2, 2, 2, 2), num_res_units=2)`, batches of {SAMPLES} crops of {ROI_3D[0]}×{ROI_3D[1]}×{ROI_3D[2]} voxels;
  sliding-window inference with that window, overlap 0.25, Gaussian weighting.
- (d) `monai.networks.nets.SwinUNETR(in_channels=1, out_channels={ctx['num_classes']}, feature_size={ctx['swin_feature_size']})` (MONAI
  {monai.__version__}; no `img_size` argument any more), the same crops zero-padded symmetrically from {ROI_3D[2]} to
  {SWIN_DIVISOR} slices (SwinUNETR needs sides divisible by 32); sliding-window inference with a
  {ROI_3D[0]}×{ROI_3D[1]}×{SWIN_DIVISOR} window, which pads each {ctx['block']}-slice test block the same way.
{losses}{skipped}
- The budget is wall-clock time, so it buys very different numbers of steps: {ctx['steps_text']}. A row whose
  loss is still far from the others' at the end is undertrained at this budget; that says how far each network
  gets in {ctx['budget_s']:g} s on this CPU, not how well it does when trained to convergence.
- Resampling ceiling: the reference itself, taken to the prepared grid (nearest neighbour) and back with the same
  `Invertd`, scores {ctx['ceiling_text']} on the test slices: the most any row can reach at this slice size.

## Data and split

- `{CT_FILE}` ({ctx['ct_shape']} voxels, spacing {ctx['spacing']} mm) and `{SEG_FILE}` from
  `shared/data/totalsegmentator_example` (TotalSegmentator test files, Apache-2.0; see its README).
- Label ids remapped by name with `{CLASS_MAP_FILE}` ("total"): {ctx['mapping_text']}; every other class
  (stomach, bowel, muscles, pelvis, sacrum, ribs, ...) is background.
- Split along the axial axis into blocks of {ctx['block']} consecutive slices: training blocks (even) {ctx['train_blocks']},
  test blocks (odd) {ctx['test_blocks']} (slice index ranges, end exclusive). Each test block is predicted on its own,
  with no slices of the training blocks around it; training crops never cross a block border. The organs lie in
  the upper part of the scan: {ctx['organ_blocks_text']}. Reference organ voxels per split:

| organ | training slices | test slices |
|---|---|---|
{vox_rows}

- Preprocessing (every model): the bundle's `preprocessing_config` `{json.dumps(ctx['preprocessing_config'])}` through
  `volumes.segmentation.segmentation_transforms`: loaded as RAS, soft-tissue window (level 40, width 400 HU) to
  [0, 1], slices resized to a longer side of {ctx['preprocessing_config'].get('size')} px ({ctx['prepared_shape']} after padding
  to the patch grid). The slice segmenter gets the 3 repeated, ImageNet-normalised channels; the 3D networks the
  windowed channel in [0, 1]. Predictions go back to the original grid with `Invertd`
  (`volumes.segmentation.segmentation_postprocessing`), and Dice (`monai.metrics.compute_dice`) is computed there,
  over all test slices pooled.
- Training (rows b–d): DiceCE (`to_onehot_y`, softmax), AdamW with weight decay {WEIGHT_DECAY:g}; crop centres on an
  organ voxel {POS:g} : {NEG:g} as often as on background (as `volumes.segmentation.training_crops`); no augmentation;
  seed {ctx['seed']}. The slice segmenter keeps the bundle's learning rate ({LR_SLICE:g}); the 3D networks use
  {ctx['lr_3d']:g} (`--lr-3d`), a common choice for them with Adam-type optimisers and short schedules.

## Machine and timing

- {ctx['machine']}; load average {ctx['load_end']} at the end. The machine's 2 cores
  are shared with other people's jobs (test runs among them) that run at the same time, so wall times, and with
  them the steps each budget bought, are noisy: a quieter machine gives every row more steps in the same budget.
- Software: torch {torch.__version__}, MONAI {monai.__version__}, timm {timm.__version__}, Python {platform.python_version()}.
- Total script time: {ctx['total_s'] / 60:.1f} min.
"""


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place (mode as umask allows)."""
    atomic_write_bytes(path, lambda stream: stream.write(text.encode("utf-8")))


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {message}", flush=True)

    needed = [args.data_dir / f for f in (CT_FILE, SEG_FILE, CLASS_MAP_FILE)]
    if not all(p.is_file() for p in needed):
        print(f"skipped: the TotalSegmentator example data are not there ({', '.join(str(p) for p in needed if not p.is_file())}); "
              "they come with the project's shared/ folder next to the repository.")
        return 0

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import UNet
    from monai.utils import set_determinism

    from volumes.bundle import load_network_weights
    from volumes.data.phantoms import LABEL_NAMES
    from volumes.segmentation import slab_inferer

    train_config = json.loads((BUNDLE / "configs" / "train.json").read_text())
    labels = list(train_config.get("labels", LABEL_NAMES))
    if labels != list(LABEL_NAMES):
        raise SystemExit(f"bundle labels {labels} differ from volumes.data.phantoms.LABEL_NAMES {list(LABEL_NAMES)}")
    num_classes = len(labels)
    preprocessing_config = bundle_preprocessing_config()
    load_start = load_average()

    tmp = tempfile.TemporaryDirectory(prefix="segmentation_results_") if args.work_dir is None else None
    work_dir = Path(tmp.name) if tmp else args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    rows: list[Row] = []
    ctx: dict[str, Any] = {}
    try:
        set_determinism(seed=args.seed)
        patch = slice_segmenter(num_classes, args.seed).encoder.patch_size
        case = prepare_case(args.data_dir, work_dir, labels, args.block, patch, preprocessing_config)
        reference = np.asarray(case.prepared["original_label"][0]).astype(np.int64)
        test_z = case.slices(case.test_blocks)
        say(f"CT prepared: image {tuple(case.prepared['image'].shape)}, train blocks {case.train_blocks}, "
            f"test blocks {case.test_blocks}; organ voxels train {case.organ_voxels['train']}, "
            f"test {case.organ_voxels['test']}")
        image = case.prepared["image"].as_tensor()
        soft = windowed(case)

        def evaluate(network, infer, volume_input, blocks=case.test_blocks, z=test_z):
            network.eval()
            logits, seconds = predict_blocks(case, infer, blocks, num_classes, volume_input)
            pred = label_map_original(case, logits, num_classes)
            return dice_on(pred, reference, z, labels), seconds

        slab = slab_inferer(INFERENCE_SLAB)

        # The ceiling the grid change allows: the reference taken to the prepared grid and back.
        from monai.networks.utils import one_hot

        perfect = one_hot(case.prepared["label"].as_tensor()[None].long(), num_classes)[0].float()
        ctx["ceiling"] = dice_on(label_map_original(case, perfect, num_classes), reference, test_z, labels)
        say(f"resampling ceiling on the test slices: {ctx['ceiling']}")

        # (a) phantom-trained model as is
        if "a" in args.rows:
            steps = None
            if args.checkpoint is not None:
                checkpoint, how, phantom_s = args.checkpoint, f"checkpoint `{args.checkpoint}`", None
                datalist = None
            else:
                checkpoint, how, phantom_s, steps = run_phantom_training(args, work_dir, say)
                datalist = work_dir / "phantom_bundle" / "data" / "phantoms" / "datalist.json"
            net = load_network_weights(slice_segmenter(num_classes, args.seed, args.decoder), checkpoint,
                                       settings={"network": {"decoder": args.decoder}}).eval()
            params = count_params(net)
            trained = TrainResult(steps=steps or 0, seconds=phantom_s) if phantom_s is not None else None
            dice, secs = evaluate(net, lambda x: slab(x, net), image)
            rows.append(Row("a", "(a) SliceSegmenter, phantom-trained", "phantoms", dice, params, trained, secs))
            whole, whole_s = evaluate(net, lambda x: slab(x, net), image, blocks=[(0, case.depth)],
                                      z=range(case.depth))
            rows.append(Row("a*", "(a) same, whole CT", "phantoms", whole, params, None, whole_s))
            ctx["phantom_how"] = how
            if datalist is not None and datalist.is_file():
                dice_ph, n_ph = phantom_dice(net, datalist, preprocessing_config, labels, patch)
                ctx["phantom"] = {"dice": dice_ph, "n": n_ph,
                                  "mean": sum(dice_ph[o] for o in REPORTED) / len(REPORTED)}
            say(f"(a) test slices {dice}; whole CT {whole}")
            del net
        else:
            ctx["phantom_how"] = "not run"

        # (b) SliceSegmenter trained on the CT's training slices
        if "b" in args.rows:
            set_determinism(seed=args.seed)
            net = slice_segmenter(num_classes, args.seed, args.decoder)
            say(f"(b) training SliceSegmenter for {args.budget_s:g} s")
            result = train_budgeted(net, slice_batches(case, args.seed), lr=LR_SLICE, budget_s=args.budget_s,
                                    name="(b)", log=say)
            dice, secs = evaluate(net, lambda x: slab(x, net), image)
            rows.append(Row("b", "(b) SliceSegmenter, CT-trained", "CT training slices", dice, count_params(net),
                            result, secs, LR_SLICE))
            say(f"(b) {result.steps} steps in {result.seconds:.0f} s: {dice}")
            del net

        # (c) MONAI 3D UNet
        if "c" in args.rows:
            set_determinism(seed=args.seed)
            net = UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=(16, 32, 64, 128, 256),
                       strides=(2, 2, 2, 2), num_res_units=2)
            say(f"(c) training 3D UNet for {args.budget_s:g} s")
            result = train_budgeted(net, volume_batches(case, args.seed), lr=args.lr_3d, budget_s=args.budget_s,
                                    name="(c)", log=say)
            inferer = SlidingWindowInferer(roi_size=ROI_3D, sw_batch_size=4, overlap=0.25, mode="gaussian")
            dice, secs = evaluate(net, lambda x: inferer(x, net), soft)
            rows.append(Row("c", "(c) MONAI UNet (3D)", "CT training slices", dice, count_params(net), result, secs,
                            args.lr_3d))
            say(f"(c) {result.steps} steps in {result.seconds:.0f} s: {dice}")
            del net

        # (d) MONAI SwinUNETR
        if "d" in args.rows:
            try:
                importlib.import_module("einops")  # SwinUNETR's forward needs it; MONAI imports it lazily
            except ImportError:
                skipped.append("(d) SwinUNETR skipped: `einops` is not installed (`pip install einops`).")
                say(skipped[-1])
            else:
                from monai.networks.nets import SwinUNETR

                set_determinism(seed=args.seed)
                net = SwinUNETR(in_channels=1, out_channels=num_classes, feature_size=args.swin_feature_size,
                                spatial_dims=3)
                say(f"(d) training SwinUNETR (feature_size {args.swin_feature_size}) for {args.budget_s:g} s")
                result = train_budgeted(net, volume_batches(case, args.seed, pad_depth_to=SWIN_DIVISOR),
                                        lr=args.lr_3d, budget_s=args.budget_s, name="(d)", log=say)
                roi = (ROI_3D[0], ROI_3D[1], SWIN_DIVISOR)
                inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=4, overlap=0.25, mode="gaussian")
                dice, secs = evaluate(net, lambda x: inferer(x, net), soft)
                rows.append(Row("d", f"(d) MONAI SwinUNETR (feature_size {args.swin_feature_size})",
                                "CT training slices", dice, count_params(net), result, secs, args.lr_3d))
                say(f"(d) {result.steps} steps in {result.seconds:.0f} s: {dice}")
                del net
    finally:
        if tmp is not None:
            tmp.cleanup()

    inverse = {}
    for ts_id, ours in sorted(case.mapping.items()):
        inverse.setdefault(labels[ours], []).append(ts_id)
    def id_text(ids: list[int]) -> str:
        if len(ids) == 1:
            return str(ids[0])
        return f"{min(ids)}–{max(ids)}" if ids == list(range(min(ids), max(ids) + 1)) else str(ids)

    mapping_text = "; ".join(f"{name} ← {id_text(ids)}" for name, ids in inverse.items())
    ctx.update(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=command_line("segmentation_results.py", argv), block=args.block, depth=case.depth, n_test=len(test_z),
        budget_s=args.budget_s, num_classes=num_classes, swin_feature_size=args.swin_feature_size,
        organ_voxels=case.organ_voxels, skipped=skipped, ct_shape="×".join(str(s) for s in reference.shape),
        spacing=" × ".join(f"{s:g}" for s in case.spacing), mapping_text=mapping_text,
        train_blocks=", ".join(f"{lo}–{hi}" for lo, hi in case.train_blocks),
        test_blocks=", ".join(f"{lo}–{hi}" for lo, hi in case.test_blocks),
        preprocessing_config=preprocessing_config,
        prepared_shape="×".join(str(s) for s in case.prepared["image"].shape[1:3]),
        seed=args.seed, lr_3d=args.lr_3d, decoder=args.decoder, machine=machine_line(torch.get_num_threads()),
        load_start=load_start, load_end=load_average(), total_s=time.perf_counter() - t0,
    )
    ctx["bundle_epochs"] = train_config.get("epochs")
    trained_rows = [r for r in rows if r.key in ("b", "c", "d") and r.train and r.train.steps]
    ctx["steps_text"] = "; ".join(
        f"{r.label.split(' ', 1)[1]} {r.train.steps} steps of {r.train.seconds / r.train.steps:.2f} s"
        for r in trained_rows) or "no row trained"
    ctx["ceiling_text"] = ", ".join(f"{o} {ctx['ceiling'][o]:.3f}" for o in (*REPORTED, *EXTRA)) + (
        f" (mean (4) {sum(ctx['ceiling'][o] for o in REPORTED) / len(REPORTED):.3f})")
    organ_test_blocks = [f"{lo}–{hi}" for lo, hi in case.test_blocks
                         if (reference[..., lo:hi][None] == np.arange(1, 5)[:, None, None, None]).any()]
    ctx["organ_blocks_text"] = (
        f"the test organ voxels ({', '.join(REPORTED)}) lie in test block(s) {', '.join(organ_test_blocks)}, "
        f"each with training blocks directly above and/or below: this measures filling in gaps of "
        f"{args.block * case.spacing[2]:g} mm within one patient, an easier task than a new patient")
    text = render(ctx, rows)
    write_atomic(args.output, text)
    print(text)
    say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
