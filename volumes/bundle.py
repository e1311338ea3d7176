"""Small helpers the MONAI bundles call from their JSON configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from volumes.errors import ConfigError, VolumesError


def ensure_phantom_cohort(dataset_dir: str | Path, n: int = 40, seed: int = 0, task: str = "hepatomegaly",
                          kind: str = "classification") -> str:
    """The datalist of ``dataset_dir``; writes a synthetic phantom cohort there first if it has none.

    Lets ``python -m monai.bundle run`` train out of the box; point ``dataset_dir`` at a
    folder with your own ``datalist.json`` to train on real data. The cohort is
    :meth:`PhantomConfig.classification_demo` (``kind="classification"``) or
    :meth:`PhantomConfig.segmentation_demo` (``kind="segmentation"``) with ``task``.
    """
    if kind not in ("classification", "segmentation"):
        raise ConfigError("kind", kind, ["classification", "segmentation"])
    dataset_dir = Path(dataset_dir)
    datalist = dataset_dir / "datalist.json"
    if not datalist.is_file():
        from volumes.data.phantoms import PhantomConfig, write_cohort

        config = getattr(PhantomConfig, f"{kind}_demo")(task=task)
        write_cohort(dataset_dir, n=n, seed=seed, config=config, progress=False)
    return str(datalist)


def datalist_section(datalist: str | Path, section: str) -> list[dict[str, Any]]:
    """Items of one section of a MONAI datalist, read by :func:`volumes.data.discovery.discover_cases`.

    So bundles, ``volumes infer`` and the evaluation commands give every file the same
    ``case_id`` (two files with one base name get distinct ids). An empty section gives
    no items.
    """
    from volumes.data.discovery import discover_cases

    datalist = Path(datalist)
    if not datalist.is_file():
        raise FileNotFoundError(f"{datalist}: datalist not found (set dataset_dir to a folder with datalist.json)")
    content = json.loads(datalist.read_text())
    if section not in content:
        raise ConfigError("datalist section", section, [k for k, v in content.items() if isinstance(v, list)])
    if not content[section]:
        return []
    return [case.to_dict() for case in discover_cases(datalist, section=section)]


def fold_section(datalist: str | Path, fold: int | str | None, section: str) -> list[dict[str, Any]]:
    """One section of a datalist, or of cross-validation fold ``fold`` of a ``volumes datalist`` file.

    ``fold=None``: the datalist's own ``section`` (:func:`datalist_section`). An integer:
    that fold's ``training``/``validation``/``test`` patients
    (:func:`volumes.data.labelled.fold_items`). ``"final"``: the model on every patient
    (``training`` and ``validation`` split the patients; ``test`` is empty).
    """
    if fold is None:
        return datalist_section(datalist, section)
    from volumes.data.labelled import fold_items

    if str(fold) == "final":
        return [] if section == "test" else fold_items(datalist, -1, f"final_{section}")
    return fold_items(datalist, int(fold), section)


def datalist_labels(datalist: str | Path, default: list[str]) -> list[str]:
    """Label names in value order from a ``volumes datalist`` file; ``default`` for other datalists.

    Raises ConfigError when the values are not 0..K-1 (a network has one channel per value).
    """
    content = json.loads(Path(datalist).read_text())
    if "labels" not in content:
        return list(default)
    table = {int(k): str(v) for k, v in content["labels"].items()}
    if sorted(table) != list(range(len(table))):
        raise ConfigError("label values", sorted(table), "consecutive values 0..K-1")
    return [table[v] for v in range(len(table))]


def plan_preprocessing(datalist: str | Path, default: Mapping[str, Any], *, target_size: int = 112) -> dict[str, Any]:
    """Slice preparation planned from a ``volumes datalist`` file; ``default`` for other datalists.

    From the data, as nnU-Net plans its spacing: each volume prepared by its own modality
    (``preset="auto"``); slices resampled in-plane to one spacing, the larger of the median
    in-plane spacing and what brings the median field of view to ``target_size`` pixels
    (the cost of a slice grows with its pixels); slice spacing kept.
    """
    content = json.loads(Path(datalist).read_text())
    entries = content.get("training") or []
    if "modalities" not in content or not entries:
        return dict(default)
    import numpy as np

    in_plane = float(np.median([min(e["spacing"][:2]) for e in entries]))
    field = float(np.median([max(n * s for n, s in zip(e["shape"][:2], e["spacing"][:2])) for e in entries]))
    spacing = round(max(in_plane, field / target_size), 2)
    return {"preset": "auto", "axis": "axial", "channel_mode": "auto", "size": None, "spacing": [spacing, spacing, 0]}


def write_derived_bundle(source: str | Path, target: str | Path, values: Mapping[str, Any]) -> Path:
    """Copy bundle ``source`` to ``target`` with top-level config keys set to ``values``.

    For a model trained on your own data: ``values`` such as ``labels`` and
    ``preprocessing_config`` replace those keys (literal values, so inference needs no
    datalist) in every config under ``configs/`` that has them; a key may be a MONAI
    ``a#b`` path into one. ``models/``, ``data/``, ``eval/``, ``cache/`` and ``runs/`` are
    not copied. ``volumes infer --bundle TARGET`` then runs it. Configs are written through
    a temporary file and a rename.
    """
    import shutil

    from volumes.atomic import atomic_path

    source, target = Path(source), Path(target)
    if not (source / "configs").is_dir():
        raise ConfigError("bundle", str(source), "a bundle folder with configs/")
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] in ("models", "eval", "data", "cache", "runs") or path.is_dir():
            continue
        out = target / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json" and relative.parts[0] == "configs":
            config = json.loads(path.read_text())
            for key, value in values.items():
                if key.split("#")[0] in config:
                    _set_path(config, key, _plain(value))
            with atomic_path(out) as tmp:
                Path(tmp).write_text(json.dumps(config, indent=4) + "\n")
        else:
            shutil.copy2(path, out)
    return target


def _set_path(config: dict, key: str, value: Any) -> None:
    """``config[key] = value`` with MONAI's ``a#b`` paths."""
    *parents, last = key.split("#")
    for part in parents:
        config = config[part]
    config[last] = value


