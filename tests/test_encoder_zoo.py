"""Parity of the foundation-model zoo with the reference libraries nobody here wrote.

Each reference (open_clip, segment_anything, transformers' BLIP) is random-initialised at a
tiny size, its parameters perturbed (so a swapped bias, a dropped LayerNorm or a transposed
projection cannot hide behind ones and zeros), saved in its official layout by the library
itself, loaded back through ``ZooSliceEncoder`` and compared with the library's own forward.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from parity import TOL, max_diff, perturb
from volumes.encoders import ZooSliceEncoder, build_slice_encoder, native_input_size, zoo_encoder_names
from volumes.errors import ConfigError, WeightsError



def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _capture(module: torch.nn.Module) -> tuple[list, object]:
    seen: list = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    return seen, handle


# ----------------------------------------------------------------------------- OpenCLIP / OpenAI / BiomedCLIP
open_clip = pytest.importorskip("open_clip", reason="zoo parity tests need open_clip_torch (pip install 'volumes[dev]')")

_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def _open_clip_vit(quick_gelu: bool = False):
    vision = {"layers": 2, "width": 64, "head_width": 32, "patch_size": 16, "image_size": 64, "mlp_ratio": 2.0}
    model = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=_TEXT, quick_gelu=quick_gelu)
    perturb(model, seed=1)
    config = {"embed_dim": 24, "quick_gelu": quick_gelu, "vision_cfg": vision, "text_cfg": _TEXT}
    return model.eval(), config


def _save_open_clip(model, config, tmp_path, how: str):
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    state = model.state_dict()
    if how == "bin":
        torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
        return tmp_path / "open_clip_pytorch_model.bin"
    if how == "safetensors":
        save_file(state, str(tmp_path / "open_clip_pytorch_model.safetensors"))
        return tmp_path / "open_clip_pytorch_model.safetensors"
    hub = tmp_path / "hub"  # what open_clip.push_to_hf_hub uploads (BiomedCLIP's repository layout)
    hub.mkdir()
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    # open_clip.create_model sets these before saving; the config records them
    model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    save_file(state, str(hub / HF_SAFE_WEIGHTS_NAME)) if how == "hub_safetensors" else torch.save(state, hub / HF_WEIGHTS_NAME)
    save_config_for_hf(model, hub / "open_clip_config.json", model_config=config)
    return hub


CLIP_SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2.0}


@pytest.mark.parametrize("how", ["bin", "safetensors", "hub_bin", "hub_safetensors"])
def test_open_clip_vit_matches_open_clip(tmp_path, how):
    reference, config = _open_clip_vit()
    path = _save_open_clip(reference, config, tmp_path, how)
    encoder = ZooSliceEncoder("vit_base_patch16_clip_224", weights=path, model_kwargs=CLIP_SMALL, layers=(0, 1))
    x = _images(3, 64, 64)
    tokens, handle = _capture(reference.visual.ln_post)
    with torch.no_grad():
        image_features = reference.encode_image(x)
    handle.remove()
    final = tokens[0]  # ln_post over every token: [N, 1 + 16, 64]
    ours = encoder(x)
    assert max_diff(ours.cls, final[:, 0]) < TOL  # pre-projection class token
    assert max_diff(ours.patch_mean, final[:, 1:].mean(1)) < TOL
    assert max_diff(ours.patch_grids[-1], final[:, 1:].transpose(1, 2).reshape(3, 64, 4, 4)) < TOL
    assert encoder.proj_dim == 24
    assert max_diff(encoder.projected(x), image_features) < TOL


def test_openai_clip_state_dict_matches_with_quickgelu(tmp_path):
    """OpenAI's CLIP layout is open_clip's ViT layout with QuickGELU: timm's *_quickgelu_* names."""
    reference, _ = _open_clip_vit(quick_gelu=True)
    torch.save(reference.state_dict(), tmp_path / "ViT-B-16.pth")
    encoder = ZooSliceEncoder("vit_base_patch16_clip_quickgelu_224", weights=tmp_path / "ViT-B-16.pth",
                              model_kwargs=CLIP_SMALL)
    x = _images(2, 64, 64, seed=1)
    with torch.no_grad():
        expected = reference.encode_image(x)
    assert max_diff(encoder.projected(x), expected) < TOL
    # the same file in a GELU tower computes something else: the activation is part of the name
    gelu = ZooSliceEncoder("vit_base_patch16_clip_224", weights=tmp_path / "ViT-B-16.pth", model_kwargs=CLIP_SMALL)
    assert max_diff(gelu.projected(x), expected) > 1e-3


