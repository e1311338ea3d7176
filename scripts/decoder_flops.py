#!/usr/bin/env python
"""FLOPs per slice of the segmentation bundle's parts: encoder, each 2D decoder (+ 1x1 head), Refine3D.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications,
convolutions and attention, a multiply-add = 2 FLOPs; norms, activations and
interpolations are not counted) on one slice of the bundle's default network: a 12-block
``vit_small_patch14_dinov2`` (random weights; FLOPs do not depend on them), ``feature_size``
16, 7 classes. Refine3D runs over stacked slices: its count over 8 slices divided by 8.
FLOP counts are deterministic, so no timing is involved.

Output of ``python scripts/decoder_flops.py`` (GFLOP per slice; ratio = part / encoder)::

    | size | encoder | unetr decoder + head | ratio | light decoder + head | ratio | Refine3D |
    |---|---|---|---|---|---|---|
    | 112 px | 2.867 | 1.123 | 0.392 | 0.289 | 0.101 | 0.176 |
    | 224 px | 12.247 | 4.493 | 0.367 | 1.156 | 0.094 | 0.705 |

The 1x1 head is 0.003 GFLOP at 112 px; Refine3D (a 3x3x3 convolution F -> F over the
stacked features, then 1x1x1 to the classes) is not part of either 2D decoder and is the
same for both.

Run from the repository root: ``python scripts/decoder_flops.py [--sizes 112 224] [--depth 12]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file from a checkout without installing

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from volumes.decoders import DECODERS  # noqa: E402


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` under ``torch.no_grad``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def slice_flops(size: int, *, encoder: str = "vit_small_patch14_dinov2", depth: int = 12, feature_size: int = 16,
                num_classes: int = 7, refine_depth: int = 8) -> dict[str, float]:
    """FLOPs per ``size`` x ``size`` slice: ``encoder``, ``<decoder>`` (2D decoder + 1x1 head) for each decoder, ``refine``."""
    from volumes.networks import SliceSegmenter

    torch.manual_seed(0)
    out: dict[str, float] = {}
    slices = torch.randn(1, 3, size, size)
    for name in DECODERS:
        net = SliceSegmenter(num_classes, encoder, decoder=name, feature_size=feature_size, refine=True,
                             encoder_kwargs={"autocast": "fp32", "model_kwargs": {"depth": depth}}).eval()
        if "encoder" not in out:
            out["encoder"] = count_flops(net.encoder, slices, with_grids=True)
            with torch.no_grad():
                grids = net.encoder(slices, with_grids=True).patch_grids
            features = torch.zeros(refine_depth, feature_size, size, size)
            out["refine"] = count_flops(net.refine, net._stack(features, 1)) / refine_depth
        out[name] = count_flops(lambda: net.head(net.decoder(grids, slices)))
    return out


def table(sizes: Sequence[int], **kwargs) -> str:
    names = list(DECODERS)
    lines = ["| size | encoder | " + " | ".join(f"{n} decoder + head | ratio" for n in names) + " | Refine3D |",
             "|---|---|" + "---|---|" * len(names) + "---|"]
    for size in sizes:
        f = slice_flops(size, **kwargs)
        cells = [f"{size} px", f"{f['encoder'] / 1e9:.3f}"]
        for n in names:
            cells += [f"{f[n] / 1e9:.3f}", f"{f[n] / f['encoder']:.3f}"]
        cells.append(f"{f['refine'] / 1e9:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224], help="slice sizes in px")
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2")
    parser.add_argument("--depth", type=int, default=12, help="ViT blocks (the bundle's default network has 12)")
    parser.add_argument("--feature-size", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"GFLOP per slice, {args.encoder} with {args.depth} blocks, feature_size {args.feature_size}; "
          "ratio = decoder + head / encoder; Refine3D per slice (over 8 slices / 8)")
    print(table(args.sizes, encoder=args.encoder, depth=args.depth, feature_size=args.feature_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
