"""SliceClassifier: volume in, logits out, for any slice count and several planes."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from volumes.errors import ConfigError
from volumes.networks import SliceClassifier, slice_spacing_mm

ENC = {"model_kwargs": {"depth": 1}}


@pytest.mark.parametrize("aggregator", ["transformer", "gnn", "mean", "attention_mil"])
def test_padded_slices_do_not_change_the_logits(aggregator):
    torch.manual_seed(0)
    net = SliceClassifier(3, "vit_small_patch14_dinov2", aggregator, encoder_kwargs=ENC).eval()
    short = torch.randn(1, 3, 28, 42, 5)
    padded = torch.cat([short, torch.randn(1, 3, 28, 42, 4)], dim=-1)
    batch = torch.cat([padded, torch.randn(1, 3, 28, 42, 9)])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    with torch.no_grad():
        alone = net(short)
        together, importance = net.forward_with_importance(batch, mask)
    assert together.shape == (2, 3)
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    assert torch.all(importance[0, 5:] == 0) and torch.allclose(importance.sum(1), torch.ones(2), atol=1e-5)


def test_slice_positions_come_from_the_affine():
    volume = MetaTensor(torch.zeros(1, 3, 28, 28, 4), affine=torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0])))
    assert torch.allclose(slice_spacing_mm(volume, 4), torch.tensor([2.5]))
    assert torch.allclose(slice_spacing_mm(torch.zeros(2, 3, 28, 28, 4), 4), torch.ones(2))
    net = SliceClassifier(2, "vit_small_patch14_dinov2", "transformer", encoder_kwargs=ENC)
    _, positions, plane_ids = net.embed(volume)
    assert positions.tolist() == [[0.0, 2.5, 5.0, 7.5]] and plane_ids is None


def test_three_planes_form_one_token_stream():
    net = SliceClassifier(2, "vit_small_patch14_dinov2", "transformer", planes=("axial", "coronal", "sagittal"), encoder_kwargs=ENC)
    x, positions, plane_ids = net.embed(torch.randn(1, 3, 28, 42, 6))
    assert x.shape == (1, 6 + 42 + 28, 384)
    assert plane_ids[0].bincount().tolist() == [6, 42, 28]
    assert net(torch.randn(1, 3, 28, 42, 6)).shape == (1, 2)


def test_cls_and_mean_patch_features_double_the_width():
    net = SliceClassifier(2, "vit_small_patch14_dinov2", "mean", features="cls_patch_mean", encoder_kwargs=ENC)
    assert net.embed_dim == 768
    assert net.embed(torch.randn(1, 3, 28, 28, 3))[0].shape == (1, 3, 768)


@pytest.mark.parametrize(("kwargs", "key"), [({"features": "max"}, "features"), ({"planes": ("axial", "axial")}, "planes"), ({"aggregator": "rnn"}, "aggregator")])
def test_bad_arguments(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SliceClassifier(2, "vit_small_patch14_dinov2", **{"encoder_kwargs": ENC, **kwargs})
