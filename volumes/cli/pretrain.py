"""``volumes pretrain``: the DINOv2 recipe on a folder of unlabelled CT/MR (see :mod:`volumes.pretrain`)."""

from __future__ import annotations

import argparse
import json


def _pair(text: str) -> tuple[float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers 'START,END', got {text!r}")
    return parts[0], parts[1]


def add_parser(sub) -> None:
    from volumes.pretrain.config import pretrain_defaults

    d = pretrain_defaults()  # every default is PretrainConfig's own (tests/test_pretrain.py compares them)
    p = sub.add_parser("pretrain", help="self-supervised DINOv2 pretraining of a slice encoder on unlabelled volumes",
                       description="Pretrain a DINOv2/DINOv3 slice encoder on your own unlabelled CT/MR volumes "
                                   "(DINO + iBOT + KoLeo, multi-crop, EMA teacher). Writes OUT/encoder.safetensors "
                                   "and OUT/encoder.json for the bundles' encoder_weights (docs/PRETRAIN.md).")
    p.add_argument("--data", required=True,
                   help="a folder of NIfTI/NRRD/MHA files and DICOM series, a MONAI datalist .json, a .csv with an "
                        "image column, or a MedMNIST 3D .npz (its train split); labels are ignored")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, encoder.safetensors, metrics.jsonl)")
    p.add_argument("--encoder", default=d["encoder"], help="a DINOv2/DINOv3 timm name")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--weights", default=None,
                       help="continue from these weights (Meta .pth, timm file, Hugging Face folder, our encoder.safetensors)")
    start.add_argument("--pretrained", action="store_true", help="continue from timm's hub weights (needs the network)")
    p.add_argument("--model-kwargs", type=json.loads, default=d["model_kwargs"], help='timm options as JSON, e.g. \'{"depth": 4}\'')
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="slices per step and process")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default: 0.004 x sqrt(batch/1024); "
                                                         "x 0.2 when continuing from weights)")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help="lr warm-up (default: 10%% of the steps)")
    p.add_argument("--layer-decay", type=float, default=d["layer_decay"], help="layer-wise lr decay")
    p.add_argument("--freeze-backbone-steps", type=int, default=d["freeze_backbone_steps"],
                   help="train only the heads first (default: 10%% of the steps with --weights/--pretrained, else 0)")
    p.add_argument("--size", type=int, default=d["size"], help="slice size, as the bundles' preprocessing_config size")
    p.add_argument("--preset", default=d["preset"],
                   help="intensity preset as the bundles' (a CT window, ct_three_windows, mr, none for [0, 1] data, or "
                        "auto: each volume by its modality, CT windows for CT and MR normalisation for MR)")
    p.add_argument("--channel-mode", default=None, help="windows (ct_three_windows) or repeat (default: what fits)")
    p.add_argument("--modality", default=d["modality"],
                   help="with --preset auto, for files that carry no modality (NIfTI outside a datalist with a "
                        "'modality' field): CT, MR, or PATTERN=CT,PATTERN=MR (shell patterns on the path, e.g. "
                        "'*/ct.nii.gz=CT,*/mr_t1.nii.gz=MR'); DICOM series carry their Modality tag")
    p.add_argument("--planes", nargs="+", default=list(d["planes"]), choices=["axial", "coronal", "sagittal"])
    p.add_argument("--local-crops", type=int, default=d["local_crops"])
    p.add_argument("--layer-scale", type=float, default=d["layer_scale"],
                   help="a random backbone's LayerScale start (DINOv2 uses 1e-5, which gives every slice the same class token at the start: std 1e-6 against 0.03 with 1.0, measured)")
    p.add_argument("--drop-path", type=float, default=d["drop_path"], help="the student's stochastic depth")
    p.add_argument("--prototypes", type=int, default=d["prototypes"], help="DINO head outputs (and the iBOT head's)")
    p.add_argument("--centering", choices=["centering", "sinkhorn"], default=d["centering"])
    p.add_argument("--koleo-weight", type=float, default=d["koleo_weight"])
    p.add_argument("--ibot-weight", type=float, default=d["ibot_weight"])
    p.add_argument("--momentum", type=_pair, default=d["momentum"], help="teacher EMA momentum START,END")
    p.add_argument("--teacher-temp", type=_pair, default=d["teacher_temp"], help="teacher temperature START,END")
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"], help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=d["log_every"], help="steps between metrics.jsonl lines")
    p.add_argument("--collapse-patience", type=int, default=d["collapse_patience"], help="steps of collapse before the run stops")
    p.add_argument("--workers", type=int, default=d["num_workers"], help="slice loader processes (default: cores - 1, at most 4)")
    p.add_argument("--device", default=d["device"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt with the same settings")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    from volumes.pretrain import PretrainConfig

    preset = None if args.preset.lower() == "none" else args.preset
    from volumes.transforms import WINDOW_SETS

    mode = args.channel_mode or ("windows" if preset in WINDOW_SETS else "auto" if preset == "auto" else "repeat")
    return PretrainConfig(
        data=args.data, out=args.out, encoder=args.encoder, weights=args.weights, pretrained=args.pretrained,
        model_kwargs=args.model_kwargs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, layer_decay=args.layer_decay, freeze_backbone_steps=args.freeze_backbone_steps,
        layer_scale=args.layer_scale, drop_path=args.drop_path, size=args.size, preset=preset, channel_mode=mode, modality=args.modality, planes=tuple(args.planes), local_crops=args.local_crops,
        prototypes=args.prototypes, ibot_prototypes=args.prototypes, centering=args.centering,
        koleo_weight=args.koleo_weight, ibot_weight=args.ibot_weight, momentum=args.momentum,
        teacher_temp=args.teacher_temp, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        collapse_patience=args.collapse_patience, num_workers=args.workers, device=args.device, seed=args.seed,
        progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    import os

    from volumes.pretrain import pretrain

    result = pretrain(config_from_args(args), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        from volumes.pretrain.trainer import ENCODER_JSON, TENSORBOARD, bundle_arguments

        print(result.line())
        print(f"curves: tensorboard --logdir {result.out / TENSORBOARD}")
        print(f"use it in a bundle (every setting from {result.out / ENCODER_JSON}):\n"
              f"  python -m monai.bundle run --config_file configs/train.json "
              f"{bundle_arguments(result.out / ENCODER_JSON)}")
    return 0
