"""The ``volumes`` command line.

    python -m volumes demo --out runs/demo          the main job on built-in phantom data
    python -m volumes phantoms --out DIR --n N      write a synthetic CT cohort
    python -m volumes embed --input SRC --out DIR   embed every slice of every case
    python -m volumes cache info|prune              inspect or trim the embedding cache

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
    from volumes.data.discovery import discover_cases
    from volumes.data.phantoms import write_cohort
    from volumes.embedding import embed_cases, summarize

    out = Path(args.out)
    print(f"[1/2] writing {args.n} synthetic CT phantoms to {out / 'cohort'}")
    datalist = write_cohort(out / "cohort", n=args.n, seed=args.seed)
    cases = discover_cases(datalist)
    print(f"[2/2] embedding {len(cases)} cases with {args.encoder} (random weights unless --weights/--pretrained)")
    rows = embed_cases(cases, out, _embed_config(args))
    print(summarize(rows, out))
    return 1 if any("error" in r for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="volumes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on built-in phantom data")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--n", type=int, default=6, help="number of phantom cases")
    demo.add_argument("--seed", type=int, default=0)
    _add_embed_options(demo)
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("phantoms", help="write a synthetic CT phantom cohort (see: phantoms --help)", add_help=False)
    sub.add_parser("cache", help="inspect or prune the embedding cache (see: cache --help)", add_help=False)

    embed = sub.add_parser("embed", help="embed every slice of every case")
    embed.add_argument("--input", required=True, help="folder, datalist JSON or CSV of cases")
    embed.add_argument("--out", required=True, help="output folder")
    _add_embed_options(embed)
    embed.set_defaults(func=cmd_embed)
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
