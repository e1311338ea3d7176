"""Resident memory over time of one case through ``volumes infer``'s runner, with a mark at each stage.

Usage (after ``python -m volumes bench --sections c --out runs/bench``, which writes the
synthetic CTs and the random-initialised bundle weights this reads)::

    OMP_NUM_THREADS=2 .venv/bin/python scripts/memory_profile.py \\
        runs/bench/runs/slices_0768/input/case_000.nii.gz --weights runs/bench/weights/default

Prints the growth over the baseline (models built) at the start and end of every stage
and the stage that holds the peak. RSS is read every 5 ms with the bench's own reader
(:func:`volumes.apps.child.rss_mib`), so it counts pages the allocator keeps after a free,
as the bench's section c does.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

import volumes.apps.bench_infer as bench_infer
import volumes.data.io as io
import volumes.inference.report as report
import volumes.segmentation as segmentation
from volumes.apps.child import rss_mib
from volumes.inference import BatchInference, load_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("input", type=Path, help="a volume file or DICOM folder")
    parser.add_argument("--weights", type=Path, required=True,
                        help="folder with dinov2_unet_segmentation.pt and dinov2_slice_classification.pt")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    models = [load_bundle(bench_infer.bundle_path(key), device="cpu", weights=args.weights / f"{name}.pt")
              for key, name in bench_infer.BUNDLE_NAMES.items()]
    marks: list[tuple[float, str]] = []
    samples: list[tuple[float, float]] = []

    def mark(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def marked(*a, **k):
            marks.append((time.perf_counter(), f"start {label}"))
            try:
                return fn(*a, **k)
            finally:
                marks.append((time.perf_counter(), f"end {label}"))

        setattr(owner, name, marked)

    for model in models:
        mark(model.predictor, "prepare", f"{model.bundle_id} prepare")
        mark(model.predictor, "predict", f"{model.bundle_id} predict")
        if model.task == "segmentation":
            mark(model.predictor, "inferer", "sliding slabs")
            mark(model.predictor, "postprocessing", "postprocessing")
    mark(io, "load_volume", "load")
    mark(segmentation, "write_label_map", "write label map")
    mark(report, "case_figure", "figure")

    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), rss_mib()))
            time.sleep(0.005)

    base = rss_mib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as out:
        BatchInference(models, Path(out), workers=args.workers, figures=True, progress=False).run(
            [{"image": str(args.input), "case_id": "case"}])
    stop.set()
    sampler.join()
    peak_time, peak = max(samples, key=lambda s: s[1])
    print(f"baseline {base:.0f} MiB, peak {peak:.0f} MiB, growth {peak - base:.0f} MiB")
    for when, label in sorted(marks):
        before = [r for t, r in samples if t <= when] or [base]
        print(f"{label:50s} now {before[-1] - base:7.0f}  max so far {max(before) - base:7.0f} MiB")
    print("peak after:", ", ".join([label for t, label in sorted(marks) if t <= peak_time][-3:]))


if __name__ == "__main__":
    main()
