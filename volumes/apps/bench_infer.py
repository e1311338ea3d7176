"""Throughput and memory of ``python -m volumes infer`` on CT-sized volumes of several slice counts.

    .venv/bin/python -m volumes.apps.bench_infer                      # 64, 256, 768 slices of 512 x 512
    .venv/bin/python -m volumes.apps.bench_infer --slices 8 16 --size 128 --depth 2 --threads 1   # a quick check

Per slice count: a streamed synthetic CT (:mod:`volumes.data.phantoms.streaming`), hard-linked
``--cases`` times, through the batch inference in a child process that reports its RSS.
Writes ``OUT/bench_infer.md`` and ``.json``; what is measured is in ``docs/BENCH.md``.
(``python -m volumes bench --sections c`` runs the same measurement.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from volumes.apps.child import MIB, child_spec, peak_rss_mib, print_result, rss_mib, run_child
from volumes.data.phantoms.streaming import SPACING_MM, cached_ct
from volumes.reporting import available_cores, markdown_table, write_json_and_markdown

BUNDLE_NAMES = {"seg": "dinov2_unet_segmentation", "cls": "dinov2_slice_classification"}

SUMMARY = re.compile(  # InferenceSummary.line(), as `volumes infer` prints it
    r"^(\d+) cases: (\d+) done, (\d+) already complete \(resume\), (\d+) failed in ([\d.]+) s; report:")
STAGES = ("load", "preprocess", "infer", "write", "figure")
PER_CASE_STAGES = ("hash", "load", "figure")  # the runner repeats these in every bundle's row of a case
_say = functools.partial(print, flush=True)


def bundle_path(key: str) -> Path:
    """The shipped bundle of ``key`` (``seg`` or ``cls``)."""
    from volumes.paths import bundle_dir

    return bundle_dir(BUNDLE_NAMES[key])


# ---------------------------------------------------------------- inputs

def case_folder(folder: Path, volume: Path, cases: int) -> Path:
    """``folder`` emptied and holding ``cases`` hard links (or copies) of ``volume``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for index in range(cases):
        target = folder / f"case_{index:03d}.nii.gz"
        try:
            os.link(volume, target)
        except OSError:  # another file system, or no hard links
            shutil.copyfile(volume, target)
    return folder


# ---------------------------------------------------------------- weights

def write_weights(folder: Path, bundles: Sequence[str], overrides: dict[str, Any]) -> list[Path]:
    """Random-initialised checkpoints (seed 0) of the bundles' networks with ``overrides`` applied."""
    import torch
    from monai.bundle import ConfigParser

    paths = []
    for name in bundles:
        parser = ConfigParser()
        parser.read_config(str(bundle_path(name) / "configs" / "inference.json"))
        for key, value in overrides.items():
            parser[key] = value
        torch.manual_seed(0)
        path = folder / f"{BUNDLE_NAMES[name]}.pt"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the child process

def child(spec: dict[str, Any]) -> int:
    """Run one batch as ``volumes infer`` would, printing its summary line and a JSON result line."""
    import torch

    from volumes.data.discovery import discover_cases
    from volumes.inference import BatchInference, load_bundle
    from volumes.devices import resolve_device

    torch.set_num_threads(spec["threads"])
    startup = rss_mib()
    device = resolve_device(spec["device"], distributed=True)
    models = [load_bundle(root, device=device, weights=w, overrides=spec["overrides"])
              for root, w in zip(spec["bundles"], spec["weights"])]
    baseline, build_peak = rss_mib(), peak_rss_mib()
    cases = discover_cases(spec["input"])
    runner = BatchInference(models, spec["output"], workers=spec["workers"], figures=spec["figures"], progress=False)
    summary = runner.run([case.to_dict() for case in cases])
    result = {
        "startup_rss_mib": startup, "baseline_rss_mib": baseline, "build_peak_rss_mib": build_peak,
        "peak_rss_mib": peak_rss_mib(), "end_rss_mib": rss_mib(), "run_s": summary.seconds,
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__, "device": str(device),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else None,
    }
    print(summary.line())
    print_result(result)
    return 0 if summary.ok else 1


# ---------------------------------------------------------------- the parent

