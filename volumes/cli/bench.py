"""``volumes bench``: speed and memory, every comparison side by side in one run (:mod:`volumes.apps.bench`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from volumes.errors import VolumesError


def _model_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: a JSON object, e.g. '{{\"depth\": 2}}'")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def add_parser(sub) -> None:
    from volumes.apps.bench import BUNDLE_KEYS, SECTIONS, parse_volume

    bench = sub.add_parser(
        "bench", help="benchmark: encoder vs timm, pipeline overhead, memory, cache, 3D peers, CUDA variants",
        description="Speed and memory of slice encoding and of the pipeline around it, every comparison measured "
                    "side by side in one run (a: encoder efficiency, b: pipeline overhead, c: memory, d: cache, "
                    "e: 3D peers, f: CUDA variants). Writes OUT/bench.json and OUT/bench.md and prints the "
                    "table. See docs/BENCH.md for what each section measures.",
    )
    bench.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="default: all")
    bench.add_argument("--encoder", default="vit_small_patch14_dinov2", help="timm model of sections a and f")
    bench.add_argument("--model-kwargs", type=_model_kwargs, default=None,
                       help='JSON for timm.create_model, every encoder (the bundles\' too), e.g. \'{"depth": 2}\'')
    bench.add_argument("--slices", type=_positive, default=64, help="slices per batch in sections a and f")
    bench.add_argument("--size", type=_positive, default=224, help="slice size in sections a and f")
    bench.add_argument("--chunk-size", type=_positive, default=32, help="SliceEncoder chunk size in section a")
    bench.add_argument("--autocast", default="auto", choices=["auto", "bf16", "fp32"], help="SliceEncoder autocast (a)")
    bench.add_argument("--volume", type=parse_volume, default=(512, 512, 200),
                       help="synthetic CT of sections b, d and e, SIZExSIZExSLICES (default 512x512x200)")
    bench.add_argument("--bundles", nargs="+", choices=BUNDLE_KEYS, default=list(BUNDLE_KEYS),
                       help="bundles of sections b and c (seg: segmentation, cls: classification)")
    bench.add_argument("--bundle-size", type=_positive, default=None,
                       help="override the bundles' in-plane preprocessing size (default: their own, 112)")
    bench.add_argument("--no-figures", action="store_true", help="b and c: skip the per-case figure")
    bench.add_argument("--memory-slices", nargs="+", type=int, default=[64, 256, 768], help="c: slice counts")
    bench.add_argument("--memory-size", type=_positive, default=512, help="c: in-plane size")
    bench.add_argument("--memory-cases", type=_positive, default=1, help="c: cases per slice count")
    bench.add_argument("--cache-cases", type=_positive, default=3, help="d: distinct CTs classified")
    bench.add_argument("--cache-volume", type=parse_volume, default=None, help="d: their size (default --volume)")
    bench.add_argument("--peer-volume", type=parse_volume, default=None,
                       help="e: the CT of the 3D comparison (default --volume; on CPU scaled to --peer-cpu-size)")
    bench.add_argument("--peer-cpu-size", type=_positive, default=192, help="e: in-plane size of the CPU CT")
    bench.add_argument("--peer-roi", type=_positive, default=96, help="e: sliding-window size (a multiple of 32, at least 64)")
    bench.add_argument("--peer-sw-batch", type=_positive, default=1, help="e: windows per network call")
    bench.add_argument("--peer-feature-size", type=_positive, default=48, help="e: SwinUNETR feature size")
    bench.add_argument("--no-peer-flops", action="store_true", help="e: skip the FLOP count pass")
    bench.add_argument("--peak-tflops", type=float, default=None, help="f: peak for MFU (default: known GPU table)")
    bench.add_argument("--no-compile", action="store_true", help="f: skip torch.compile and CUDA graphs")
    bench.add_argument("--gemm-size", type=_positive, default=None, help="GEMM size (default 2048 CPU, 8192 CUDA)")
    bench.add_argument("--threads", type=_positive, default=None, help="torch threads (default: all available cores)")
    bench.add_argument("--repeats", type=_positive, default=5, help="timed repeats per variant (median reported)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md, volumes and runs")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from volumes.apps.bench import bench_main
    from volumes.reporting import available_cores

    if args.threads is None:
        args.threads = available_cores()
    if args.warmup < 0:
        raise VolumesError("--warmup must be at least 0")
    if args.peer_roi % 32 or args.peer_roi < 64:
        # 32 downsamples it 5 times to 1 voxel, where its instance norm has nothing to normalise
        raise VolumesError(f"--peer-roi {args.peer_roi}: SwinUNETR needs a multiple of 32, at least 64")
    args.sections = list(dict.fromkeys(args.sections))
    args.bundles = list(dict.fromkeys(args.bundles))
    return bench_main(args)
