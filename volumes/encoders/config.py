"""One encoder configuration for every caller: ``volumes embed``, the evaluation protocols, the bundles."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["EncoderConfig"]


@dataclass
class EncoderConfig:
    """How to build a slice encoder (:func:`volumes.encoders.build_slice_encoder`).

    Attributes:
        name: timm DINOv2/DINOv3 ViT or CNN name.
        weights: local weights file or Hugging Face folder; ``None`` with ``pretrained=False``
            means random initialisation.
        pretrained: timm hub weights (needs network access).
        model_kwargs: passed to ``timm.create_model`` (e.g. ``{"depth": 4}``).
        chunk_size: slices per encoder pass (bounds memory).
        mode: ``frozen``, ``finetune`` or ``last_n``.
        seed: torch seed of a random initialisation, so every build gives the same encoder;
            ``None`` leaves torch's global generator as it is.
        options: any other keyword of the encoder class (``layers``, ``autocast``...).
    """

    name: str = "vit_small_patch14_dinov2"
    weights: str | None = None
    pretrained: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    chunk_size: int = 32
    mode: str = "frozen"
    seed: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        return self.weights is None and not self.pretrained

    def kwargs(self) -> dict[str, Any]:
        """The encoder class's keyword arguments (everything but ``name`` and ``seed``)."""
        return {"weights": self.weights, "pretrained": self.pretrained, "mode": self.mode,
                "chunk_size": self.chunk_size, "model_kwargs": dict(self.model_kwargs) or None, **self.options}

    def build(self, **overrides: Any):
        """A fresh encoder; with a ``seed`` and random weights, the same one every time."""
        import torch

        from volumes.encoders.registry import build_slice_encoder

        kwargs = {**self.kwargs(), **overrides}
        if self.seed is None:
            return build_slice_encoder(self.name, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return build_slice_encoder(self.name, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
