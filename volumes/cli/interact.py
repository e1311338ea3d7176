"""``volumes interact``: train the click model, and run the standard click protocol (``docs/INTERACTIVE.md``)."""

from __future__ import annotations

import argparse
import json


def _labels(text: str) -> dict[str, int]:
    """``liver=1,spleen=2`` -> ``{"liver": 1, "spleen": 2}``."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE...], got {text!r}")
        out[name.strip()] = int(value)
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("interact", help="interactive and few-shot segmentation: train the click model, simulate clicks",
                       description="Train the click model on frozen slice features with simulated clicks (MONAI's "
                                   "DeepGrow transforms), or run the standard click protocol and few-shot labels on "
                                   "labelled volumes (docs/INTERACTIVE.md).")
    actions = p.add_subparsers(dest="action", required=True)

    t = actions.add_parser("train", help="train a click model folder")
    t.add_argument("--data", required=True, help="a MONAI datalist .json with image and label paths")
    t.add_argument("--section", default="training")
    t.add_argument("--out", required=True, help="the click model folder to write")
    t.add_argument("--labels", type=_labels, default="liver=1,spleen=2,kidney_left=3,kidney_right=4",
                   help="the objects to learn clicks on, NAME=VALUE,... (others stay unseen)")
    t.add_argument("--encoder", default="vit_small_patch14_dinov2")
    t.add_argument("--encoder-weights", default=None, help="encoder weights (e.g. volumes pretrain's encoder.safetensors); "
                                                           "default: a random-initialised encoder, saved in OUT")
    t.add_argument("--model-kwargs", type=json.loads, default={"depth": 4}, help="timm options as JSON")
    t.add_argument("--size", type=int, default=112, help="working in-plane size (the bundles' preprocessing size)")
    t.add_argument("--preset", default="ct_abdomen_windows")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--window", type=int, nargs=3, default=[112, 112, 32], metavar=("W", "W", "WZ"))
    t.add_argument("--baseline", action="store_true", help="also train the DeepGrow 3D baseline (no features)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(run=run)

    s = actions.add_parser("simulate", help="the click protocol and few-shot labels on labelled volumes")
    s.add_argument("--model", required=True, help="a click model folder (volumes interact train)")
    s.add_argument("--data", required=True, help="a MONAI datalist .json with image and label paths")
    s.add_argument("--section", default="test")
    s.add_argument("--labels", type=_labels, required=True, help="objects to click on, NAME=VALUE,...")
    s.add_argument("--clicks", type=int, default=10)
    s.add_argument("--methods", nargs="+", default=["clicks"], choices=["clicks", "deepgrow", "graphcut"])
    s.add_argument("--fewshot", type=int, nargs="*", default=[], help="also few-shot from this many painted slices")
    s.add_argument("--out", default=None, help="write the rows as JSON here")
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from volumes.atomic import atomic_path
    from volumes.interactive import ClickTrainingConfig
    from volumes.interactive.service import InteractiveConfig
    from volumes.interactive.workflow import simulate, train

    if args.action == "train":
        config = InteractiveConfig(encoder=args.encoder, encoder_weights=args.encoder_weights,
                                   encoder_model_kwargs=args.model_kwargs, size=args.size, preset=args.preset)
        training = ClickTrainingConfig(labels=args.labels, steps=args.steps, batch_size=args.batch_size,
                                       window=tuple(args.window), seed=args.seed)
        summary = train(args.data, args.out, config=config, training=training, baseline=args.baseline,
                        section=args.section)
        print(json.dumps(summary, indent=1))
        return 0
    result = simulate(args.model, args.data, labels=args.labels, section=args.section, clicks=args.clicks,
                      methods=args.methods, fewshot=args.fewshot)
    for summary in summarise(result["rows"]):
        print("  ".join(f"{k}={v}" for k, v in summary.items()))
    if args.out:
        with atomic_path(Path(args.out), suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean Dice at 1, 3, 5, 10 clicks and mean clicks to 0.85 / 0.90 per (method, label)."""
    import numpy as np

    from volumes.interactive.simulate import dice_at

    out = []
    for method, label in sorted({(r["method"], r["label"]) for r in rows}):
        group = [r for r in rows if r["method"] == method and r["label"] == label]
        summary: dict = {"method": method, "label": label, "cases": len(group)}
        if method.startswith("fewshot"):
            summary["dice"] = round(float(np.mean([r["dice"][0] for r in group])), 3)
        else:
            for k in (1, 3, 5, 10):
                if any(len(r["dice"]) >= k or r["dice"][-1] == 1.0 for r in group):
                    summary[f"dice@{k}"] = round(float(np.mean([dice_at(_as_rows(r), k) for r in group])), 3)
        out.append(summary)
    return out


def _as_rows(row: dict) -> list[dict]:
    return [{"click": i + 1, "dice": d} for i, d in enumerate(row["dice"])]
