"""Runtime table (issue 18 part 4): seconds and peak RAM per CT size, ours next to MONAI's 3D peers.

    .venv/bin/python -m volumes.apps.bench_runtime --work runtime_work --json runtime.json --markdown runtime.md
    .venv/bin/python -m volumes.apps.bench_runtime --slices 8 12 --matrix 64 --size 28 --depth 1 --repeat 1 \\
        --roi 64 --feature-size 12 --launch fork          # a smoke run (tests/test_bench.py)

For each CT size (``--slices``, ``--matrix`` squared in-plane: a
:func:`~volumes.data.phantoms.streaming.cached_ct` file per size) every cell runs in its own
child process, so each has its own peak RSS: one untimed warm-up, then the best of
``--repeat`` timed runs (wall seconds per case). The cells, the rows of the table:

* ours, end to end from the file through :class:`~volumes.inference.BatchInference`
  (hash, load, preprocess, network, write the label map; ``figures=False``,
  ``workers=0``, no progress bar) for each backend (torch, onnxruntime,
  onnxruntime-int8, openvino) with 1 head (the segmenter) and 2 heads (the segmenter and the
  classifier sharing its encoder, as :mod:`volumes.apps.bench_heads` builds them).
  Random weights; loading the bundles is not timed (``setup_s``).
* the segmenter's encoder alone (torch, ``encoder(slices, with_grids=True)`` over the
  case's prepared slices, prepared once) and its ``predictor.predict`` alone (network and
  postprocessing, no file I/O): the denominators of "end to end <= 1.3x the encoder".
* MONAI SwinUNETR and a MONAI 3D UNet (:func:`volumes.apps.bench.peers._peer_network`),
  random weights, end to end from the file: load, peers.py's intensity scaling, an
  in-plane resize to the grid our encoder sees (``--size`` squared, every slice kept),
  ``sliding_window_inference`` (``--roi``^3 windows, padded where the volume is smaller,
  overlap 0.25, Gaussian), argmax, nearest-neighbour back to the CT's grid, the uint8
  label map written as ours is.

ONNX files are exported before the cells, by one untimed child per ONNX backend (its
seconds are ``onnx_export``), into a cache every cell reads; so a cell's warm-up opens the
cached file (it would export there if the file were missing) and neither its time nor its
peak RAM holds the export. A failing cell is recorded with its error; the run goes on.

``--launch exec`` (the default) starts every child as ``python -m`` (:mod:`volumes.apps.child`);
``--launch fork`` forks them from a server that imported torch, MONAI and this package
once (multiprocessing's forkserver): the same measurement without the 15-30 s of
imports per child, for smoke runs (its peak RSS is about 0.39 GiB lower, a constant: the
imports' transient memory and untouched library pages are not counted). Writes ``--json`` after every cell and ``--markdown``
(atomically) at the end; prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from volumes.apps import child
from volumes.apps.bench.timing import best_of

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8", "openvino")
PEERS = ("swinunetr", "unet3d")
CLASSES = 7  # background + the six organs (peers.py)


def configurations(args: argparse.Namespace) -> dict[str, str]:
    """``{key: row label}``, in table order."""
    rows = {}
    for backend in BACKENDS:
        rows[f"{backend}-1"] = f"ours, {backend}, 1 head (segmenter)"
        rows[f"{backend}-2"] = f"ours, {backend}, 2 heads (+ classifier, shared encoder)"
    rows["encoder"] = "encoder alone (torch, prepared slices)"
    rows["network"] = "segmenter predict alone (torch, network + postprocessing, no file I/O)"
    rows["swinunetr"] = f"MONAI SwinUNETR (feature size {args.feature_size}), sliding window {args.roi}^3"
    rows["unet3d"] = f"MONAI 3D UNet, sliding window {args.roi}^3"
    return rows


# ------------------------------------------------------------------ child side


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _load(spec: dict[str, Any], key: str, backend: str = "torch"):
    from volumes.apps.bench_heads import CLS, SEG
    from volumes.inference import load_bundle
    from volumes.inference.onnx_backend import use_backend
    from volumes.paths import bundle_dir

    name = {"seg": SEG, "cls": CLS}[key]
    model = load_bundle(bundle_dir(name), device="cpu", weights=spec["weights"][key], overrides=spec["overrides"])
    return use_backend(model, backend, cache_dir=spec["onnx_dir"])


def _run_ours(spec: dict[str, Any], out: dict[str, Any]) -> Callable[[], Any]:
    """``BatchInference`` of the case with 1 or 2 heads on ``spec["backend"]``; its output folder is emptied first."""
    from volumes.inference import BatchInference

    start = time.perf_counter()
    keys = ["seg", "cls"][: spec["heads"]]
    models = [_load(spec, key, spec["backend"]) for key in keys]
    folder = Path(spec["out"])
    runner = BatchInference(models, folder, workers=0, figures=False, progress=False, share_encoder=True)
    out["setup_s"] = time.perf_counter() - start
    out["parameters"] = {m.bundle_id: _parameters(m.predictor.network) for m in models}
    out["shared_encoder_groups"] = runner.sharing.groups
    items = [{"image": spec["ct"], "case_id": "ct"}]

    def run():
        summary = runner.run(items)
        if not summary.ok:
            failures = folder / "failures.csv"
            raise RuntimeError("the case failed: " + (failures.read_text().strip() if failures.is_file() else "?"))

    run.reset = lambda: shutil.rmtree(folder, ignore_errors=True)  # type: ignore[attr-defined]  (untimed)
    return run


def _run_segmenter_part(spec: dict[str, Any], out: dict[str, Any]) -> Callable[[], Any]:
    import torch

    from volumes.encoders.slice_encoder import volume_to_slices

    start = time.perf_counter()
    predictor = _load(spec, "seg").predictor
    data = predictor.prepare({"image": spec["ct"]})
    raw = data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"]
    out["setup_s"] = time.perf_counter() - start
    out["input_shape"] = list(raw.shape)
    out["parameters"] = _parameters(predictor.network)
    if spec["kind"] == "network":
        return lambda: predictor.predict(data)["label_map"]
    slices = volume_to_slices(raw.unsqueeze(0)).float()
    data.clear()  # only the slices stay
    del raw
    encoder = predictor.network.encoder
    out["parameters"] = _parameters(encoder)

    def run():
        with torch.inference_mode():
            return encoder(slices, with_grids=True)

    return run


def _peer_network(name: str, feature_size: int):
    from volumes.apps.bench.peers import _peer_network as build

    return build({"model": name, "feature_size": feature_size})


def _run_peer(spec: dict[str, Any], out: dict[str, Any]) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from volumes.data.io import load_volume
    from volumes.segmentation import write_label_map

    torch.manual_seed(0)
    network = _peer_network(spec["kind"], spec["feature_size"]).eval()
    out["parameters"] = _parameters(network)
    size, roi, path = spec["size"], (spec["roi"],) * 3, Path(spec["out"]) / "ct_seg.nii.gz"

    def run():
        volume = load_volume(spec["ct"])  # float32 [1, X, Y, Z], RAS
        affine, original = volume.affine.clone(), volume.meta["original_affine"]
        grid = tuple(volume.shape[1:])
        x = volume.as_tensor()
        x.sub_(-175.0).div_(250.0 + 175.0).clamp_(0.0, 1.0)  # peers.py's ScaleIntensityRange, in place
        x = F.interpolate(x.unsqueeze(0), size=(size, size, grid[2]), mode="trilinear", align_corners=False)
        del volume
        out["input_shape"] = list(x.shape[1:])
        with torch.inference_mode():
            logits = sliding_window_inference(x, roi, spec["sw_batch"], network, overlap=0.25, mode="gaussian")
            labels = logits.argmax(dim=1, keepdim=True).to(torch.uint8)
            del logits
            labels = F.interpolate(labels, size=grid, mode="nearest")
        write_label_map(labels[0], affine, path, original_affine=original)

    return run


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One cell in this (fresh) process: warm-up, best of ``repeat``, peak RSS."""
    import monai  # noqa: F401  (imported before the baseline, as every cell imports it)
    import torch

    import volumes.inference  # noqa: F401

    torch.set_num_threads(spec["threads"])
    # RSS with the libraries imported, before any model or data: what the peak adds to it is the cell's own
    out: dict[str, Any] = {"baseline_rss_mib": child.rss_mib()}
    kind = spec["kind"]
    if kind == "ours":
        run = _run_ours(spec, out)
    elif kind in ("encoder", "network"):
        run = _run_segmenter_part(spec, out)
    elif kind in PEERS:
        run = _run_peer(spec, out)
    elif kind == "export":  # the ONNX files every ours cell of this backend reads
        start = time.perf_counter()
        _run_ours(spec, out)()
        return {"seconds": time.perf_counter() - start, "peak_rss_mib": child.peak_rss_mib()}
    else:
        raise ValueError(f"unknown cell kind {kind!r}")
    out.update(best_of(run, spec["repeat"], reset=getattr(run, "reset", None), warmup=spec.get("warmup", True)))
    out["peak_rss_mib"] = child.peak_rss_mib()
    out["threads"] = torch.get_num_threads()
    return out


