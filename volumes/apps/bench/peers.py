"""Section e of ``volumes bench``: the segmentation bundle, SwinUNETR and a 3D UNet, each in its own process."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Mapping

from volumes.apps import child
from volumes.apps.bench.inputs import bench_infer_module, bundle_overrides, bundle_weights, synthetic_ct
from volumes.apps.bench.timing import _error, count_flops, synchronize, timed
from volumes.devices import resolve_device

PEERS = ("ours", "swinunetr", "unet3d")


def peer_volume(args: argparse.Namespace, device) -> tuple[tuple[int, int, int], str]:
    """The CT the 3D peers run on, and why: ``--peer-volume``, or ``--volume`` (smaller on CPU)."""
    if args.peer_volume:
        return args.peer_volume, "--peer-volume"
    size, _, slices = args.volume
    if device.type == "cuda" or size <= args.peer_cpu_size:
        return args.volume, "--volume"
    scale = args.peer_cpu_size / size
    dims = (args.peer_cpu_size, args.peer_cpu_size, max(2, round(slices * scale)))
    return dims, f"--volume scaled by {scale:.3f} on CPU (3D networks at full size take hours on a CPU)"


def bench_peers(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """The segmentation bundle, MONAI SwinUNETR and a MONAI 3D UNet on one CT, each in its own process.

    Per model: RSS (or CUDA memory) after building it (baseline), load and preparation,
    then ``--warmup`` untimed and ``--repeats`` timed inferences to a uint8 label map
    (ours: the bundle's ``predict``, slab windows and ``Invertd`` included; peers:
    ``sliding_window_inference`` with ``--peer-roi``^3 windows, overlap 0.25, Gaussian
    blending, then argmax) and the peak. FLOPs per volume from one extra pass under
    ``FlopCounterMode``. Ratios are peer / ours.
    """
    device = device or resolve_device(args.device)
    dims, why = peer_volume(args, device)
    volume = synthetic_ct(Path(args.out) / "volumes", dims)
    weights = bundle_weights(args, ["seg"])["seg"]
    results: dict[str, Any] = {}
    for model in PEERS:
        spec = {"model": model, "volume": str(volume), "device": str(device.type), "threads": args.threads,
                "repeats": args.repeats, "warmup": args.warmup, "roi": args.peer_roi, "sw_batch": args.peer_sw_batch,
                "feature_size": args.peer_feature_size, "weights": str(weights), "overrides": bundle_overrides(args),
                "flops": not args.no_peer_flops}
        results[model] = run_child(spec, args.threads)
    ours = results["ours"]
    for model in PEERS[1:]:
        peer = results[model]
        if "infer_s" in peer and "infer_s" in ours:
            peer["time_vs_ours"] = peer["infer_s"] / ours["infer_s"]
            peer["memory_vs_ours"] = peer["growth_mib"] / ours["growth_mib"] if ours["growth_mib"] > 0 else None
    return {"volume": "x".join(map(str, dims)), "volume_source": why, "volume_file": str(volume),
            "roi": args.peer_roi, "sw_batch": args.peer_sw_batch, "feature_size": args.peer_feature_size,
            "device": str(device), "models": results}


def run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """``python -m volumes.apps.bench --child SPEC``: one measurement in a fresh process (its own peak RSS)."""
    run = child.run_child("volumes.apps.bench", spec, threads)
    if run.result is None:
        return {"error": run.failure(), "child_wall_s": run.wall_s}
    return {**run.result, "child_wall_s": run.wall_s}


def _peer_network(spec: Mapping[str, Any]):
    from monai.networks.nets import UNet, SwinUNETR

    classes = 7  # background + the six organs of the segmentation bundle
    if spec["model"] == "swinunetr":
        return SwinUNETR(in_channels=1, out_channels=classes, feature_size=spec["feature_size"], spatial_dims=3)
    return UNet(spatial_dims=3, in_channels=1, out_channels=classes, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


def child_main(spec: dict[str, Any]) -> int:
    """The child of :func:`bench_peers`: builds one model, measures it, prints one JSON line."""
    import torch

    bi = bench_infer_module()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    if spec["model"] == "ours":
        from volumes.inference import load_bundle

        bundle = load_bundle(bi.bundle_path("seg"), device=device, weights=spec["weights"], overrides=spec["overrides"])
        predictor = bundle.predictor
        network = predictor.network
        prepare = lambda: predictor.prepare({"image": spec["volume"]})  # noqa: E731
        infer = lambda data: predictor.predict(data)["label_map"]  # noqa: E731
    else:
        from monai.inferers import sliding_window_inference
        from monai.transforms import ScaleIntensityRange

        from volumes.data.io import load_volume

        network = _peer_network(spec).to(device).eval()
        scale = ScaleIntensityRange(a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True)
        prepare = lambda: {"image": scale(load_volume(spec["volume"]))}  # noqa: E731
        roi = (spec["roi"],) * 3

        def infer(data):
            with torch.inference_mode():
                x = data["image"].as_tensor().unsqueeze(0).to(device)
                logits = sliding_window_inference(x, roi, spec["sw_batch"], network, overlap=0.25, mode="gaussian")
                return logits.argmax(dim=1).to(torch.uint8).cpu()
    parameters = sum(p.numel() for p in network.parameters())
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / child.MIB
    baseline_rss = child.rss_mib()
    start = time.perf_counter()
    data = prepare()
    prepare_s = time.perf_counter() - start
    shape = list(data["image"].shape)
    result = timed(lambda: infer(data), repeats=spec["repeats"], warmup=spec["warmup"], device=device)
    peak_rss = child.peak_rss_mib()
    out: dict[str, Any] = {
        "model": spec["model"], "parameters": parameters, "input_shape": shape, "prepare_s": prepare_s,
        "infer_s": result["median_s"], "infer_times_s": result["times_s"], "baseline_rss_mib": baseline_rss,
        "peak_rss_mib": peak_rss, "threads": torch.get_num_threads(), "device": str(device),
    }
    out["growth_mib"] = (torch.cuda.max_memory_allocated(device) / child.MIB - baseline) if cuda else peak_rss - baseline_rss
    if spec.get("flops"):
        try:
            out["flops_per_volume"] = count_flops(infer, data)[0]
        except Exception as exc:
            out["flops_error"] = _error(exc)
    child.print_result(out)
    return 0
