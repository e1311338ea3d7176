"""SliceEncoder behaviour: shapes, chunking, training modes, hub path, weight errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from volumes.encoders import SliceEncoder, default_layers, encoder_names, volume_to_slices
from volumes.errors import ConfigError, WeightsError

SMALL = {"depth": 2}


def test_every_dinov2_and_dinov3_vit_is_accepted():
    names = encoder_names()
    for size in ("small", "base", "large", "giant"):
        assert f"vit_{size}_patch14_dinov2" in names
        assert f"vit_{size}_patch14_reg4_dinov2" in names
    assert {"vit_small_patch16_dinov3", "vit_base_patch16_dinov3", "vit_large_patch16_dinov3"} <= set(names)


@pytest.mark.parametrize(
    ("name", "patch", "registers"),
    [("vit_small_patch14_dinov2", 14, 0), ("vit_small_patch14_reg4_dinov2", 14, 4), ("vit_small_patch16_dinov3", 16, 4)],
)
def test_output_shapes(name, patch, registers):
    encoder = SliceEncoder(name, model_kwargs=SMALL, layers=(0, 1))
    features = encoder(torch.randn(5, 3, 2 * patch, 3 * patch))
    assert features.cls.shape == (5, 384)
    assert features.registers.shape == (5, registers, 384)
    assert features.patch_mean.shape == (5, 384)
    assert [tuple(g.shape) for g in features.patch_grids] == [(5, 384, 2, 3)] * 2
    assert encoder.patch_size == patch and encoder.num_registers == registers


def test_default_layers_are_evenly_spaced():
    assert default_layers(12) == (2, 5, 8, 11)
    assert default_layers(24) == (5, 11, 17, 23)
    assert default_layers(40) == (9, 19, 29, 39)
    assert SliceEncoder("vit_small_patch14_dinov2", model_kwargs={"depth": 4}, layers=(-1, 0)).layers == (3, 0)


def test_chunking_does_not_change_results_and_bounds_chunk_size():
    encoder = SliceEncoder("vit_small_patch14_dinov2", model_kwargs=SMALL, chunk_size=3)
    seen: list[int] = []
    original = encoder._encode_chunk

    def recording(slices, with_grids):
        seen.append(slices.shape[0])
        return original(slices, with_grids)

    encoder._encode_chunk = recording
    x = torch.randn(10, 3, 28, 28)
    chunked = encoder(x)
    assert seen == [3, 3, 3, 1]
    encoder.chunk_size = 100
    whole = encoder(x)
    assert (chunked.cls - whole.cls).abs().max() < 1e-5
    assert (chunked.patch_grids[-1] - whole.patch_grids[-1]).abs().max() < 1e-5


def test_without_grids_returns_tokens_only():
    encoder = SliceEncoder("vit_small_patch14_dinov2", model_kwargs=SMALL)
    x = torch.randn(2, 3, 28, 42)
    light, full = encoder(x, with_grids=False), encoder(x)
    assert light.patch_grids == ()
    assert torch.allclose(light.cls, full.cls, atol=1e-5)


def test_position_grid_is_resampled_once_per_size():
    encoder = SliceEncoder("vit_small_patch14_dinov2", model_kwargs=SMALL)
    with torch.inference_mode():
        encoder(torch.randn(2, 3, 28, 42))
        encoder(torch.randn(2, 3, 28, 42))
        encoder(torch.randn(1, 3, 56, 56))
    assert sorted(k[:2] for k in encoder.backbone._volumes_pos_cache) == [(2, 3), (4, 4)]


def test_cached_position_grid_follows_changes_of_the_weights():
    encoder = SliceEncoder("vit_small_patch14_dinov2", model_kwargs=SMALL, mode="finetune").eval()
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        before = encoder(x).cls
        encoder.backbone.pos_embed.add_(torch.randn_like(encoder.backbone.pos_embed))  # as an optimiser step would
        after = encoder(x).cls
        fresh = SliceEncoder("vit_small_patch14_dinov2", model_kwargs=SMALL).eval()
        fresh.backbone.load_state_dict(encoder.backbone.state_dict())
        expected = fresh(x).cls
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)


def test_frozen_mode_has_no_gradients_and_stays_in_eval():
    encoder = SliceEncoder("vit_small_patch14_dinov2", model_kwargs=SMALL)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.backbone.training
    head = torch.nn.Linear(384, 2)
    # A head trained on frozen features must be able to backpropagate into itself.
    loss = head(encoder(torch.randn(2, 3, 28, 28)).cls).sum()
    loss.backward()
    assert head.weight.grad is not None


def test_finetune_and_last_n_modes_train_the_right_parameters():
    x = torch.randn(2, 3, 28, 28)
    full = SliceEncoder("vit_small_patch14_dinov2", model_kwargs={"depth": 3}, mode="finetune")
    full(x).cls.sum().backward()
    assert all(p.grad is not None for p in full.parameters())

    partial = SliceEncoder("vit_small_patch14_dinov2", model_kwargs={"depth": 3}, mode="last_n", trainable_blocks=1)
    partial(x).cls.sum().backward()
    trained = {n for n, p in partial.backbone.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith(("blocks.2.", "norm.")) for n in trained)
    assert any(n.startswith("blocks.2.") for n in trained)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "vit_tiny_unknown"}, "encoder"),
        ({"mode": "half"}, "mode"),
        ({"autocast": "fp8"}, "autocast"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"pos_embed_interpolation": "nearest"}, "pos_embed_interpolation"),
        ({"mode": "last_n", "trainable_blocks": 5}, "trainable_blocks"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    kwargs = {"name": "vit_small_patch14_dinov2", "model_kwargs": SMALL, **kwargs}
    with pytest.raises(ConfigError, match=key):
        SliceEncoder(**kwargs)


def test_slices_must_fit_the_patch_grid():
    encoder = SliceEncoder("vit_small_patch14_dinov2", model_kwargs=SMALL)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        encoder(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"\[N, 3, h, w\]"):
        encoder(torch.randn(1, 1, 28, 28))


def test_volume_to_slices_orders_case_then_slice():
    volume = torch.arange(2 * 1 * 2 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 2, 3)
    slices = volume_to_slices(volume)
    assert slices.shape == (6, 1, 2, 2)
    assert torch.equal(slices[4], volume[1, :, :, :, 1])


# ------------------------------------------------------------------ weights errors
def _save(model_name: str, path, **kwargs):
    torch.save(SliceEncoder(model_name, model_kwargs={**SMALL, **kwargs}).backbone.state_dict(), path)


def test_weights_of_another_variant_name_the_file_variant_and_keys(tmp_path):
    path = tmp_path / "base.pth"
    torch.save(SliceEncoder("vit_base_patch14_dinov2", model_kwargs=SMALL).backbone.state_dict(), path)
    with pytest.raises(WeightsError) as err:
        SliceEncoder("vit_small_patch14_dinov2", weights=path, model_kwargs=SMALL)
    message = str(err.value)
    assert str(path) in message
    assert "vit_small_patch14_dinov2" in message and "embed_dim 384" in message and "embed_dim 768" in message
    assert "cls_token (1, 1, 768) vs expected (1, 1, 384)" in message


def test_missing_keys_are_listed(tmp_path):
    path = tmp_path / "short.pth"
    _save("vit_small_patch14_dinov2", path, depth=1)
    with pytest.raises(WeightsError, match=r"missing keys: blocks\.1\."):
        SliceEncoder("vit_small_patch14_dinov2", weights=path, model_kwargs=SMALL)


def test_registers_into_a_model_without_them_is_rejected(tmp_path):
    path = tmp_path / "reg.pth"
    _save("vit_small_patch14_reg4_dinov2", path)
    with pytest.raises(WeightsError, match="0 register tokens.*the checkpoint has .*4 register tokens"):
        SliceEncoder("vit_small_patch14_dinov2", weights=path, model_kwargs=SMALL)


@pytest.mark.parametrize(
    ("content", "name", "phrase"),
    [
        (b"not a checkpoint at all", "garbage.pth", "cannot read weights"),
        (b"\x00\x01\x02", "garbage.safetensors", "cannot read weights"),
        (b"{}", "weights.onnx", "unknown weights format"),
    ],
)
def test_unreadable_files(tmp_path, content, name, phrase):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=phrase) as err:
        SliceEncoder("vit_small_patch14_dinov2", weights=path, model_kwargs=SMALL)
    assert str(path) in str(err.value)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Linear(2, 2), "callback": print}, path)  # objects, not tensors
    with pytest.raises(WeightsError, match="cannot read weights"):
        SliceEncoder("vit_small_patch14_dinov2", weights=path, model_kwargs=SMALL)


def test_missing_path_and_foreign_hf_directory(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        SliceEncoder("vit_small_patch14_dinov2", weights=tmp_path / "nope.pth")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(WeightsError, match="model_type is 'bert'"):
        SliceEncoder("vit_small_patch14_dinov2", weights=tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="without config.json"):
        SliceEncoder("vit_small_patch14_dinov2", weights=tmp_path / "empty")


def test_pretrained_true_goes_through_timms_hub_loader(tmp_path):
    """The real hub code path, served from a Hugging Face cache the test writes (no network)."""
    from safetensors.torch import save_file

    source = SliceEncoder("vit_small_patch14_dinov2", model_kwargs={**SMALL, "img_size": 518})
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(source.backbone.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    expected = source(torch.ones(1, 3, 28, 28)).cls[0, :4].tolist()

    script = (
        "import torch; from volumes.encoders import SliceEncoder;"
        "e = SliceEncoder('vit_small_patch14_dinov2', pretrained=True, model_kwargs={'depth': 2});"
        "print(e.weights_id); print(e(torch.ones(1, 3, 28, 28)).cls[0, :4].tolist())"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    weights_id, values = result.stdout.strip().splitlines()[-2:]
    assert weights_id == "timm-hub:lvd142m"
    assert torch.allclose(torch.tensor(json.loads(values)), torch.tensor(expected), atol=1e-5)
