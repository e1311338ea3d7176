"""Weight formats of the foundation-model zoo: SAM / MedSAM, OpenCLIP / OpenAI CLIP / BiomedCLIP, BLIP.

Each format is detected from the file (or directory) itself and read into a
:class:`ZooCheckpoint`: the state dict, plus what the file says about the architecture
the timm model must be built with (position grid, projection width, LayerNorm epsilon,
activation), so that loading never resamples and a wrong file fails loudly.

============================  =========================================================
format                        what it looks like
============================  =========================================================
Meta SAM / MedSAM             ``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth``: a whole
                              ``Sam`` state dict (``image_encoder.*``, ``prompt_encoder.*``,
                              ``mask_decoder.*``), optionally inside ``{"model": ...}``
                              (MedSAM's training checkpoints). Only ``image_encoder.*`` is used.
OpenCLIP / OpenAI CLIP        ``open_clip_pytorch_model.bin`` / ``.safetensors`` or a
                              ``state_dict()`` of OpenAI's ``clip`` model: ``visual.conv1``,
                              ``visual.class_embedding``, ``visual.positional_embedding``,
                              ``visual.transformer.resblocks.N.attn.in_proj_weight`` ...,
                              ``visual.ln_post``, ``visual.proj``; text-tower keys are ignored.
OpenCLIP hf-hub directory     ``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` (or
                              ``open_clip_model.safetensors``): BiomedCLIP's layout, a timm
                              trunk (``visual.trunk.*``) and ``visual.head.proj.weight``.
BLIP (transformers)           a directory with ``config.json`` of ``BlipVisionModel``
                              (``model_type`` ``blip_vision_model``) or ``BlipForImageTextRetrieval``
                              (``blip``): ``embeddings.class_embedding``, ``encoder.layers.N.self_attn.qkv``,
                              ``post_layernorm``; the retrieval model's ``vision_proj`` is the projection.
============================  =========================================================

OpenAI's released ``ViT-B-16.pt`` files are TorchScript archives: they hold code, which
this package never runs, so they are refused with a message saying how to turn them into
a plain state dict. Everything else is read with ``weights_only=True``.

The timm names are produced by timm's own ``checkpoint_filter_fn`` of the model family at
load time (:func:`volumes.encoders.weights.load_checkpoint_into`); only BLIP, which timm does
not know, is renamed here.
"""

from __future__ import annotations

import json
import re
import zipfile
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from volumes.encoders.weights import Checkpoint, StateDict, _read_tensor_file, _unwrap, read_checkpoint
from volumes.errors import WeightsError

__all__ = ["ZooCheckpoint", "blip_to_timm", "read_zoo_checkpoint"]

_BLIP_TYPES = ("blip", "blip_vision_model")
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors")


@dataclass
class ZooCheckpoint(Checkpoint):
    """A :class:`Checkpoint` with the architecture hints its file carries.

    Attributes:
        grid: side of the position grid the weights were trained at (patches), or ``None``.
        proj_dim: width of the image-text projection (CLIP ``visual.proj``, BLIP ``vision_proj``), 0 if none.
        model_kwargs: timm keyword arguments the file implies (``act_layer``, ``norm_layer``).
    """

    grid: int | None = None
    proj_dim: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(re.fullmatch(r"[^/]+/(code/.*|constants\.pkl)", name) for name in archive.namelist())


