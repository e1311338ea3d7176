"""The segmentation bundle, run the way users run it: monai.bundle's run, verify and export.

The trained fixture is the issue's short CPU training run: a frozen random-init 4-block
ViT-S/14 at 112 px with the bundle's default input (soft-tissue, lung and bone windows as
the three channels), the decoder trained on phantom slabs for 32 epochs (448 steps, about
5 minutes on 2 cores). Mean Dice over the six organs on the held-out test phantoms, in the
original image space, must reach 0.85 (measured: 0.889 with the light decoder, the default
from bundle 0.2.0, 0.882 with the UNETR decoder of 0.1.0).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

monai_bundle = pytest.importorskip("monai.bundle")

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "dinov2_unet_segmentation"
CONFIGS = BUNDLE / "configs"
SMALL = {"encoder_model_kwargs": {"depth": 4}}
TRAINING = {"epochs": 32, "validation_interval": 16}

pytestmark = pytest.mark.slow


def _run(config_files: list[str], root: Path, **override) -> None:
    monai_bundle.run(
        config_file=[str(CONFIGS / f) for f in config_files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(root),
        **{**SMALL, **override},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("segmentation_bundle")
    _run(["train.json"], root, **TRAINING)
    return root


def _metrics(root: Path) -> dict[str, float]:
    rows = (root / "eval" / "metrics.csv").read_text().splitlines()
    return {row.split(",")[0]: float(row.split(",")[1]) for row in rows if "," in row}


def test_short_training_reaches_mean_dice_085_on_held_out_phantoms(trained):
    state = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("decoder.") for k in state) and any(k.startswith("refine.") for k in state)
    _run(["train.json", "evaluate.json"], trained)
    metrics = _metrics(trained)
    print("test split:", metrics)
    assert metrics["val_mean_dice"] >= 0.85
    assert 0.0 < metrics["val_hd95_mm"] < 40.0
    # per case and organ, in the original image space
    with open(trained / "eval" / "val_mean_dice_raw.csv") as handle:
        table = list(csv.reader(handle))
    datalist = json.loads((trained / "data" / "phantoms" / "datalist.json").read_text())
    assert len(table) - 1 == len(datalist["test"]) and len(table[0]) == 1 + 6 + 1  # filename, 6 organs, mean


def test_inference_writes_label_maps_in_the_input_geometry(trained):
    _run(["inference.json"], trained)
    datalist = json.loads((trained / "data" / "phantoms" / "datalist.json").read_text())
    root = trained / "data" / "phantoms"
    for item in datalist["test"]:
        case_id = Path(item["image"]).name.split(".")[0]
        written = nib.load(trained / "eval" / case_id / "dinov2_unet_segmentation_seg.nii.gz")
        source = nib.load(root / item["image"])
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
        labels = np.asanyarray(written.dataobj)
        reference = np.asanyarray(nib.load(root / item["label"]).dataobj)
        assert (labels == reference).mean() > 0.95


def test_training_fits_quality_control_that_flags_wrongly_scaled_input(trained, tmp_path):
    """QC fitted at the end of training; held-out phantoms stored without the rescale intercept
    (HU + 1024: a pipeline mistake the model cannot read) are flagged, their clean twins are not
    flagged as unusual, and the outputs say so."""
    from volumes.data.corruptions import corrupt
    from volumes.inference import BatchInference, load_bundle
    from volumes.quality import load_quality_reference

    labels = json.loads((CONFIGS / "inference.json").read_text())["labels"]
    reference = load_quality_reference(trained / "models" / "model.pt", labels)
    assert reference is not None and reference.threshold >= 2.0
    assert reference.validation["cases"] == 5 and reference.validation["organs"] == 30
    assert reference.validation["false_alarm_rate"] <= 0.1  # the rule the threshold was chosen by
    datalist = json.loads((trained / "data" / "phantoms" / "datalist.json").read_text())
    root, inputs = trained / "data" / "phantoms", tmp_path / "in"
    inputs.mkdir()
    for item in datalist["test"]:
        source = nib.load(root / item["image"])
        case_id = Path(item["image"]).name.split(".")[0]
        shutil.copy(root / item["image"], inputs / f"{case_id}.nii.gz")
        image, _, affine = corrupt("no_intercept", np.asanyarray(source.dataobj), np.zeros(source.shape), source.affine)
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), inputs / f"{case_id}_no_intercept.nii.gz")
    model = load_bundle(BUNDLE, weights=trained / "models" / "model.pt", overrides=SMALL)
    assert model.fitted_sha256 is not None  # the QC files are part of the model key
    output = tmp_path / "out"
    from volumes.data.discovery import discover_cases

    BatchInference([model], output, progress=False).run([c.to_dict() for c in discover_cases(inputs)])
    rows = {r["case_id"]: r for r in map(json.loads, (output / "predictions.jsonl").read_text().splitlines())}
    clean = [r["quality"] for k, r in rows.items() if not k.endswith("_no_intercept")]
    wrong = [r["quality"] for k, r in rows.items() if k.endswith("_no_intercept")]
    assert len(clean) == len(wrong) == len(datalist["test"])
    for quality in wrong:
        assert quality["flag"] == "review" and quality["reasons"][0] == "unusual image"
        assert quality["ood_z"] > 10 * quality["threshold"]
    assert all(q["ood_z"] <= q["threshold"] for q in clean)
    assert max(q["score"] for q in clean) < min(q["score"] for q in wrong)
    flagged = [o["flag"] == "review" for q in clean for o in q["organs"].values()]
    assert np.mean(flagged) < 0.5  # most organs of clean held-out phantoms pass
    table = (output / "predictions.csv").read_text()
    assert "qc_flag,qc_score" in table and "qc_flag_liver" in table
    assert "Flagged for review" in (output / "report.html").read_text()


def test_verify_metadata_against_the_monai_schema(verify_bundle_metadata):
    verify_bundle_metadata(CONFIGS / "metadata.json")


def test_metadata_channel_def_names_the_organs_of_the_configs():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    labels = json.loads((CONFIGS / "train.json").read_text())["labels"]
    assert json.loads((CONFIGS / "inference.json").read_text())["labels"] == labels
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {str(i): n for i, n in enumerate(labels)}


def test_verify_net_in_out():
    monai_bundle.verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        n=2,
        any=3,
        encoder_model_kwargs={"depth": 1},
    )


def test_torchscript_export_matches_eager(trained, tmp_path):
    exported = tmp_path / "model.ts"
    monai_bundle.ckpt_export(
        net_id="network_def",
        filepath=str(exported),
        ckpt_file=str(trained / "models" / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        use_trace=True,
        input_shape=[1, 3, 56, 42, 4],
        **SMALL,
    )
    parser = monai_bundle.ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["encoder_model_kwargs"] = SMALL["encoder_model_kwargs"]
    parser["bundle_root"] = str(trained)
    eager = parser.get_parsed_content("network").cpu().eval()
    scripted = torch.jit.load(str(exported))
    for depth, width in ((4, 42), (7, 70)):  # not tied to the example's slice count or size
        volume = torch.randn(1, 3, 56, width, depth, generator=torch.Generator().manual_seed(depth))
        with torch.no_grad():
            torch.testing.assert_close(scripted(volume), eager(volume), atol=1e-4, rtol=1e-4)


def test_torchrun_two_cpu_processes_train_and_evaluate(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "monai.bundle", "run",
        "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(tmp_path), "--epochs", "1", "--validation_interval", "1", "--phantom_cases", "12",  # 3 test cases for 2 ranks
        "--preprocessing_config#size", "56", "--encoder_model_kwargs", '{"depth": 1}',
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone writes the checkpoint, its settings and the quality-control reference it fits at the end
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "model.pt", "model.qc.json", "model.qc_index.npy", "model.settings.json"]

    configs = [CONFIGS / "train.json", CONFIGS / "evaluate.json", CONFIGS / "multi_gpu_evaluate.json"]
    command[command.index("--config_file") + 1] = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(tmp_path)
    assert set(metrics) == {"val_mean_dice", "val_hd95_mm"} and 0.0 <= metrics["val_mean_dice"] <= 1.0


def test_a_run_shorter_than_the_validation_interval_keeps_its_weights_and_curves(tmp_path):
    """``--epochs 1`` with ``validation_interval`` 5 used to exit 0 without a model.pt; the curves go to
    TensorBoard (eval/events.out.tfevents.*) and, with ``--tracking mlflow``, to MLflow (eval/mlruns.db)."""
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.json"),
               "--meta_file", str(CONFIGS / "metadata.json"), "--bundle_root", str(tmp_path), "--epochs", "1",
               "--phantom_cases", "8", "--encoder_model_kwargs", '{"depth": 1}', "--tracking", "mlflow"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "between two validations" in result.stderr + result.stdout
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("decoder.") for k in state)
    assert (tmp_path / "models" / "model.qc.json").is_file() and (tmp_path / "models" / "model.settings.json").is_file()
    scalars: dict[str, list[float]] = {}
    for events in (tmp_path / "eval").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    assert len(scalars["train_loss"]) >= 2 and all(np.isfinite(scalars["train_loss"]))
    assert len(scalars["val_mean_dice"]) == 1 and 0.0 <= scalars["val_mean_dice"][0] <= 1.0

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=["monai_experiment"])
    assert len(runs) == 1 and runs.loc[0, "metrics.val_mean_dice"] == pytest.approx(scalars["val_mean_dice"][0], abs=1e-6)
    assert np.isfinite(runs.loc[0, "metrics.train_loss"])