def test_torchscript_archive_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(WeightsError, match="TorchScript archive") as info:
        ZooSliceEncoder("vit_base_patch16_clip_224", weights=path, model_kwargs=CLIP_SMALL)
    assert str(path) in str(info.value)


def test_biomedclip_hub_directory_matches_open_clip(tmp_path):
    """BiomedCLIP: an open_clip tower around a timm ViT trunk (vit_base_patch16_224 there, tiny here)."""
    vision = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
              "timm_proj": "linear", "image_size": 224}
    model = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=_TEXT)
    perturb(model, seed=3)
    model.eval()
    hub = _save_open_clip(model, {"embed_dim": 24, "vision_cfg": vision, "text_cfg": _TEXT}, tmp_path, "hub_bin")
    encoder = ZooSliceEncoder("vit_tiny_patch16_224", weights=hub, layers=(11,))
    x = _images(2, 224, 224, seed=2)
    tokens, handle = _capture(model.visual.trunk.norm)
    with torch.no_grad():
        expected = model.encode_image(x)
    handle.remove()
    ours = encoder(x)
    assert max_diff(ours.cls, tokens[0][:, 0]) < TOL
    assert max_diff(ours.patch_grids[0], tokens[0][:, 1:].transpose(1, 2).reshape(2, 192, 14, 14)) < TOL
    assert max_diff(encoder.projected(x), expected) < TOL


# ----------------------------------------------------------------------------- BLIP (transformers)
transformers = pytest.importorskip("transformers", reason="BLIP parity needs transformers")

_BLIP_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": 64, "patch_size": 16}
BLIP_SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2.0}


