"""Run the evaluation protocols for one encoder on one data set.

:class:`Evaluator` embeds every volume once (through the persistent embedding cache),
then runs any of the protocols on the frozen features (``knn``, ``fewshot``,
``linear``) or trains end to end (``finetune``, ``lora``, ``bitfit``). Each protocol
returns :class:`ProtocolResult` rows (one per variant: ``k``, shots, feature kind...)
with test AUC / accuracy per run, trainable parameters and wall time.

Frozen features are standardised with training-split statistics before every frozen
protocol (``standardize=False`` turns it off): a random-initialised encoder's features
share a large offset, which would dominate cosine similarity. For few-shot, the
statistics come from the whole training split's features, without its labels.

Volume tasks pool the slice features of a volume by their mean (the ``mean``
aggregator's pooling) for the frozen protocols; the end-to-end protocols train an
aggregator (``FinetuneConfig.aggregator``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from volumes.encoders.config import EncoderConfig
from volumes.errors import ConfigError
from volumes.calibration import calibration_metrics
from volumes.evaluation.data import EvaluationData, stratified_split
from volumes.evaluation.features import FEATURE_KINDS, FeatureLayout, FeatureSet, evaluation_embedder, standardize
from volumes.evaluation.fewshot import DEFAULT_DRAWS, DEFAULT_FEWSHOT_L2, DEFAULT_SHOTS, fewshot_indices
from volumes.evaluation.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_scores
from volumes.evaluation.linear import DEFAULT_L2_GRID, fit_logistic, select_logistic
from volumes.metrics import classification_metrics, mean_std
from volumes.reporting import format_params

__all__ = ["FROZEN_PROTOCOLS", "PROTOCOLS", "Evaluator", "ProtocolResult", "results_markdown"]

FROZEN_PROTOCOLS: tuple[str, ...] = ("knn", "fewshot", "linear")
PROTOCOLS: tuple[str, ...] = (*FROZEN_PROTOCOLS, "attention", "finetune", "lora", "bitfit")


@dataclass
class ProtocolResult:
    """One protocol variant's runs.

    Attributes:
        protocol: ``knn``, ``fewshot``, ``linear``, ``attention``, ``finetune``, ``lora`` or ``bitfit``.
        variant: e.g. ``k=20``, ``n=4``, ``last4_cls``, ``mean aggregator``.
        runs: one dict per run (seed or draw) with at least ``test_auc`` and ``test_acc``.
        trainable_params: parameters the protocol fits (head included).
        seconds: wall time of all runs (frozen features already computed).
        details: protocol settings and choices (chosen ``l2``, feature kind, ...).
    """

    protocol: str
    variant: str
    runs: list[dict[str, Any]]
    trainable_params: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def stat(self, key: str) -> tuple[float, float]:
        """Mean and sample std of ``key`` over the runs."""
        return mean_std([float(r[key]) for r in self.runs if key in r])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("test_auc", "test_acc"):
            mean, std = self.stat(key)
            out[key] = {"mean": mean, "std": std, "n": len(self.runs)}
        return out


def _fmt(mean_std_pair: tuple[float, float], n: int) -> str:
    mean, std = mean_std_pair
    if np.isnan(mean):
        return "–"
    return f"{mean:.3f}" if n <= 1 else f"{mean:.3f} ± {std:.3f}"


def results_markdown(results: Sequence[ProtocolResult]) -> str:
    """A markdown table: protocol, variant, test AUC, test ACC, runs, trainable params, wall time."""
    lines = ["| protocol | variant | test AUC | test ACC | runs | trainable params | wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        n = len(r.runs)
        lines.append(f"| {r.protocol} | {r.variant} | {_fmt(r.stat('test_auc'), n)} | {_fmt(r.stat('test_acc'), n)} "
                     f"| {n} | {format_params(r.trainable_params)} | {r.seconds:.1f} s |")
    return "\n".join(lines)


class Evaluator:
    """The protocols of one encoder on one :class:`EvaluationData`.

    Args:
        data: the splits and preprocessing.
        spec: the encoder.
        cache_dir: persistent embedding cache (``None``: no cache, embeddings in memory only).
        device: where the encoder runs.
        progress: tqdm progress bars.
        standardize: standardise frozen features with training statistics (see the module docstring).
        encoder: ``spec.build(mode="frozen")`` when already built (e.g. to read its patch size first).
        batch_volumes: volumes encoded together on a cache miss (see ``SliceEmbedder.embed_items``).
    """

    def __init__(self, data: EvaluationData, spec: EncoderConfig, *, cache_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", progress: bool = True, standardize: bool = True,
                 encoder: Any = None, batch_volumes: int = 8):
        self.data = data
        self.spec = spec
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        self.progress = progress
        self.standardize = standardize
        self.batch_volumes = max(1, int(batch_volumes))
        self.encoder = encoder if encoder is not None else spec.build(mode="frozen")
        if not self.encoder.frozen:
            raise ConfigError("encoder mode", self.encoder.mode, "'frozen' (end-to-end runs build their own)")
        self.layout = FeatureLayout.of(self.encoder)
        self._rows: dict[str, FeatureSet] | None = None
        self._samples: dict[str, list] | None = None
        self.embed_runs: list[dict[str, Any]] = []

    @property
    def patch_size(self) -> int:
        return int(self.encoder.patch_size)

    # ------------------------------------------------------------------ frozen features
    def embed(self) -> dict[str, Any]:
        """Embed (or read from the cache) every volume of every split; returns timing and cache counts.

        Every call goes through the cache again (a second call measures the cache's speed-up).
        """
        from tqdm.auto import tqdm

        embedder = evaluation_embedder(self.encoder, self.data.transform(self.patch_size),
                                      self.data.preprocessing(self.patch_size), self.cache_dir,
                                      device=self.device, progress=False)
        start = time.perf_counter()
        rows: dict[str, FeatureSet] = {}
        total = sum(len(items) for items in self.data.splits.values())
        bar = tqdm(total=total, desc=f"embedding ({self.spec.name})", unit="case", disable=not self.progress)
        for split, items in self.data.splits.items():
            xs, ys, ids, groups = [], [], [], []
            embedded = []
            for start_index in range(0, len(items), self.batch_volumes):
                batch = items[start_index : start_index + self.batch_volumes]
                embedded += embedder.embed_items(batch)
                bar.update(len(batch))
            for item, out in zip(items, embedded):
                emb = out["embedding"].numpy()
                case = str(out["case_id"])
                if self.data.task == "volume":
                    xs.append(emb.mean(axis=0, keepdims=True))
                    ys.append(int(item["class_label"]))
                    ids.append(case)
                    groups.append(case)
                else:
                    keep = np.asarray(item["slice_keep"], dtype=bool)
                    labels = np.asarray(item["slice_labels"], dtype=np.int64)
                    if len(keep) != emb.shape[0]:
                        raise ConfigError(f"{case}.slice_labels", len(keep),
                                          f"{emb.shape[0]} entries (the prepared volume's slice count)")
                    xs.append(emb[keep])
                    ys.extend(labels[keep].tolist())
                    ids.extend(f"{case}#{d}" for d in np.flatnonzero(keep))
                    groups.extend([case] * int(keep.sum()))
            x = np.concatenate(xs).astype(np.float32) if xs else np.zeros((0, self.layout.width), np.float32)
            rows[split] = FeatureSet(x, np.asarray(ys, dtype=np.int64), ids, groups)
        bar.close()
        seconds = time.perf_counter() - start
        stats = dict(embedder.cache.stats) if embedder.cache is not None else {}
        run = {"seconds": seconds, "cases": total, "encoded_slices": embedder.encoded_slices,
               "cache_hits": stats.get("hits", 0), "cache_misses": stats.get("misses", 0)}
        self.embed_runs.append(run)
        self._rows = rows
        return run

    def features(self, kind: str = "cls") -> dict[str, FeatureSet]:
        """Feature rows of ``kind`` per split, standardised with training statistics (when enabled)."""
        if kind not in FEATURE_KINDS:
            raise ConfigError("features", kind, list(FEATURE_KINDS))
        if self._rows is None:
            self.embed()
        assert self._rows is not None
        cols = self.layout.columns(kind)
        sets = {split: FeatureSet(fs.x[:, cols], fs.y, fs.ids, fs.groups) for split, fs in self._rows.items()}
        if self.standardize:
            train, val, test = standardize(sets["train"].x, sets["val"].x, sets["test"].x)
            for split, x in zip(("train", "val", "test"), (train, val, test)):
                sets[split] = FeatureSet(x, sets[split].y, sets[split].ids, sets[split].groups)
        return sets

    # ------------------------------------------------------------------ protocols
    def knn(self, ks: Sequence[int] = DEFAULT_KS, *, temperature: float = DEFAULT_TEMPERATURE,
            features: str = "cls") -> list[ProtocolResult]:
        """Weighted kNN (cosine, ``exp(sim / T)`` votes) from the training split, scored on the test split."""
        sets = self.features(features)
        out = []
        for k in ks:
            start = time.perf_counter()
            scores = knn_scores(sets["train"].x, sets["train"].y, sets["test"].x, k=int(k),
                                num_classes=self.data.num_classes, temperature=temperature)
            metrics = classification_metrics(scores, sets["test"].y)
            out.append(ProtocolResult("knn", f"k={k}", [{"test_auc": metrics["auc"], "test_acc": metrics["acc"]}], 0,
                                      time.perf_counter() - start,
                                      {"features": features, "temperature": temperature, "k": int(k)}))
        return out

    def fewshot(self, shots: Sequence[int] = DEFAULT_SHOTS, *, draws: int = DEFAULT_DRAWS, features: str = "cls",
                l2: float = DEFAULT_FEWSHOT_L2) -> list[ProtocolResult]:
        """Logistic regression on ``n`` training examples per class, ``draws`` seeded draws per ``n``.

        An ``n`` larger than the smallest class of the training split gives a result without
        runs (``details["skipped"]`` says why) instead of an error, so the other ``n`` still run.
        """
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ConfigError("draws", draws, "a positive integer")
        sets = self.features(features)
        train, test = sets["train"], sets["test"]
        k = self.data.num_classes
        out = []
        smallest = int(np.bincount(train.y).min()) if len(train) else 0
        for n in shots:
            details = {"features": features, "l2": l2, "shots": int(n), "draws": draws}
            if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > smallest:
                details["skipped"] = f"the smallest class has {smallest} training examples"
                out.append(ProtocolResult("fewshot", f"n={n}", [], train.x.shape[1] * k + k, 0.0, details))
                continue
            start = time.perf_counter()
            runs = []
            for draw in range(draws):
                rows = fewshot_indices(train.y, int(n), seed=draw)
                model = fit_logistic(train.x[rows], train.y[rows], num_classes=k, l2=l2)
                metrics = classification_metrics(model.predict_proba(test.x), test.y)
                runs.append({"seed": draw, "test_auc": metrics["auc"], "test_acc": metrics["acc"],
                             "rows": [train.ids[i] for i in rows]})
            out.append(ProtocolResult("fewshot", f"n={n}", runs, train.x.shape[1] * k + k, time.perf_counter() - start,
                                      details))
        return out

    def linear(self, kinds: Sequence[str] = FEATURE_KINDS, *, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
               select_metric: str = "auc") -> list[ProtocolResult]:
        """Logistic regression on each feature kind; ``l2`` chosen on the validation split."""
        out = []
        for kind in kinds:
            sets = self.features(kind)
            start = time.perf_counter()
            model, sweep = select_logistic(sets["train"].x, sets["train"].y, sets["val"].x, sets["val"].y,
                                           num_classes=self.data.num_classes, l2_grid=l2_grid, metric=select_metric)
            test_p = model.predict_proba(sets["test"].x)
            metrics = classification_metrics(test_p, sets["test"].y)
            chosen = next(row for row in sweep if row["l2"] == model.l2)
            dim = sets["train"].x.shape[1]
            calibration = calibration_metrics(model.predict_proba(sets["val"].x), sets["val"].y, test_p, sets["test"].y)
            out.append(ProtocolResult(
                "linear", kind,
                [{"test_auc": metrics["auc"], "test_acc": metrics["acc"], "val_auc": chosen["val_auc"], **calibration}],
                dim * self.data.num_classes + self.data.num_classes, time.perf_counter() - start,
                {"features": kind, "dim": dim, "l2": model.l2, "select_metric": select_metric, "sweep": sweep},
            ))
        return out

    def attention_head(self, config: Any = None, *, seeds: Sequence[int] = (0,)) -> ProtocolResult:
        """Frozen encoder + a small transformer head on its pooled patch tokens (Huix et al.), per seed.

        See :mod:`volumes.evaluation.attention_head`; ``config`` is an ``AttentionHeadConfig``.
        """
        from volumes.evaluation.attention_head import run_attention_head

        return ProtocolResult(**run_attention_head(self, config, seeds=seeds))

    # ------------------------------------------------------------------ end to end
    def samples(self, split: str) -> list:
        """Prepared end-to-end samples of ``split`` (volumes, or single slices for a slice task); kept."""
        if self._samples is None:
            self._samples = {}
        if split not in self._samples:
            self._samples[split] = self._build_samples(self.data.splits[split], split)
        return self._samples[split]

    def _build_samples(self, items: Sequence[dict], desc: str) -> list:
        from tqdm.auto import tqdm

        from volumes.evaluation.finetune import Sample
        from volumes.networks import slice_spacing_mm

        transform = self.data.transform(self.patch_size)
        samples = []
        for item in tqdm(items, desc=f"preparing {desc}", unit="case", disable=not self.progress):
            image = transform(dict(item))["image"]
            spacing = float(slice_spacing_mm(image.unsqueeze(0), 4)[0])
            volume = (image.as_tensor() if hasattr(image, "as_tensor") else image).float().contiguous()
            depth = volume.shape[-1]
            if self.data.task == "volume":
                positions = torch.arange(depth, dtype=torch.float32) * spacing
                samples.append(Sample(volume, int(item["class_label"]), positions))
            else:
                for d in np.flatnonzero(np.asarray(item["slice_keep"], dtype=bool)):
                    samples.append(Sample(volume[..., d : d + 1].clone(), int(item["slice_labels"][d]),
                                          torch.zeros(1)))
        return samples

    def _training_samples(self, max_train: int | None, subset_seed: int) -> list:
        """Training samples, or a stratified subset of ``max_train`` (volumes: only those are prepared)."""
        items = self.data.splits["train"]
        if max_train is None:
            return self.samples("train")
        if self.data.task == "volume":
            if max_train >= len(items):
                return self.samples("train")
            _, taken = stratified_split([int(i["class_label"]) for i in items], max_train / len(items), subset_seed)
            return self._build_samples([items[i] for i in taken], "train subset")
        train = self.samples("train")
        if max_train >= len(train):
            return train
        _, taken = stratified_split([s.label for s in train], max_train / len(train), subset_seed)
        return [train[i] for i in taken]

    def finetune(self, config: Any, *, seeds: Sequence[int] = (0,), max_train: int | None = None,
                 subset_seed: int = 0) -> ProtocolResult:
        """Train encoder + aggregator end to end (``config.method``: finetune, lora or bitfit), per seed.

        Args:
            config: a :class:`volumes.evaluation.finetune.FinetuneConfig`.
            seeds: one run per seed (head initialisation and data order; the encoder starts
                from the same weights every time).
            max_train: train on a stratified subset of this many training samples (CPU budgets).
            subset_seed: seed of that subset (the same for every run and method).
        """
        from tqdm.auto import tqdm

        from volumes.evaluation.finetune import EndToEndClassifier, prepare_encoder, train_end_to_end

        if max_train is not None and max_train < 2:
            raise ConfigError("max_train", max_train, "at least 2 training samples, or None for all")
        train, val, test = self._training_samples(max_train, subset_seed), self.samples("val"), self.samples("test")
        runs = []
        start = time.perf_counter()
        params = encoder_params = 0
        info: dict[str, Any] = {}
        for seed in seeds:
            encoder = self.spec.build(mode="finetune")
            info = prepare_encoder(encoder, config)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                model = EndToEndClassifier(encoder, self.data.num_classes, config.aggregator)
            steps = config.epochs * -(-len(train) // config.batch_size)
            bar = tqdm(total=steps, desc=f"{config.method} seed {seed}", unit="step", disable=not self.progress)

            def on_step(step: int, total: int, loss: float, bar=bar) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            result = train_end_to_end(model, train, val, test, config, seed=int(seed), device=self.device,
                                      on_step=on_step)
            bar.close()
            params, encoder_params = result["trainable_params"], result["encoder_trainable_params"]
            runs.append({"seed": int(seed), **{k: v for k, v in result.items() if k != "losses"},
                         "final_loss": result["losses"][-1] if result["losses"] else float("nan")})
        variant = f"{config.aggregator} aggregator" if self.data.task == "volume" else "linear head"
        details = {**config.to_dict(), **info, "encoder_trainable_params": encoder_params, "train_samples": len(train),
                   "val_samples": len(val), "test_samples": len(test)}
        return ProtocolResult(config.method, variant, runs, params, time.perf_counter() - start, details)