def stage_medians(path: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Median per-case stage seconds from ``predictions.jsonl``: over bundles, and per bundle."""
    per_case: dict[str, dict[str, float]] = {}
    per_bundle: dict[str, dict[str, list[float]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        timings = row.get("timings_s", {})
        case = per_case.setdefault(row["case_id"], {})
        for stage, seconds in timings.items():
            per_bundle.setdefault(row["bundle"], {}).setdefault(stage, []).append(seconds)
            if stage in PER_CASE_STAGES:
                case[stage] = seconds
            else:
                case[stage] = case.get(stage, 0.0) + seconds
    stages = sorted({s for case in per_case.values() for s in case})
    medians = {s: statistics.median(case.get(s, 0.0) for case in per_case.values()) for s in stages}
    bundles = {b: {s: statistics.median(v) for s, v in stages_.items()} for b, stages_ in per_bundle.items()}
    return medians, bundles


def run_size(args: argparse.Namespace, slices: int, weights: list[Path], overrides: dict[str, Any],
             out: Path) -> dict[str, Any]:
    """Run one child batch on ``--cases`` copies of the ``slices``-slice CT; its row of the table."""
    volume = cached_ct(out / "volumes", args.size, slices, say=_say)
    folder = out / "runs" / f"slices_{slices:04d}"
    inputs = case_folder(folder / "input", volume, args.cases)
    output = folder / "output"
    shutil.rmtree(output, ignore_errors=True)
    bundles = [str(bundle_path(name)) for name in args.bundles]
    spec = {"bundles": bundles, "weights": [str(w) for w in weights], "overrides": overrides, "input": str(inputs),
            "output": str(output), "workers": args.workers, "figures": not args.no_figures, "device": args.device,
            "threads": args.threads}
    infer = ["python", "-m", "volumes", "infer", "--input", str(inputs), "--output", str(output), "--workers",
             str(args.workers), "--device", args.device, "--no-progress"]
    for bundle, w in zip(bundles, weights):
        infer += ["--bundle", bundle, "--weights", str(w)]
    infer += [f"--set={k}={json.dumps(v)}" for k, v in overrides.items()]
    infer += ["--no-figures"] if args.no_figures else []
    row: dict[str, Any] = {
        "slices": slices, "size": args.size, "cases": args.cases,
        "volume_mib_float32": args.size * args.size * slices * 4 / MIB,
        "volume_file": str(volume), "file_mib": volume.stat().st_size / MIB,
        "infer_command": f"OMP_NUM_THREADS={args.threads} " + shlex.join(infer),
    }
    print(f"--- {slices} slices: {args.cases} cases of {args.size} x {args.size} x {slices}", flush=True)
    child = run_child("volumes.apps.bench_infer", spec, args.threads, capture_stderr=False)
    row["wall_s"] = child.wall_s
    row["returncode"] = child.returncode
    summary = None
    for line in child.lines:
        print(line, flush=True)
        summary = SUMMARY.match(line) or summary
    result = child.result
    if result is None or summary is None:
        row["error"] = child.failure()
        return row
    total, done, _, failed, run_s = summary.groups()
    row.update(result)
    row["summary_run_s"] = float(run_s)  # as printed (0.1 s); run_s is the same time unrounded
    row["done"], row["failed"] = int(done), int(failed)
    if int(failed):
        row["error"] = f"{failed} of {total} cases failed: see {output / 'failures.csv'}"
    row["cases_per_min_run"] = int(done) / result["run_s"] * 60 if int(done) else 0.0
    row["cases_per_min_wall"] = int(done) / row["wall_s"] * 60 if int(done) else 0.0
    row["growth_mib"] = result["peak_rss_mib"] - result["baseline_rss_mib"]
    row["growth_per_volume"] = row["growth_mib"] / row["volume_mib_float32"]
    predictions = output / "predictions.jsonl"
    if predictions.is_file() and predictions.stat().st_size:
        row["median_stage_s"], row["median_stage_s_per_bundle"] = stage_medians(predictions)
    return row


COLUMNS = ["slices", "volume MiB (float32)", "cases/min (run)", "cases/min (wall)", "baseline RSS MiB",
           "peak RSS MiB", "growth MiB", "growth / volume", *(f"{stage} s" for stage in STAGES)]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of the measured rows."""
    cells_by_row = []
    for row in rows:
        if "baseline_rss_mib" not in row:
            cells = [str(row["slices"]), f"{row['volume_mib_float32']:.1f}"] + ["-"] * (len(COLUMNS) - 2)
        else:
            stages = row.get("median_stage_s", {})
            cells = [str(row["slices"]), f"{row['volume_mib_float32']:.1f}", f"{row['cases_per_min_run']:.2f}",
                     f"{row['cases_per_min_wall']:.2f}", f"{row['baseline_rss_mib']:.0f}",
                     f"{row['peak_rss_mib']:.0f}", f"{row['growth_mib']:.0f}", f"{row['growth_per_volume']:.1f}",
                     *(f"{stages[s]:.2f}" if s in stages else "-" for s in STAGES)]
        cells_by_row.append(cells)
    return markdown_table(COLUMNS, cells_by_row, align="r" * len(COLUMNS))


def notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Failures under the table."""
    return [f"- {row['slices']} slices: {row['error']}" for row in rows if "error" in row]


def reproduce_command(args: argparse.Namespace) -> str:
    """This run's command with every option spelled out."""
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    argv = [str(python), "-m", "volumes.apps.bench_infer", "--slices", *map(str, args.slices), "--size", str(args.size),
            "--cases", str(args.cases)]
    argv += ["--depth", str(args.depth)] if args.depth is not None else []
    argv += ["--bundles", *args.bundles, "--workers", str(args.workers), "--threads", str(args.threads),
             "--device", args.device, "--out", str(args.out)]
    argv += ["--no-figures"] if args.no_figures else []
    return shlex.join(argv)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m volumes.apps.bench_infer", description=__doc__.split("\n", 1)[0].replace("``", ""),
                                     epilog="docs/BENCH.md says what is measured and how.")
    parser.add_argument("--slices", nargs="+", type=int, default=[64, 256, 768],
                        help="slice counts (default 64 256 768)")
    parser.add_argument("--size", type=int, default=512, help="in-plane matrix (default 512)")
    parser.add_argument("--cases", type=int, default=2, help="cases per slice count (default 2)")
    parser.add_argument("--depth", type=int, default=None,
                        help="ViT blocks of the encoders (--set encoder_model_kwargs); default: the bundles' own")
    parser.add_argument("--bundles", nargs="+", choices=sorted(BUNDLE_NAMES), default=["seg", "cls"],
                        help="seg: dinov2_unet_segmentation, cls: dinov2_slice_classification (default both)")
    parser.add_argument("--workers", type=int, default=1, help="infer --workers (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP / torch threads of the child (default: all cores of this process)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="infer --device (default auto)")
    parser.add_argument("--no-figures", action="store_true", help="infer --no-figures")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_infer"),
                        help="output folder (default runs/bench_infer)")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = available_cores()
    for name in ("size", "cases", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if min(args.slices) < 2:
        parser.error("--slices must be at least 2 (the runner rejects single-slice volumes)")
    if args.depth is not None and args.depth < 1:
        parser.error("--depth must be at least 1")
    if args.workers < 0:
        parser.error("--workers must be at least 0")
    args.bundles = list(dict.fromkeys(args.bundles))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = child_spec(argv)
    if spec is not None:
        return child(spec)
    args = parse_args(argv)
    import torch

    from volumes.reporting import cpu_model

    out: Path = args.out
    overrides = {"encoder_model_kwargs": {"depth": args.depth}} if args.depth is not None else {}
    weights = write_weights(out / "weights", args.bundles, overrides)
    report: dict[str, Any] = {
        "command": reproduce_command(args),
        "machine": {"cpu": cpu_model(), "cores": available_cores(), "python": sys.version.split()[0]},
        "torch_version": torch.__version__, "torch_threads": args.threads,
        "settings": {"slices": args.slices, "size": args.size, "spacing_mm": SPACING_MM, "cases": args.cases,
                     "depth": args.depth, "bundles": [BUNDLE_NAMES[b] for b in args.bundles],
                     "workers": args.workers, "threads": args.threads, "device": args.device,
                     "figures": not args.no_figures, "overrides": overrides},
        "rows": [],
    }
    text = ""
    for slices in args.slices:
        report["rows"].append(run_size(args, slices, weights, overrides, out))
        measured = [r for r in report["rows"] if "torch_threads" in r]
        if measured:  # what the children saw, rather than what was asked for
            report["torch_threads"] = measured[-1]["torch_threads"]
            report["torch_version"] = measured[-1]["torch_version"]
            report["device"] = measured[-1]["device"]
        depth = "the bundles' own" if args.depth is None else str(args.depth)
        text = "\n".join([
            f"# volumes infer: {args.cases} cases per size, {args.size} x {args.size} x N CT, "
            f"bundles {', '.join(report['settings']['bundles'])}, encoder depth {depth}, workers {args.workers}",
            "",
            f"- machine: {report['machine']['cpu']} ({report['machine']['cores']} cores available), "
            f"device {report.get('device', args.device)}",
            f"- torch {report['torch_version']}, {report['torch_threads']} threads",
            f"- reproduce: `{report['command']}`",
            "- RSS of the child: baseline after building the models, peak over its whole run; "
            "growth / volume = growth over the volume's size as float32; stage times: median s per case",
            "",
            table(report["rows"]),
            *([""] + notes(report["rows"]) if notes(report["rows"]) else []),
        ])
        write_json_and_markdown(out, "bench_infer", report, text + "\n")
    print()
    print(text)
    print(f"\nwrote {out / 'bench_infer.json'} and {out / 'bench_infer.md'}")
    return 0 if all("error" not in row for row in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
