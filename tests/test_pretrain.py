"""``volumes pretrain``: slices as the bundles prepare them, the recipe's mechanics, outputs, faults, resume, DDP.

A tiny ViT (1 block, 96 wide) on 42 px slices of small phantoms, a few steps per run:
what is tested is the machinery (what is masked, frozen, averaged, written, refused),
not what a long run learns (docs/PRETRAIN.md has that, from scripts/pretrain_results.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightly", reason="volumes pretrain needs lightly (pip install 'volumes[pretrain]')")

from volumes.cli import main  # noqa: E402
from volumes.errors import VolumesError  # noqa: E402
from volumes.pretrain import CollapseError, PretrainConfig, Pretrainer, pretrain  # noqa: E402
from volumes.pretrain.data import MultiCrop, SliceSpec, SliceStream, foreground, prepare_volume, render  # noqa: E402
from volumes.pretrain.recipe import cosine, learning_rate, teacher_temperature  # noqa: E402

TESTS = Path(__file__).resolve().parent
MODEL = {"depth": 1, "embed_dim": 96, "num_heads": 2}
TINY = dict(model_kwargs=MODEL, size=42, batch_size=4, prototypes=32, ibot_prototypes=32, head_hidden=64,
            head_bottleneck=32, local_crops=2, num_workers=0, progress=False, cache_volumes=2, slices_per_volume=4,
            log_every=1)
CLI_TINY = ["--model-kwargs", json.dumps(MODEL), "--size", "42", "--batch-size", "4", "--prototypes", "32",
            "--local-crops", "2", "--workers", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Three small CT phantoms (NIfTI) and a datalist naming them."""
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case

    base = tmp_path_factory.mktemp("archive")
    config = PhantomConfig.segmentation_demo(matrix=48)
    entries = [write_case(generate_phantom(70 + i, config), base, f"ct{i}") for i in range(3)]
    (base / "datalist.json").write_text(json.dumps({"training": [{"image": e["image"]} for e in entries]}))
    return base


def _config(archive: Path, out: Path, **overrides) -> PretrainConfig:
    return PretrainConfig(data=str(archive / "datalist.json"), out=str(out), **{**TINY, **overrides})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- slices
def test_slices_are_the_bundles_slices_when_nothing_is_jittered(archive):
    """Without jitter a rendered slice equals the bundles' own preprocessing of that slice."""
    from volumes.data.io import load_volume
    from volumes.transforms import preprocessing

    spec = SliceSpec(size=42, jitter=0.0)
    volume = load_volume(archive / "images" / "ct0.nii.gz", dtype=None)
    stack = prepare_volume(volume.as_tensor(), spec, "axial", 14)
    bundle = preprocessing(("image",), preset="ct_three_windows", channel_mode="windows", size=42)({"image": volume})
    expected = bundle["image"].as_tensor()
    assert stack.shape[1:] == expected.shape[1:]
    for index in (0, stack.shape[-1] // 2, stack.shape[-1] - 1):
        ours = render(stack[..., index], spec, torch.Generator().manual_seed(0))
        assert torch.allclose(ours, expected[..., index], atol=1e-5), index


def test_jitter_moves_the_windows_within_its_bounds():
    hu = torch.linspace(-1000, 1500, 42 * 42).reshape(1, 42, 42)
    spec = SliceSpec(size=42, jitter=0.1)
    still = render(hu, SliceSpec(size=42, jitter=0.0), torch.Generator())
    views = [render(hu, spec, torch.Generator().manual_seed(i)) for i in range(8)]
    differences = [float((v - still).abs().max()) for v in views]
    assert all(d > 1e-3 for d in differences)  # every view has its own windows
    assert len({round(d, 6) for d in differences}) == 8


def test_air_slices_are_never_drawn():
    volume = torch.full((1, 40, 40, 20), -1000.0)
    volume[:, 8:32, 8:32, 5:15] = 40.0  # a body in slices 5..14 only
    spec = SliceSpec(size=42, jitter=0.0, min_foreground=0.1)
    stack = prepare_volume(volume, spec, "axial", 14)
    fractions = foreground(stack, spec)
    assert (fractions[5:15] > 0.3).all() and (fractions[:5] == 0).all() and (fractions[15:] == 0).all()

    class SliceMean:  # stands in for MultiCrop: returns the drawn slice's mean HU
        def __init__(self):
            self.spec = spec

        def __call__(self, hu, generator):
            return [hu.mean()]

    stream = SliceStream([{"case_id": "a", "array": np.zeros(1)}], SliceMean())
    import volumes.pretrain.data as data

    original = data._read
    data._read = lambda case: volume
    try:
        means = [float(views[0]) for views, _ in zip(iter(stream), range(64))]
    finally:
        data._read = original
    body = {round(float(stack[..., k].mean()), 3) for k in range(5, 15)}
    assert {round(m, 3) for m in means} <= body  # every drawn slice is one with the body in it
    assert float(stack[..., 0].mean()) == pytest.approx(-1000.0)


def test_multicrop_views_have_the_global_and_local_sizes():
    spec = SliceSpec(size=112)
    crops = MultiCrop(spec, patch_size=14, local_crops=3)
    views = crops(torch.zeros(1, 112, 112) + 40, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 112, 112)] * 2 + [(3, 42, 42)] * 3


