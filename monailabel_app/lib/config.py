"""The app's settings, read from ``monailabel start_server ... --conf KEY VALUE``.

MONAI Label hands every ``--conf`` pair to the app as a string; :func:`parse_conf` turns
them into a typed :class:`AppConfig`, naming the key of any value it cannot read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["MODEL_NAMES", "AppConfig", "ConfError", "parse_conf", "strtobool"]

#: Model names the app serves, and the bundle folder each one comes from.
MODEL_NAMES: dict[str, str] = {
    "segmentation": "dinov2_unet_segmentation",
    "classification": "dinov2_slice_classification",
}

#: Every ``--conf`` key the app reads (MONAI Label's own keys such as ``zoo_source`` pass through).
KNOWN_KEYS = frozenset({
    "models", "bundles_dir", "model_dir", "device", "epochs", "encoder_depth", "size", "use_pretrained",
    "segmentation_weights", "classification_weights", "encoder_weights", "segmentation_overrides",
    "classification_overrides", "val_split", "multi_gpu", "seed", "allow_remote", "uncertainty_cache",
    "interactive_model", "interactive_cache_mb",
})


class ConfError(ValueError):
    """A ``--conf`` value the app cannot use; the message names the key."""


def strtobool(value: Any) -> bool:
    """``"true"/"1"/"yes"/"on"`` -> True, ``"false"/"0"/"no"/"off"`` -> False (case-insensitive)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class AppConfig:
    """What the app serves and how.

    Attributes:
        models: the models to serve, from :data:`MODEL_NAMES` (``--conf models all``).
        bundles_dir: folder holding the two MONAI bundles (default: the checkout's ``bundles/``).
        model_dir: where each model's current checkpoint, training runs and stats live
            (``<model_dir>/<model>/model.pt``; default: ``<app>/model``).
        device: ``cpu``, ``cuda`` or ``cuda:N``; default: CUDA when available.
        epochs: default epochs of a training run (a request's ``max_epochs`` wins).
        encoder_depth: number of ViT blocks (``encoder_model_kwargs={"depth": N}``); None keeps the bundle's.
        size: in-plane input size (``preprocessing_config#size``); None keeps the bundle's.
        use_pretrained: start from the bundle's own ``models/model.pt`` when it has one.
        weights: per model, a checkpoint to start from (``--conf segmentation_weights PATH``).
        encoder_weights: DINOv2 encoder weights for a fresh start (a local weights file or
            Hugging Face model folder, as ``volumes.encoders.SliceEncoder`` reads them).
        overrides: per model, extra bundle config overrides (JSON object, ``{"slab": 8}``).
        val_split: fraction of the labelled images held out for validation during training.
        multi_gpu: let training / batch inference spread over several GPUs.
        seed: seed of fresh networks and of the training split.
        allow_remote: allow the server to listen on a non-loopback address.
        uncertainty_cache: file of cached uncertainty scores (default ``<model_dir>/uncertainty.json``).
        interactive_model: a click model folder (``volumes interact train`` or the interactive
            bundle's ``models/``); serves the ``clicks`` (deepgrow) and ``fewshot`` (scribbles) tasks.
        interactive_cache_mb: memory for the encoded volumes the click tasks keep (LRU).
    """

    models: tuple[str, ...] = tuple(MODEL_NAMES)
    bundles_dir: Path = Path("bundles")
    model_dir: Path = Path("model")
    device: str | None = None
    epochs: int = 10
    encoder_depth: int | None = None
    size: int | None = None
    use_pretrained: bool = True
    weights: dict[str, Path] = field(default_factory=dict)
    encoder_weights: Path | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    val_split: float = 0.2
    multi_gpu: bool = False
    seed: int = 0
    allow_remote: bool = False
    uncertainty_cache: Path | None = None
    interactive_model: Path | None = None
    interactive_cache_mb: int = 2048

    def bundle_root(self, model: str) -> Path:
        return self.bundles_dir / MODEL_NAMES[model]

    def bundle_overrides(self, model: str) -> dict[str, Any]:
        """Config overrides for ``model``'s bundle, for inference and training alike."""
        values: dict[str, Any] = {}
        if self.encoder_depth is not None:
            values["encoder_model_kwargs"] = {"depth": self.encoder_depth}
        if self.size is not None:
            values["preprocessing_config#size"] = self.size
        values.update(self.overrides.get(model, {}))
        return values


def _int(conf: Mapping[str, str], key: str, default: int | None, minimum: int = 1) -> int | None:
    if key not in conf or conf[key] in ("", "none", "None"):
        return default
    try:
        value = int(conf[key])
    except ValueError:
        raise ConfError(f"--conf {key} {conf[key]!r}: expected an integer") from None
    if value < minimum:
        raise ConfError(f"--conf {key} {value}: expected an integer >= {minimum}")
    return value


