"""Encode once, many heads, and the ONNX Runtime CPU path: seconds per case and per slice.

    .venv/bin/python -m volumes.apps.bench_heads                          # ViT-S/14 at 112 px, a 512x512x200 CT
    .venv/bin/python -m volumes.apps.bench_heads --slices 32 --size 128 --depth 2   # a quick check

On one synthetic CT (:func:`volumes.data.phantoms.streaming.cached_ct`) with
random-initialised bundles that share one encoder and one slice preparation (the
segmentation bundle's): ``volumes infer``'s batch runner (no figures) with the segmenter
alone (1 head), with the segmenter and the classifier sharing the encoder (2 heads), and
with both each running its own encoder; then the encoder alone per slice and the segmenter
end to end, for torch and ONNX Runtime (fp32 and int8). Best of ``--repeat`` runs, in this
process, after one warm-up (which also writes the ONNX files). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from volumes.apps.bench.timing import best_time
from volumes.paths import bundle_dir

SEG, CLS = "dinov2_unet_segmentation", "dinov2_slice_classification"


def _weights(folder: Path, overrides: dict) -> dict[str, Path]:
    """Random weights for both bundles, the classifier with the segmenter's encoder."""
    from monai.bundle import ConfigParser

    states = {}
    for key, name in (("seg", SEG), ("cls", CLS)):
        parser = ConfigParser()
        parser.read_config(str(bundle_dir(name) / "configs" / "inference.json"))
        for k, v in overrides.items():
            parser[k] = v
        torch.manual_seed(0)
        states[key] = parser.get_parsed_content("network_def").state_dict()
    states["cls"].update({k: v for k, v in states["seg"].items() if k.startswith("encoder.")})
    paths = {}
    for key, state in states.items():
        paths[key] = folder / key / "model.pt"
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state}, paths[key])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--matrix", type=int, default=512, help="in-plane voxels of the CT")
    parser.add_argument("--size", type=int, default=112, help="slice size the encoder sees (the bundles' default)")
    parser.add_argument("--depth", type=int, default=None, help="ViT blocks (default: the full ViT-S, 12)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", default=None, help="folder for the CT and the weights (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from volumes.data.phantoms.streaming import cached_ct
    from volumes.inference import BatchInference, load_bundle
    from volumes.inference.onnx_backend import use_backend

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_heads_"))
    prep = {"preset": "ct_three_windows", "axis": "axial", "channel_mode": "windows", "size": args.size}
    overrides: dict = {"preprocessing_config": prep, "encoder_model_kwargs": {"depth": args.depth} if args.depth else {}}
    weights = _weights(work, overrides)
    ct = cached_ct(work, args.matrix, args.slices)
    items = [{"image": str(ct), "case_id": "ct"}]

    def models(keys: str, backend: str = "torch") -> list:
        names = {"seg": SEG, "cls": CLS}
        return [use_backend(load_bundle(bundle_dir(names[k]), device="cpu", weights=weights[k], overrides=overrides),
                            backend) for k in keys.split("+")]

    def batch(keys: str, share: bool = True, backend: str = "torch") -> Callable[[], Any]:
        runner = BatchInference(models(keys, backend), work / "out", workers=0, figures=False, progress=False,
                                share_encoder=share)
        return lambda: runner.run(items)

    result: dict[str, Any] = {"slices": args.slices, "matrix": args.matrix, "size": args.size,
                              "depth": args.depth or 12, "threads": torch.get_num_threads()}
    seconds = {
        "1 head (segmentation)": best_time(batch("seg"), args.repeat),
        "2 heads, shared encoder": best_time(batch("seg+cls"), args.repeat),
        "2 heads, separate encoders": best_time(batch("seg+cls", share=False), args.repeat),
    }
    for backend in ("onnxruntime", "onnxruntime-int8"):
        seconds[f"1 head, {backend}"] = best_time(batch("seg", backend=backend), args.repeat)
        seconds[f"2 heads shared, {backend}"] = best_time(batch("seg+cls", backend=backend), args.repeat)
    result["case_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    result["two_heads_over_one"] = round(seconds["2 heads, shared encoder"] / seconds["1 head (segmentation)"], 3)
    result["separate_over_shared"] = round(seconds["2 heads, separate encoders"] / seconds["2 heads, shared encoder"], 3)

    slices = torch.randn(args.slices, 3, args.size, args.size)
    per_slice = {}
    for backend in ("torch", "onnxruntime", "onnxruntime-int8"):
        encoder = models("seg", backend)[0].predictor.network.encoder
        with torch.inference_mode():
            per_slice[backend] = best_time(lambda e=encoder: e(slices, with_grids=True), args.repeat) / args.slices
    result["encoder_ms_per_slice"] = {k: round(1000 * v, 3) for k, v in per_slice.items()}
    result["encoder_torch_over_onnxruntime"] = round(per_slice["torch"] / per_slice["onnxruntime"], 3)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