def test_unreadable_cases_are_skipped_with_the_file_and_the_reason(archive, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(archive / "images", data)
    (data / "broken.nii.gz").write_bytes(b"\x00 not a volume " * 64)
    out = tmp_path / "out"
    # 5 steps of 4 slices, 4 slices per volume read: the first pass over the 4 cases is complete
    result = pretrain(PretrainConfig(data=str(data), out=str(out), steps=5, **TINY))
    assert result.steps == 5 and result.skipped == 1
    text = (out / "skipped.csv").read_text()
    assert "broken" in text and str(data / "broken.nii.gz") in text and "gzip" in text
    assert json.loads((out / "encoder.json").read_text())["skipped_cases"] == 1


def test_a_mixed_archive_prepares_each_volume_by_its_modality(archive, tmp_path):
    """--preset auto: CT windows for the CT, MR normalisation for the MR (never CT windows on an MR); unknown refused."""
    import nibabel as nib

    from volumes.pretrain.data import case_spec, list_cases

    data = tmp_path / "mixed"
    shutil.copytree(archive / "images", data / "ct")
    first = sorted((data / "ct").glob("*.nii.gz"))[0]
    ct = nib.load(str(first))
    mr = np.clip(np.asarray(ct.dataobj, dtype=np.float32) + 1000.0, 0, None) * 3.0  # MR-like: no HU, zero background
    (data / "mr").mkdir()
    nib.save(nib.Nifti1Image(mr.astype(np.int16), ct.affine), str(data / "mr" / "t1.nii.gz"))
    spec = SliceSpec(preset="auto", channel_mode="auto", size=42)
    cases = list_cases(data, "*/ct/*=CT,*/mr/*=MR")
    assert {c["modality"] for c in cases} == {"CT", "MR"}
    specs = {c["modality"]: case_spec(spec, c, None) for c in cases}
    assert specs["CT"].preset == "ct_three_windows" and specs["MR"].preset == "mr"
    # a DICOM series's tag decides when neither the datalist nor a rule does
    assert case_spec(spec, {"case_id": "x", "image": "series"}, "MR").preset == "mr"
    # the MR's prepared stack is normalised to [0, 1], not HU
    volume = torch.as_tensor(mr)[None]
    stack = prepare_volume(volume, specs["MR"], "axial", 14)
    assert float(stack.max()) <= 1.0 and float(stack.min()) >= 0.0
    result = pretrain(PretrainConfig(data=str(data), out=str(tmp_path / "out"), steps=2, preset="auto",
                                     channel_mode="auto", modality="*/ct/*=CT,*/mr/*=MR", **{**TINY, "size": 42}))
    assert result.steps == 2 and result.skipped == 0
    assert json.loads((tmp_path / "out" / "encoder.json").read_text())["preprocessing_config"]["preset"] == "auto"
    with pytest.raises(VolumesError, match="no CT or MR modality.*t1.nii.gz"):
        pretrain(PretrainConfig(data=str(data), out=str(tmp_path / "out2"), steps=2, preset="auto",
                                channel_mode="auto", modality="*/ct/*=CT", **TINY))


def test_no_readable_case_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.nii.gz").write_bytes(b"\x00 not a volume " * 64)
    with pytest.raises(VolumesError, match="no readable case"):
        pretrain(PretrainConfig(data=str(data), out=str(tmp_path / "out"), steps=2, **TINY))
    assert main(["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2


# ---------------------------------------------------------------------- the recipe
def test_schedules_have_their_known_values():
    s = {"lr": 1e-3, "min_lr": 1e-6, "warmup_steps": 10, "steps": 110, "teacher_temp": [0.04, 0.07],
         "teacher_temp_warmup_steps": 30}
    assert learning_rate(0, s) == pytest.approx(1e-4) and learning_rate(9, s) == pytest.approx(1e-3)
    assert learning_rate(60, s) == pytest.approx((1e-3 + 1e-6) / 2) and learning_rate(110, s) == pytest.approx(1e-6)
    assert cosine(0, 100, 0.992, 1.0) == 0.992 and cosine(50, 100, 0.992, 1.0) == pytest.approx(0.996)
    assert teacher_temperature(15, s) == pytest.approx(0.055) and teacher_temperature(40, s) == 0.07


def test_the_teacher_is_the_moving_average_of_the_student(archive, tmp_path):
    trainer = Pretrainer(_config(archive, tmp_path, steps=10, freeze_last_layer_steps=0))
    views = next(iter(trainer.loader()))
    teacher0 = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    metrics = trainer.step(views)
    m = metrics["momentum"]
    student, teacher = trainer.model.student.state_dict(), trainer.model.teacher.state_dict()
    name = "backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(student[name], teacher0[name])  # the student moved
    assert torch.allclose(teacher[name], m * teacher0[name] + (1 - m) * student[name], atol=1e-6)
    assert {"dino", "ibot", "koleo", "cls_std", "effective_rank", "teacher_entropy"} <= set(metrics)


def test_frozen_backbone_and_last_layers_do_not_move_until_their_step(archive, tmp_path):
    trainer = Pretrainer(_config(archive, tmp_path, steps=10, freeze_backbone_steps=2, freeze_last_layer_steps=2))
    batches = iter(trainer.loader())
    start = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    for _ in range(2):
        trainer.step(next(batches))
    now = trainer.model.student.state_dict()
    moved = {k for k in start if not torch.equal(start[k], now[k])}
    assert moved and all(not k.startswith("backbone.") and ".last_layer." not in k for k in moved), sorted(moved)
    trainer.step(next(batches))
    now = trainer.model.student.state_dict()
    assert not torch.equal(start["backbone.vit.blocks.0.mlp.fc1.weight"], now["backbone.vit.blocks.0.mlp.fc1.weight"])
    assert any(".last_layer." in k and not torch.equal(start[k], now[k]) for k in start)


def test_layer_wise_lr_decay_and_no_decay_groups(archive, tmp_path):
    trainer = Pretrainer(_config(archive, tmp_path, steps=10, layer_decay=0.5))
    scales = {}
    for group in trainer.groups:
        for name in group["names"]:
            scales[name] = (group["lr_scale"], group["wd_scale"])
    assert scales["backbone.vit.patch_embed.proj.weight"] == (0.25, 1.0)  # layer 0 of depth 1: 0.5 ** 2
    assert scales["backbone.vit.blocks.0.mlp.fc1.weight"] == (0.5, 1.0)
    assert scales["backbone.vit.norm.weight"] == (1.0, 0.0)
    assert scales["backbone.vit.cls_token"][1] == 0.0 and scales["backbone.mask_token"][1] == 0.0
    assert scales["dino.layers.0.weight"] == (1.0, 1.0)


def test_sinkhorn_centering_trains(archive, tmp_path):
    result = pretrain(_config(archive, tmp_path, steps=3, centering="sinkhorn"))
    assert result.steps == 3 and all(np.isfinite(m["loss"]) for m in _metrics(tmp_path))


# ---------------------------------------------------------------------- outputs
def test_the_encoder_loads_unchanged_into_slice_encoder(archive, tmp_path):
    from volumes.encoders import SliceEncoder

    config = _config(archive, tmp_path, steps=4, checkpoint_every=2)
    trainer = Pretrainer(config)
    from volumes.pretrain.trainer import run

    result = run(trainer)
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3, 4]
    # the same curves as TensorBoard scalars, in sections
    from volumes.curves import read_scalars

    scalars = read_scalars(tmp_path / "tensorboard")
    for tag, key in (("loss/loss", "loss"), ("schedule/lr", "lr"), ("schedule/teacher_temp", "teacher_temp"),
                     ("collapse/cls_std", "cls_std"), ("collapse/effective_rank", "effective_rank"),
                     ("collapse/teacher_entropy", "teacher_entropy")):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4], tag
        np.testing.assert_allclose([v for _, v in scalars[tag]], [m[key] for m in _metrics(tmp_path)], rtol=1e-4, atol=1e-6)  # the jsonl rounds to 6 places
    info = json.loads((tmp_path / "encoder.json").read_text())
    assert info["steps"] == 4 and info["preprocessing_config"] == {"preset": "ct_three_windows", "axis": "axial",
                                                                   "channel_mode": "windows", "size": 42}
    assert info["bundle_settings"]["encoder_weights"] == str(result.encoder.resolve())
    encoder = SliceEncoder(info["encoder"], weights=result.encoder, model_kwargs=info["model_kwargs"])
    teacher = trainer.model.teacher_backbone_state()
    assert encoder.backbone.state_dict().keys() == teacher.keys()
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, teacher[key]), key
    slices = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        reference = trainer.model.teacher.backbone.encode(slices)[:, 0]
    assert torch.allclose(encoder(slices, with_grids=False).cls, reference, atol=1e-5)


