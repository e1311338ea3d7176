"""The light 2D decoder (``SliceSegmenter(decoder="light")``): shapes, FLOPs, ONNX parity, learning.

The UNETR decoder's state dict is pinned here too: checkpoints trained before the light
decoder existed must load unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from volumes.decoders import DECODERS, InstanceNorm2d, LightSliceDecoder, SliceUNetDecoder
from volumes.errors import ConfigError
from volumes.networks import SliceSegmenter

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_kwargs": {"depth": 4, "embed_dim": 48, "num_heads": 2}}


def _light(num_classes=7, encoder="vit_small_patch14_dinov2", **kwargs) -> SliceSegmenter:
    torch.manual_seed(0)
    return SliceSegmenter(num_classes, encoder, decoder="light", encoder_kwargs=TINY, feature_size=8, **kwargs).eval()


@pytest.mark.parametrize(("encoder", "sizes"), [
    ("vit_small_patch14_dinov2", [(28, 28), (42, 28), (56, 70), (112, 112)]),
    ("vit_small_patch16_dinov3", [(32, 32), (48, 32), (64, 80)]),
])
def test_output_shapes_for_patch_14_and_16_and_several_sizes(encoder, sizes, one_torch_thread):
    net = _light(4, encoder)
    assert isinstance(net.decoder, LightSliceDecoder) and net.decoder.feature_size == 8
    for h, w in sizes:
        volume = torch.randn(1, 3, h, w, 3)
        with torch.no_grad():
            features, logits = net.per_slice(net._slices_of(volume))
            out = net(volume)
        assert features.shape == (3, 8, h, w) and logits.shape == (3, 4, h, w)
        assert out.shape == (1, 4, h, w, 3)
        assert features.is_contiguous(memory_format=torch.channels_last)


def test_the_decoder_alone_and_its_norms(one_torch_thread):
    torch.manual_seed(0)
    decoder = LightSliceDecoder(48, feature_size=8, patch_size=14).eval()
    grids = [torch.randn(2, 48, 4, 3) for _ in range(4)]
    with torch.no_grad():
        assert decoder(grids, torch.randn(2, 3, 56, 42)).shape == (2, 8, 56, 42)
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm)]
    assert norms and all(type(m) is InstanceNorm2d for m in norms)  # the fast, channels-last ones
    with pytest.raises(ValueError, match="4 patch grids"):
        decoder(grids[:3], torch.randn(2, 3, 56, 42))
    with pytest.raises(ValueError, match="even slice sizes"):
        decoder(grids, torch.randn(2, 3, 55, 42))
    with pytest.raises(ConfigError, match="decoder"):
        SliceSegmenter(3, decoder="segformer", encoder_kwargs=TINY)
    assert DECODERS == {"unetr": SliceUNetDecoder, "light": LightSliceDecoder}


def test_chunks_and_traces_give_the_same_logits(one_torch_thread):
    net = _light()
    volume = torch.randn(1, 3, 42, 28, 5)
    with torch.no_grad():
        whole = net(volume)
        net.chunk_size = 2
        torch.testing.assert_close(net(volume), whole, atol=1e-5, rtol=1e-5)
        traced = torch.jit.trace(net, torch.randn(1, 3, 42, 28, 3))
        for depth, width in ((3, 28), (6, 56)):
            other = torch.randn(1, 3, 42, width, depth, generator=torch.Generator().manual_seed(depth))
            torch.testing.assert_close(traced(other), net(other), atol=1e-4, rtol=1e-4)


# name:shape of every non-encoder tensor of SliceSegmenter(7) with the UNETR decoder (feature_size 16,
# refine), as before the light decoder was added: old checkpoints load only if this holds.
UNETR_STATE = (32, "7f118547dbd7b386", 1249262)


def _signature(net: SliceSegmenter) -> tuple[int, str, int]:
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("encoder.")}
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    return len(state), hashlib.sha256(text.encode()).hexdigest()[:16], sum(v.numel() for v in state.values())


def test_the_unetr_decoder_state_dict_is_unchanged_and_light_is_the_default(one_torch_thread):
    enc = {"model_kwargs": {"depth": 1}}
    unetr = SliceSegmenter(7, decoder="unetr", encoder_kwargs=enc)
    assert _signature(unetr) == UNETR_STATE
    default = SliceSegmenter(7, encoder_kwargs=enc)
    assert default.decoder_name == "light" and isinstance(default.decoder, LightSliceDecoder)
    with pytest.raises(RuntimeError, match="Missing key"):  # weights of one decoder never load into the other
        default.load_state_dict(unetr.state_dict())


def _flop_script():
    spec = importlib.util.spec_from_file_location("decoder_flops", ROOT / "scripts" / "decoder_flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_light_decoder_costs_at_most_30_percent_of_the_encoder(one_torch_thread):
    # FLOP counts (FlopCounterMode), not timings: deterministic. The bundle's default network:
    # 12-block ViT-S/14 at 112 px, feature_size 16, 7 classes; decoder + 1x1 head.
    flops = _flop_script().slice_flops(112)
    assert flops["encoder"] == pytest.approx(2.867e9, rel=0.01)
    assert flops["light"] / flops["encoder"] <= 0.30
    assert flops["unetr"] / flops["encoder"] > 0.30  # what the light decoder is for
    assert flops["light"] < flops["unetr"] / 3


def test_onnx_export_of_the_light_decoder_matches_torch(tmp_path, one_torch_thread):
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'volumes[onnx]') is not installed")
    from volumes.inference.onnx_backend import OnnxDecoder

    net = _light()
    decoder = OnnxDecoder(net.decoder, tmp_path)
    for n in (3, 7):  # the first call exports with 3 slices; 7 runs the same file
        slices = torch.randn(n, 3, 56, 42)
        with torch.no_grad():
            grids = net.encoder(slices, with_grids=True).patch_grids
            expected = net.decoder(grids, slices)
            got = decoder(grids, slices)
        assert got.shape == expected.shape == (n, 8, 56, 42)
        assert float((got - expected).abs().max()) <= 1e-4
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["decoder"]


def test_a_few_training_steps_reduce_the_loss_on_a_phantom(tmp_path, one_torch_thread):
    from monai.losses import DiceCELoss

    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case
    from volumes.segmentation import segmentation_transforms

    entry = write_case(generate_phantom(3, PhantomConfig.segmentation_demo(matrix=48)), tmp_path, "p0")
    prep = {"preset": "ct_three_windows", "axis": "axial", "channel_mode": "windows", "size": 56}
    data = segmentation_transforms(prep, 14, keep_original_label=False)(
        {"image": str(tmp_path / entry["image"]), "label": str(tmp_path / entry["label"])})
    label = data["label"].as_tensor()
    z = int(label.flatten(0, 2).amax(0).nonzero().median())  # a slab through the organs
    image, label = data["image"].as_tensor()[None, ..., z - 2 : z + 2], label[None, ..., z - 2 : z + 2]
    net = _light().train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(p.grad is None for p in net.encoder.parameters())  # frozen encoder, as in the bundle
    assert losses[-1] < 0.8 * losses[0], losses
