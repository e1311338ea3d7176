"""The frozen-backbone + attention-head protocol, and the zoo encoders through the evaluation protocols.

Cohort: the hepatomegaly phantom task of ``PhantomConfig.classification_demo()`` (48 cases:
24 / 12 / 12), as tests/test_evaluation.py uses; tiny random-initialised encoders on 28-32 px slices.
"""

from __future__ import annotations

import json

import pytest
import torch

from volumes.errors import ConfigError
from volumes.evaluation.attention_head import AttentionHead, AttentionHeadConfig
from volumes.evaluation.data import load_evaluation_data
from volumes.encoders import EncoderConfig
from volumes.evaluation.runner import Evaluator

CLIP_TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2.0}
SAM_TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4,
            "neck_chans": 32, "img_size": 64}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def datalist(classification_cohort):
    return classification_cohort


def test_padding_is_ignored_and_slice_order_matters():
    torch.manual_seed(0)
    config = AttentionHeadConfig(pool=2, dim=32, heads=4, dropout=0.0)
    head = AttentionHead(16, 3, config).eval()
    tokens = torch.randn(1, 5 * 4, 16)  # 5 slices x 2x2 cells
    padded = torch.cat([tokens, torch.randn(1, 3 * 4, 16)], dim=1)
    mask = torch.zeros(1, 8 * 4, dtype=torch.bool)
    mask[:, 20:] = True
    with torch.no_grad():
        alone, with_padding = head(tokens), head(padded, mask)
        reversed_slices = head(tokens.reshape(1, 5, 4, 16).flip(1).reshape(1, 20, 16))
    assert alone.shape == (1, 3)
    assert (alone - with_padding).abs().max() < 1e-5
    assert (alone - reversed_slices).abs().max() > 1e-4  # sinusoidal slice positions: order is seen


def test_bad_head_settings_name_the_key():
    with pytest.raises(ConfigError, match="attention_head.dim"):
        AttentionHeadConfig(dim=30, heads=4)
    with pytest.raises(ConfigError, match="attention_head.pool"):
        AttentionHeadConfig(pool=0)


def test_attention_head_on_frozen_dinov2_tokens_beats_chance(datalist):
    data = load_evaluation_data(datalist, preset="liver", size=28)
    evaluator = Evaluator(data, EncoderConfig("vit_small_patch14_dinov2", model_kwargs={"depth": 2}), progress=False)
    result = evaluator.attention_head(AttentionHeadConfig(pool=2, dim=32, epochs=15, batch_size=8), seeds=(0,))
    run = result.runs[0]
    assert result.protocol == "attention" and result.details["tokens_per_slice"] == 4
    assert run["test_auc"] > 0.75, run
    head_params = sum(p.numel() for p in AttentionHead(384, 2, AttentionHeadConfig(pool=2, dim=32)).parameters())
    assert result.trainable_params == head_params
    assert not any(p.requires_grad for p in evaluator.encoder.parameters())  # the backbone stayed frozen


@pytest.mark.parametrize(("name", "kwargs", "size"), [("vit_base_patch16_clip_224", CLIP_TINY, 32),
                                                       ("samvit_base_patch16", SAM_TINY, 32)])
def test_zoo_encoders_through_the_frozen_protocols(datalist, name, kwargs, size):
    data = load_evaluation_data(datalist, preset="liver", size=size)
    evaluator = Evaluator(data, EncoderConfig(name, model_kwargs=kwargs), progress=False)
    knn = evaluator.knn([5])[0]
    linear = evaluator.linear(["cls", "last4_cls"])
    head = evaluator.attention_head(AttentionHeadConfig(pool=2, dim=32, epochs=8, batch_size=8))
    for result in (knn, *linear, head):
        auc = result.runs[0]["test_auc"]
        assert 0.0 <= auc <= 1.0, (result.protocol, auc)
    # the phantom's label is an organ size a random encoder's features carry; at least one frozen protocol sees it
    assert max(r.runs[0]["test_auc"] for r in (knn, *linear)) > 0.7
    assert linear[1].details["dim"] == evaluator.encoder.embed_dim * 2  # last-blocks cls of a 2-block encoder


def test_evaluate_command_runs_the_attention_head_with_a_zoo_encoder(datalist, tmp_path, capsys):
    from volumes.__main__ import main

    code = main(["evaluate", "--protocol", "knn", "attention", "--encoder", "vit_base_patch16_clip_224",
                 "--model-kwargs", json.dumps(CLIP_TINY), "--data", str(datalist), "--preset", "liver", "--size", "32",
                 "--k", "5", "--head-pool", "2", "--head-dim", "32", "--head-epochs", "3", "--no-cache",
                 "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    protocols = [r["protocol"] for r in report["results"]]
    assert protocols == ["knn", "attention"]
    assert report["results"][1]["trainable_params"] > 0
    assert "attention" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_end_to_end_methods_run_on_a_zoo_encoder(datalist, method):
    from volumes.evaluation.finetune import FinetuneConfig, _layer_id

    data = load_evaluation_data(datalist, task="slice", slice_label="liver", preset="liver", size=32)
    spec = EncoderConfig("samvit_base_patch16", model_kwargs=SAM_TINY)
    evaluator = Evaluator(data, spec, progress=False)
    result = evaluator.finetune(FinetuneConfig(method=method, epochs=1, batch_size=16), max_train=64)
    run = result.runs[0]
    assert 0.0 <= run["test_auc"] <= 1.0 and run["final_loss"] == run["final_loss"]  # finite loss
    encoder = spec.build(mode="finetune")
    if method == "lora":
        assert result.details["lora_targets"] == 6  # qkv, fc1, fc2 of both blocks
    else:  # BitFit: the biases of every block, the patch embedding and the neck's convs / norms
        biases = sum(p.numel() for n, p in encoder.backbone.named_parameters() if n.endswith("bias"))
        assert result.details["encoder_trainable_params"] == biases
    clip = EncoderConfig("vit_base_patch16_clip_224", model_kwargs=CLIP_TINY).build(mode="finetune")
    assert _layer_id(clip, "norm_pre.weight") == (0, 3) and _layer_id(clip, "blocks.1.attn.qkv.weight") == (2, 3)
