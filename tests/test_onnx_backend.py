"""``--backend onnxruntime``: the encoder and the 2D decoder through ONNX Runtime match torch.

Tiny random-initialised networks (a 2-block ViT-S/14 at 56 px). Skips when onnxruntime
is not installed (the ``onnx`` extra); the error for a missing runtime is tested anyway.
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volumes.errors import VolumesError

ROOT = Path(__file__).resolve().parents[1]
SEG = ROOT / "bundles" / "dinov2_unet_segmentation"
CLS = ROOT / "bundles" / "dinov2_slice_classification"
SMALL = {"encoder_model_kwargs": {"depth": 2}, "preprocessing_config#size": 56}


@pytest.mark.parametrize("runtime, extra", [("onnxruntime", "onnx"), ("openvino", "openvino")])
def test_a_missing_runtime_names_the_extra(monkeypatch, runtime, extra):
    from volumes.inference import onnx_backend

    require = getattr(onnx_backend, f"require_{runtime}")
    real_import = builtins.__import__

    def without_runtime(name, *args, **kwargs):
        if name == runtime:
            raise ImportError(f"No module named '{runtime}'", name=runtime)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_runtime)
    with pytest.raises(VolumesError, match=rf"{runtime} is not installed.*pip install 'volumes\[{extra}\]'"):
        require()


def test_unknown_backends_say_so():
    from volumes.inference.onnx_backend import use_backend

    with pytest.raises(VolumesError, match="choose one of"):
        use_backend(object(), "tensorrt")


def test_openvino_runs_the_same_exports_as_onnxruntime_within_1e4(tmp_path, one_torch_thread):
    pytest.importorskip("openvino", reason="the openvino extra (pip install 'volumes[openvino]') is not installed")
    from volumes.inference.onnx_backend import OnnxDecoder, OnnxSliceEncoder
    from volumes.networks import SliceSegmenter

    torch.manual_seed(0)
    net = SliceSegmenter(7, "vit_small_patch14_dinov2", encoder_kwargs={"model_kwargs": {"depth": 2}}).eval()
    encoder = OnnxSliceEncoder(net.encoder, tmp_path, runtime="openvino")
    decoder = OnnxDecoder(net.decoder, tmp_path, runtime="openvino")
    assert encoder.backend == "openvino"
    for n in (2, 9):  # dynamic slice count
        slices = torch.randn(n, 3, 56, 56)
        with torch.no_grad():
            ref = net.encoder(slices, with_grids=True)
            got = encoder(slices, with_grids=True)
            for a, b in zip((got.cls, got.patch_mean, *got.patch_grids), (ref.cls, ref.patch_mean, *ref.patch_grids)):
                assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-4
            features, expected = decoder(ref.patch_grids, slices), net.decoder(ref.patch_grids, slices)
        assert features.shape == expected.shape and float((features - expected).abs().max()) <= 1e-4
    with pytest.raises(VolumesError, match="int8 quantisation is done with onnxruntime only"):
        OnnxSliceEncoder(net.encoder, tmp_path, quantize=True, runtime="openvino")


def test_encoder_and_decoder_match_torch_for_any_slice_count(tmp_path, one_torch_thread):
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'volumes[onnx]') is not installed")
    from volumes.inference.onnx_backend import OPSET, OnnxDecoder, OnnxSliceEncoder
    from volumes.networks import SliceSegmenter

    torch.manual_seed(0)
    net = SliceSegmenter(7, "vit_small_patch14_dinov2", encoder_kwargs={"model_kwargs": {"depth": 2}}).eval()
    encoder = OnnxSliceEncoder(net.encoder, tmp_path)
    decoder = OnnxDecoder(net.decoder, tmp_path)
    for n in (3, 11):  # the first call exports with 3 slices; 11 runs the same file
        slices = torch.randn(n, 3, 56, 56)
        with torch.no_grad():
            ref = net.encoder(slices, with_grids=True)
            got = encoder(slices, with_grids=True)
            for a, b in zip((got.cls, got.patch_mean, *got.patch_grids), (ref.cls, ref.patch_mean, *ref.patch_grids)):
                assert a.shape == b.shape
                assert float((a - b).abs().max()) <= 1e-4
            features = decoder(ref.patch_grids, slices)
            expected = net.decoder(ref.patch_grids, slices)
        assert features.shape == expected.shape == (n, 16, 56, 56)
        assert float((features - expected).abs().max()) <= 1e-4
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("decoder-") and files[1].startswith("encoder-")
    import onnx

    model = onnx.load(str(tmp_path / files[1]))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "slices"  # dynamic slice axis


def _weights(folder: Path) -> list[Path]:
    from monai.bundle import ConfigParser

    paths = []
    for bundle in (SEG, CLS):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        for key, value in SMALL.items():
            parser[key] = value
        torch.manual_seed(0)
        paths.append(folder / bundle.name / "model.pt")
        paths[-1].parent.mkdir()
        torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, paths[-1])
    return paths


def _infer(inputs: Path, output: Path, weights: list[Path], *extra: str) -> int:
    from volumes.cli import main

    args = ["infer", "--input", str(inputs), "--output", str(output), "--no-progress", "--no-figures",
            "--device", "cpu"]
    for bundle, w in zip((SEG, CLS), weights):
        args += ["--bundle", str(bundle), "--weights", str(w)]
    for key, value in SMALL.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return main(args + list(extra))


def test_volumes_infer_onnxruntime_gives_the_torch_label_maps(tmp_path, one_torch_thread):
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'volumes[onnx]') is not installed")
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case
    from volumes.segmentation import per_case_metrics

    config = PhantomConfig.segmentation_demo(matrix=48)
    entry = write_case(generate_phantom(5, config), tmp_path / "staging", "p0", fmt="nifti")
    (tmp_path / "input").mkdir()
    shutil.copy(tmp_path / "staging" / entry["image"], tmp_path / "input" / "p0.nii.gz")
    weights = _weights(tmp_path)
    outputs = {}
    backends = ["torch", "onnxruntime", "onnxruntime-int8"]
    try:
        import openvino  # noqa: F401

        backends.append("openvino")
    except ImportError:
        pass
    for backend in backends:
        assert _infer(tmp_path / "input", tmp_path / backend, weights, "--backend", backend) == 0
        case = tmp_path / backend / "p0"
        outputs[backend] = (np.asarray(nib.load(case / "dinov2_unet_segmentation_seg.nii.gz").dataobj),
                            json.loads((case / "dinov2_slice_classification_probabilities.json").read_text()))
    ref_label, ref_probs = outputs["torch"]
    label, probs = outputs["onnxruntime"]
    assert len(np.unique(ref_label)) > 1 and label.shape == ref_label.shape
    # A random-initialised network has near-tied logits at many voxels, so 1e-5 of feature
    # rounding flips a few (2 of 129024 here); the features themselves match to 1e-4 (above).
    assert float(np.mean(label != ref_label)) <= 1e-4
    for name, p in ref_probs["probabilities"].items():
        assert abs(p - probs["probabilities"][name]) <= 1e-4
    if "openvino" in outputs:  # the same exports compiled by OpenVINO
        ov_label, ov_probs = outputs["openvino"]
        assert float(np.mean(ov_label != ref_label)) <= 1e-4
        for name, p in ref_probs["probabilities"].items():
            assert abs(p - ov_probs["probabilities"][name]) <= 1e-4
    # the exports are cached beside the weights: encoder + decoder (fp32 and int8 encoder) and one classifier encoder
    assert len(list((weights[0].parent / "onnx").glob("*.onnx"))) == 3
    assert len(list((weights[1].parent / "onnx").glob("*.onnx"))) == 2
    # int8: the label maps agree with fp32 torch on most voxels (Dice of the random network's own map)
    int8_label, _ = outputs["onnxruntime-int8"]
    dice = per_case_metrics(int8_label, ref_label, [1, 1, 1], ["background", *map(str, range(1, 7))])
    present = [v for k, v in dice.items() if k.startswith("dice_") and not np.isnan(v)]
    assert present and float(np.mean(present)) > 0.8, dice
    records = [json.loads(line) for line in (tmp_path / "onnxruntime" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["case_id"] == "p0" for r in records)
