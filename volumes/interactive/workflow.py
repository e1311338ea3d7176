"""Train a click model folder and run the standard click protocol on it (``volumes interact train|simulate``).

:func:`train` writes the folder :class:`~volumes.interactive.service.InteractiveModel` loads
(and, with ``baseline``, the DeepGrow 3D network beside it); :func:`simulate` runs the click
protocol (:mod:`volumes.interactive.simulate`) for the click model, DeepGrow 3D and GraphCut,
and few-shot labels from painted slices.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from volumes.interactive.fewshot import FewShotHead
from volumes.interactive.segmenter import ClickSegmenter, ClickState
from volumes.interactive.service import (CLICK_MODEL, DEEPGROW, ENCODER_FILE, InteractiveConfig, InteractiveModel,
                                         fewshot_mask, load_case, load_encoder)
from volumes.interactive.session import VolumeFeatures, encode_volume
from volumes.interactive.training import ClickTrainingConfig, load_click_model, save_click_model, train_click_model

__all__ = ["fewshot_slices", "labelled_features", "simulate", "train"]


# ---------------------------------------------------------------------- training
def labelled_features(items: Sequence[dict[str, Any]], encoder: Any, config: InteractiveConfig,
                      progress: bool = True) -> list[VolumeFeatures]:
    """Working grids with labels of datalist items (``image`` and ``label`` paths)."""
    from tqdm.auto import tqdm

    out = []
    for item in tqdm(items, desc="encoding", disable=not progress):
        volume, spacing, label, _ = load_case(item["image"], item["label"])
        vf = encode_volume(encoder, volume[None] if volume.ndim == 3 else volume, spacing, size=config.size,
                           preset=config.preset, label=label, resample_z=config.resample_z)
        vf.extra["case"] = str(item.get("case_id", Path(item["image"]).name))
        out.append(vf)
    return out


def train(data: str | Path, out: str | Path, *, config: InteractiveConfig | None = None,
          training: ClickTrainingConfig | None = None, baseline: bool = False, section: str = "training",
          progress: bool = True, volumes: list[VolumeFeatures] | None = None) -> dict[str, Any]:
    """Train the click model (and with ``baseline`` the DeepGrow 3D network) into the folder ``out``."""
    from volumes.encoders import write_random_encoder
    from volumes.bundle import datalist_section

    config = config or InteractiveConfig()
    training = training or ClickTrainingConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the folder is the whole model: the encoder goes in (a random one is still a specific one)
    if config.encoder_weights is None:
        write_random_encoder(out / ENCODER_FILE, config.encoder, config.encoder_model_kwargs, seed=training.seed)
        config = InteractiveConfig(**{**asdict(config), "encoder_weights": ENCODER_FILE})
    else:
        config = InteractiveConfig(**{**asdict(config), "encoder_weights": _copy_weights(Path(config.encoder_weights), out)})
    encoder = load_encoder(config, out)
    if volumes is None:
        volumes = labelled_features(datalist_section(data, section), encoder, config, progress)
    summary: dict[str, Any] = {"cases": len(volumes), "out": str(out)}
    runs = [(CLICK_MODEL, training)]
    if baseline:
        runs.append((DEEPGROW, ClickTrainingConfig(**{**asdict(training), "use_features": False, "intensity_cue": False,
                                                        "intensity_augment": 0.0})))
    for name, cfg in runs:
        log: list[dict[str, float]] = []
        start = time.perf_counter()
        model = train_click_model(volumes, cfg, progress=progress, log=log,
                                  curves=out / "tensorboard" / name.split(".")[0])
        seconds = time.perf_counter() - start
        save_click_model(model, out / name, cfg, interactive=asdict(config), encoder_fingerprint=encoder.fingerprint(),
                         log={"first_loss": log[0]["loss"], "last_loss": float(np.mean([r["loss"] for r in log[-10:]])),
                              "seconds": seconds})
        summary[name] = {"seconds": seconds, "last_loss": float(np.mean([r["loss"] for r in log[-10:]]))}
    return summary


def _copy_weights(source: Path, out: Path) -> str:
    """Copy encoder weights (a file or a Hugging Face folder) into the model folder; its name there."""
    import shutil

    if not source.exists():
        raise FileNotFoundError(f"encoder weights {source} not found")
    name = "encoder" if source.is_dir() else "encoder" + source.suffix
    target = out / name
    if source.resolve() != target.resolve():
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
    return name


# ---------------------------------------------------------------------- simulation
def _click_method(model: InteractiveModel, segmenter: ClickSegmenter, vf: VolumeFeatures) -> Callable:
    state = ClickState()

    def method(fg: list, bg: list, order: list) -> np.ndarray:
        nonlocal state
        mask, state, _ = segmenter.segment(vf, fg, bg, state=state, order=order)
        return mask
    return method


def _graphcut_method(volume: torch.Tensor, spacing: Sequence[float]) -> Callable:
    from volumes.interactive.graphcut import graphcut_segment

    image = np.asarray(volume[0], np.float32)

    def method(fg: list, bg: list, order: list) -> np.ndarray:
        return graphcut_segment(image, fg, bg, spacing=spacing)
    return method


def fewshot_slices(label_grid: np.ndarray, k: int) -> list[int]:
    """``k`` working-grid slices of an object, evenly inside its extent (the middle one for ``k = 1``)."""
    zs = np.flatnonzero(label_grid.reshape(-1, label_grid.shape[-1]).any(axis=0))
    if len(zs) == 0:
        return []
    quantiles = [0.5] if k == 1 else list(np.linspace(0.2, 0.8, k))
    return sorted({int(zs[int(round(q * (len(zs) - 1)))]) for q in quantiles})


def simulate(root: str | Path, data: str | Path, *, labels: dict[str, int], section: str = "test", clicks: int = 10,
             methods: Sequence[str] = ("clicks",), fewshot: Sequence[int] = (), progress: bool = True,
             items: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The click protocol (and few-shot from ``fewshot`` painted slices) per method, case and label.

    Returns ``{"rows": [...], "encode_s": [...]}``; a row has ``method``, ``case``, ``label``,
    ``dice`` (per click) and ``seconds`` (per click), or ``slices`` and ``dice`` for few-shot.
    """
    from tqdm.auto import tqdm

    from volumes.bundle import datalist_section
    from volumes.data.io import source_sha256
    from volumes.interactive.simulate import dice, run_protocol

    root = Path(root)
    model = InteractiveModel(root)
    deepgrow = None
    if "deepgrow" in methods:
        net, _ = load_click_model(root / DEEPGROW)
        deepgrow = ClickSegmenter(net, model.window)
    items = list(items) if items is not None else datalist_section(data, section)
    rows: list[dict[str, Any]] = []
    encode_s = []
    for item in tqdm(items, desc="cases", disable=not progress):
        case = str(item.get("case_id", Path(item["image"]).name))
        volume, spacing, label, _ = load_case(item["image"], item["label"])
        # keyed by the image's content: items sharing one image (one label file per structure) share the
        # features, never one item's label
        vf, hit = model.features(volume, spacing, key=source_sha256(item["image"]))
        if not hit:
            encode_s.append(vf.encode_s)
        grid_labels = model.label_grid(vf, volume, label)
        truth_all = label.numpy()
        for name, value in labels.items():
            truth = truth_all == value
            if not truth.any():
                continue
            for method in methods:
                if method == "clicks":
                    fn = _click_method(model, model.segmenter, vf)
                elif method == "deepgrow":
                    fn = _click_method(model, deepgrow, vf)
                elif method == "graphcut":
                    fn = _graphcut_method(volume, spacing)
                else:
                    raise ValueError(f"unknown method {method!r}: clicks, deepgrow or graphcut")
                protocol = run_protocol(fn, truth, spacing, clicks)
                rows.append({"method": method, "case": case, "label": name,
                             "dice": [r["dice"] for r in protocol], "seconds": [r["seconds"] for r in protocol]})
            label_grid = (grid_labels == value).numpy()
            for k in fewshot:
                painted = np.zeros_like(label_grid)
                for z in fewshot_slices(label_grid, k):
                    painted[..., z] = True
                start = time.perf_counter()
                head = FewShotHead().fit_slices(vf, label_grid & painted, painted & ~label_grid)
                mask = fewshot_mask(vf, head, label_grid & painted)
                rows.append({"method": f"fewshot-{k}", "case": case, "label": name, "slices": k,
                             "dice": [dice(mask, truth)], "seconds": [time.perf_counter() - start]})
    return {"rows": rows, "encode_s": encode_s, "store": {"hits": model.store.hits, "misses": model.store.misses}}
