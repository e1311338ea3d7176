"""The classification bundle, run the way users run it: monai.bundle's run, verify and export."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

monai_bundle = pytest.importorskip("monai.bundle")

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "dinov2_slice_classification"
CONFIGS = BUNDLE / "configs"
# Small and quick: a 2-block encoder on 56-pixel slices, a 16-case phantom cohort.
SMALL = {
    "encoder_model_kwargs": {"depth": 2},
    "preprocessing_config#size": 56,
    "phantom_cases": 16,
}


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
    root = tmp_path_factory.mktemp("bundle")
    _run(["train.json"], root, epochs=2)
    return root


def test_train_writes_a_checkpoint_and_fills_the_cache(trained):
    state = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    # The whole network is saved: a random-initialised encoder is part of what was trained on.
    assert any(k.startswith("encoder.backbone.") for k in state) and any(k.startswith("aggregator.") for k in state)
    entries = [json.loads(p.with_suffix(".json").read_text()) for p in (trained / "cache").rglob("*.npz")]
    datalist = json.loads((trained / "data" / "phantoms" / "datalist.json").read_text())
    cases = len(datalist["training"]) + len(datalist["validation"])
    # one entry per case keyed by its voxels, and one keyed by its file's bytes (no loading next time)
    assert sum("source" not in e for e in entries) == cases
    assert sorted(Path(e["source"]).name for e in entries if "source" in e) == sorted(
        Path(item["image"]).name for item in datalist["training"] + datalist["validation"])


def test_second_training_run_reads_embeddings_from_the_cache(trained, monkeypatch):
    from volumes.embedding import SliceEmbedder

    def no_encoder(self, image):
        raise AssertionError("the encoder ran although every embedding was cached")

    monkeypatch.setattr(SliceEmbedder, "_compute", no_encoder)
    _run(["train.json"], trained, epochs=1)


def test_checkpoint_settings_travel_with_the_weights(trained):
    """Training writes the network, slice preparation and labels beside model.pt; inference checks them."""
    from volumes.errors import VolumesError

    settings = json.loads((trained / "models" / "model.settings.json").read_text())
    assert settings["network"]["encoder"] == "vit_small_patch14_dinov2"
    assert settings["network"]["encoder_model_kwargs"] == {"depth": 2}
    assert settings["preprocessing"]["size"] == 56 and settings["labels"] == ["normal_liver", "hepatomegaly"]
    from volumes.errors import volumes_error_in

    for override, message in (({"preprocessing_config#size": 112}, "preprocessing.size: trained with 56, configured 112"),
                              ({"aggregator": "mean"}, "network.aggregator: trained with 'transformer', configured 'mean'")):
        with pytest.raises(Exception) as error:  # monai.bundle wraps it in RuntimeError("Failed to evaluate ...")
            _run(["inference.json"], trained, **override)
        assert isinstance(volumes_error_in(error.value), VolumesError) and message in str(volumes_error_in(error.value))


def test_evaluate_on_the_test_split(trained):
    import numpy as np

    from volumes.calibration import brier_score, softmax

    _run(["train.json", "evaluate.json"], trained)
    metrics = (trained / "eval" / "metrics.csv").read_text()
    assert "val_auc" in metrics and "val_accuracy" in metrics
    # calibration on the test split, before and after the calibration chosen at training
    report = json.loads((trained / "eval" / "calibration.json").read_text())
    datalist = json.loads((trained / "data" / "phantoms" / "datalist.json").read_text())
    saved = json.loads((trained / "models" / "model.calibration.json").read_text())
    assert report["cases"] == len(datalist["test"]) and report["temperature"] == saved["temperature"]
    assert report["method"] == saved["method"] and report["bias"] == saved["bias"] and report["reason"] == saved["reason"]
    # accuracy at the calibrated 0.5 threshold: Platt's intercept may move it, by whole cases
    assert report["accuracy_calibrated"] * report["cases"] == pytest.approx(round(report["accuracy_calibrated"] * report["cases"]))
    for key in ("ece", "ece_calibrated"):
        assert 0.0 <= report[key] <= 1.0
    # the Brier score of a constant 0.5 answer is 0.5: the numbers are on that scale
    assert brier_score(softmax(np.zeros((4, 2))), np.array([0, 1, 0, 1])) == 0.5
    assert 0.0 <= report["brier_calibrated"] <= 2.0


def test_inference_writes_probabilities_and_top_slices(trained):
    _run(["inference.json"], trained, top_k=3)
    rows = [json.loads(line) for line in (trained / "eval" / "predictions.jsonl").read_text().splitlines()]
    datalist = json.loads((trained / "data" / "phantoms" / "datalist.json").read_text())
    assert len(rows) == len(datalist["test"]) > 0
    for row in rows:
        assert abs(sum(row["probabilities"].values()) - 1.0) < 1e-4
        assert len(row["top_slices"]) == 3
        importances = [s["importance"] for s in row["top_slices"]]
        assert importances == sorted(importances, reverse=True)
    with open(trained / "eval" / "predictions.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["case_id"] for r in table] == [r["case_id"] for r in rows]


def test_verify_metadata_against_the_monai_schema(verify_bundle_metadata):
    verify_bundle_metadata(CONFIGS / "metadata.json")


def test_verify_net_in_out():
    monai_bundle.verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        n=2,
        any=5,
        encoder_model_kwargs={"depth": 2},
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
        input_shape=[1, 3, 56, 42, 9],
        encoder_model_kwargs={"depth": 2},
    )
    parser = monai_bundle.ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["encoder_model_kwargs"] = {"depth": 2}
    parser["preprocessing_config#size"] = 56  # as trained: loading the weights checks model.settings.json
    parser["bundle_root"] = str(trained)
    eager = parser.get_parsed_content("network").cpu().eval()
    scripted = torch.jit.load(str(exported))
    for depth in (9, 13):  # the traced graph is not tied to the example's slice count
        volume = torch.randn(1, 3, 56, 42, depth, generator=torch.Generator().manual_seed(depth))
        with torch.no_grad():
            assert torch.allclose(scripted(volume), eager(volume), atol=1e-4)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [("aggregator", "lstm", "transformer"), ("encoder", "vit_tiny_nope", "vit_small_patch14_dinov2"), ("planes", ["axial", "oblique"], "coronal")],
)
def test_bad_config_value_names_the_key_and_choices(key, value, allowed):
    parser = monai_bundle.ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser[key] = value
    parser["encoder_model_kwargs"] = {"depth": 1}
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("network_def")
    chain, exc = [], err.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    message = "\n".join(chain)
    assert f"{key}=" in message and allowed in message


def test_torchrun_two_cpu_processes_write_exactly_one_checkpoint(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "monai.bundle", "run",
        "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(tmp_path), "--epochs", "2", "--phantom_cases", "12",
        "--preprocessing_config#size", "56", "--encoder_model_kwargs", '{"depth": 2}',
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.calibration.json", "model.pt", "model.settings.json"]

    # Distributed evaluation of that checkpoint: metrics gathered from both ranks, saved once.
    configs = [CONFIGS / "train.json", CONFIGS / "evaluate.json", CONFIGS / "multi_gpu_evaluate.json"]
    command[command.index("--config_file") + 1] = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics] == ["val_auc", "val_accuracy"]


def test_inference_applies_the_calibration_fitted_at_training(trained):
    """Training saves its chosen calibration and why beside model.pt; inference applies what the file says."""
    import numpy as np

    from volumes.calibration import calibration_path, load_calibration

    datalist = json.loads((trained / "data" / "phantoms" / "datalist.json").read_text())
    saved = calibration_path(trained / "models" / "model.pt")
    chosen = json.loads(saved.read_text())
    assert chosen["method"] in ("none", "temperature scaling", "Platt scaling") and chosen["reason"]
    assert chosen["cases"] == len(datalist["validation"])
    # never worse calibrated on the cases it was chosen on
    assert chosen["val_ece_calibrated"] <= chosen["val_ece"] + 1e-9
    # inference applies whatever the file holds: a Platt map with an intercept, to see it applied
    original = saved.read_text()
    saved.write_text(json.dumps({**chosen, "method": "Platt scaling", "temperature": 2.0, "bias": [0.0, 0.7]}))
    calibration = json.loads(saved.read_text())
    fitted = load_calibration(trained / "models" / "model.pt")

    def predictions():
        _run(["inference.json"], trained)
        return [json.loads(line) for line in (trained / "eval" / "predictions.jsonl").read_text().splitlines()]

    rows = predictions()
    for row in rows:
        raw = np.array([list(row["probabilities_uncalibrated"].values())])
        expected = fitted.probabilities(np.log(np.clip(raw, 1e-6, None)))[0]
        np.testing.assert_allclose(list(row["probabilities"].values()), expected, atol=1e-3)
        assert row["temperature"] == calibration["temperature"] and row["logit_bias"] == calibration["bias"]
    # the ranking is kept: the calibrated positive-class scores order the cases as the raw ones do
    raw1 = [list(row["probabilities_uncalibrated"].values())[1] for row in rows]
    cal1 = [list(row["probabilities"].values())[1] for row in rows]
    assert np.all(np.diff(np.array(cal1)[np.argsort(raw1, kind="stable")]) >= -1e-6)
    # a checkpoint trained before calibration existed: T = 1, the probabilities as they were
    hidden = saved.rename(saved.with_suffix(".hidden"))
    try:
        for row in predictions():
            assert row["temperature"] == 1.0 and row["probabilities"] == row["probabilities_uncalibrated"]
    finally:
        hidden.rename(saved)
        saved.write_text(original)


def test_a_broken_calibration_file_is_named(tmp_path):
    from volumes.calibration import calibration_path, load_calibration
    from volumes.errors import VolumesError

    checkpoint = tmp_path / "model.pt"
    assert load_calibration(checkpoint).temperature == 1.0
    calibration_path(checkpoint).write_text('{"temperature": -2}')
    with pytest.raises(VolumesError, match="model.calibration.json: temperature must be a positive number"):
        load_calibration(checkpoint)
    calibration_path(checkpoint).write_text("{not json")
    with pytest.raises(VolumesError, match="model.calibration.json: unreadable calibration file"):
        load_calibration(checkpoint)
    calibration_path(checkpoint).write_text('{"temperature": 1.5, "bias": [0, "nan"]}')
    with pytest.raises(VolumesError, match="model.calibration.json: bias must be finite numbers"):
        load_calibration(checkpoint)
