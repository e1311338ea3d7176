"""One evaluation run: every requested protocol for one encoder on one data set, and its report.

What ``python -m volumes evaluate`` does once the arguments are parsed; callable from a
script or a notebook with the same options.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from volumes.evaluation.features import FEATURE_KINDS
from volumes.evaluation.fewshot import DEFAULT_DRAWS, DEFAULT_FEWSHOT_L2, DEFAULT_SHOTS
from volumes.evaluation.knn import DEFAULT_KS, DEFAULT_TEMPERATURE
from volumes.evaluation.linear import DEFAULT_L2_GRID

__all__ = ["ProtocolOptions", "evaluation_report", "run_protocols", "write_results"]


@dataclass
class ProtocolOptions:
    """The settings of every protocol (the ``evaluate`` command's options, same defaults).

    ``features``: the frozen feature kinds; ``linear`` fits each, ``knn`` and ``fewshot``
    use the first. ``finetune``: keyword arguments of
    :class:`~volumes.evaluation.finetune.FinetuneConfig` for the end-to-end protocols.
    """

    ks: Sequence[int] = DEFAULT_KS
    temperature: float = DEFAULT_TEMPERATURE
    shots: Sequence[int] = DEFAULT_SHOTS
    draws: int = DEFAULT_DRAWS
    fewshot_l2: float = DEFAULT_FEWSHOT_L2
    features: Sequence[str] = FEATURE_KINDS
    l2_grid: Sequence[float] = DEFAULT_L2_GRID
    finetune: dict[str, Any] = field(default_factory=dict)
    seeds: Sequence[int] = (0,)
    max_train: int | None = None
    attention: dict[str, Any] = field(default_factory=dict)  # AttentionHeadConfig keyword arguments


def run_protocols(evaluator: Any, protocols: Sequence[str], options: ProtocolOptions,
                  log: Callable[[str], None] = print) -> tuple[list, dict[str, Any] | None]:
    """Run ``protocols`` in order with ``evaluator`` (:class:`~volumes.evaluation.runner.Evaluator`).

    Returns:
        The :class:`~volumes.evaluation.runner.ProtocolResult` rows and the embedding
        summary (``None`` when only end-to-end protocols ran, which embed nothing up front).
    """
    from volumes.evaluation.finetune import METHODS, FinetuneConfig

    embedding = None
    if any(p not in (*METHODS, "attention") for p in protocols):  # the attention head encodes its own tokens
        embedding = evaluator.embed()
        cache = evaluator.cache_dir
        log(f"embeddings: {embedding['seconds']:.1f} s, {embedding['encoded_slices']} slices encoded, "
            f"cache hits {embedding['cache_hits']} / misses {embedding['cache_misses']}"
            + (f" ({cache})" if cache else " (no cache)"))
    kinds = list(options.features)
    results: list = []
    for protocol in protocols:
        if protocol == "knn":
            results += evaluator.knn(options.ks, temperature=options.temperature, features=kinds[0])
        elif protocol == "fewshot":
            results += evaluator.fewshot(options.shots, draws=options.draws, features=kinds[0], l2=options.fewshot_l2)
        elif protocol == "linear":
            results += evaluator.linear(kinds, l2_grid=options.l2_grid)
        elif protocol == "attention":
            from volumes.evaluation.attention_head import AttentionHeadConfig

            results.append(evaluator.attention_head(AttentionHeadConfig(**options.attention), seeds=options.seeds))
        else:
            config = FinetuneConfig(method=protocol, **options.finetune)
            results.append(evaluator.finetune(config, seeds=options.seeds, max_train=options.max_train))
    return results, embedding


def evaluation_report(evaluator: Any, results: Sequence, embedding: dict[str, Any] | None, *,
                      data_path: str | Path, started: float | None = None) -> dict[str, Any]:
    """``results.json``'s content: the command, data, encoder identity, embedding summary and rows."""
    data, spec = evaluator.data, evaluator.spec
    report = {
        "argv": sys.argv[1:],
        "data": {"path": str(data_path), "task": data.task, "counts": data.counts(), "settings": data.settings,
                 "num_classes": data.num_classes},
        "encoder": {"name": spec.name, "weights": spec.weights, "pretrained": spec.pretrained,
                    "model_kwargs": spec.model_kwargs, "seed": spec.seed, "weights_id": evaluator.encoder.weights_id},
        "embedding": embedding,
        "results": [r.to_dict() for r in results],
    }
    if started is not None:
        report["seconds"] = time.perf_counter() - started
    return report


def write_results(out: str | Path, report: dict[str, Any], table: str) -> tuple[Path, Path]:
    """``OUT/results.json`` and ``OUT/results.md``, each written atomically."""
    from volumes.atomic import atomic_write_bytes

    out = Path(out)
    text = json.dumps(report, indent=1, default=str)
    atomic_write_bytes(out / "results.json", lambda f: f.write(text.encode()))
    atomic_write_bytes(out / "results.md", lambda f: f.write((table + "\n").encode()))
    return out / "results.json", out / "results.md"
