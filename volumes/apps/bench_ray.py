"""Cases/min of ``volumes infer --engine ray`` with 1, 2, ... model actors, and the scaling efficiency.

    .venv/bin/python -m volumes.apps.bench_ray                          # 8 cases of 128 x 128 x 64, 1 and 2 actors
    .venv/bin/python -m volumes.apps.bench_ray --workers 1 2 4 --cases 16 --size 256 --slices 128
    .venv/bin/python -m volumes.apps.bench_ray --address auto --workers 4 8 --num-gpus 1   # an existing cluster

The cases are ``--cases`` hard links of the streamed synthetic CT
(:mod:`volumes.data.phantoms.streaming`, int16 NIfTI, ``size x size x slices``), run
through both bundles with random-initialised weights (``--depth`` ViT blocks). Without
``--address`` one private Ray instance on 127.0.0.1 serves every run, with
``max(workers) * threads + 1`` logical CPUs (one per thread of each actor, one for the
load tasks); each actor's torch runs ``--threads`` threads. First the local engine runs once in this process with ``--threads`` threads
(the reference), then for every worker count W a fresh output folder gets a
:class:`volumes.inference.ray_engine.RayInference` run. Per run:

* run s: the whole ``RayInference.run`` (joining Ray, the streamed pipeline with the
  actors' start-up - imports and model loading - and the driver's merge); stream s and
  merge s split it;
* cases/min (run) = cases / run s * 60, what a user waits for;
* cases/min (steady) from the completion times of the cases (``record.json`` mtimes):
  ``(cases - W) / (t_last - t_W) * 60`` with ``t_W`` the W-th completion, i.e. once every
  actor has delivered its first case - the rate that extrapolates to a long archive;
* efficiency = cases/min (W) / (W * cases/min (1)), for both rates;
* discovery s: ``discover_cases`` of the input folder, once (serial, on the driver).

Writes ``OUT/bench_ray.json`` and ``OUT/bench_ray.md`` (atomically, after every run) and
prints the table with the command that reproduces it. On a machine shared with other
work, the figures say as much about the neighbours as about Ray: note the load.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from volumes.reporting import available_cores, markdown_table, write_json_and_markdown

COLUMNS = ["engine", "workers", "run s", "stream s", "merge s", "cases/min (run)", "cases/min (steady)",
           "efficiency (run)", "efficiency (steady)"]


def steady_rate(output: Path, case_ids: Sequence[str], workers: int) -> float | None:
    """Cases/min after every actor delivered its first case, from the ``record.json`` mtimes."""
    times = sorted((output / case / "record.json").stat().st_mtime for case in case_ids
                   if (output / case / "record.json").is_file())
    if len(times) <= workers:
        return None
    span = times[-1] - times[workers - 1]
    return (len(times) - workers) / span * 60 if span > 0 else None


def _row(engine: str, workers: int, cases: int, run_s: float, stream_s: float | None, merge_s: float | None,
         steady: float | None) -> dict[str, Any]:
    return {"engine": engine, "workers": workers, "run_s": run_s, "stream_s": stream_s, "merge_s": merge_s,
            "cases_per_min_run": cases / run_s * 60, "cases_per_min_steady": steady}


def efficiencies(rows: list[dict[str, Any]]) -> None:
    """Add each Ray row's efficiency against the 1-worker Ray row (when there is one)."""
    one = next((r for r in rows if r["engine"] == "ray" and r["workers"] == 1), None)
    for row in rows:
        if row["engine"] != "ray" or one is None:
            continue
        for rate in ("run", "steady"):
            base, value = one[f"cases_per_min_{rate}"], row[f"cases_per_min_{rate}"]
            row[f"efficiency_{rate}"] = value / (row["workers"] * base) if base and value else None


def table(rows: Sequence[dict[str, Any]]) -> str:
    fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    cells = [[r["engine"], str(r["workers"]), fmt(r["run_s"], ".1f"), fmt(r["stream_s"], ".1f"),
              fmt(r["merge_s"], ".2f"), fmt(r["cases_per_min_run"], ".1f"), fmt(r["cases_per_min_steady"], ".1f"),
              fmt(r.get("efficiency_run"), ".2f"), fmt(r.get("efficiency_steady"), ".2f")] for r in rows]
    return markdown_table(COLUMNS, cells, align="ll" + "r" * (len(COLUMNS) - 2))


