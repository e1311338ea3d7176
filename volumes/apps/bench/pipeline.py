"""Section b of ``volumes bench``: ``BatchInference`` end to end against the encoder and the network alone."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from volumes.apps.bench.inputs import _load_bundle, bundle_weights, synthetic_ct
from volumes.apps.bench.timing import _median, _StageTimer, _TimedCall, synchronize, timed
from volumes.devices import resolve_device


def _predictions(output: Path) -> list[dict[str, Any]]:
    path = output / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _failure(output: Path) -> str:
    path = output / "failures.csv"
    return path.read_text().strip() if path.is_file() else "no predictions written"


def bench_pipeline(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """End-to-end ``BatchInference`` of one synthetic CT per bundle against the encoder alone.

    One case per run, ``workers=0`` (stages run one after the other, so they add up),
    figures as ``volumes infer`` draws them unless ``--no-figures``. The encoder's forward
    hooks time ``encode`` inside the network; ``decode / aggregate`` is the rest of the
    network's time (decoder, 3D refinement and sliding-window stitching, or the slice
    aggregator); ``invert`` is the segmentation postprocessing (softmax, argmax, ``Invertd``
    back to the input grid); ``other`` is whatever the wall time holds beyond the stages
    (records, merged tables, the HTML report). The pure encoder time is the same encoder
    on the prepared volume's slices, each slice once.
    """
    import torch

    from volumes.encoders.slice_encoder import volume_to_slices
    from volumes.inference import BatchInference

    device = device or resolve_device(args.device)
    volume = synthetic_ct(Path(args.out) / "volumes", args.volume)
    weights = bundle_weights(args, args.bundles)
    result: dict[str, Any] = {"volume": "x".join(map(str, args.volume)), "volume_file": str(volume),
                              "figures": not args.no_figures, "device": str(device), "bundles": {}}
    for key in args.bundles:
        model = _load_bundle(args, key, weights[key], device)
        predictor = model.predictor
        network = predictor.network
        encoder = network.encoder
        seg = model.task == "segmentation"
        timer = _StageTimer(encoder, device)
        invert = None
        if seg:
            invert = predictor.postprocessing = _TimedCall(predictor.postprocessing, device)
        folder = Path(args.out) / "pipeline" / model.bundle_id
        runs = []
        try:
            for index in range(args.warmup + args.repeats):
                output = folder / "output"
                shutil.rmtree(output, ignore_errors=True)
                runner = BatchInference([model], output, workers=0, figures=not args.no_figures, progress=False)
                timer.reset()
                if invert is not None:
                    invert.seconds = 0.0
                synchronize(device)
                start = time.perf_counter()
                summary = runner.run([{"image": str(volume), "case_id": "ct"}])
                wall = time.perf_counter() - start
                rows = _predictions(output)
                if not summary.ok or not rows:
                    raise RuntimeError(f"{model.bundle_id}: the case failed: {_failure(output)}")
                if index < args.warmup:
                    continue
                stages = dict(rows[0]["timings_s"])
                infer = stages.pop("infer")
                stages["encode"] = timer.seconds
                stages["invert"] = invert.seconds if invert is not None else 0.0
                stages["decode" if seg else "aggregate"] = max(0.0, infer - timer.seconds - stages["invert"])
                stages["other"] = max(0.0, wall - sum(stages.values()))
                runs.append({"wall_s": wall, "stages_s": stages, "encoded_slices": timer.items,
                             "encoder_calls": timer.calls})
        finally:
            timer.remove()
            if invert is not None:
                predictor.postprocessing = invert.fn
        # the pure encoder: the prepared volume's own slices, once each, in the encoder's chunks
        prepared = predictor.prepare({"image": str(volume)})["image"]
        raw = prepared.as_tensor() if hasattr(prepared, "as_tensor") else prepared
        slices = volume_to_slices(raw.unsqueeze(0)).float().to(device)
        pure = timed(lambda: encoder(slices, with_grids=seg), repeats=args.repeats, warmup=args.warmup, device=device)
        # the whole network on the prepared volume (decoder, 3D refinement and slab stitching,
        # or the aggregator, included): what is left of the end-to-end time is the pipeline's
        batch = raw.unsqueeze(0).to(device)

        def network_only():
            with torch.inference_mode():
                return predictor.inferer(batch, network) if seg else network(batch)

        pure_network = timed(network_only, repeats=args.repeats, warmup=args.warmup, device=device)
        stage_names = sorted({s for run in runs for s in run["stages_s"]})
        median_stages = {s: _median([run["stages_s"].get(s, 0.0) for run in runs]) for s in stage_names}
        wall = _median([run["wall_s"] for run in runs])
        result["bundles"][key] = {
            "bundle": model.bundle_id, "task": model.task, "encoder": encoder.name,
            "encoder_depth": encoder.depth, "prepared_shape": list(raw.shape),
            "slices": int(slices.shape[0]), "slice_size": list(slices.shape[-2:]),
            "encoded_slices": runs[-1]["encoded_slices"], "encoder_calls": runs[-1]["encoder_calls"],
            "wall_s": wall, "wall_times_s": [round(r["wall_s"], 4) for r in runs], "stages_s": median_stages,
            "pure_encoder": pure, "ratio": wall / pure["median_s"],
            "pure_network": pure_network, "network_ratio": wall / pure_network["median_s"],
        }
        del model, predictor, network, encoder, slices, prepared, raw, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result
