"""Section c of ``volumes bench``: peak RSS per slice count, from ``volumes.apps.bench_infer``'s child processes."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from volumes.apps.bench.inputs import bench_infer_module, bundle_overrides, bundle_weights
from volumes.devices import resolve_device


def bench_memory(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """Peak RSS per slice count: ``volumes.apps.bench_infer``'s child processes, one per count.

    Each child builds the bundles, runs ``volumes infer``'s batch on ``--memory-cases``
    copies of a ``--memory-size`` x ``--memory-size`` x N CT and reports its RSS after
    building (baseline) and its peak. ``slope`` is the least-squares growth of the peak
    per MiB of float32 volume across the counts: 1 would mean the peak grows by exactly
    one float32 copy of the volume per extra slice.
    """
    bi = bench_infer_module()
    device = device or resolve_device(args.device)
    settings = argparse.Namespace(size=args.memory_size, cases=args.memory_cases, bundles=list(args.bundles),
                                  workers=1, no_figures=args.no_figures, device=device.type, threads=args.threads)
    overrides = bundle_overrides(args)
    weights = bundle_weights(args, args.bundles)
    rows = [bi.run_size(settings, n, [weights[k] for k in args.bundles], overrides, Path(args.out))
            for n in args.memory_slices]
    measured = [r for r in rows if "growth_mib" in r]
    slope = None
    if len(measured) >= 2:
        xs = [r["volume_mib_float32"] for r in measured]
        ys = [r["peak_rss_mib"] for r in measured]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        denominator = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / denominator if denominator else None
    return {"size": args.memory_size, "cases": args.memory_cases, "bundles": [bi.BUNDLE_NAMES[k] for k in args.bundles],
            "overrides": overrides, "rows": rows, "peak_per_volume_slope": slope,
            "table": bi.table(rows), "errors": bi.notes(rows)}