def _bool(conf: Mapping[str, str], key: str, default: bool) -> bool:
    if key not in conf:
        return default
    try:
        return strtobool(conf[key])
    except ValueError:
        raise ConfError(f"--conf {key} {conf[key]!r}: expected true or false") from None


def _json_object(conf: Mapping[str, str], key: str) -> dict[str, Any]:
    if not conf.get(key):
        return {}
    try:
        value = json.loads(conf[key])
    except json.JSONDecodeError as exc:
        raise ConfError(f"--conf {key}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfError(f"--conf {key}: expected a JSON object of bundle config keys, got {value!r}")
    return value


def _existing_path(conf: Mapping[str, str], key: str, folder_ok: bool = False) -> Path | None:
    if not conf.get(key):
        return None
    path = Path(conf[key]).expanduser().resolve()
    if not (path.is_file() or (folder_ok and path.is_dir())):
        raise ConfError(f"--conf {key} {conf[key]!r}: {'file or folder' if folder_ok else 'file'} not found")
    return path


def parse_conf(conf: Mapping[str, Any], app_dir: str | Path) -> AppConfig:
    """Read MONAI Label's ``conf`` dict (all values strings) into an :class:`AppConfig`.

    Raises:
        ConfError: a value that cannot be used; the message names its ``--conf`` key.
    """
    app_dir = Path(app_dir).resolve()
    conf = {str(k): str(v) for k, v in conf.items()}

    requested = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
    if not requested or requested == ["all"]:
        models = tuple(MODEL_NAMES)
    else:
        unknown = [m for m in requested if m not in MODEL_NAMES]
        if unknown:
            raise ConfError(f"--conf models: unknown model(s) {unknown}; choose from {list(MODEL_NAMES)} or 'all'")
        models = tuple(dict.fromkeys(requested))

    bundles_dir = Path(conf.get("bundles_dir") or app_dir.parent / "bundles").expanduser().resolve()
    for model in models:
        config = bundles_dir / MODEL_NAMES[model] / "configs" / "inference.json"
        if not config.is_file():
            raise ConfError(f"--conf bundles_dir {bundles_dir}: {config} not found (the checkout's bundles/ folder)")
    model_dir = Path(conf.get("model_dir") or app_dir / "model").expanduser().resolve()

    device = conf.get("device") or None
    if device is not None and not (device == "cpu" or device.startswith("cuda")):
        raise ConfError(f"--conf device {device!r}: expected cpu, cuda or cuda:N")

    try:
        val_split = float(conf.get("val_split", 0.2))
    except ValueError:
        raise ConfError(f"--conf val_split {conf['val_split']!r}: expected a number") from None
    if not 0.0 <= val_split < 1.0:
        raise ConfError(f"--conf val_split {val_split}: expected a fraction in [0, 1)")

    weights = {m: p for m in MODEL_NAMES if (p := _existing_path(conf, f"{m}_weights")) is not None}
    cache = conf.get("uncertainty_cache")
    return AppConfig(
        models=models,
        bundles_dir=bundles_dir,
        model_dir=model_dir,
        device=device,
        epochs=_int(conf, "epochs", 10),
        encoder_depth=_int(conf, "encoder_depth", None),
        size=_int(conf, "size", None, minimum=14),
        use_pretrained=_bool(conf, "use_pretrained", True),
        weights=weights,
        encoder_weights=_existing_path(conf, "encoder_weights", folder_ok=True),
        overrides={m: _json_object(conf, f"{m}_overrides") for m in MODEL_NAMES},
        val_split=val_split,
        multi_gpu=_bool(conf, "multi_gpu", False),
        seed=_int(conf, "seed", 0, minimum=0),
        allow_remote=_bool(conf, "allow_remote", False),
        uncertainty_cache=Path(cache).expanduser().resolve() if cache else None,
        interactive_model=_click_model(conf),
        interactive_cache_mb=_int(conf, "interactive_cache_mb", 2048, minimum=64),
    )


def _click_model(conf: Mapping[str, str]) -> Path | None:
    """``--conf interactive_model DIR``: a folder with click_model.safetensors and click_model.json."""
    folder = _existing_path(conf, "interactive_model", folder_ok=True)
    if folder is not None and not (folder / "click_model.safetensors").is_file():
        raise ConfError(f"--conf interactive_model {folder}: no click_model.safetensors there "
                        "(train one with `python -m volumes interact train` or the interactive bundle)")
    return folder
