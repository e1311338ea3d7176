"""Both bundles' configs agree with each other, and settings saved with the weights are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from volumes.bundle import SaveSettings, check_settings, settings_path
from volumes.errors import VolumesError

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"

# Keys that may differ between train.json and inference.json, and why.
DIFFERENT_ON_PURPOSE = {
    "imports": "training imports ignite as well",
    "initialize": "training also creates the checkpoint folder",
    "run": "train vs infer",
    "network": "training builds network_def; inference loads the checkpoint into it",
    "encoder_kwargs": "training may start from encoder weights; inference takes every weight from the checkpoint",
    "preprocessing": "segmentation training adds labels, crops and augmentation",
}


@pytest.mark.parametrize("bundle", ["dinov2_slice_classification", "dinov2_unet_segmentation"])
def test_every_key_shared_by_train_and_inference_is_equal(bundle):
    train = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    inference = json.loads((BUNDLES / bundle / "configs" / "inference.json").read_text())
    shared = set(train) & set(inference)
    assert {"checkpoint_settings", "preprocessing_config", "encoder", "network_def"} <= shared
    differ = sorted(key for key in shared if train[key] != inference[key])
    assert set(differ) <= set(DIFFERENT_ON_PURPOSE), f"{bundle}: {differ} differ between train.json and inference.json"
    assert train["checkpoint_settings"] == inference["checkpoint_settings"]


def test_saved_settings_are_checked_key_by_key(tmp_path):
    checkpoint = tmp_path / "models" / "model.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    trained = {"network": {"encoder": "vit_small_patch14_dinov2", "encoder_model_kwargs": {"depth": 4}},
               "preprocessing": {"size": 112, "preset": "liver"}, "labels": ("background", "liver")}
    assert SaveSettings(checkpoint, trained).write() == settings_path(checkpoint) == tmp_path / "models" / "model.settings.json"

    check_settings(checkpoint, trained)  # the same settings (a tuple and a list are the same JSON)
    check_settings(checkpoint, {"preprocessing": {"size": 112}, "extra": 1})  # keys on one side only are not compared
    with pytest.raises(VolumesError) as error:
        check_settings(checkpoint, {**trained, "network": {"encoder": "vit_base_patch14_dinov2",
                                                           "encoder_model_kwargs": {"depth": 2}}})
    message = str(error.value)
    assert message.startswith(f"{checkpoint}: the inference config does not match")
    assert "network.encoder: trained with 'vit_small_patch14_dinov2', configured 'vit_base_patch14_dinov2'" in message
    assert "network.encoder_model_kwargs.depth: trained with 4, configured 2" in message

    other = tmp_path / "elsewhere.pt"  # no settings beside it: trained before settings were saved, not checked
    other.write_bytes(b"weights")
    check_settings(other, {"network": {"encoder": "anything"}})
    settings_path(checkpoint).write_text("{not json")
    with pytest.raises(VolumesError, match="unreadable settings file"):
        check_settings(checkpoint, trained)


def test_a_checkpoint_saved_before_the_decoder_setting_counts_as_unetr(tmp_path):
    import torch

    from volumes.bundle import load_network_weights
    from volumes.networks import SliceSegmenter

    def network(decoder):
        torch.manual_seed(0)
        return SliceSegmenter(3, decoder=decoder, feature_size=4, refine=False,
                              encoder_kwargs={"model_kwargs": {"depth": 1}})

    settings = json.loads((BUNDLES / "dinov2_unet_segmentation" / "configs" / "train.json").read_text())
    assert settings["decoder"] in ("unetr", "light")  # built by network_def and saved with the weights
    assert settings["network_def"]["decoder"] == settings["checkpoint_settings"]["network"]["decoder"] == "@decoder"
    configured = {"network": {"encoder": "vit_small_patch14_dinov2", "feature_size": 4}}
    old = tmp_path / "old" / "model.pt"  # settings written before "decoder" existed: UNETR weights
    old.parent.mkdir()
    torch.save({"model": network("unetr").state_dict()}, old)
    SaveSettings(old, configured).write()
    assert "decoder" not in json.loads(settings_path(old).read_text())["network"]
    load_network_weights(network("unetr"), old, settings={"network": {**configured["network"], "decoder": "unetr"}})
    load_network_weights(network("unetr"), old, settings=configured)  # a config without the key is not compared
    with pytest.raises(VolumesError, match="network.decoder: trained with 'unetr', configured 'light'"):
        load_network_weights(network("light"), old, settings={"network": {**configured["network"], "decoder": "light"}})

    new = tmp_path / "new" / "model.pt"  # trained with the light decoder: refused by a unetr config
    new.parent.mkdir()
    torch.save({"model": network("light").state_dict()}, new)
    SaveSettings(new, {"network": {**configured["network"], "decoder": "light"}}).write()
    load_network_weights(network("light"), new, settings={"network": {**configured["network"], "decoder": "light"}})
    with pytest.raises(VolumesError, match="network.decoder: trained with 'light', configured 'unetr'"):
        load_network_weights(network("unetr"), new, settings={"network": {**configured["network"], "decoder": "unetr"}})

    bare = tmp_path / "bare.pt"  # no settings file at all (trained elsewhere): the state dict's keys tell
    torch.save({"model": network("unetr").state_dict()}, bare)
    load_network_weights(network("unetr"), bare)
    with pytest.raises(VolumesError, match="weights are of the 'unetr' decoder, the config builds 'light'"):
        load_network_weights(network("light"), bare, settings={"network": {"decoder": "light"}})


@pytest.mark.parametrize("bundle", ["dinov2_slice_classification", "dinov2_unet_segmentation"])
def test_tracking_mlflow_patches_the_training_and_validation_handlers(bundle, tmp_path):
    """``monai.bundle run --tracking mlflow`` appends MONAI's MLFlowHandler to ``train#handlers`` and
    ``validate#handlers``, which it can only do to lists (an expression string made it fail)."""
    from monai.bundle import ConfigParser, ConfigWorkflow
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    configs = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([configs / "train.json"])
    parser["bundle_root"] = str(tmp_path)
    ConfigWorkflow.patch_bundle_tracking(parser, DEFAULT_MLFLOW_SETTINGS)
    for section in ("train#handlers", "validate#handlers"):
        handlers = parser[section]
        assert isinstance(handlers, list) and handlers[-1]["_target_"] == "MLFlowHandler", section
    # the multi-GPU config hands the same lists to rank 0
    multi = json.loads((configs / "multi_gpu_train.json").read_text())
    assert "@train#handlers" in multi["train#trainer#train_handlers"]
    assert "@validate#handlers" in multi["validate#evaluator#val_handlers"]
    assert list(tmp_path.glob("eval/config_*.json"))  # the executed config, logged as MLflow's artifact
