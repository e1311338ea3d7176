"""Content keys of the embedding cache (:mod:`volumes.cache`): what a cached entry is keyed on.

:func:`volume_hash` (voxels, dtype, shape, affine), :func:`config_hash` (canonical JSON of a
preprocessing mapping), :func:`encoder_weights_id` and :func:`cache_key`, which joins them.
Bumping a version string invalidates every key made with the old one. Importing this
module does not import torch; tensors are accepted by duck typing.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

from volumes.arrays import as_numpy

__all__ = ["cache_key", "config_hash", "encoder_weights_id", "volume_hash"]

# Bumping a version string invalidates every key made with the old one.
_VOLUME_HASH_VERSION = b"volumes.volume_hash.v1"
_CACHE_KEY_VERSION = "volumes.cache_key.v1"
_AFFINE_DECIMALS = 6


def _storable(value: Any) -> tuple[np.ndarray, str]:
    """Array or tensor -> (numpy array, dtype label). Tensors by duck typing so torch stays unimported."""
    if str(getattr(value, "dtype", "")) == "torch.bfloat16":
        # numpy has no bfloat16: hash the raw 16-bit patterns under their own label.
        import torch

        return value.detach().cpu().contiguous().view(torch.int16).numpy(), "bfloat16"
    array = as_numpy(value)
    if array.dtype.hasobject:
        raise TypeError(f"cannot hash or cache an array of dtype {array.dtype}: it holds Python objects")
    # Same values, same hash, whatever the byte order (NIfTI readers return big-endian arrays at times).
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return array, array.dtype.str


def volume_hash(array: Any, affine: Any | None = None) -> str:
    """sha256 hex of a volume's dtype, shape and voxel bytes, plus its affine when given.

    Args:
        array: ``np.ndarray`` or torch tensor (``MetaTensor`` included) of any shape,
            e.g. ``[C, H, W, D]``. A C-contiguous array is hashed in place (no copy).
        affine: optional voxel-to-world matrix, e.g. ``[4, 4]``; rounded to 1e-6 so
            float noise from a round trip through a file does not change the hash.
            ``None`` and an identity affine give different hashes. The affine of a
            ``MetaTensor`` is not picked up implicitly: pass it.
    """
    data, dtype_label = _storable(array)
    data = np.ascontiguousarray(data)
    digest = hashlib.sha256(_VOLUME_HASH_VERSION)
    digest.update(json.dumps({"dtype": dtype_label, "shape": list(data.shape)}).encode())
    # hashlib reads the buffer directly and releases the GIL for large inputs.
    digest.update(memoryview(data.reshape(-1).view(np.uint8)))
    if affine is None:
        digest.update(b"|affine:none")
    else:
        matrix, _ = _storable(affine)
        matrix = matrix.astype(np.float64)
        if not np.all(np.isfinite(matrix)):
            raise ValueError(f"volume_hash: the affine has non-finite values: {matrix.tolist()}")
        # Integers in units of 1e-6: no -0.0 vs 0.0 and no float formatting in the hash.
        ticks = np.rint(matrix * 10**_AFFINE_DECIMALS).astype("<i8")
        digest.update(b"|affine:" + json.dumps(list(ticks.shape)).encode())
        digest.update(memoryview(np.ascontiguousarray(ticks).reshape(-1).view(np.uint8)))
    return digest.hexdigest()


def _canonical(obj: Any, where: str = "$") -> Any:
    """Turn ``obj`` into plain JSON values whose dump is the same in every process and on every run."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) + 0.0  # -0.0 -> 0.0; json writes floats with repr, which round-trips
    if isinstance(obj, enum.Enum):
        return _canonical(obj.value, where)
    if isinstance(obj, np.generic):
        return _canonical(obj.item(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj), where)
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"config_hash: {where} has a key of type {type(key).__name__}; use strings")
            name = key if isinstance(key, str) else json.dumps(_canonical(key))
            if name in out:
                raise TypeError(f"config_hash: {where} has two keys that both read {name!r}")
            out[name] = _canonical(value, f"{where}.{name}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        items = [_canonical(v, f"{where}{{}}") for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if hasattr(obj, "tolist"):  # numpy arrays and torch tensors
        return _canonical(obj.tolist(), where)
    # str() of an arbitrary object may contain a memory address, which would make keys
    # differ between runs; refuse instead of guessing.
    raise TypeError(f"config_hash: {where} is a {type(obj).__name__}, which has no canonical JSON form")


def _canonical_json(obj: Any) -> str:
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(obj: Mapping) -> str:
    """sha256 hex of the canonical JSON of a configuration mapping.

    Canonical: sorted keys, tuples as lists, paths as strings, numpy scalars/arrays
    as Python values, floats written with ``repr`` (so ``224`` and ``224.0`` differ,
    which can only cost a recomputation). Unknown object types raise ``TypeError``
    rather than being hashed through a ``str`` that may change between runs.
    """
    return hashlib.sha256(_canonical_json(obj).encode()).hexdigest()


def cache_key(volume_hash: str, encoder_name: str, weights_id: str, preprocessing: Mapping) -> str:
    """sha256 hex of (volume hash, encoder name, weights id, preprocessing); any change -> a new key.

    ``preprocessing`` must hold everything else that changes the embedding (preset or
    window, axis, channel mode, size, layers...). ``weights_id="random"`` is refused:
    two random initialisations share it, so their embeddings would be mixed up; use
    :func:`encoder_weights_id`, which falls back to a parameter fingerprint.
    """
    if weights_id == "random":
        raise ValueError(
            "cache_key: weights_id 'random' does not identify the weights (every random encoder has it); "
            "use volumes.cache.encoder_weights_id(encoder), which hashes the parameters"
        )
    parts = [_CACHE_KEY_VERSION, str(volume_hash), str(encoder_name), str(weights_id), config_hash(preprocessing)]
    # A JSON list keeps the parts apart: ("ab", "c") and ("a", "bc") cannot collide.
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def encoder_weights_id(encoder: Any) -> str:
    """The weights identity to key a ``SliceEncoder``'s embeddings on.

    Its ``weights_id`` (``sha256:<file hash>`` or ``timm-hub:<tag>``) when that pins
    the parameters: the encoder is frozen and not randomly initialised. Otherwise
    ``params:<fingerprint>``, a hash of the current parameters (costs one pass over
    the state dict), which tells apart random seeds and fine-tuning steps.
    """
    weights_id = str(encoder.weights_id)
    if weights_id != "random" and getattr(encoder, "frozen", True):
        return weights_id
    return "params:" + encoder.fingerprint()
