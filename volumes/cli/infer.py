"""``volumes infer``: run one or more bundles over a folder, datalist or CSV of cases."""

from __future__ import annotations

import argparse
import os

from volumes.errors import VolumesError


def add_parser(sub) -> None:
    infer = sub.add_parser(
        "infer", help="batch inference with one or more bundles (masks, DICOM SEG, predictions, report)",
        description="Run MONAI bundles over every case of a folder (NIfTI/NRRD/MHA files and DICOM series), "
                    "a datalist JSON or a CSV. Writes OUTPUT/<case-id>/ (masks in the input geometry, DICOM SEG "
                    "for DICOM input, probabilities, a figure), predictions.csv/.jsonl, failures.csv and "
                    "report.html. Exit code 0: all cases done; 1: some cases failed (see failures.csv); "
                    "2: bad arguments. Scale out with: torchrun --nproc_per_node N -m volumes infer ... (one node), "
                    "or --engine ray (a Ray cluster: cases streamed to free workers, dead workers' cases retried).",
    )
    infer.add_argument("--bundle", action="append", required=True, metavar="PATH",
                       help="a bundle folder (repeat for several: e.g. segmentation and classification)")
    infer.add_argument("--input", required=True, help="folder of volumes / DICOM series, datalist .json or .csv")
    infer.add_argument("--output", required=True, help="output folder")
    infer.add_argument("--section", action="append", default=None,
                       help="datalist section(s) to run (default: all)")
    infer.add_argument("--weights", action="append", default=None, metavar="FILE",
                       help="checkpoint replacing a bundle's models/model.pt; one per --bundle, in order")
    infer.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    infer.add_argument("--resume", action="store_true",
                       help="skip cases whose outputs are complete for the same input hash and models")
    infer.add_argument("--workers", type=int, default=None,
                       help="background threads loading and preprocessing the next cases "
                            "(default: 1 on CUDA, 0 on CPU, where they would compete with the network)")
    infer.add_argument("--no-figures", action="store_true", help="skip the per-case PNG figures")
    infer.add_argument("--no-share-encoder", action="store_true",
                       help="run each bundle's own encoder even when bundles share encoder, weights and slice "
                            "preparation (by default such bundles encode each case once for all their heads)")
    infer.add_argument("--backend", default="torch",
                       choices=["torch", "onnxruntime", "onnxruntime-int8", "openvino"],
                       help="torch (default); onnxruntime: the encoder and the 2D decoder exported to ONNX "
                            "(cached beside the weights) and run on the CPU by ONNX Runtime "
                            "(pip install 'volumes[onnx]'); onnxruntime-int8: the encoder's weights quantised "
                            "to int8 as well; openvino: the same ONNX files compiled by OpenVINO "
                            "(pip install 'volumes[openvino]')")
    infer.add_argument("--no-progress", action="store_true")
    infer.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                       help="override a key of every bundle's inference config, e.g. inference_slab=8")
    ray = infer.add_argument_group("engine", "where the cases run (--engine ray needs pip install 'volumes[ray]')")
    ray.add_argument("--engine", choices=["local", "ray"], default="local",
                     help="local: this process (or torchrun's); ray: a Ray cluster via Ray Data (docs/RAY.md)")
    ray.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                     help="the Ray cluster to join (default: a private Ray instance on this machine, on 127.0.0.1)")
    ray.add_argument("--ray-workers", type=int, default=None, metavar="N",
                     help="model actors, each loading the bundles once (default: one per GPU, or 1 on CPUs)")
    ray.add_argument("--ray-num-gpus", type=float, default=None, metavar="G",
                     help="GPUs per actor, fractions share a GPU (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--ray-cpus-per-worker", type=float, default=1.0, metavar="C",
                     help="CPUs per actor; its torch runs as many threads (default 1)")
    infer.set_defaults(run=run)


def parse_overrides(pairs: list[str]) -> dict:
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise VolumesError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from volumes.data.discovery import discover_cases
    from volumes.devices import resolve_device
    from volumes.inference import BatchInference, load_bundle

    weights = args.weights or [None] * len(args.bundle)
    if len(weights) != len(args.bundle):
        raise VolumesError(f"--weights given {len(weights)} times for {len(args.bundle)} bundles; give one per bundle")
    if args.engine == "ray":
        if args.backend != "torch":
            raise VolumesError(f"--backend {args.backend} runs with --engine local only")
        return _run_ray(args, weights)
    from volumes.inference.onnx_backend import require_onnxruntime, require_openvino, use_backend

    if args.backend.startswith("onnxruntime"):
        require_onnxruntime()  # before discovery and model loading: a missing extra is said at once
    elif args.backend == "openvino":
        require_openvino()
    cases = discover_cases(args.input, section=args.section)
    device = resolve_device(args.device, distributed=True)
    overrides = parse_overrides(args.set)
    models = [use_backend(load_bundle(root, device=device, weights=w, overrides=overrides), args.backend)
              for root, w in zip(args.bundle, weights)]
    runner = BatchInference(models, args.output, resume=args.resume, workers=args.workers,
                            figures=not args.no_figures, progress=not args.no_progress,
                            share_encoder=not args.no_share_encoder)
    summary = runner.run([case.to_dict() for case in cases])
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.line())
        if summary.failed:
            print(f"failed cases are listed in {summary.output_dir / 'failures.csv'}")
    return 0 if summary.ok else 1


def _run_ray(args: argparse.Namespace, weights: list) -> int:
    """``--engine ray``: the same per-case stages and merge, on a Ray cluster (volumes.inference.ray_engine)."""
    from volumes.inference.ray_engine import BundleSource, RayConfig, RayInference, require_ray

    require_ray()  # before discovery and model loading: a missing extra is said at once
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VolumesError("--engine ray runs from one driver process; do not start it under torchrun")
    if args.workers is not None:
        raise VolumesError("--workers (prefetch threads) is for --engine local; Ray loads cases in its own CPU tasks")
    num_gpus = args.ray_num_gpus
    if num_gpus is None and args.device != "auto":
        num_gpus = 0.0 if args.device == "cpu" else 1.0
    elif num_gpus and args.device == "cpu":
        raise VolumesError(f"--device cpu with --ray-num-gpus {num_gpus}: choose one")
    from volumes.data.discovery import discover_cases

    cases = discover_cases(args.input, section=args.section)
    overrides = parse_overrides(args.set)
    bundles = [BundleSource(root, w, overrides) for root, w in zip(args.bundle, weights)]
    config = RayConfig(address=args.ray_address, workers=args.ray_workers, num_gpus=num_gpus,
                       num_cpus=args.ray_cpus_per_worker)
    engine = RayInference(bundles, args.output, resume=args.resume, figures=not args.no_figures,
                          progress=not args.no_progress, config=config, share_encoder=not args.no_share_encoder)
    summary = engine.run([case.to_dict() for case in cases])
    print(summary.line())
    if summary.retried:
        print(f"retried after a worker died: {', '.join(f'{c} ({n} attempts)' for c, n in summary.retried.items())}")
    if summary.failed:
        print(f"failed cases are listed in {summary.output_dir / 'failures.csv'}")
    return 0 if summary.ok else 1
