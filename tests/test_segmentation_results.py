"""Smoke run of scripts/segmentation_results.py on the real example CT, tiny budget (skips without shared data)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.shared

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "segmentation_results.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("segmentation_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_label_mapping_follows_the_class_map(shared_data: Path):
    script = _load_script()
    folder = shared_data / "totalsegmentator_example"
    labels = ["background", "liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae"]
    mapping = script.label_mapping(folder / script.CLASS_MAP_FILE, labels)
    assert {5: 1, 1: 2, 3: 3, 2: 4, 52: 5}.items() <= mapping.items()
    assert mapping[31] == 6 and 25 not in mapping  # vertebrae_L1 is a vertebra, the sacrum is not


def test_tiny_budget_run_writes_the_table(shared_data: Path, tmp_path: Path):
    torch.set_num_threads(1)
    script = _load_script()
    folder = shared_data / "totalsegmentator_example"
    checkpoint = tmp_path / "model.pt"  # an untrained network saved the way the bundle's CheckpointSaver does
    torch.save(script.slice_segmenter(7, seed=0).state_dict(), checkpoint)
    output = tmp_path / "results.md"
    rows = ["a", "b", "c"]  # SwinUNETR (d) takes ~25 s even this small on 2 shared cores: left to the real run
    assert script.main(["--data-dir", str(folder), "--checkpoint", str(checkpoint), "--budget-s", "0.5",
                        "--rows", *rows, "--output", str(output),
                        "--work-dir", str(tmp_path / "work")]) == 0
    text = output.read_text()
    assert "not manual" in text and "ground truth" in text
    table = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(table) == len(rows) + 1  # (a) also on the whole CT
    for line in table:
        dice = [float(v) for v in re.findall(r"\| (\d\.\d{3}) ", line)[:4]]
        assert len(dice) == 4 and all(0.0 <= d <= 1.0 for d in dice)
    assert not list(output.parent.glob(".results.md.*"))  # written through a temporary file and a rename


def test_skips_cleanly_without_data(tmp_path: Path, capsys):
    script = _load_script()
    output = tmp_path / "results.md"
    assert script.main(["--data-dir", str(tmp_path / "missing"), "--output", str(output)]) == 0
    assert "skipped" in capsys.readouterr().out and not output.exists()


def test_the_decoder_follows_the_checkpoint_settings(tmp_path: Path):
    script = _load_script()
    checkpoint = tmp_path / "models" / "model.pt"
    checkpoint.parent.mkdir()
    assert script.checkpoint_decoder(None) == script.checkpoint_decoder(checkpoint) == script.BUNDLE_DECODER
    settings = checkpoint.with_name("model.settings.json")
    settings.write_text('{"network": {"encoder": "vit_small_patch14_dinov2"}}')  # saved before "decoder" existed
    assert script.checkpoint_decoder(checkpoint) == "unetr"
    settings.write_text('{"network": {"decoder": "light"}}')
    assert script.checkpoint_decoder(checkpoint) == "light"
    assert script.parse_args(["--checkpoint", str(checkpoint)]).decoder == "light"
    assert script.parse_args(["--checkpoint", str(checkpoint), "--decoder", "unetr"]).decoder == "unetr"
