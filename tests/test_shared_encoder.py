"""Encode once, many heads: bundles sharing an encoder give the outputs of separate runs.

Two bundles (segmentation and classification) with the same random-initialised 2-block
ViT-S/14 at 56 px and the same slice preparation; a third classifier with other encoder
weights. What is tested: the shared run's label maps and probabilities equal separate
runs', and the encoder sees each slice once instead of once per bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volumes.inference import BatchInference, load_bundle
from volumes.inference.shared_encoder import EncoderSharing, encoder_identity

ROOT = Path(__file__).resolve().parents[1]
SEG = ROOT / "bundles" / "dinov2_unet_segmentation"
CLS = ROOT / "bundles" / "dinov2_slice_classification"
PREP = {"preset": "ct_three_windows", "axis": "axial", "channel_mode": "windows", "size": 56}
SMALL = {"encoder_model_kwargs": {"depth": 2}, "preprocessing_config": PREP}


def _state(bundle: Path, seed: int) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for key, value in SMALL.items():
        parser[key] = value
    torch.manual_seed(seed)
    return parser.get_parsed_content("network_def").state_dict()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_torch_thread):
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case

    base = tmp_path_factory.mktemp("shared")
    seg = _state(SEG, 0)
    encoder = {k: v for k, v in seg.items() if k.startswith("encoder.")}
    same = {**_state(CLS, 1), **encoder}          # the segmenter's encoder, its own aggregator
    other = _state(CLS, 2)                         # another random encoder
    weights = {}
    for name, state in (("seg", seg), ("cls", same), ("other", other)):
        weights[name] = base / f"{name}.pt"
        torch.save({"model": state}, weights[name])
    inputs = base / "input"
    entry = write_case(generate_phantom(3, PhantomConfig.segmentation_demo(matrix=48)), inputs, "p0", fmt="nifti")
    items = [{"image": str(inputs / entry["image"]), "case_id": "p0"}]
    return {"base": base, "weights": weights, "items": items}


def _models(setup: dict, *names: str) -> list:
    roots = {"seg": SEG, "cls": CLS, "other": CLS}
    models = []
    for name in names:
        model = load_bundle(roots[name], device="cpu", weights=setup["weights"][name], overrides=SMALL)
        if name == "other":
            model.bundle_id = "other_classifier"
        models.append(model)
    return models


class _Counter:
    """Counts the slices that go through an encoder's backbone (both timm entry points)."""

    def __init__(self, encoder):
        self.slices = 0
        backbone = encoder.backbone
        for name in ("forward_features", "forward_intermediates"):
            original = getattr(backbone, name)

            def counted(x, *args, _original=original, **kwargs):
                self.slices += len(x)
                return _original(x, *args, **kwargs)

            setattr(backbone, name, counted)


def _run(setup: dict, models: list, out: str, share: bool) -> tuple[BatchInference, Path]:
    output = setup["base"] / out
    runner = BatchInference(models, output, workers=0, figures=False, progress=False, share_encoder=share)
    summary = runner.run(setup["items"])
    assert summary.ok, (output / "failures.csv").read_text()
    return runner, output


def _outputs(output: Path) -> tuple[np.ndarray, dict]:
    label = np.asarray(nib.load(output / "p0" / "dinov2_unet_segmentation_seg.nii.gz").dataobj)
    probs = json.loads((output / "p0" / "dinov2_slice_classification_probabilities.json").read_text())
    return label, probs


def test_a_shared_encoder_runs_once_and_gives_the_outputs_of_separate_runs(setup):
    separate = _models(setup, "seg", "cls")
    counters = [_Counter(m.predictor.network.encoder) for m in separate]
    runner, out_separate = _run(setup, separate, "separate", share=False)
    assert runner.sharing.groups == []
    depth = int(nib.load(setup["items"][0]["image"]).shape[2])
    assert depth >= 16  # no padded slab: every encoded slice is a volume slice
    assert [c.slices for c in counters] == [depth, depth]  # each bundle encodes every slice

    shared = _models(setup, "seg", "cls")
    counters = [_Counter(m.predictor.network.encoder) for m in shared]
    runner, out_shared = _run(setup, shared, "shared", share=True)
    assert runner.sharing.groups == [["dinov2_unet_segmentation", "dinov2_slice_classification"]]
    assert [c.slices for c in counters] == [depth, 0]  # once, by the first bundle, for both heads
    memos = runner.sharing.last_memo
    assert memos["dinov2_unet_segmentation"].misses == 0 and memos["dinov2_slice_classification"].misses == 0
    assert memos["dinov2_slice_classification"].hits == depth

    label_a, probs_a = _outputs(out_separate)
    label_b, probs_b = _outputs(out_shared)
    assert label_a.shape == label_b.shape and len(np.unique(label_a)) > 1
    np.testing.assert_array_equal(label_a, label_b)
    for name, p in probs_a["probabilities"].items():
        assert abs(p - probs_b["probabilities"][name]) <= 1e-5
    np.testing.assert_allclose(probs_a["importance"], probs_b["importance"], atol=1e-5)


def test_the_classifier_first_still_feeds_the_segmenter_its_grids(setup):
    separate = _models(setup, "cls", "seg")
    _, out_separate = _run(setup, separate, "separate_cls_first", share=False)
    shared = _models(setup, "cls", "seg")
    runner, out_shared = _run(setup, shared, "shared_cls_first", share=True)
    assert runner.sharing.last_memo["dinov2_unet_segmentation"].misses == 0
    label_a, probs_a = _outputs(out_separate)
    label_b, probs_b = _outputs(out_shared)
    np.testing.assert_array_equal(label_a, label_b)
    for name, p in probs_a["probabilities"].items():
        assert abs(p - probs_b["probabilities"][name]) <= 1e-5


def test_encoders_with_other_weights_or_preparation_do_not_share(setup):
    seg, cls, other = _models(setup, "seg", "cls", "other")
    assert encoder_identity(seg) == encoder_identity(cls)
    assert encoder_identity(other) != encoder_identity(cls)  # another weights hash
    assert EncoderSharing([seg, other]).groups == []
    assert EncoderSharing([seg, cls, other]).groups == [["dinov2_unet_segmentation", "dinov2_slice_classification"]]
    moved = load_bundle(CLS, device="cpu", weights=setup["weights"]["cls"],
                        overrides={**SMALL, "preprocessing_config": {**PREP, "preset": "liver", "channel_mode": "repeat"}})
    assert encoder_identity(moved) != encoder_identity(cls)  # another slice preparation
    assert EncoderSharing([seg, moved]).groups == []
