#!/usr/bin/env python
"""Where the segmentation bundle's time goes on one CT: encoder, 2D decoder, head, 3D refinement, postprocessing.

    .venv/bin/python scripts/segmenter_breakdown.py --ct runs/runtime/cts/ct_512x512x300_v2.nii.gz \\
        --weights runs/runtime/weights/seg/model.pt

(the CT and random weights that ``python -m volumes.apps.bench_runtime --work runs/runtime`` wrote).
Prints seconds per stage, best of ``--repeat`` after a warm-up, in this process: the encoder
over every prepared slice, the 2D decoder and the 1x1 head (chunks of 32 slices, as
``SliceSegmenter.per_slice``), ``per_slice`` as a whole, the slab inferer (everything the
network does: per-slice work once, the 3D refinement per slab, MONAI's blending), the
refinement alone over the whole stack, the postprocessing (argmax, back to the CT's grid)
and ``predict`` (inferer + postprocessing).
"""

from __future__ import annotations

import argparse

import torch

from volumes.apps.bench.timing import best_time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", required=True)
    parser.add_argument("--weights", required=True, help="the segmentation bundle's model.pt")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from volumes.data.io import LoadVolumed
    from volumes.inference import load_bundle
    from volumes.paths import bundle_dir

    prep = {"preset": "ct_three_windows", "axis": "axial", "channel_mode": "windows", "size": args.size}
    model = load_bundle(bundle_dir("dinov2_unet_segmentation"), device="cpu", weights=args.weights,
                        overrides={"preprocessing_config": prep})
    predictor, net = model.predictor, model.predictor.network
    volume = LoadVolumed("image", dtype=None)({"image": args.ct})["image"]
    data = predictor.prepare({"image": volume})
    image = data["image"]
    slices = image.permute(3, 0, 1, 2).contiguous().float()
    chunks = range(0, len(slices), 32)
    seconds = {}
    with torch.inference_mode():
        encoded = net.encoder(slices, with_grids=True)
        decode = lambda: torch.cat([net.decoder([g[i:i + 32] for g in encoded.patch_grids], slices[i:i + 32])  # noqa: E731
                                    for i in chunks])
        features = decode()
        seconds["encoder"] = best_time(lambda: net.encoder(slices, with_grids=True), args.repeat)
        seconds["2D decoder"] = best_time(decode, args.repeat)
        seconds["1x1 head"] = best_time(lambda: net.head(features), args.repeat)
        seconds["per_slice (encoder + decoder + head)"] = best_time(lambda: net.per_slice(slices), args.repeat)
        seconds["slab inferer (the whole network)"] = best_time(lambda: predictor.inferer(image.unsqueeze(0), net),
                                                          args.repeat)
        if net.refine is not None:
            stacked = net._stack(features, 1)
            seconds["3D refinement over the whole stack"] = best_time(lambda: net.refine(stacked), args.repeat)
        logits = predictor.inferer(image.unsqueeze(0), net)[0]
    seconds["postprocessing"] = best_time(lambda: predictor.postprocessing({"image": image, "pred": logits.clone()}),
                                     args.repeat)
    seconds["predict"] = best_time(lambda: predictor.predict(data), args.repeat)
    print(f"{tuple(image.shape)} prepared, {torch.get_num_threads()} threads")
    for name, value in seconds.items():
        print(f"{name:40s} {value:7.3f} s  ({value / seconds['encoder']:.2f}x the encoder)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
