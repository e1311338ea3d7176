"""Agreement of ONNX Runtime fp32 and int8 label maps with torch fp32 on a segmentation phantom.

    PYTHONPATH=. .venv/bin/python -W ignore scripts/onnx_int8_agreement.py

The segmentation bundle with a random-initialised full ViT-S/14 at 112 px (no trained
weights offline): what this measures is agreement with torch, not accuracy against ground
truth. docs/PERFORMANCE.md ("Shared encoder and ONNX Runtime") has the figures.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from volumes.apps.bench_heads import _weights
from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case
from volumes.inference import BatchInference, load_bundle
from volumes.inference.onnx_backend import use_backend
from volumes.paths import bundle_dir
from volumes.segmentation import per_case_metrics

LABELS = ["background", "liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="onnx_int8_"))
    prep = {"preset": "ct_three_windows", "axis": "axial", "channel_mode": "windows", "size": 112}
    overrides = {"preprocessing_config": prep, "encoder_model_kwargs": {}}
    weights = _weights(work, overrides)
    entry = write_case(generate_phantom(7, PhantomConfig.segmentation_demo()), work / "staging", "p0", fmt="nifti")
    image = work / "input" / "p0.nii.gz"
    image.parent.mkdir()
    shutil.copy(work / "staging" / entry["image"], image)
    maps = {}
    for backend in ("torch", "onnxruntime", "onnxruntime-int8"):
        model = load_bundle(bundle_dir("dinov2_unet_segmentation"), device="cpu", weights=weights["seg"],
                            overrides=overrides)
        runner = BatchInference([use_backend(model, backend)], work / backend, workers=0, figures=False,
                                progress=False)
        runner.run([{"image": str(image), "case_id": "p0"}])
        maps[backend] = np.asarray(nib.load(work / backend / "p0" / "dinov2_unet_segmentation_seg.nii.gz").dataobj)
    print("shape", maps["torch"].shape, "labels present", np.unique(maps["torch"]).tolist())
    for backend in ("onnxruntime", "onnxruntime-int8"):
        row = per_case_metrics(maps[backend], maps["torch"], [1, 1, 1], LABELS)
        dice = {k: round(v, 4) for k, v in row.items() if k.startswith("dice_")}
        present = [v for v in dice.values() if not np.isnan(v)]
        print(backend, "voxels differing", float(np.mean(maps[backend] != maps["torch"])),
              "mean Dice vs torch fp32", round(float(np.mean(present)), 4), dice)


if __name__ == "__main__":
    main()