def child_main(spec: dict[str, Any]) -> int:
    """``python -m volumes.apps.bench_runtime --child SPEC``: one cell, one result line."""
    child.print_result(measure(spec))
    return 0


def _forked(spec: dict[str, Any], conn, log: str) -> None:
    """A forked child: stdout and stderr to ``log`` (its last line explains a failure), the result to ``conn``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        conn.send(measure(spec))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise SystemExit(1)


# ------------------------------------------------------------------ parent side


class Launcher:
    """Runs one cell per child: ``exec`` (``python -m``, :func:`volumes.apps.child.run_child`) or ``fork``."""

    # not this module: each forked child imports it as __mp_main__ (runpy warns when it is there already)
    PRELOAD = ["torch", "monai", "timm", "volumes.inference", "volumes.apps.bench_heads", "volumes.apps.bench.peers"]

    def __init__(self, how: str, threads: int, work: Path):
        self.how, self.threads, self.work = how, threads, work
        self.context = None
        if how == "fork":
            import multiprocessing

            # the server inherits this environment: its children get the cell's thread count
            os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload(self.PRELOAD)

    def run(self, spec: dict[str, Any]) -> child.ChildRun:
        if self.context is None:
            return child.run_child("volumes.apps.bench_runtime", spec, self.threads)
        from volumes.apps import bench_runtime  # by name: a __main__ function does not pickle for the server

        receive, send = self.context.Pipe(duplex=False)
        log = tempfile.NamedTemporaryFile("r", prefix="cell_", suffix=".log", dir=self.work, delete=False)
        start = time.perf_counter()
        process = self.context.Process(target=bench_runtime._forked, args=(spec, send, log.name))
        process.start()
        send.close()
        result = None
        try:
            result = receive.recv()
        except EOFError:  # the child died without sending
            pass
        process.join()
        run = child.ChildRun(result, returncode=process.exitcode or 0, wall_s=time.perf_counter() - start)
        text = log.read().strip().splitlines()
        log.close()
        os.unlink(log.name)
        run.stderr_tail = text[-1] if text else ""
        return run


def _cell(launcher: Launcher, spec: dict[str, Any]) -> dict[str, Any]:
    run = launcher.run(spec)
    if run.result is None:
        return {"error": run.failure(), "child_wall_s": run.wall_s}
    return {**run.result, "child_wall_s": run.wall_s}


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "seconds" not in a or "seconds" not in b or not b["seconds"]:
        return None
    return a["seconds"] / b["seconds"]


def goal_ratios(cells: dict[str, dict[str, dict]], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """The issue's goals on this run's cells: ``[{name, goal, values {slices: ratio or None}}]``."""
    def row(name: str, goal: str, top: str, bottom: str) -> dict[str, Any]:
        values = {str(n): _ratio(cells.get(top, {}).get(str(n)), cells.get(bottom, {}).get(str(n))) for n in sizes}
        return {"name": name, "goal": goal, "numerator": top, "denominator": bottom, "values": values}

    rows = [row("end to end / encoder alone (torch, 1 head)", "<= 1.3", "torch-1", "encoder"),
            row("end to end / predict alone (torch, 1 head)", "", "torch-1", "network")]
    rows += [row(f"2 heads / 1 head, {b}", "<= 1.15", f"{b}-2", f"{b}-1") for b in BACKENDS]
    for heads in (1, 2):
        for backend in BACKENDS[1:]:
            rows.append(row(f"torch / {backend}, {heads} head{'s' * (heads > 1)}", ">= 1.5", f"torch-{heads}",
                            f"{backend}-{heads}"))
    return rows


def _met(value: float | None, goal: str) -> str:
    if value is None:
        return "n/a"
    if goal.startswith("<="):
        return f"{value:.2f}" + (" (met)" if value <= float(goal[2:]) else " (missed)")
    if goal.startswith(">="):
        return f"{value:.2f}" + (" (met)" if value >= float(goal[2:]) else " (missed)")
    return f"{value:.2f}"


def _seconds(s: float) -> str:
    return f"{s:.1f}" if s >= 10 else f"{s:.2f}" if s >= 0.1 else f"{s:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The TotalSegmentator-shaped resource table, the goal ratios and where they were measured."""
    from volumes.reporting import format_params, markdown_table

    sizes = report["slices"]
    header = ["configuration"]
    for n in sizes:
        header += [f"{n} slices: s", f"{n} slices: peak RAM GiB"]
    rows = []
    for key, label in report["configurations"].items():
        row = [label]
        for n in sizes:
            cell = report["cells"].get(key, {}).get(str(n), {})
            if "seconds" in cell:
                row += [_seconds(cell["seconds"]), f"{cell['peak_rss_mib'] / 1024:.2f}"]
            else:
                row += ["error", "error" if "error" in cell else ""]
        rows.append(row)
    lines = [f"CT of {report['matrix']}x{report['matrix']} x N slices (`cached_ct`), seconds per case (best of "
             f"{report['repeat']} after a warm-up; the 3D peers: best of {report.get('peer_repeat', report['repeat'])}, "
             "no warm-up) and the peak RSS of the cell's own process.", "",
             markdown_table(header, rows), ""]
    ratio_header = ["ratio (same run)", "goal", *[f"{n} slices" for n in sizes]]
    ratio_rows = [[r["name"], r["goal"] or "-", *[_met(r["values"][str(n)], r["goal"]) for n in sizes]]
                  for r in report["ratios"]]
    lines += [markdown_table(ratio_header, ratio_rows, "ll" + "r" * len(sizes)), ""]
    errors = [f"* {report['configurations'][k]}, {n} slices: {c['error']}"
              for k, by_size in report["cells"].items() for n, c in by_size.items() if "error" in c]
    errors += [f"* ONNX export, {b}: {e['error']}" for b, e in report["onnx_export"].items() if "error" in e]
    if errors:
        lines += ["Errors:", "", *errors, ""]
    baselines = sorted(c["baseline_rss_mib"] for by_size in report["cells"].values() for c in by_size.values()
                       if "baseline_rss_mib" in c)
    if baselines:
        lines += [f"Peak RAM includes the {baselines[len(baselines) // 2] / 1024:.2f} GiB (median) of a process that "
                  "has imported torch, MONAI and volumes, before any model or data (`baseline_rss_mib`).", ""]
    params = report["parameters"]
    lines += [
        f"Ours: DINOv2 ViT-S/14 slice encoder ({report['depth']} blocks) at {report['size']}x{report['size']} px, "
        f"random weights; segmenter {format_params(params.get('segmenter', 0))} parameters (encoder "
        f"{format_params(params.get('encoder', 0))}), the classifier {format_params(params.get('classifier_head', 0))} "
        "more (its encoder shared). Peers: SwinUNETR "
        f"{format_params(params.get('swinunetr', 0))}, 3D UNet {format_params(params.get('unet3d', 0))} parameters, "
        f"random weights, sliding windows of {report['roi']}^3 (overlap 0.25, Gaussian, {report['sw_batch']} "
        "window(s) per call).",
        f"Same input: the peers see the voxel grid our encoder sees, {report['size']}x{report['size']} in-plane and "
        "every slice (one channel, -175..250 HU scaled to 0..1; ours: three CT windows as channels), and write "
        "the label map back on the CT's own grid as ours does.",
        "ONNX: the files are exported once per backend before the cells (untimed: "
        + ", ".join(f"{b} {e['seconds']:.1f} s" for b, e in report["onnx_export"].items() if "seconds" in e)
        + "); each cell's warm-up opens them. Bundle loading is not timed.",
        f"Machine: {report['machine']}.",
        f"Command: `{report['command']}` ({report['date']}, children: {report['launch']}).",
    ]
    return "\n".join(lines) + "\n"