def test_a_bundle_trains_with_the_pretrained_encoder(archive, tmp_path):
    """The segmentation bundle's encoder_weights read the pretraining output (its features, not a random init)."""
    from monai.bundle import ConfigParser

    import shlex

    from fire.parser import DefaultParseValue

    from volumes.pretrain.trainer import bundle_arguments

    result = pretrain(_config(archive, tmp_path / "pt", steps=2))
    parser = ConfigParser()
    parser.read_config(str(TESTS.parent / "bundles" / "dinov2_unet_segmentation" / "configs" / "train.json"))
    # the arguments `volumes pretrain` prints, parsed as monai.bundle run parses them (fire): every setting
    words = shlex.split(bundle_arguments(result.out / "encoder.json"))
    overrides = {words[i][2:]: DefaultParseValue(words[i + 1]) for i in range(0, len(words), 2)}
    assert set(overrides) == {"encoder", "encoder_weights", "encoder_model_kwargs", "preprocessing_config"}
    parser.update(overrides)
    assert parser.get_parsed_content("preprocessing_config")["size"] == 42
    network = parser.get_parsed_content("network_def")
    assert len(network.encoder.backbone.blocks) == 1
    from safetensors.torch import load_file

    saved = load_file(result.encoder)
    assert torch.equal(network.encoder.backbone.state_dict()["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------------- faults and resume
def test_kill_then_resume_loses_at_most_the_steps_since_the_checkpoint(archive, tmp_path, capsys, monkeypatch):
    out, marker = tmp_path / "out", tmp_path / "stopped"
    args = ["pretrain", "--data", str(archive / "datalist.json"), "--out", str(out), "--steps", "6",
            "--checkpoint-every", "2", *CLI_TINY]
    from kill_points import kill, run_until, wait_for

    # stopped while the encoder written after the step-2 checkpoint is being renamed into place
    process = run_until(marker, "encoder.json", args, os.environ)
    wait_for(marker, process, "the run never reached its first checkpoint")
    kill(process)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2
    assert any(p.name.startswith(".encoder.json.") for p in out.iterdir())  # the killed writer's temporary file
    assert main([*args, "--resume"]) == 0
    assert "4 steps (resumed at step 2, now 6 of 6)" in capsys.readouterr().out  # what this process ran
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5, 6]  # each step once
    from volumes.curves import read_scalars

    assert [step for step, _ in read_scalars(out / "tensorboard")["loss/loss"]] == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # a refused --resume says so before the model is imported and built (that took about 20 s)
    monkeypatch.setattr(Pretrainer, "_build", lambda self: pytest.fail("built the model before refusing"))
    with pytest.raises(VolumesError, match="batch_size was 4 .* now 8"):
        Pretrainer(_config(archive, out, steps=6, checkpoint_every=2, batch_size=8), resume=True)
    with pytest.raises(VolumesError, match="nothing to resume"):
        Pretrainer(_config(archive, tmp_path / "empty", steps=6), resume=True)
    assert not (tmp_path / "empty").exists()


def test_a_failed_start_leaves_no_output_folder(archive, tmp_path):
    """A --weights file that cannot be read: the error, and no empty OUT left behind."""
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    out = tmp_path / "run"
    with pytest.raises(Exception, match="broken.pth"):
        Pretrainer(_config(archive, out, steps=2, weights=str(broken)))
    assert not out.exists()


def test_collapse_stops_the_run_and_says_what_collapsed(archive, tmp_path, capsys):
    # a floor no real spread reaches: every step after the warm-up counts as collapsed
    config = _config(archive, tmp_path, steps=20, warmup_steps=1, collapse_std=10.0, collapse_patience=3)
    with pytest.raises(CollapseError) as info:
        pretrain(config)
    message = str(info.value)
    assert "stopped at step 4" in message and "class tokens are nearly the same" in message
    assert "lower --lr" in message and str(tmp_path / "checkpoint.pt") in message
    assert _metrics(tmp_path)[-1]["step"] == 4


def test_torchrun_ddp_on_two_cpu_processes(archive, tmp_path):
    """gloo, 2 processes: it runs, the loss falls, the ranks end with one teacher, one checkpoint is written."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "volumes",
               "pretrain", "--data", str(archive / "datalist.json"), "--out", str(out), "--steps", "16",
               "--checkpoint-every", "8", "--lr", "0.002", "--koleo-weight", "0", *CLI_TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 16  # rank 0 logs, once per step
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert [p.name for p in out.glob("checkpoint*")] == ["checkpoint.pt"]
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 16 and saved["slices_seen"] == 16 * 4 * 2
    assert done.stdout.count("16 steps in") == 1  # rank 0 reports


# ---------------------------------------------------------------------- the bundle
BUNDLE = TESTS.parent / "bundles" / "dinov2_ssl_pretraining"


def test_the_bundle_runs_the_same_pretraining(archive, tmp_path):
    """``monai.bundle run`` on train.json with tiny settings writes the encoder a bundle reads."""
    from monai.bundle import run as bundle_run

    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE, root)
    bundle_run(config_file=str(root / "configs" / "train.json"), meta_file=str(root / "configs" / "metadata.json"),
               logging_file=str(root / "configs" / "logging.conf"), bundle_root=str(root),
               data=str(archive / "datalist.json"), steps=2, batch_size=4, encoder_model_kwargs=MODEL,
               **{"preprocessing_config#size": 42, "prototypes": 32, "local_crops": 2, "num_workers": 0})
    info = json.loads((root / "models" / "encoder.json").read_text())
    assert info["steps"] == 2 and info["model_kwargs"] == MODEL and (root / "models" / "encoder.safetensors").is_file()
    assert torch.load(root / "models" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_bundle_metadata_passes_the_monai_schema(verify_bundle_metadata):
    verify_bundle_metadata(BUNDLE / "configs" / "metadata.json")


def test_each_default_is_written_once_the_cli_and_the_bundle_agree_with_the_config():
    """`volumes pretrain` with no optional flag builds PretrainConfig's defaults; the SSL bundle's settings are them."""
    import argparse
    from dataclasses import asdict

    from volumes.cli import pretrain as cli
    from volumes.pretrain.config import pretrain_defaults

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["pretrain", "--data", "d", "--out", "o"])
    assert asdict(cli.config_from_args(args)) == asdict(PretrainConfig(data="d", out="o"))

    defaults = pretrain_defaults()
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    for field_name, reference in train["config"].items():
        if isinstance(reference, str) and reference.startswith("@") and reference[1:] in train and field_name in defaults:
            value = train[reference[1:]]
            assert value == defaults[field_name] or (isinstance(value, list) and tuple(value) == defaults[field_name]), (
                f"the bundle's {reference[1:]} is {value!r}, PretrainConfig.{field_name} {defaults[field_name]!r}")
    for key in ("preset", "channel_mode", "size"):
        assert train["preprocessing_config"][key] == defaults[key], key
