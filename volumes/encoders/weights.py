"""Reading encoder weights from local files in the formats people actually have.

Supported, detected from the file itself:

* timm format: ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` with timm key names
  (what ``timm.create_model(..., pretrained=True)`` caches, or ``model.state_dict()``).
* Meta's official DINOv2 / DINOv3 checkpoints, e.g. ``dinov2_vits14_pretrain.pth``
  (``cls_token``, ``pos_embed`` with the class position, ``register_tokens`` /
  ``storage_tokens``, ``mask_token``, ``blocks.N.ls1.gamma`` ...).
* A Hugging Face transformers directory (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``) of ``Dinov2Model`` / ``Dinov2WithRegistersModel``, the format
  of ``facebook/dinov2-*`` and ``microsoft/rad-dino``. Both the transformers 4 key
  names (``attention.attention.query``) and the transformers 5 names (``q_proj``)
  are read.

Meta and Hugging Face checkpoints are renamed to Meta's layout and then handed to
timm's own ``checkpoint_filter_fn`` for the model family, so the last step of every
conversion is the one timm uses for its hub weights. Every file is read with
``weights_only=True``: a checkpoint can never run code.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from volumes.errors import WeightsError

StateDict = dict[str, torch.Tensor]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


@dataclass
class Checkpoint:
    """A state dict read from disk, with what we learned about its layout."""

    path: Path
    state: StateDict
    layout: str  # "timm" | "meta" | "hf"
    hf_config: dict = field(default_factory=dict)

    def grid_size(self, patch_size: int) -> int | None:
        """The position-embedding grid side the checkpoint was trained at (None if RoPE)."""
        if self.layout == "hf":
            return int(self.hf_config.get("image_size", 518)) // patch_size
        pos = self.state.get("pos_embed")
        if pos is None:
            return None
        n = pos.shape[1]
        side = math.isqrt(n)
        return side if side * side == n else math.isqrt(n - 1)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a weights file or Hugging Face directory into a flat state dict.

    Raises:
        WeightsError: the path is missing, unreadable, not a tensor checkpoint, or a
            Hugging Face directory of another model type.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(path, "weights file or directory does not exist")
    if path.is_dir():
        return _read_hf_directory(path)
    state = _read_tensor_file(path)
    state = _unwrap(state, path)
    layout = "meta" if ("mask_token" in state or "storage_tokens" in state or "register_tokens" in state) else "timm"
    if any(k.startswith(("encoder.layer.", "embeddings.")) for k in state):
        raise WeightsError(
            path,
            "looks like a Hugging Face transformers state dict; pass the directory that holds it "
            "together with its config.json instead of the weights file alone",
        )
    return Checkpoint(path, state, layout)


def _read_tensor_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix in _TORCH_SUFFIXES:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader failure means the same thing to the user
        raise WeightsError(path, f"cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    raise WeightsError(path, f"unknown weights format '{suffix}'; expected .safetensors, {', '.join(_TORCH_SUFFIXES)} or a Hugging Face directory")


def _unwrap(state: object, path: Path) -> StateDict:
    """Strip the containers and prefixes training scripts wrap a backbone in."""
    if not isinstance(state, dict):
        raise WeightsError(path, f"holds a {type(state).__name__}, not a state dict of tensors")
    for key in ("model_ema", "teacher", "model", "module", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    for prefix in ("module.", "backbone.", "encoder.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(path, "contains no tensors")
    return tensors


def _read_hf_directory(path: Path) -> Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsError(path, "is a directory without config.json; expected a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(config_file, f"is not valid JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
        raise WeightsError(path, f"Hugging Face model_type is {model_type!r}; expected one of {list(_HF_MODEL_TYPES)}")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            state = _read_tensor_file(path / name)
            break
    else:
        raise WeightsError(path, "has config.json but neither model.safetensors nor pytorch_model.bin")
    # A checkpoint saved from a task model (e.g. Dinov2ForImageClassification) nests the backbone.
    for prefix in ("dinov2.", "dinov2_with_registers.", "model."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return Checkpoint(path, hf_to_meta_layout(state, config), "hf", config)


# Hugging Face Dinov2 names (transformers 4 and 5) -> Meta's DINOv2 names, per layer.
_HF_LAYER_RENAMES = (
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in.", "mlp.w12."),
    ("mlp.weights_out.", "mlp.w3."),
)
_HF_QKV = {
    "attention.attention.query.": "q",
    "attention.attention.key.": "k",
    "attention.attention.value.": "v",
    "attention.q_proj.": "q",
    "attention.k_proj.": "k",
    "attention.v_proj.": "v",
}


def hf_to_meta_layout(state: StateDict, config: dict) -> StateDict:
    """Rename a Hugging Face ``Dinov2Model`` state dict to Meta's checkpoint layout.

    Query, key and value projections are concatenated into Meta's fused ``qkv``.
    """
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    layer_key = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
            continue
        match = layer_key.fullmatch(key)
        if match is None:
            continue  # pooler or task heads: not part of the backbone
        index, rest = int(match.group(1)), match.group(2)
        for hf_prefix, letter in _HF_QKV.items():
            if rest.startswith(hf_prefix):
                kind = rest[len(hf_prefix):]  # "weight" | "bias"
                qkv.setdefault((index, kind), {})[letter] = value
                break
        else:
            for old, new in _HF_LAYER_RENAMES:
                rest = rest.replace(old, new)
            out[f"blocks.{index}.{rest}"] = value
    for (index, kind), parts in qkv.items():
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def architecture_of(state: StateDict) -> str:
    """A short human description of a state dict's architecture, for error messages."""
    embed = state.get("cls_token", state.get("norm.weight"))
    dim = embed.shape[-1] if embed is not None else "?"
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    regs = state.get("reg_token", state.get("register_tokens", state.get("storage_tokens")))
    n_reg = regs.shape[1] if regs is not None else 0
    patch = state.get("patch_embed.proj.weight")
    patch_size = patch.shape[-1] if patch is not None else "?"
    return f"embed_dim {dim}, depth {depth}, patch {patch_size}, {n_reg} register tokens"


def load_checkpoint_into(model: nn.Module, checkpoint: Checkpoint, variant: str) -> None:
    """Convert ``checkpoint`` to ``model``'s timm layout and load it strictly.

    Raises:
        WeightsError: naming the file, the expected variant and the first mismatched keys.
    """
    family = sys.modules[type(model).__module__]
    expected = model.state_dict()
    mismatch = (
        f"does not fit {variant} ({architecture_of(expected)}); the checkpoint has {architecture_of(checkpoint.state)}"
    )
    try:
        state = family.checkpoint_filter_fn(dict(checkpoint.state), model)
    except Exception as exc:  # noqa: BLE001 - timm raises assorted errors on foreign layouts
        raise WeightsError(checkpoint.path, f"{mismatch} (conversion failed: {type(exc).__name__}: {exc})") from exc
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append("shape mismatch: " + "; ".join(wrong_shape[:3]))
        if missing:
            parts.append("missing keys: " + ", ".join(missing[:5]))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected[:5]))
        raise WeightsError(checkpoint.path, f"{mismatch}. " + ". ".join(parts))
    model.load_state_dict(state, strict=True)
