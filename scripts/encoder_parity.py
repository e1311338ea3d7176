"""Print how far SliceEncoder is from Hugging Face transformers' DINOv2 on full-size ViT-S models.

    .venv/bin/python scripts/encoder_parity.py

Builds random-initialised (and perturbed) ``Dinov2Model`` and ``Dinov2WithRegistersModel``
ViT-S/14 at 518 px, saves them in the Hugging Face format, loads them through
SliceEncoder and prints the max abs difference of CLS and patch tokens at 518 and
224 px, and what the other position-interpolation mode would give.
"""

from __future__ import annotations

import tempfile

import torch
import transformers

from volumes.encoders import SliceEncoder


def main() -> None:
    torch.manual_seed(0)
    common = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14)
    for registers in (False, True):
        if registers:
            reference = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common))
        else:
            reference = transformers.Dinov2Model(transformers.Dinov2Config(**common))
        reference.eval()
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
        folder = tempfile.mkdtemp()
        reference.save_pretrained(folder)
        name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
        prefix = 5 if registers else 1
        encoder = SliceEncoder(name, weights=folder)
        other_mode = "bicubic" if registers else "bicubic_antialias"
        other = SliceEncoder(name, weights=folder, pos_embed_interpolation=other_mode)
        for size in (518, 224):
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                tokens = reference(pixel_values=x).last_hidden_state
            ours = encoder(x)
            patches = ours.patch_grids[-1].flatten(2).transpose(1, 2)
            print(
                f"{name} {size}px: CLS max abs diff {(ours.cls - tokens[:, 0]).abs().max():.2e}, "
                f"patch tokens {(patches - tokens[:, prefix:]).abs().max():.2e}; "
                f"with {other_mode} interpolation CLS {(other(x).cls - tokens[:, 0]).abs().max():.2e}"
            )


if __name__ == "__main__":
    main()