def read_zoo_checkpoint(path: str | Path) -> ZooCheckpoint:
    """Read any zoo format (see the module docstring) or a timm / Meta DINOv2 file.

    Raises:
        WeightsError: missing or unreadable path, TorchScript archive, or a directory of
            another model type; the message names the path and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(path, "weights file or directory does not exist")
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return _read_open_clip_directory(path)
        config = _json(path / "config.json") if (path / "config.json").is_file() else {}
        if config.get("model_type") in _BLIP_TYPES:
            return _read_blip_directory(path, config)
        base = read_checkpoint(path)  # Hugging Face Dinov2 (RAD-DINO) or its clear WeightsError
        return ZooCheckpoint(base.path, base.state, base.layout, base.hf_config)
    if path.suffix.lower() in (".pt", ".pth", ".bin") and _is_torchscript(path):
        raise WeightsError(
            path,
            "is a TorchScript archive (as OpenAI's released CLIP .pt files); it holds code, which volumes never "
            "runs. Convert it once where you trust it: torch.save(torch.jit.load(PATH).state_dict(), 'clip.pth')",
        )
    state = _unwrap(_read_tensor_file(path), path)
    return from_state(path, state)


def from_state(path: Path, state: StateDict, model_kwargs: dict[str, Any] | None = None) -> ZooCheckpoint:
    """Classify a flat state dict by its keys and record the architecture hints."""
    kwargs = dict(model_kwargs or {})
    if "image_encoder.pos_embed" in state or "image_encoder.patch_embed.proj.weight" in state:
        pos = state.get("image_encoder.pos_embed")  # SAM: [1, grid, grid, E], class-free
        return ZooCheckpoint(path, state, "sam", grid=int(pos.shape[1]) if pos is not None else None,
                             model_kwargs=kwargs)
    if "visual.class_embedding" in state:
        pos = state["visual.positional_embedding"]  # [1 + grid^2, E]
        proj = state.get("visual.proj")  # [E, P]
        return ZooCheckpoint(path, state, "open_clip", grid=_grid(pos.shape[0] - 1),
                             proj_dim=int(proj.shape[1]) if proj is not None else 0, model_kwargs=kwargs)
    if "visual.trunk.pos_embed" in state:
        pos = state["visual.trunk.pos_embed"]  # timm trunk with a class token: [1, 1 + grid^2, E]
        proj = state.get("visual.head.proj.weight")  # [P, E]
        if any(k.startswith("visual.head.") and k != "visual.head.proj.weight" for k in state):
            raise WeightsError(path, "OpenCLIP timm tower with an MLP or attention-pool head; only a linear "
                                     "projection (timm_proj 'linear', as BiomedCLIP) is supported")
        return ZooCheckpoint(path, state, "open_clip_timm", grid=_grid(pos.shape[1] - 1),
                             proj_dim=int(proj.shape[0]) if proj is not None else 0, model_kwargs=kwargs)
    if any(k.endswith("embeddings.class_embedding") for k in state):
        converted = blip_to_timm(state)
        kwargs.setdefault("norm_layer", partial(torch.nn.LayerNorm, eps=1e-5))  # BlipVisionConfig's default
        return ZooCheckpoint(path, converted, "blip", grid=_grid(converted["pos_embed"].shape[1] - 1),
                             proj_dim=int(converted["head.weight"].shape[0]) if "head.weight" in converted else 0,
                             model_kwargs=kwargs)
    if any(k.startswith(("encoder.layer.", "embeddings.")) for k in state):
        raise WeightsError(path, "looks like a Hugging Face transformers state dict; pass the directory that holds "
                                 "it together with its config.json instead of the weights file alone")
    # timm or Meta DINOv2 layout, as volumes.encoders.weights.read_checkpoint classifies it
    meta = any(k in state for k in ("mask_token", "storage_tokens", "register_tokens"))
    base = Checkpoint(path, state, "meta" if meta else "timm")
    pos = state.get("pos_embed")
    return ZooCheckpoint(base.path, state, base.layout, grid=base.grid_size(1) if pos is not None and pos.ndim == 3
                         else None, proj_dim=int(state["head.weight"].shape[0]) if "head.weight" in state else 0,
                         model_kwargs=kwargs)


def _grid(patches: int) -> int | None:
    side = int(round(patches ** 0.5))
    return side if side * side == patches else None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(path, f"is not readable JSON ({exc})") from exc


def _read_open_clip_directory(path: Path) -> ZooCheckpoint:
    config = _json(path / "open_clip_config.json")
    vision = dict(config.get("model_cfg", {}).get("vision_cfg", {}))
    for name in _OPEN_CLIP_FILES:
        if (path / name).is_file():
            state = _unwrap(_read_tensor_file(path / name), path / name)
            break
    else:
        raise WeightsError(path, f"has open_clip_config.json but none of {list(_OPEN_CLIP_FILES)}")
    kwargs: dict[str, Any] = {}
    if config.get("model_cfg", {}).get("quick_gelu") and "visual.class_embedding" in state:
        kwargs["act_layer"] = "quick_gelu"  # the config says so; a bare OpenAI file cannot (use *_quickgelu_* names)
    checkpoint = from_state(path, state, kwargs)
    checkpoint.hf_config = {"open_clip": config, "timm_model_name": vision.get("timm_model_name")}
    return checkpoint


def _read_blip_directory(path: Path, config: dict) -> ZooCheckpoint:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            state = _unwrap(_read_tensor_file(path / name), path / name)
            break
    else:
        raise WeightsError(path, "has a BLIP config.json but neither model.safetensors nor pytorch_model.bin")
    vision = config.get("vision_config", config) if config.get("model_type") == "blip" else config
    kwargs: dict[str, Any] = {}
    eps = float(vision.get("layer_norm_eps", 1e-5))
    kwargs["norm_layer"] = partial(torch.nn.LayerNorm, eps=eps)
    act = vision.get("hidden_act", "gelu")
    if act not in ("gelu", "quick_gelu"):
        raise WeightsError(path, f"BLIP vision hidden_act {act!r} is not supported (gelu or quick_gelu)")
    if act == "quick_gelu":
        kwargs["act_layer"] = "quick_gelu"
    checkpoint = from_state(path, state, kwargs)
    if checkpoint.layout != "blip":
        raise WeightsError(path, "config.json says BLIP but the weights hold no BLIP vision tower "
                                 "(embeddings.class_embedding)")
    checkpoint.hf_config = config
    return checkpoint


_BLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_BLIP_RENAMES = (
    ("self_attn.qkv.", "attn.qkv."),
    ("self_attn.projection.", "attn.proj."),
    ("layer_norm1.", "norm1."),
    ("layer_norm2.", "norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)


def blip_to_timm(state: StateDict) -> StateDict:
    """Rename a transformers BLIP vision tower (alone or inside a BLIP model) to timm ViT keys.

    ``vision_proj`` (BlipForImageTextRetrieval's image-text projection) becomes timm's ``head``.
    Text encoder, text projection and ITM head are dropped.
    """
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    simple = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    out: StateDict = {}
    for key, value in state.items():
        if key in ("vision_proj.weight", "vision_proj.bias"):
            out["head." + key.split(".")[1]] = value
            continue
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key in simple:
            out[simple[key]] = value
            continue
        match = _BLIP_LAYER.fullmatch(key)
        if match is None:
            continue
        rest = match.group(2)
        for old, new in _BLIP_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[f"blocks.{match.group(1)}.{rest}"] = value
    return out
