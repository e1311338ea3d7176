"""Foundation-model evaluation protocols on volumes and slices.

The protocols of the DINOv2-for-radiology studies, for 3D volume classification (slice
features pooled or aggregated per volume) and 2D slice classification (per-slice labels):

* ``knn``: cosine similarity, ``exp(sim / 0.07)``-weighted votes, ``k`` in {10, 20}
  (:mod:`volumes.evaluation.knn`);
* ``fewshot``: ``n`` in {1, 2, 4, 8, 16} labelled examples per class, repeated stratified
  seeded draws (:mod:`volumes.evaluation.fewshot`);
* ``linear``: logistic regression on frozen features (CLS; CLS + mean patch; the last
  four blocks' CLS), regularisation chosen on the validation split (:mod:`volumes.evaluation.linear`);
* ``attention``: a small transformer head on the frozen encoder's pooled patch tokens
  (Huix et al. 2024; :mod:`volumes.evaluation.attention_head`);
* ``finetune`` (layer-wise learning-rate decay), ``lora`` (peft adapters on qkv and MLP)
  and ``bitfit`` (biases only), end to end (:mod:`volumes.evaluation.finetune`).

:class:`~volumes.evaluation.runner.Evaluator` ties them to an encoder and a data set
(:func:`~volumes.evaluation.data.load_evaluation_data`), reading frozen features from the
persistent embedding cache. ``python -m volumes evaluate`` is the command line.
Names resolve on first use, so ``import volumes.evaluation`` stays light.
"""

from __future__ import annotations

from volumes._lazy import lazy_names

_LAZY = {
    "EvaluationData": "volumes.evaluation.data",
    "load_evaluation_data": "volumes.evaluation.data",
    "attach_slice_labels": "volumes.evaluation.slices",
    "FEATURE_KINDS": "volumes.evaluation.features",
    "EvaluationFeatures": "volumes.evaluation.features",
    "evaluation_embedder": "volumes.evaluation.features",
    "FeatureLayout": "volumes.evaluation.features",
    "FeatureSet": "volumes.evaluation.features",
    "encode_deduplicated": "volumes.evaluation.features",
    "encode_for_evaluation": "volumes.evaluation.features",
    "knn_scores": "volumes.evaluation.knn",
    "fewshot_indices": "volumes.evaluation.fewshot",
    "fit_logistic": "volumes.evaluation.linear",
    "select_logistic": "volumes.evaluation.linear",
    "AttentionHead": "volumes.evaluation.attention_head",
    "AttentionHeadConfig": "volumes.evaluation.attention_head",
    "run_attention_head": "volumes.evaluation.attention_head",
    "EndToEndClassifier": "volumes.evaluation.finetune",
    "FinetuneConfig": "volumes.evaluation.finetune",
    "METHODS": "volumes.evaluation.finetune",
    "add_lora": "volumes.evaluation.finetune",
    "prepare_encoder": "volumes.evaluation.finetune",
    "train_end_to_end": "volumes.evaluation.finetune",
    "accuracy": "volumes.metrics",
    "roc_auc": "volumes.metrics",
    "PROTOCOLS": "volumes.evaluation.runner",
    "Evaluator": "volumes.evaluation.runner",
    "ProtocolResult": "volumes.evaluation.runner",
    "results_markdown": "volumes.evaluation.runner",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