def _write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        from volumes.atomic import atomic_write_bytes

        data = json.dumps(report, indent=1, default=str).encode()
        atomic_write_bytes(path, lambda f: f.write(data))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m volumes.apps.bench_runtime",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 300, 800], help="slices per CT, one CT each")
    parser.add_argument("--matrix", type=int, default=512, help="in-plane voxels of the CTs")
    parser.add_argument("--size", type=int, default=112, help="slice size our encoder sees (and the peers' grid)")
    parser.add_argument("--depth", type=int, default=None, help="ViT blocks (default: the full ViT-S, 12)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per cell after the warm-up (best kept)")
    parser.add_argument("--peer-repeat", type=int, default=1,
                        help="timed runs of SwinUNETR and the 3D UNet, without a warm-up (each 800-slice pass of "
                             "SwinUNETR takes minutes on a CPU; their first call has no export or cache to warm)")
    parser.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads (default: all cores)")
    parser.add_argument("--roi", type=int, default=96, help="peers' sliding-window size (a multiple of 32, >= 64)")
    parser.add_argument("--sw-batch", type=int, default=1, help="peers' windows per network call")
    parser.add_argument("--feature-size", type=int, default=48, help="SwinUNETR feature size (a multiple of 12)")
    parser.add_argument("--launch", choices=("exec", "fork"), default="exec",
                        help="children as `python -m` (default) or forked from a server that imported once")
    parser.add_argument("--work", default=None, help="folder for the CTs, weights, ONNX files and outputs "
                        "(default: a temporary one; reuse it to keep the CTs)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here (after every cell)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here (atomically)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = child.child_spec(argv)
    if spec is not None:
        return child_main(spec)
    args = build_parser().parse_args(argv)
    if args.roi % 32 or args.roi < 64 or args.feature_size % 12 or min(args.slices) < 2 or args.repeat < 1:
        raise SystemExit("--roi: a multiple of 32, at least 64; --feature-size: a multiple of 12; "
                         "--slices: at least 2; --repeat: at least 1")
    from volumes.apps.bench_heads import _weights
    from volumes.data.phantoms.streaming import cached_ct
    from volumes.reporting import available_cores, machine_line

    threads = args.threads or available_cores()
    sizes = sorted(set(args.slices))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_runtime_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say = lambda line: print(f"[{time.perf_counter() - started:7.1f} s] {line}", file=sys.stderr, flush=True)
    machine = machine_line(threads)  # the load average before this run's own work
    prep = {"preset": "ct_three_windows", "axis": "axial", "channel_mode": "windows", "size": args.size}
    overrides: dict = {"preprocessing_config": prep, "encoder_model_kwargs": {"depth": args.depth} if args.depth else {}}
    weights = {k: str(p) for k, p in _weights(work / "weights", overrides).items()}
    cts = {n: str(cached_ct(work / "cts", args.matrix, n, say=say)) for n in sizes}
    configs = configurations(args)
    report: dict[str, Any] = {
        "issue": "18 part 4: runtime table", "slices": sizes, "matrix": args.matrix, "size": args.size,
        "depth": args.depth or 12, "repeat": args.repeat, "peer_repeat": args.peer_repeat, "threads": threads,
        "roi": args.roi,
        "sw_batch": args.sw_batch, "feature_size": args.feature_size, "launch": args.launch,
        "machine": machine, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python -m volumes.apps.bench_runtime", *map(shlex.quote, argv)]).strip(),
        "work": str(work), "cts": {str(n): p for n, p in cts.items()}, "configurations": configs,
        "onnx_export": {}, "cells": {key: {} for key in configs}, "parameters": {}, "ratios": [],
    }
    launcher = Launcher(args.launch, threads, work)
    base = {"weights": weights, "overrides": overrides, "onnx_dir": str(work / "onnx"), "threads": threads,
            "repeat": args.repeat, "size": args.size, "roi": args.roi, "sw_batch": args.sw_batch,
            "feature_size": args.feature_size}
    for backend in BACKENDS[1:]:
        say(f"exporting the ONNX files of {backend}")
        report["onnx_export"][backend] = _cell(launcher, {**base, "kind": "export", "backend": backend, "heads": 2,
                                                          "ct": cts[sizes[0]], "out": str(work / "out" / "export")})
    total, done = len(sizes) * len(configs), 0
    for n in sizes:
        for key in configs:
            backend, _, heads = key.rpartition("-")
            kind = "ours" if backend in BACKENDS else key
            spec = {**base, "kind": kind, "ct": cts[n], "out": str(work / "out" / f"{key}_{n}")}
            if kind == "ours":
                spec.update(backend=backend, heads=int(heads))
            elif kind in PEERS:
                spec.update(repeat=args.peer_repeat, warmup=False)
            cell = report["cells"][key][str(n)] = _cell(launcher, spec)
            done += 1
            shown = (f"{cell['seconds']:.2f} s, {cell['peak_rss_mib'] / 1024:.2f} GiB" if "seconds" in cell
                     else cell["error"])
            say(f"[{done}/{total}] {n} slices, {configs[key]}: {shown}")
            _write_json(args.json, report)
    params = report["parameters"]
    for key, name in (("swinunetr", "swinunetr"), ("unet3d", "unet3d"), ("network", "segmenter")):
        found = [c["parameters"] for c in report["cells"][key].values() if "parameters" in c]
        if found:
            params[name] = found[0]
    encoder = [c["parameters"] for c in report["cells"]["encoder"].values() if "parameters" in c]
    for cell in report["cells"]["torch-2"].values():
        for bundle_id, count in cell.get("parameters", {}).items():
            if "classif" in bundle_id and encoder:
                params["classifier_head"] = count - encoder[0]  # beyond the encoder it shares
    if encoder:
        params["encoder"] = encoder[0]
    report["ratios"] = goal_ratios(report["cells"], sizes)
    _write_json(args.json, report)
    text = markdown(report)
    if args.markdown is not None:
        from volumes.atomic import atomic_write_bytes

        atomic_write_bytes(args.markdown, lambda f: f.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
