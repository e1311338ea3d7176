"""Evaluation protocols (volumes.evaluation, ``volumes evaluate``) and the CNN encoder adapter.

The cohort is the hepatomegaly phantom task of ``PhantomConfig.classification_demo()``
(48 cases: 24 training, 12 validation, 12 test), whose volume label a random-initialised
ViT's slice features separate; the slice task labels each slice by whether it shows the
liver. The encoder is a random-initialised DINOv2 ViT-S/14 with 2 blocks on 28 px slices
(2 x 2 patches), so that everything here runs on a CPU in about a minute.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from volumes.data.phantoms import PhantomConfig, write_cohort
from volumes.errors import ConfigError, VolumesError, WeightsError
from volumes.evaluation.data import load_evaluation_data
from volumes.evaluation.features import FeatureLayout, evaluation_embedder, encode_deduplicated, encode_for_evaluation
from volumes.evaluation.fewshot import fewshot_indices
from volumes.evaluation.finetune import (
    EndToEndClassifier,
    FinetuneConfig,
    Sample,
    _param_groups,
    prepare_encoder,
    snapshot,
    train_end_to_end,
)
from volumes.evaluation.knn import knn_scores
from volumes.evaluation.linear import fit_logistic
from volumes.metrics import roc_auc
from volumes.encoders import EncoderConfig
from volumes.evaluation.runner import Evaluator

TINY = {"depth": 2}
VIT = EncoderConfig("vit_small_patch14_dinov2", model_kwargs=TINY)
SIZE = 28


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(classification_cohort, tmp_path_factory):
    return {"datalist": classification_cohort, "cache": tmp_path_factory.mktemp("evaluation") / "cache"}


@pytest.fixture(scope="module")
def volume_eval(cohort):
    data = load_evaluation_data(cohort["datalist"], preset="liver", size=SIZE)
    evaluator = Evaluator(data, VIT, cache_dir=cohort["cache"], progress=False)
    evaluator.embed()
    return evaluator


@pytest.fixture(scope="module")
def slice_eval(cohort, volume_eval):  # after volume_eval: the per-volume embeddings come from the cache
    data = load_evaluation_data(cohort["datalist"], task="slice", slice_label="liver", preset="liver", size=SIZE)
    evaluator = Evaluator(data, VIT, cache_dir=cohort["cache"], progress=False)
    evaluator.embed()
    return evaluator


# ------------------------------------------------------------------ data
def test_cohort_splits_and_slice_labels(volume_eval, slice_eval):
    assert volume_eval.data.counts() == {"train": 24, "val": 12, "test": 12}
    for split in ("train", "val", "test"):
        labels = volume_eval.data.labels(split)
        assert 0 < sum(labels) < len(labels)
    # the slice task reuses the volume task's cached embeddings: nothing encoded again
    assert slice_eval.embed_runs[0]["encoded_slices"] == 0 and slice_eval.embed_runs[0]["cache_hits"] == 48
    rows = slice_eval.features("cls")
    assert rows["train"].x.shape[0] == sum(len(item["slice_labels"]) for item in slice_eval.data.splits["train"])
    assert 0.3 < rows["train"].y.mean() < 0.95  # both "liver" and "no liver" slices
    assert set(rows["test"].groups).isdisjoint(rows["train"].groups)  # splits by case


def test_lesion_slice_labels_come_from_the_phantom_cases(tmp_path):
    datalist = write_cohort(tmp_path, 4, seed=1, config=PhantomConfig(task="lesion", prevalence=1.0),
                            splits=(0.5, 0.25, 0.25), progress=False)
    data = load_evaluation_data(datalist, task="slice", slice_label="lesion", size=SIZE)
    cases = json.loads((tmp_path / "cases.json").read_text())
    for item in data.splits["train"]:
        lesion = cases[item["case_id"]]["lesion"]["slices"]
        assert [d for d, v in enumerate(item["slice_labels"]) if v] == lesion
        keep = np.asarray(item["slice_keep"])
        assert keep[lesion].all() and 0 < keep.sum() < len(keep)  # only liver slices take part


def test_bad_data_is_a_clear_error(cohort, tmp_path):
    with pytest.raises(ConfigError, match="task='organ'"):
        load_evaluation_data(cohort["datalist"], task="organ")
    with pytest.raises(ConfigError, match="slice_label='brain'"):
        load_evaluation_data(cohort["datalist"], task="slice", slice_label="brain")
    with pytest.raises(VolumesError, match="no such file"):
        load_evaluation_data(tmp_path / "missing.json")
    (tmp_path / "no_test.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "class_label": 0}]}))
    with pytest.raises(VolumesError, match="'training' and 'test'"):
        load_evaluation_data(tmp_path / "no_test.json")


# ------------------------------------------------------------------ frozen protocols
def test_knn_beats_chance(volume_eval, slice_eval):
    volume = {r.variant: r.runs[0] for r in volume_eval.knn((10, 20))}
    print("kNN volume:", volume)
    for run in volume.values():
        assert run["test_auc"] >= 0.85
    slices = {r.variant: r.runs[0] for r in slice_eval.knn((10, 20))}
    print("kNN slice:", slices)
    for run in slices.values():
        assert run["test_auc"] >= 0.95 and run["test_acc"] >= 0.9


def test_fewshot_beats_chance_with_distinct_draws(volume_eval):
    results = {r.variant: r for r in volume_eval.fewshot((1, 4), draws=3)}
    four = results["n=4"]
    print("few-shot:", {k: r.stat("test_auc") for k, r in results.items()})
    assert len(four.runs) == 3 and four.stat("test_auc")[0] >= 0.85
    draws = [tuple(run["rows"]) for run in four.runs]
    assert len(set(draws)) == 3 and all(len(rows) == 8 for rows in draws)
    assert four.trainable_params == 384 * 2 + 2


def test_linear_probe_on_each_feature_kind(volume_eval):
    results = {r.variant: r for r in volume_eval.linear()}
    assert set(results) == {"cls", "cls_patch_mean", "last4_cls"}
    dims = {"cls": 384, "cls_patch_mean": 768, "last4_cls": 768}  # 2 blocks: both blocks' class tokens
    for kind, result in results.items():
        run = result.runs[0]
        print(f"linear {kind}: test AUC {run['test_auc']:.3f}, ACC {run['test_acc']:.3f}, l2 {result.details['l2']}")
        assert run["test_auc"] >= 0.9 and run["test_acc"] >= 0.75
        assert result.details["dim"] == dims[kind] and result.trainable_params == dims[kind] * 2 + 2
        assert result.details["l2"] in [row["l2"] for row in result.details["sweep"]]
        # calibration chosen on the validation split (and why); only Platt's intercept can move the accuracy
        assert run["calibration"] in ("none", "temperature scaling", "Platt scaling") and run["calibration_reason"]
        assert run["temperature"] > 0
        if run["calibration"] != "Platt scaling":
            assert run["test_acc_calibrated"] == pytest.approx(run["test_acc"])
        for key in ("test_ece", "test_ece_calibrated"):
            assert 0.0 <= run[key] <= 1.0
        for key in ("test_brier", "test_brier_calibrated"):
            assert 0.0 <= run[key] <= 2.0


def test_fewshot_sampler_is_stratified_and_reproducible():
    labels = np.array([0] * 30 + [1] * 7 + [2] * 12)
    for n in (1, 2, 4, 7):
        rows = fewshot_indices(labels, n, seed=3)
        assert np.bincount(labels[rows]).tolist() == [n, n, n]
        assert len(set(rows.tolist())) == 3 * n
        np.testing.assert_array_equal(rows, fewshot_indices(labels, n, seed=3))
    draws = {tuple(fewshot_indices(labels, 4, seed=s)) for s in range(5)}
    assert len(draws) == 5
    with pytest.raises(ConfigError, match="class 1 has 7"):
        fewshot_indices(labels, 8, seed=0)
    with pytest.raises(ConfigError, match="shots"):
        fewshot_indices(labels, 0, seed=0)


def test_knn_votes_by_hand():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    query = np.array([[1.0, 0.2]])
    scores = knn_scores(train, labels, query, k=3, num_classes=2, temperature=0.5)
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    sims = unit @ (query[0] / np.linalg.norm(query[0]))
    top = np.argsort(-sims)[:3]
    votes = np.zeros(2)
    for i in top:
        votes[labels[i]] += np.exp(sims[i] / 0.5)
    np.testing.assert_allclose(scores[0], votes / votes.sum(), rtol=1e-5)
    with pytest.raises(ConfigError, match="k=0"):
        knn_scores(train, labels, query, k=0, num_classes=2)


def test_auc_and_logistic_regression_match_scikit_learn():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # ties
    labels = rng.integers(0, 2, 300)
    assert roc_auc(np.stack([-scores, scores], 1), labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    x = rng.normal(size=(200, 10))
    y = rng.integers(0, 3, 200)
    x[:, 0] += y
    ours = fit_logistic(x, y, num_classes=3, l2=0.01).predict_proba(x)
    reference = LogisticRegression(C=1 / (0.01 * 200), tol=1e-10, max_iter=10000).fit(x, y).predict_proba(x)
    assert sklearn.__version__ and np.abs(ours - reference).max() < 1e-4


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", ["finetune", "lora", "bitfit"])
def test_end_to_end_on_slices_beats_chance(slice_eval, method):
    result = slice_eval.finetune(FinetuneConfig(method=method, epochs=2, batch_size=16), seeds=[0], max_train=128)
    run = result.runs[0]
    print(f"{method} (slices): test AUC {run['test_auc']:.3f}, ACC {run['test_acc']:.3f}, "
          f"{result.trainable_params} trainable, {result.seconds:.1f} s")
    assert run["test_auc"] >= 0.9
    assert result.details["train_samples"] == 128
    # depth-2 ViT-S/14: everything; rank-8 A and B of qkv (384 -> 1152), fc1 (384 -> 1536), fc2 (1536 -> 384)
    # in 2 blocks; the biases of 2 blocks (4224 each) + patch embedding + final norm (384 each)
    expected_encoder = {"finetune": 4_303_872, "lora": 2 * 8 * (1536 + 1920 + 1920), "bitfit": 2 * 4224 + 768}[method]
    assert result.details["encoder_trainable_params"] == expected_encoder
    assert result.trainable_params == expected_encoder + 384 * 2 + 2  # + the linear head


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "lora", "bitfit"])
def test_end_to_end_on_volumes_beats_chance(volume_eval, method):
    result = volume_eval.finetune(FinetuneConfig(method=method, epochs=3, batch_size=4), seeds=[0])
    run = result.runs[0]
    print(f"{method} (volumes): val AUC {run['val_auc']:.3f} (epoch {run['best_epoch']}), "
          f"test AUC {run['test_auc']:.3f}, {result.seconds:.1f} s")
    assert run["test_auc"] >= 0.75 and run["val_auc"] >= 0.75


def _random_samples(n: int, seed: int = 0) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 2
        image = torch.randn(3, 28, 28, 3, generator=generator) + 0.5 * label
        out.append(Sample(image, label, torch.arange(3.0)))
    return out


def _train_a_little(method: str):
    encoder = VIT.build(mode="finetune")
    before_adapters = snapshot(encoder.backbone)
    config = FinetuneConfig(method=method, epochs=2, batch_size=4)
    prepare_encoder(encoder, config)
    model = EndToEndClassifier(encoder, 2)
    start = snapshot(encoder.backbone)
    samples = _random_samples(8)
    train_end_to_end(model, samples, samples[:4], samples[4:], config)
    return encoder, before_adapters, start, snapshot(encoder.backbone)


def test_lora_trains_only_the_adapters_and_keeps_the_base_weights():
    encoder, original, start, end = _train_a_little("lora")
    trainable = {n for n, p in encoder.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.attn.qkv"} <= adapted
    changed = {k for k in end if not torch.equal(start[k], end[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed)  # B starts at zero: it has to move for the adapter to act
    # every original weight is still there, bit for bit (peft moves adapted layers' weights to .base_layer)
    for key, value in original.items():
        moved = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(end[key] if key in end else end[moved], value), key


def test_bitfit_trains_only_biases():
    encoder, _, start, end = _train_a_little("bitfit")
    trainable = [n for n, p in encoder.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("bias") for n in trainable)
    changed = [k for k in end if not torch.equal(start[k], end[k])]
    assert changed and all(k.endswith("bias") for k in changed)


def test_finetune_learning_rates_decay_by_layer_and_stay_below_the_head():
    encoder = EncoderConfig("vit_small_patch14_dinov2", model_kwargs={"depth": 3}).build(mode="finetune")
    config = FinetuneConfig(method="finetune", encoder_lr=1e-5, head_lr=1e-2, layer_decay=0.5)
    prepare_encoder(encoder, config)
    model = EndToEndClassifier(encoder, 2)
    lr_of = {}
    for group in _param_groups(model, config):
        for param in group["params"]:
            lr_of[id(param)] = group["lr"]
    named = dict(encoder.backbone.named_parameters())
    lrs = [lr_of[id(named[name])] for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                                                "blocks.1.attn.qkv.weight", "blocks.2.attn.qkv.weight", "norm.weight")]
    assert lrs == pytest.approx([1e-5 * 0.5**4, 1e-5 * 0.5**3, 1e-5 * 0.5**2, 1e-5 * 0.5, 1e-5])
    head = [lr_of[id(p)] for _, p in model.head_parameters()]
    assert head and min(head) == 1e-2 and max(lrs) <= min(head) / 100


def test_bad_finetune_settings_name_the_key():
    with pytest.raises(ConfigError, match="method"):
        FinetuneConfig(method="prompt")
    with pytest.raises(ConfigError, match="layer_decay"):
        FinetuneConfig(layer_decay=1.5)
    with pytest.raises(ConfigError, match="encoder mode"):
        prepare_encoder(VIT.build(mode="frozen"), FinetuneConfig(method="lora"))


# ------------------------------------------------------------------ cache and features
def _items(cohort, n=2):
    return load_evaluation_data(cohort["datalist"], preset="liver", size=SIZE).splits["train"][:n]


def test_cache_returns_identical_embeddings_and_misses_on_a_changed_key(cohort, tmp_path):
    from safetensors.torch import save_file

    data = load_evaluation_data(cohort["datalist"], preset="liver", size=SIZE)
    item = data.splits["train"][0]
    weights_a, weights_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path, seed in ((weights_a, 1), (weights_b, 2)):
        torch.manual_seed(seed)
        backbone = EncoderConfig("vit_small_patch14_dinov2", model_kwargs=TINY, seed=seed).build().backbone
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))

    def embedder(weights, size=SIZE):
        encoder = EncoderConfig("vit_small_patch14_dinov2", weights=str(weights), model_kwargs=TINY).build()
        settings = load_evaluation_data(cohort["datalist"], preset="liver", size=size)
        return evaluation_embedder(encoder, settings.transform(14), settings.preprocessing(14), tmp_path / "cache",
                                  progress=False)

    first = embedder(weights_a)
    computed = first.embed_item(item)["embedding"]
    assert first.cache.stats["misses"] == 1 and first.encoded_slices > 0
    again = embedder(weights_a)  # a new process would do the same: a fresh embedder, the same folder
    cached = again.embed_item(item)["embedding"]
    assert (again.cache.stats["hits"], again.cache.stats["misses"], again.encoded_slices) == (1, 0, 0)
    assert torch.equal(cached, computed)
    batched = again.embed_items([item, data.splits["train"][1]])  # the batched path reads the same entry
    assert again.cache.stats["hits"] == 2 and again.cache.stats["misses"] == 1
    assert torch.equal(batched[0]["embedding"], computed)

    other_weights = embedder(weights_b)
    other_weights.embed_item(item)
    assert other_weights.cache.stats["misses"] == 1 and other_weights.cache.stats["hits"] == 0
    other_size = embedder(weights_a, size=42)
    other_size.embed_item(item)
    assert other_size.cache.stats["misses"] == 1 and other_size.cache.stats["hits"] == 0
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 4  # a, a + second item, b, size 42


def test_features_hold_cls_patch_mean_and_last_blocks_of_the_encoder():
    encoder = EncoderConfig("vit_small_patch14_reg4_dinov2", model_kwargs={"depth": 4}).build()
    slices = torch.randn(5, 3, 28, 28)
    slices[1] = slices[3] = 0.25  # constant slices: encoded once
    features = encode_for_evaluation(encoder, slices)
    layout = FeatureLayout.of(encoder)
    reference = encoder(slices, with_grids=False)
    assert features.shape == (5, layout.width) == (5, 384 * 6)
    torch.testing.assert_close(features[:, layout.columns("cls")], reference.cls)
    torch.testing.assert_close(features[:, 384:768], reference.patch_mean)
    torch.testing.assert_close(features[:, -384:], reference.cls)  # the last block's class token is the final one
    deduplicated = encode_deduplicated(lambda batch: encode_for_evaluation(encoder, batch), slices)
    torch.testing.assert_close(deduplicated, features, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ CNN adapter
def test_cnn_encoder_gives_slice_features_and_checks_weights(tmp_path):
    from volumes.encoders import CNNSliceEncoder, SliceEncoder, build_slice_encoder

    torch.manual_seed(0)
    encoder = build_slice_encoder("resnet18")
    assert isinstance(encoder, CNNSliceEncoder) and isinstance(encoder, SliceEncoder)
    out = encoder(torch.randn(3, 3, 64, 64))
    assert out.cls.shape == (3, 512) and out.registers.shape == (3, 0, 512)
    assert [tuple(g.shape[1:]) for g in out.patch_grids] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert encoder.patch_size == 32 and not any(p.requires_grad for p in encoder.parameters())
    assert out.cls.std(0).mean() > 0  # random residual blocks are live (no zero-initialised last BatchNorm)
    with pytest.raises(ValueError, match="stride 32"):
        encoder(torch.randn(1, 3, 40, 40))
    torch.save(encoder.backbone.state_dict(), tmp_path / "r18.pth")
    loaded = build_slice_encoder("resnet18", weights=tmp_path / "r18.pth")
    assert loaded.fingerprint() == encoder.fingerprint() and loaded.weights_id.startswith("sha256:")
    with pytest.raises(WeightsError, match="does not fit timm's resnet34"):
        build_slice_encoder("resnet34", weights=tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="encoder='resnet_unknown'"):
        build_slice_encoder("resnet_unknown")
    bitfit = build_slice_encoder("resnet18", mode="finetune")
    prepare_encoder(bitfit, FinetuneConfig(method="bitfit"))
    assert all(n.endswith("bias") for n, p in bitfit.backbone.named_parameters() if p.requires_grad)


def test_cnn_baseline_through_the_same_protocols(cohort):
    data = load_evaluation_data(cohort["datalist"], preset="liver", size=32)
    evaluator = Evaluator(data, EncoderConfig("resnet18"), cache_dir=cohort["cache"], progress=False)
    linear = {r.variant: r.runs[0]["test_auc"] for r in evaluator.linear()}
    print("resnet18 linear:", linear)
    assert evaluator.layout.dim("last4_cls") == 64 + 128 + 256 + 512
    assert linear["cls"] >= 0.9


# ------------------------------------------------------------------ command line
def test_evaluate_command_writes_results(cohort, tmp_path, capsys):
    from volumes.cli import main

    code = main(["evaluate", "--protocol", "knn", "linear", "--data", str(cohort["datalist"]), "--preset", "liver",
                 "--size", str(SIZE), "--model-kwargs", json.dumps(TINY), "--cache-dir", str(cohort["cache"]),
                 "--features", "cls", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cache hits 48 / misses 0" in printed and "| knn | k=20 |" in printed
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["protocol"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {("knn", "k=10"), ("knn", "k=20"), ("linear", "cls")}
    assert rows[("linear", "cls")]["test_auc"]["mean"] >= 0.9
    assert report["encoder"]["weights"] is None and report["data"]["counts"]["test"] == 12
    assert (tmp_path / "results.md").read_text().startswith("| protocol |")
    assert not list(tmp_path.glob(".*.tmp"))


def test_evaluate_command_rejects_bad_input(cohort, capsys):
    from volumes.cli import main

    base = ["evaluate", "--data", str(cohort["datalist"]), "--no-progress", "--no-cache"]
    assert main([*base, "--protocol", "knn", "--encoder", "vit_huge_unknown"]) == 2
    assert "encoder='vit_huge_unknown' is not allowed" in capsys.readouterr().err
    assert main([*base, "--protocol", "knn", "--model-kwargs", "{depth"]) == 2
    assert "--model-kwargs" in capsys.readouterr().err
    assert main([*base, "--protocol", "lora", "--aggregator", "max", "--model-kwargs", json.dumps(TINY)]) == 2
    assert "aggregator='max'" in capsys.readouterr().err
    assert main([*base, "--protocol", "svm"]) == 2  # argparse's usage error, as an exit status
    assert "invalid choice: 'svm'" in capsys.readouterr().err


# ------------------------------------------------------------------ real data
def test_adrenalmnist3d_through_the_frozen_protocols(shared_data):
    adrenal = shared_data / "medmnist3d" / "adrenalmnist3d.npz"
    with pytest.raises(ConfigError, match="no per-slice labels"):
        load_evaluation_data(adrenal, task="slice")
    with pytest.raises(ConfigError, match="preset='liver'"):
        load_evaluation_data(adrenal, preset="liver")
    data = load_evaluation_data(adrenal, size=SIZE)
    assert data.counts() == {"train": 1188, "val": 98, "test": 298}
    data.splits = {"train": data.splits["train"][:300], "val": data.splits["val"], "test": data.splits["test"][:100]}
    evaluator = Evaluator(data, VIT, cache_dir=None, progress=False)
    run = evaluator.embed()
    assert run["encoded_slices"] < 498 * 28 * 0.6  # the empty background slices are encoded once each
    linear = evaluator.linear(["cls"])[0]
    knn = evaluator.knn((20,))[0]
    print(f"AdrenalMNIST3D subset: linear AUC {linear.runs[0]['test_auc']:.3f}, kNN AUC {knn.runs[0]['test_auc']:.3f}")
    assert linear.runs[0]["test_auc"] >= 0.6 and knn.runs[0]["test_auc"] >= 0.6