def reproduce_command(args: argparse.Namespace) -> str:
    argv = [sys.executable, "-m", "volumes.apps.bench_ray", "--workers", *map(str, args.workers), "--cases",
            str(args.cases), "--size", str(args.size), "--slices", str(args.slices), "--depth", str(args.depth),
            "--threads", str(args.threads), "--out", str(args.out)]
    argv += ["--address", args.address] if args.address else []
    argv += ["--num-gpus", str(args.num_gpus)] if args.num_gpus is not None else []
    argv += ["--no-figures"] if args.no_figures else []
    return shlex.join(argv)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m volumes.apps.bench_ray", description=__doc__.split("\n", 1)[0],
                                     epilog="See the module docstring for what is measured and how.")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="actor counts (default 1 2)")
    parser.add_argument("--cases", type=int, default=8, help="cases per run (default 8)")
    parser.add_argument("--size", type=int, default=128, help="in-plane matrix of the synthetic CT (default 128)")
    parser.add_argument("--slices", type=int, default=64, help="slices of the synthetic CT (default 64)")
    parser.add_argument("--depth", type=int, default=2, help="ViT blocks of the encoders (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per actor and of the local run (default 1)")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: a private instance)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: 0 on a private instance)")
    parser.add_argument("--no-local", action="store_true", help="skip the local-engine reference run")
    parser.add_argument("--no-figures", action="store_true", help="infer --no-figures")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ray"), help="output folder (default runs/bench_ray)")
    args = parser.parse_args(argv)
    for name in ("cases", "size", "slices", "depth", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if min(args.workers) < 1:
        parser.error("--workers must be at least 1")
    if args.cases <= max(args.workers):
        parser.error("--cases must exceed the largest worker count (the steady rate needs them)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from volumes.apps.bench_infer import BUNDLE_NAMES, bundle_path, case_folder, write_weights
    from volumes.data.phantoms.streaming import cached_ct
    from volumes.inference.ray_engine import BundleSource, RayConfig, RayInference, check_private_auth, require_ray
    from volumes.reporting import cpu_model

    ray = require_ray()
    out: Path = args.out
    overrides = {"encoder_model_kwargs": {"depth": args.depth}}
    weights = write_weights(out / "weights", list(BUNDLE_NAMES), overrides)
    inputs = case_folder(out / "input", cached_ct(out / "volumes", args.size, args.slices), args.cases)
    from volumes.data.discovery import discover_cases

    start = time.perf_counter()
    items = [case.to_dict() for case in discover_cases(inputs.resolve())]  # as volumes infer finds them
    discover_s = time.perf_counter() - start
    case_ids = [item["case_id"] for item in items]
    bundles = [BundleSource(str(bundle_path(key)), str(w), overrides) for key, w in zip(BUNDLE_NAMES, weights)]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    report: dict[str, Any] = {
        "command": reproduce_command(args), "rows": [],
        "machine": {"cpu": cpu_model(), "cores": available_cores(), "load_average_at_start": load},
        "settings": {"cases": args.cases, "volume": [args.size, args.size, args.slices], "depth": args.depth,
                     "threads": args.threads, "figures": not args.no_figures, "address": args.address or "private"},
        "discover_s": discover_s,
    }

    def write() -> str:
        efficiencies(report["rows"])
        text = "\n".join([
            f"# volumes infer --engine ray: {args.cases} cases of {args.size} x {args.size} x {args.slices}, both "
            f"bundles (encoder depth {args.depth}), {args.threads} torch thread(s) per worker",
            "", f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, load average at start "
            f"{'-' if load is None else ' '.join(f'{x:.1f}' for x in load)}",
            f"- reproduce: `{report['command']}`",
            "- run s includes the actors' start-up (imports, model loading); steady = after every actor's first case",
            f"- discovering the {args.cases} cases (serial, on the driver): {discover_s:.3f} s",
            "", table(report["rows"])])
        write_json_and_markdown(out, "bench_ray", report, text + "\n")
        return text

    if not args.no_local:
        import torch

        from volumes.inference import BatchInference

        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            output = out / "runs" / "local"
            shutil.rmtree(output, ignore_errors=True)
            runner = BatchInference([b.load("cpu") for b in bundles], output, workers=0,
                                    figures=not args.no_figures, progress=False)
            summary = runner.run(items)
        finally:
            torch.set_num_threads(threads)
        report["rows"].append(_row("local", 1, summary.succeeded, summary.seconds, None, None,
                                   steady_rate(output, case_ids, 1)))
        print(summary.line(), flush=True)
        write()
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # the workers inherit it
        if args.address:
            ray.init(address=args.address, include_dashboard=False, configure_logging=False)
        else:
            check_private_auth()
            ray.init(address="local", num_cpus=max(args.workers) * args.threads + 1, include_dashboard=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
        started = True
    try:
        for workers in args.workers:
            output = out / "runs" / f"ray_{workers}"
            shutil.rmtree(output, ignore_errors=True)
            config = RayConfig(address=args.address, workers=workers, num_gpus=args.num_gpus,
                               num_cpus=float(args.threads))
            start = time.perf_counter()
            summary = RayInference(bundles, output, figures=not args.no_figures, progress=False,
                                   config=config).run(items)
            print(f"ray, {workers} worker(s): {summary.line()} ({time.perf_counter() - start:.1f} s)", flush=True)
            report["rows"].append(_row("ray", workers, summary.succeeded, summary.seconds, summary.stream_s,
                                       summary.merge_s, steady_rate(output, case_ids, workers)))
            write()
    finally:
        if started:
            ray.shutdown()
    text = write()
    print()
    print(text)
    print(f"\nwrote {out / 'bench_ray.json'} and {out / 'bench_ray.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
