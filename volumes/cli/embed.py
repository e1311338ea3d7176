"""``volumes embed``: embed every slice of every case to .npz (see :mod:`volumes.apps.embed`)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    embed = sub.add_parser("embed", help="embed every slice of every case")
    embed.add_argument("--input", required=True, help="folder, datalist JSON or CSV of cases")
    embed.add_argument("--out", required=True, help="output folder")
    _add_embed_options(embed)
    embed.set_defaults(run=run)


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
    parser.add_argument("--cache-dir", default=None,
                        help="embedding cache folder (default: none; a second run over the same cases then reads it)")


def run(args: argparse.Namespace) -> int:
    from volumes.apps.embed import embed_cases, summarize
    from volumes.data.discovery import discover_cases
    from volumes.encoders import EncoderConfig

    cases = discover_cases(args.input)
    encoder = EncoderConfig(args.encoder, weights=args.weights, pretrained=args.pretrained, chunk_size=args.chunk_size)
    preprocessing = {"preset": args.preset, "axis": args.axis, "channel_mode": args.channel_mode,
                     "size": args.size or None}
    rows = embed_cases(cases, args.out, encoder, preprocessing, device=args.device, cache_dir=args.cache_dir)
    print(summarize(rows, args.out))
    return 1 if any("error" in r for r in rows) else 0
