"""``volumes bench``'s run: the chosen sections one after the other, the report rewritten after each."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from pathlib import Path
from typing import Any, Callable

from volumes.apps.bench.accelerator import bench_accelerator
from volumes.apps.bench.cache import bench_cache
from volumes.apps.bench.encoder import bench_encoder
from volumes.apps.bench.inputs import SECTION_TITLES
from volumes.apps.bench.memory import bench_memory
from volumes.apps.bench.peers import bench_peers
from volumes.apps.bench.pipeline import bench_pipeline
from volumes.apps.bench.report import write_report
from volumes.apps.bench.timing import _error
from volumes.devices import resolve_device
from volumes.reporting import available_cores

SECTION_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "a": bench_encoder, "b": bench_pipeline, "c": bench_memory, "d": bench_cache, "e": bench_peers,
    "f": bench_accelerator,
}


def machine_info(args: argparse.Namespace, device) -> dict[str, Any]:
    import monai
    import timm
    import torch

    from volumes.reporting import cpu_model

    info = {"cpu": cpu_model(), "cores": available_cores(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "monai": monai.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda})
    return info


def reproduce_command(args: argparse.Namespace) -> str:
    """This run's command with every option spelled out."""
    argv = ["python", "-m", "volumes", "bench", "--sections", *args.sections, "--encoder", args.encoder,
            "--slices", str(args.slices), "--size", str(args.size), "--volume", "x".join(map(str, args.volume)),
            "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--chunk-size", str(args.chunk_size), "--autocast", args.autocast, "--device", args.device,
            "--bundles", *args.bundles]
    if args.model_kwargs:
        argv += ["--model-kwargs", json.dumps(args.model_kwargs)]
    if args.bundle_size:
        argv += ["--bundle-size", str(args.bundle_size)]
    if args.gemm_size:
        argv += ["--gemm-size", str(args.gemm_size)]
    if "c" in args.sections:
        argv += ["--memory-slices", *map(str, args.memory_slices), "--memory-size", str(args.memory_size),
                 "--memory-cases", str(args.memory_cases)]
    if "d" in args.sections:
        argv += ["--cache-cases", str(args.cache_cases)]
        if args.cache_volume:
            argv += ["--cache-volume", "x".join(map(str, args.cache_volume))]
    if "e" in args.sections:
        argv += ["--peer-roi", str(args.peer_roi), "--peer-sw-batch", str(args.peer_sw_batch),
                 "--peer-feature-size", str(args.peer_feature_size), "--peer-cpu-size", str(args.peer_cpu_size)]
        if args.peer_volume:
            argv += ["--peer-volume", "x".join(map(str, args.peer_volume))]
        if args.no_peer_flops:
            argv.append("--no-peer-flops")
    if "f" in args.sections:
        if args.peak_tflops:
            argv += ["--peak-tflops", str(args.peak_tflops)]
        if args.no_compile:
            argv.append("--no-compile")
    if args.no_figures:
        argv.append("--no-figures")
    argv += ["--out", str(args.out)]
    return f"OMP_NUM_THREADS={args.threads} " + shlex.join(argv)


def bench_main(args: argparse.Namespace) -> int:
    """Run the chosen sections, writing ``bench.json`` / ``bench.md`` after each; print the markdown."""
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        report: dict[str, Any] = {
            "command": reproduce_command(args), "machine": machine_info(args, device),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"},
            "sections": {},
        }
        report["settings"]["out"] = str(out)
        text = write_report(out, report)
        for key in args.sections:
            print(f"--- {key}. {SECTION_TITLES[key]}", flush=True)
            start = time.perf_counter()
            try:
                result = SECTION_FUNCTIONS[key](args, device)
            except Exception as exc:  # one failing section does not lose the others
                import traceback

                traceback.print_exc()
                result = {"error": _error(exc)}
            result["section_s"] = time.perf_counter() - start
            report["sections"][key] = result
            text = write_report(out, report)
        print()
        print(text)
        print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
        return 1 if any("error" in s for s in report["sections"].values()) else 0
    finally:
        torch.set_num_threads(threads_before)