def settings_path(checkpoint: str | Path) -> Path:
    """Where the settings of ``checkpoint`` live: ``model.pt`` -> ``model.settings.json`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.rsplit(".", 1)[0] + ".settings.json")


def _plain(value: Any) -> Any:
    """JSON types only (tuples become lists), so saved and configured settings compare equal."""
    return json.loads(json.dumps(value, default=str))


class SaveSettings:
    """A training handler that writes the network definition, slice preparation and labels beside the checkpoint.

    nnU-Net keeps its plans next to its weights for the same reason: inference then checks
    that its config builds the network the weights were trained for and prepares slices
    the same way (:func:`load_network_weights`). Written when training starts, atomically.

    Args:
        checkpoint: the checkpoint file the saver writes (its settings go to
            :func:`settings_path` of it).
        settings: the bundle's ``checkpoint_settings`` (plain JSON values).
    """

    def __init__(self, checkpoint: str | Path, settings: Mapping[str, Any]):
        self.path = settings_path(checkpoint)
        self.settings = _plain(dict(settings))

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.write())

    def write(self) -> Path:
        from volumes.atomic import atomic_write_bytes

        text = json.dumps(self.settings, indent=1, sort_keys=True) + "\n"
        atomic_write_bytes(self.path, lambda handle: handle.write(text.encode()))
        return self.path


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}." if isinstance(item, dict) else f"{prefix}{key}"))
        return out or {prefix.rstrip("."): {}}
    return {prefix: value}


# Settings added after checkpoints had been saved without them, with the value every such
# checkpoint was trained with: a saved settings file that lacks the key is read as having it.
# network.decoder: the segmentation bundle had only the UNETR decoder before "light" came.
OLD_CHECKPOINT_DEFAULTS: dict[str, Any] = {"network.decoder": "unetr"}


def check_settings(checkpoint: str | Path, configured: Mapping[str, Any]) -> None:
    """Raise :class:`VolumesError` when ``configured`` differs from the settings saved with ``checkpoint``.

    Keys present on one side only are not compared (older checkpoints saved fewer), except
    those of :data:`OLD_CHECKPOINT_DEFAULTS`: a saved file without one of them was written
    before the key existed and is compared as having its old value (a checkpoint trained
    before the ``decoder`` setting holds UNETR decoder weights). A checkpoint without a
    settings file (trained elsewhere, or before settings were saved) is not checked.
    """
    path = settings_path(checkpoint)
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VolumesError(f"{path}: unreadable settings file ({exc})") from exc
    trained, config = _flatten(saved), _flatten(_plain(dict(configured)))
    trained = {**OLD_CHECKPOINT_DEFAULTS, **trained}
    differ = [f"{key}: trained with {trained[key]!r}, configured {config[key]!r}"
              for key in sorted(set(trained) & set(config)) if trained[key] != config[key]]
    if differ:
        raise VolumesError(f"{checkpoint}: the inference config does not match the settings the weights were trained "
                           f"with ({path.name}): " + "; ".join(differ)
                           + ". Set these keys to the trained values (or retrain).")


def load_network_weights(network, checkpoint: str | Path, key: str = "model", settings: Mapping[str, Any] | None = None):
    """Load a bundle checkpoint (``{"model": state_dict}`` or a bare state dict) into ``network``.

    Loaded before anything runs the network: with a frozen random-initialised encoder the
    encoder weights in the checkpoint are part of what the aggregator was trained on.
    ``settings`` (the bundle's ``checkpoint_settings``) are checked against those saved
    beside the checkpoint first (:func:`check_settings`).
    """
    import torch

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found; train first or set ckpt_path")
    if settings is not None:
        check_settings(checkpoint, settings)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
        state = state[key]
    trained, configured = _decoder_of(state), getattr(network, "decoder_name", None)
    if trained is not None and configured is not None and trained != configured:
        # no settings file to say so (trained elsewhere or before settings were saved): the keys do
        raise VolumesError(f"{checkpoint}: the weights are of the {trained!r} decoder, the config builds "
                           f"{configured!r}: set decoder to {trained!r} (or retrain).")
    network.load_state_dict(state, strict=True)
    return network


def _decoder_of(state: Any) -> str | None:
    """Which SliceSegmenter 2D decoder a state dict holds (``unetr`` / ``light``), from its keys; None if neither."""
    if not isinstance(state, Mapping):
        return None
    if "decoder.up.0.transp_conv.conv.weight" in state:
        return "unetr"
    if "decoder.project.0.weight" in state:
        return "light"
    return None


def input_items(source: str | Path, section: str = "test") -> list[dict[str, Any]]:
    """Inference inputs: a datalist JSON (its ``section``), a CSV or a folder of volumes / DICOM series."""
    from volumes.data.discovery import discover_cases

    source = Path(source)
    chosen = section if source.suffix == ".json" else None
    return [case.to_dict() for case in discover_cases(source, section=chosen)]
