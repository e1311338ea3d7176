"""Helpers of the parity tests (imported by tests/test_encoder_parity.py and tests/test_encoder_zoo.py)."""

from __future__ import annotations

import torch

TOL = 1e-4


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Add seeded noise to every parameter, so zero-initialised parts (biases, LayerScale) are tested too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two tensors of one shape."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
