"""Each volume its modality's preparation: CT windows for CT, MR normalisation for MR.

:class:`ByModalityd` holds one pipeline per modality and runs the one that fits each
volume, so a mixed archive (CT and MR at once) never gets CT windows on an MR. The
modality of a volume is, in this order:

1. the data dict's ``modality`` field (a datalist written by ``volumes datalist`` has one
   per case; ``CT``, ``MR`` or a series name such as ``mr_t1``);
2. the DICOM Modality tag (0008,0060), which :func:`volumes.data.io.load_volume` keeps in
   the image's metadata;
3. the ``default`` the configuration gives (for NIfTI files without a datalist).

A volume none of these names is refused with an error naming its file. Both pipelines
end on the same ``[3, H, W, D]`` encoder input (CT: three windows as channels; MR: the
normalised channel repeated), so one network serves both. :meth:`ByModalityd.inverse`
undoes whichever pipeline ran (``monai.transforms.Invertd`` works as with one pipeline).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import Compose, InvertibleTransform, MapTransform, allow_missing_keys_mode
from monai.utils import TraceKeys

from volumes.errors import ConfigError, VolumeReadError

#: preset and channel mode of each modality under ``preset="auto"``
MODALITY_PREPARATION: dict[str, tuple[str, str]] = {
    "CT": ("ct_three_windows", "windows"),
    "MR": ("mr", "repeat"),
}


def volume_modality(data: Mapping[Hashable, Any], image_key: Hashable = "image", modality_key: str = "modality",
                    default: str | None = None) -> str:
    """``"CT"`` or ``"MR"`` for one data dict (field, then DICOM tag, then ``default``); see the module docstring."""
    from volumes.data.labelled import modality_of

    image = data.get(image_key)
    meta = getattr(image, "meta", None) or {}
    for source, value in (("the 'modality' field", data.get(modality_key)),
                          ("the DICOM Modality tag", meta.get("modality")),
                          ("the configured default", default)):
        if value:
            try:
                return modality_of(str(value))
            except ConfigError:
                raise VolumeReadError(_name(data, image_key), f"{source} says {value!r}; only CT and MR volumes "
                                                              "have a preparation") from None
    raise VolumeReadError(_name(data, image_key), "modality unknown: give the case a 'modality' field (CT or MR) "
                                                  "in its datalist, or set the configuration's default modality")


def intensity_modality(values: Any) -> str:
    """``"CT"`` when the intensities look like Hounsfield units, else ``"MR"``: a guess for files without a tag.

    CT stores HU, so air and fat put many voxels below -50 (45-80% of the voxels of each of the
    26 sarcoma CTs, 58-64% of the example CT); MR intensities are not negative (0% of the 36
    sarcoma MRs and the prostate MR). 1% of the voxels below -50 counts as CT.
    """
    array = np.asarray(values, dtype=np.float32)
    return "CT" if array.size and float((array < -50).mean()) >= 0.01 else "MR"


def modality_rule(text: str):
    """``CT``/``MR`` (every file) or ``PATTERN=CT,PATTERN=MR`` (shell patterns on the path) -> ``path -> modality | None``."""
    from fnmatch import fnmatch

    from volumes.data.labelled import modality_of

    if "=" not in text:
        fixed = modality_of(text)
        return lambda path: fixed
    rules = []
    for part in text.split(","):
        pattern, sep, name = part.partition("=")
        if not sep or not pattern.strip():
            raise ConfigError("modality", text, "CT, MR, or PATTERN=CT,PATTERN=MR")
        rules.append((pattern.strip(), modality_of(name.strip())))

    def rule(path: str) -> str | None:
        text_path = str(path)
        return next((m for pattern, m in rules if fnmatch(text_path, pattern) or fnmatch(Path(text_path).name, pattern)),
                    None)

    return rule


def _name(data: Mapping[Hashable, Any], image_key: Hashable) -> str:
    image = data.get(image_key)
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj") or data.get("case_id") or image)


class ByModalityd(MapTransform, InvertibleTransform):
    """Run ``pipelines[modality]`` on each data dict (see the module docstring).

    Args:
        keys: the keys the pipelines transform (image and label keys), for the inverse.
        pipelines: ``{"CT": Compose, "MR": Compose}``.
        image_key: whose metadata may hold the DICOM modality.
        default: modality of volumes that carry none.
    """

    def __init__(self, keys, pipelines: Mapping[str, Compose], image_key: Hashable = "image",
                 modality_key: str = "modality", default: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pipelines = dict(pipelines)
        self.image_key = image_key
        self.modality_key = modality_key
        self.default = default

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        modality = volume_modality(data, self.image_key, self.modality_key, self.default)
        return self.pipelines[modality](dict(data))

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the pipeline that ran: the one holding the transform last recorded on the data."""
        d = dict(data)
        for key in self.key_iterator(d):
            operations = getattr(d[key], "applied_operations", None)
            if not operations:
                continue
            last = operations[-1].get(TraceKeys.ID)
            for pipeline in self.pipelines.values():
                if any(id(t) == last for t in pipeline.flatten().transforms):
                    if not self.allow_missing_keys:
                        return pipeline.inverse(d)
                    # Invertd passes only the keys it inverts and allows the others to be missing
                    with allow_missing_keys_mode(pipeline):
                        return pipeline.inverse(d)
        raise RuntimeError("ByModalityd.inverse: the data carries no operation of either pipeline")
