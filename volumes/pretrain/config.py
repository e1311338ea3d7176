"""The settings of one ``volumes pretrain`` run (``volumes pretrain --help`` says the same per option)."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from volumes.errors import ConfigError

__all__ = ["PretrainConfig", "RESUMABLE", "pretrain_defaults"]

#: settings a resumed run may change; every other one must be the checkpoint's
RESUMABLE = ("checkpoint_every", "log_every", "num_workers", "progress", "out", "device")


@dataclass
class PretrainConfig:
    """Everything a run depends on (``volumes pretrain --help`` says the same per option)."""

    data: str
    out: str
    encoder: str = "vit_small_patch14_dinov2"
    weights: str | None = None
    pretrained: bool = False
    model_kwargs: dict = field(default_factory=dict)
    # slices (as the bundles' preprocessing_config) and views
    preset: str | None = "ct_three_windows"  # "auto": each volume by its modality (CT windows / MR normalisation)
    channel_mode: str = "windows"
    modality: str | None = None  # with preset "auto": CT, MR or PATTERN=CT,PATTERN=MR for files that carry none
    size: int = 112
    planes: tuple[str, ...] = ("axial",)
    min_foreground: float = 0.1
    jitter: float = 0.1
    local_crops: int = 4
    # optimisation
    steps: int = 1000
    batch_size: int = 32
    lr: float | None = None  # None: 0.004 x sqrt(batch / 1024) (DINOv2's rule), x 0.2 when continuing
    min_lr: float = 1e-6
    warmup_steps: int | None = None  # None: 10% of the steps
    weight_decay: tuple[float, float] = (0.04, 0.2)
    layer_decay: float = 0.9
    clip_grad: float = 3.0
    drop_path: float = 0.1
    layer_scale: float = 1.0  # DINOv2 starts at 1e-5; see docs/PRETRAIN.md for why not here
    freeze_last_layer_steps: int | None = None  # None: 5% of the steps
    freeze_backbone_steps: int | None = None  # None: 10% of the steps when continuing from weights, else 0
    # the recipe
    prototypes: int = 1024
    ibot_prototypes: int = 1024
    separate_ibot_head: bool = True
    head_hidden: int = 1024
    head_bottleneck: int = 256
    momentum: tuple[float, float] = (0.992, 1.0)
    teacher_temp: tuple[float, float] = (0.04, 0.07)
    teacher_temp_warmup_steps: int | None = None  # None: 30% of the steps
    student_temp: float = 0.1
    centering: str = "centering"
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    num_workers: int | None = None
    cache_volumes: int = 8
    slices_per_volume: int = 16
    collapse_patience: int = 200
    collapse_std: float = 1e-3
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.planes = tuple(self.planes)
        self.weight_decay = tuple(self.weight_decay)
        self.momentum = tuple(self.momentum)
        self.teacher_temp = tuple(self.teacher_temp)
        self.mask_ratio = tuple(self.mask_ratio)
        checks = [
            ("steps", self.steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 2, "an integer >= 2 (KoLeo needs a neighbour)"),
            ("centering", self.centering in ("centering", "sinkhorn"), ["centering", "sinkhorn"]),
            ("layer_decay", 0 < self.layer_decay <= 1, "a number in (0, 1]"),
            ("mask_ratio", 0 <= self.mask_ratio[0] <= self.mask_ratio[1] < 1, "0 <= low <= high < 1"),
            ("mask_probability", 0 <= self.mask_probability <= 1, "a probability"),
            ("momentum", 0 <= self.momentum[0] <= self.momentum[1] <= 1, "0 <= start <= end <= 1"),
            ("prototypes", self.prototypes >= 2 and self.ibot_prototypes >= 2, "at least 2 prototypes per head"),
            ("checkpoint_every", self.checkpoint_every >= 1, "an integer >= 1"),
            ("log_every", self.log_every >= 1, "an integer >= 1"),
            ("collapse_patience", self.collapse_patience >= 1, "an integer >= 1"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(key, getattr(self, key), allowed)
        if self.pretrained and self.weights is not None:
            raise ConfigError("weights", self.weights, "either --weights FILE or --pretrained, not both")

    @property
    def continuing(self) -> bool:
        """Starts from trained weights (continued pretraining) rather than a random backbone."""
        return self.weights is not None or self.pretrained

    def resolved(self) -> dict[str, Any]:
        """The settings with every default that depends on others filled in (what a checkpoint records)."""
        s = asdict(self)
        s["lr"] = self.lr if self.lr is not None else 0.004 * math.sqrt(self.batch_size / 1024) * (
            0.2 if self.continuing else 1.0)
        s["warmup_steps"] = self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)
        s["freeze_last_layer_steps"] = (self.freeze_last_layer_steps if self.freeze_last_layer_steps is not None
                                        else self.steps // 20)
        s["freeze_backbone_steps"] = (self.freeze_backbone_steps if self.freeze_backbone_steps is not None
                                      else (self.steps // 10 if self.continuing else 0))
        s["teacher_temp_warmup_steps"] = (self.teacher_temp_warmup_steps if self.teacher_temp_warmup_steps is not None
                                          else max(1, (3 * self.steps) // 10))
        s["weights"] = str(Path(self.weights).resolve()) if self.weights is not None else None
        s["data"] = str(Path(self.data).resolve())
        s["out"] = str(Path(self.out).resolve())
        return json.loads(json.dumps(s))  # tuples as lists, as a checkpoint stores them


def pretrain_defaults() -> dict[str, Any]:
    """Each setting's default, from :class:`PretrainConfig` itself: what the command line's flags default to."""
    out = {}
    for f in fields(PretrainConfig):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out
