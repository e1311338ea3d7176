"""Parity of SliceEncoder with reference implementations nobody here wrote.

Hugging Face transformers' Dinov2Model / Dinov2WithRegistersModel and timm's own
forward are the references. Each reference is random-initialised, its parameters
perturbed (so a swapped bias or a dropped layer-scale cannot hide behind ones and
zeros), written to disk in its official format, loaded back through SliceEncoder,
and compared token by token.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

from parity import TOL, max_diff, perturb
from volumes.encoders import SliceEncoder

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install 'volumes[dev]')")



def _hf_model(with_registers: bool, *, hidden: int = 384, heads: int = 6, swiglu: bool = False):
    kwargs = dict(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads, image_size=56, patch_size=14,
        layerscale_value=0.5, use_swiglu_ffn=swiglu,
    )
    if with_registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    perturb(model, seed=1)
    return model.eval()


@pytest.mark.parametrize(
    ("variant", "with_registers", "hidden", "heads", "swiglu"),
    [
        ("vit_small_patch14_dinov2", False, 384, 6, False),
        ("vit_small_patch14_reg4_dinov2", True, 384, 6, False),
        ("vit_giant_patch14_dinov2", False, 1536, 24, True),
    ],
)
@pytest.mark.parametrize("size", [(56, 56), (84, 112), (28, 42)], ids=["native", "upsampled", "downsampled"])
def test_huggingface_directory_matches_transformers(tmp_path, variant, with_registers, hidden, heads, swiglu, size):
    reference = _hf_model(with_registers, hidden=hidden, heads=heads, swiglu=swiglu)
    reference.save_pretrained(tmp_path / "hf")
    encoder = SliceEncoder(variant, weights=tmp_path / "hf", layers=(0, 1), model_kwargs={"depth": 2})

    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = reference(pixel_values=x, output_hidden_states=True)
    ours = encoder(x)

    n_prefix = 1 + (4 if with_registers else 0)
    grid = (size[0] // 14, size[1] // 14)
    hf_last = out.last_hidden_state
    hf_patches = hf_last[:, n_prefix:].transpose(1, 2).reshape(3, hidden, *grid)
    assert max_diff(ours.cls, hf_last[:, 0]) < TOL
    assert max_diff(ours.patch_grids[-1], hf_patches) < TOL
    assert max_diff(ours.patch_mean, hf_last[:, n_prefix:].mean(1)) < TOL
    if with_registers:
        assert max_diff(ours.registers, hf_last[:, 1:5]) < TOL
    # Intermediate grid of block 0, with the final norm applied (DINOv2's dense-task convention).
    hidden_0 = reference.layernorm(out.hidden_states[1])[:, n_prefix:].transpose(1, 2).reshape(3, hidden, *grid)
    assert max_diff(ours.patch_grids[0], hidden_0) < TOL


def _timm_to_meta_dinov2(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Write a timm DINOv2 ViT's weights in the layout of Meta's released checkpoints."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    meta: dict[str, torch.Tensor] = {}
    if "reg_token" in state:
        # Meta keeps the class position inside pos_embed; timm folds it into cls_token.
        class_pos = 0.1 * torch.randn(1, 1, state["cls_token"].shape[-1])
        meta["register_tokens"] = state.pop("reg_token")
        meta["cls_token"] = state.pop("cls_token") - class_pos
        meta["pos_embed"] = torch.cat([class_pos, state.pop("pos_embed")], dim=1)
    meta["mask_token"] = torch.zeros(1, model.embed_dim)
    for key, value in state.items():
        key = re.sub(r"mlp\.fc1\.", "mlp.w12.", key) if "w12" in str(type(model.blocks[0].mlp)) else key
        meta[key] = value
    return meta


@pytest.mark.parametrize("variant", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_meta_dinov2_checkpoint_matches_timm(tmp_path, variant):
    reference = timm.create_model(variant, depth=2, img_size=56, num_classes=0, dynamic_img_size=True)
    perturb(reference, seed=2)
    reference.eval()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(_timm_to_meta_dinov2(reference), path)

    encoder = SliceEncoder(variant, weights=path, model_kwargs={"depth": 2}, layers=(1,))
    x = torch.randn(2, 3, 70, 42, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = reference.forward_features(x)
    ours = encoder(x)
    prefix = reference.num_prefix_tokens
    assert max_diff(ours.cls, tokens[:, 0]) < TOL
    assert max_diff(ours.patch_grids[0], tokens[:, prefix:].transpose(1, 2).reshape(2, 384, 5, 3)) < TOL


def test_meta_dinov3_checkpoint_matches_timm(tmp_path):
    variant = "vit_small_patch16_dinov3"
    reference = timm.create_model(variant, depth=2, num_classes=0)
    perturb(reference, seed=4)
    reference.eval()
    meta = {}
    for key, value in reference.state_dict().items():
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma").replace("reg_token", "storage_tokens")
        meta[key] = value.clone()
    meta["mask_token"] = torch.zeros(1, 384)
    meta["rope_embed.periods"] = torch.ones(16)  # a buffer Meta saves and timm recomputes
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(meta, path)

    encoder = SliceEncoder(variant, weights=path, model_kwargs={"depth": 2})
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens = reference.forward_features(x)
    ours = encoder(x, with_grids=False)
    assert max_diff(ours.cls, tokens[:, 0]) < TOL
    assert max_diff(ours.registers, tokens[:, 1:5]) < TOL
    assert max_diff(ours.patch_mean, tokens[:, 5:].mean(1)) < TOL


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_format_file_round_trips(tmp_path, suffix):
    source = SliceEncoder("vit_small_patch14_dinov2", model_kwargs={"depth": 2, "img_size": 98})
    perturb(source, seed=6)
    path = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.backbone.state_dict(), str(path))
    else:
        torch.save(source.backbone.state_dict(), path)
    loaded = SliceEncoder("vit_small_patch14_dinov2", weights=path, model_kwargs={"depth": 2})
    x = torch.randn(2, 3, 56, 56)
    assert max_diff(loaded(x).cls, source(x).cls) == 0.0
    assert loaded.backbone.patch_embed.grid_size == (7, 7)  # built at the checkpoint's grid, no resampling
    assert loaded.weights_id.startswith("sha256:") and len(loaded.weights_id) == 7 + 64
