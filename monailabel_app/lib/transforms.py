"""The app's own dictionary transforms around the bundles' preprocessing.

MONAI Label puts the request's image path under ``image_path`` in the data dictionary
(``BasicInferTask.__call__``). MONAI 1.6's ``Spacingd`` treats every ``<key>_*`` entry
as a metadata dictionary of ``<key>`` and calls ``.update()`` on it, so with
``image_path`` a string it fails with ``AttributeError: 'str' object has no attribute
'update'`` whenever a bundle resamples (``preprocessing_config#spacing``).
:class:`StashKeysd` moves such entries out of the way for the bundle's transforms and
:class:`RestoreKeysd` puts them back, without patching MONAI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Callable

from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["STASH_KEY", "BundlePrepared", "RecordGeometryd", "RestoreKeysd", "StashKeysd"]

#: Where :class:`StashKeysd` keeps the entries it moves.
STASH_KEY = "_monailabel_app_stash"


class StashKeysd(MapTransform):
    """Move every ``<key>_<suffix>`` entry that is not a mapping (``image_path``...) under :data:`STASH_KEY`.

    Args:
        keys: the image keys whose ``<key>_*`` neighbours MONAI would take for metadata.
    """

    def __init__(self, keys: KeysCollection = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        stash = dict(d.get(STASH_KEY, {}))
        for key in self.keys:
            prefix = f"{key}_"
            for name in [k for k in d if isinstance(k, str) and k.startswith(prefix)]:
                if not isinstance(d[name], Mapping):
                    stash[name] = d.pop(name)
        d[STASH_KEY] = stash
        return d


class RestoreKeysd:
    """Put the entries :class:`StashKeysd` moved back where they were."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d.update(d.pop(STASH_KEY, {}))
        return d


class RecordGeometryd:
    """Keep the loaded volume's original affine under ``original_affine``.

    Runs after :class:`volumes.data.io.LoadVolumed`, whose MetaTensor carries the file's
    own affine in ``meta["original_affine"]`` (before reorientation to RAS); the label
    map is written back in that geometry.
    """

    def __init__(self, key: str = "image") -> None:
        self.key = key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        volume = d[self.key]
        d["original_affine"] = volume.meta.get("original_affine", volume.affine)
        return d


class BundlePrepared:
    """The bundle predictor's ``prepare`` step (its preprocessing) as a transform.

    Args:
        predictor: a factory returning the current predictor (reloaded after training).
    """

    def __init__(self, predictor: Callable[[], Any]) -> None:
        self.predictor = predictor

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.predictor().prepare(dict(data))
