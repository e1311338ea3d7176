#!/usr/bin/env python
"""How far ``volumes infer --engine ray`` is from the local engine on a real CT, and why.

Runs the same bundles on the same case with

* the local engine in a child process with ``OMP_NUM_THREADS`` 1 and 2 (torch's thread
  count is fixed when the process starts);
* the Ray engine with 1 and 2 CPUs per actor (an actor runs torch with as many threads);

then compares every segmentation with the first local run: voxels that differ, Dice of
the two label maps (per organ, over the organs either has) and the largest difference of
the classifier's probabilities. Float sums depend on how many threads split them, so a
near-tied voxel can flip between thread counts; with the same thread count and backend the
outputs are expected to be identical.

Run from the repository root (the bundles: a trained demo's, ``volumes demo --out runs/demo``)::

    .venv/bin/python scripts/ray_parity.py --input ../shared/data/totalsegmentator_example/example_ct.nii.gz \\
        --bundle runs/demo/bundles/dinov2_unet_segmentation --bundle runs/demo/bundles/dinov2_slice_classification \\
        --work-dir /tmp/ray_parity
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from volumes.reporting import cpu_model


def _rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]


def _infer(bundles: list[str], inputs: Path, output: Path, threads: int, engine: str) -> None:
    args = [sys.executable, "-m", "volumes", "infer", "--input", str(inputs), "--output", str(output),
            "--no-progress", "--no-figures"]
    for bundle in bundles:
        args += ["--bundle", bundle]
    if engine == "ray":
        args += ["--engine", "ray", "--ray-workers", "1", "--ray-cpus-per-worker", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")


def compare(reference: Path, other: Path) -> dict:
    """Segmentation voxels that differ, Dice between the label maps, largest probability difference."""
    out: dict = {}
    for a, b in zip(_rows(reference), _rows(other)):
        assert (a["case_id"], a["bundle"]) == (b["case_id"], b["bundle"])
        if a["task"] == "segmentation":
            x = np.asarray(nib.load(reference / a["outputs"]["segmentation"]).dataobj)
            y = np.asarray(nib.load(other / b["outputs"]["segmentation"]).dataobj)
            organs = sorted(set(np.unique(x)) | set(np.unique(y)) - {0})
            dice = {int(k): 2 * np.sum((x == k) & (y == k)) / max(1, np.sum(x == k) + np.sum(y == k)) for k in organs}
            out["voxels"] = int(x.size)
            out["voxels_changed"] = int(np.sum(x != y))
            out["min_organ_dice"] = float(min(dice.values())) if dice else 1.0
            out["identical"] = bool(np.array_equal(x, y))
        else:
            out["max_probability_difference"] = max(abs(p - b["probabilities"][k]) for k, p in a["probabilities"].items())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="one volume (NIfTI) or DICOM series folder")
    parser.add_argument("--bundle", action="append", required=True)
    parser.add_argument("--work-dir", required=True, type=Path)
    args = parser.parse_args()
    inputs = args.work_dir / "input"
    shutil.rmtree(args.work_dir, ignore_errors=True)
    inputs.mkdir(parents=True)
    source = Path(args.input)
    (shutil.copytree if source.is_dir() else shutil.copy)(source, inputs / source.name)
    runs = [("local", 2), ("local", 1), ("ray", 1), ("ray", 2)]
    for engine, threads in runs:
        print(f"running {engine} with {threads} thread(s)", flush=True)
        _infer(args.bundle, inputs, args.work_dir / f"{engine}{threads}", threads, engine)
    reference = args.work_dir / "local2"
    lines = [f"Reference: the local engine with 2 threads; {source.name}; {cpu_model()}, {os.cpu_count()} cores.", "",
             "| run | identical | voxels changed | of | lowest organ Dice vs reference | max probability difference |",
             "|---|---|---|---|---|---|"]
    for engine, threads in runs[1:]:
        c = compare(reference, args.work_dir / f"{engine}{threads}")
        lines.append(f"| {engine}, {threads} thread(s) | {'yes' if c.get('identical') else 'no'} | "
                     f"{c.get('voxels_changed', '-')} | {c.get('voxels', '-')} | {c.get('min_organ_dice', 1.0):.6f} | "
                     f"{c.get('max_probability_difference', 0.0):.2e} |")
    text = "\n".join(lines)
    print(text)
    (args.work_dir / "ray_parity.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