@pytest.mark.parametrize("size", [(64, 64), (96, 64)], ids=["native", "resampled"])
def test_blip_vision_directory_matches_transformers(tmp_path, size):
    reference = transformers.BlipVisionModel(transformers.BlipVisionConfig(**_BLIP_VISION))
    perturb(reference, seed=4)
    reference.eval().save_pretrained(tmp_path / "blip")
    encoder = ZooSliceEncoder("vit_base_patch16_384", weights=tmp_path / "blip", model_kwargs=BLIP_SMALL,
                              layers=(0, 1))
    x = _images(2, *size, seed=3)
    with torch.no_grad():
        out = reference(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True)
    ours = encoder(x)
    grid = (size[0] // 16, size[1] // 16)
    last = out.last_hidden_state
    assert max_diff(ours.cls, last[:, 0]) < TOL
    assert max_diff(ours.patch_grids[-1], last[:, 1:].transpose(1, 2).reshape(2, 64, *grid)) < TOL
    block0 = reference.post_layernorm(out.hidden_states[1])[:, 1:].transpose(1, 2).reshape(2, 64, *grid)
    assert max_diff(ours.patch_grids[0], block0) < TOL
    assert encoder.proj_dim == 0


def test_blip_retrieval_directory_gives_cls_and_vision_projection(tmp_path):
    config = transformers.BlipConfig(
        vision_config=_BLIP_VISION,
        text_config={"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "encoder_hidden_size": 64},
        image_text_hidden_size=16,
    )
    reference = transformers.BlipForImageTextRetrieval(config)
    perturb(reference, seed=5)
    reference.eval().save_pretrained(tmp_path / "blip_itm")
    encoder = ZooSliceEncoder("vit_base_patch16_384", weights=tmp_path / "blip_itm", model_kwargs=BLIP_SMALL)
    x = _images(2, 64, 64, seed=4)
    with torch.no_grad():
        last = reference.vision_model(pixel_values=x).last_hidden_state
        projected = reference.vision_proj(last[:, 0])  # what BLIP's image-text contrastive head normalises
    assert max_diff(encoder(x, with_grids=False).cls, last[:, 0]) < TOL
    assert max_diff(encoder.projected(x), projected) < TOL


# ----------------------------------------------------------------------------- SAM / MedSAM (segment_anything)
segment_anything = pytest.importorskip("segment_anything", reason="SAM parity needs segment-anything")

SAM_SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4,
             "neck_chans": 32}


def _tiny_sam():
    """A whole ``Sam`` (image encoder, prompt encoder, mask decoder) at 96 px: Meta's checkpoint layout."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = ImageEncoderViT(img_size=96, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0,
                              out_chans=32, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, window_size=4, global_attn_indexes=(1,))
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(6, 6), input_image_size=(96, 96), mask_in_chans=4)
    decoder = MaskDecoder(transformer_dim=32, transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64,
                                                                           num_heads=2), iou_head_hidden_dim=16)
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
    perturb(sam, seed=6)
    return sam.eval()


@pytest.mark.parametrize("layout", ["sam_vit_b_01ec64.pth", "medsam_vit_b.pth"])
def test_sam_checkpoint_matches_segment_anything(tmp_path, layout):
    sam = _tiny_sam()
    path = tmp_path / layout
    if layout.startswith("medsam"):  # MedSAM's training checkpoints wrap the same Sam state dict
        torch.save({"model": sam.state_dict(), "epoch": 3}, path)
    else:
        torch.save(sam.state_dict(), path)
    encoder = ZooSliceEncoder("samvit_base_patch16", weights=path, model_kwargs=SAM_SMALL, layers=(0, 1))
    x = _images(2, 96, 96, seed=5)
    blocks, handle = _capture(sam.image_encoder.blocks[0])
    with torch.no_grad():
        embedding = sam.image_encoder(x)  # [N, 32, 6, 6], SAM's image embedding (neck output)
        block0 = sam.image_encoder.neck(blocks[0].permute(0, 3, 1, 2))
    handle.remove()
    ours = encoder(x)
    assert encoder.embed_dim == 32 and encoder.num_prefix_tokens == 1
    assert max_diff(ours.patch_grids[-1], embedding) < TOL
    assert max_diff(ours.cls, embedding.mean(dim=(2, 3))) < TOL  # CLS = mean of the neck tokens
    assert max_diff(ours.patch_mean, embedding.mean(dim=(2, 3))) < TOL
    assert max_diff(ours.patch_grids[0], block0) < TOL
    assert ours.registers.shape == (2, 0, 32)


def test_sam_runs_at_other_input_sizes_with_resampled_positions(tmp_path):
    sam = _tiny_sam()
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    encoder = ZooSliceEncoder("samvit_base_patch16", weights=tmp_path / "sam.pth", model_kwargs=SAM_SMALL)
    small = encoder(_images(2, 64, 128, seed=7))
    assert small.patch_grids[-1].shape == (2, 32, 4, 8)
    assert torch.isfinite(small.cls).all() and small.cls.std() > 0
    assert native_input_size("samvit_base_patch16") == 1024 and native_input_size("vit_base_patch16_clip_224") == 224


# ----------------------------------------------------------------------------- errors, names, contract
def test_wrong_files_raise_weights_error_naming_the_file(tmp_path):
    sam = _tiny_sam()
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    with pytest.raises(WeightsError, match="does not fit vit_base_patch16_clip_224") as info:
        ZooSliceEncoder("vit_base_patch16_clip_224", weights=tmp_path / "sam.pth", model_kwargs=CLIP_SMALL)
    assert str(tmp_path / "sam.pth") in str(info.value)
    reference, _ = _open_clip_vit()
    torch.save(reference.state_dict(), tmp_path / "clip.bin")
    with pytest.raises(WeightsError, match="shape mismatch"):
        ZooSliceEncoder("vit_base_patch16_clip_224", weights=tmp_path / "clip.bin", model_kwargs={"depth": 2})
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(WeightsError, match="open_clip_pytorch_model.bin"):
        ZooSliceEncoder("vit_base_patch16_clip_224", weights=tmp_path / "hub")
    with pytest.raises(WeightsError, match="does not exist"):
        ZooSliceEncoder("samvit_base_patch16", weights=tmp_path / "missing.pth")


def test_names_dispatch_and_unknown_names():
    names = set(zoo_encoder_names())
    assert {"samvit_base_patch16", "samvit_large_patch16", "samvit_huge_patch16", "vit_base_patch16_clip_224",
            "vit_large_patch14_clip_224", "vit_base_patch16_clip_quickgelu_224", "vit_base_patch16_224",
            "vit_large_patch16_224", "vit_huge_patch14_224", "vit_base_patch16_384"} <= names
    assert not any("dinov2" in n for n in names)
    encoder = build_slice_encoder("vit_base_patch16_clip_224", model_kwargs=CLIP_SMALL)
    assert isinstance(encoder, ZooSliceEncoder) and encoder.family == "clip" and encoder.proj_dim == 512
    assert build_slice_encoder("vit_small_patch14_dinov2", model_kwargs={"depth": 1}).__class__.__name__ == "SliceEncoder"
    with pytest.raises(ConfigError, match="zoo"):
        build_slice_encoder("not_a_model")


def test_a_new_encoder_family_is_one_registered_class(monkeypatch):
    """The registry, not an if-chain: a decorated class builds its names; the error lists every family."""
    import volumes.encoders.registry as registry
    from volumes.encoders import SliceEncoder, encoder_families, register_encoder_family

    assert [f.name for f in encoder_families()] == ["DINOv2/DINOv3 ViT", "timm CNN", "zoo model"]
    monkeypatch.setattr(registry, "_FAMILIES", list(registry._FAMILIES))

    @register_encoder_family("tiny test ViT", accepts=lambda name: name.startswith("tiny_"), example="tiny_vit",
                             listing="none")
    class TinyEncoder(SliceEncoder):
        def __init__(self, name: str, **kwargs):
            super().__init__("vit_small_patch14_dinov2", model_kwargs={"depth": 1})
            self.asked = name

    encoder = build_slice_encoder("tiny_vit")
    assert isinstance(encoder, TinyEncoder) and encoder.asked == "tiny_vit"
    with pytest.raises(ConfigError, match="a tiny test ViT .none, e.g. tiny_vit."):
        build_slice_encoder("not_a_model")
    with pytest.raises(ValueError, match="registered already"):
        register_encoder_family("tiny test ViT", accepts=bool, example="x", listing="y")(type("Other", (), {}))
    with pytest.raises(ConfigError, match="projection"):
        ZooSliceEncoder("samvit_base_patch16", model_kwargs=SAM_SMALL).projected(_images(1, 32, 32))


@pytest.mark.parametrize("name, kwargs", [("samvit_base_patch16", {**SAM_SMALL, "img_size": 96}), ("vit_base_patch16_clip_224", CLIP_SMALL)])
def test_modes_lora_targets_and_evaluation_features(name, kwargs):
    from volumes.evaluation.features import FeatureLayout, encode_for_evaluation
    from volumes.evaluation.finetune import lora_targets

    frozen = ZooSliceEncoder(name, model_kwargs=kwargs)
    assert not any(p.requires_grad for p in frozen.parameters())
    last = ZooSliceEncoder(name, model_kwargs=kwargs, mode="last_n", trainable_blocks=1)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in last.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.1", "neck" if name.startswith("sam") else "norm"}
    targets = lora_targets(frozen.backbone)
    assert {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.mlp.fc2"} <= set(targets)
    # the evaluation protocols' frozen features: cls | patch mean | last blocks' cls, one layout width
    x = _images(3, 48, 64, seed=8)
    features = encode_for_evaluation(frozen, x)
    layout = FeatureLayout.of(frozen)
    assert features.shape == (3, layout.width)
    assert max_diff(features[:, : frozen.embed_dim], frozen(x, with_grids=False).cls) < 1e-5
