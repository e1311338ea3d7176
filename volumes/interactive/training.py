"""Training the click model with simulated clicks, by MONAI's DeepGrow interaction transforms.

Each sample: a labelled volume's working grid (features computed once, kept in memory),
one of the training labels as the object, a window around a random voxel of it, and
clicks simulated as MONAI Label's DeepGrow trainer does:

1. :class:`~monai.apps.deepgrow.transforms.AddInitialSeedPointd`: a first positive click,
   drawn with probability growing with the distance from the object's border;
2. with probability ``interaction_probability``, 1 to ``max_interactions`` rounds of: the
   current network's prediction (no gradient),
   :class:`~monai.apps.deepgrow.transforms.FindDiscrepancyRegionsd` (false negatives and
   false positives), :class:`~monai.apps.deepgrow.transforms.AddRandomGuidanced` (a click
   in the larger of the two, drawn the same way);
3. :class:`~monai.apps.deepgrow.transforms.AddGuidanceSignald` for the click maps.

With ``intensity_augment`` > 0 each window's three CT windows are scaled and shifted at
random first, channel by channel (MONAI's ``RandScaleIntensity`` and ``RandShiftIntensity``),
so the network learns "the clicked structure" rather than "soft tissue of about 110 HU":
the training organs share one intensity, the held-out ones do not.

Loss: MONAI's ``DiceCELoss`` (sigmoid) on the window. The same trainer with
``use_features=False`` trains the DeepGrow 3D baseline.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.apps.deepgrow.transforms import AddInitialSeedPointd, AddRandomGuidanced, FindDiscrepancyRegionsd
from monai.losses import DiceCELoss
from monai.transforms import RandScaleIntensity, RandShiftIntensity

from volumes.interactive.model import DEFAULT_FEATURES, ClickNet, click_maps, crop_window, window_slices
from volumes.schedules import cosine
from volumes.interactive.session import VolumeFeatures

__all__ = ["ClickTrainingConfig", "train_click_model", "save_click_model", "load_click_model", "sample_window"]


@dataclass
class ClickTrainingConfig:
    """Settings of one click-model training run (saved beside the weights)."""

    labels: dict[str, int] = field(default_factory=lambda: {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4})
    window: tuple[int, int, int] = (112, 112, 32)
    steps: int = 300
    batch_size: int = 2
    learning_rate: float = 3e-3
    interaction_probability: float = 0.5
    max_interactions: int = 4
    use_features: bool = True
    projected: int = 16
    features: tuple[int, ...] = DEFAULT_FEATURES  # the network's own default, written once (model.py)
    scale: int = 2
    intensity_cue: bool = True
    intensity_augment: float = 0.3
    seed: int = 0


def sample_window(vf: VolumeFeatures, value: int, window: Sequence[int], rng: np.random.Generator,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray] | None:
    """A window around a random voxel of label ``value``: (image, features, binary label [1, W, W, Wz])."""
    assert vf.label is not None
    voxels = torch.nonzero(vf.label == value)
    if len(voxels) == 0:
        return None
    centre = voxels[rng.integers(len(voxels))].tolist()
    p = vf.grid.patch_size
    jitter = [int(rng.integers(-w // 4, w // 4 + 1)) for w in window]
    win = window_slices([c + j for c, j in zip(centre, jitter)], vf.grid.grid_shape, window, p)
    image = crop_window(vf.image.float(), win, value=float(vf.image.min()))
    feats = crop_window(vf.features.float(), win, scale=(p, p, 1))
    label = crop_window((vf.label == value)[None].float(), win).numpy()
    if label.sum() == 0:
        return None
    return image, feats, label


def _clicks_for(model: ClickNet, image: torch.Tensor, feats: torch.Tensor, label: np.ndarray, config: ClickTrainingConfig,
                rng: np.random.Generator, seed: AddInitialSeedPointd, more: AddRandomGuidanced,
                discrepancy: FindDiscrepancyRegionsd) -> np.ndarray:
    data: dict[str, Any] = seed({"label": label})
    rounds = int(rng.integers(1, config.max_interactions + 1)) if rng.random() < config.interaction_probability else 0
    for _ in range(rounds):
        maps = click_maps(label.shape[1:], data["guidance"], model.sigma)
        with torch.no_grad():
            model.eval()
            pred = torch.sigmoid(model(feats[None] if model.use_features else None, image[None],
                                       torch.from_numpy(maps)[None]))[0].numpy()
            model.train()
        data = discrepancy({**data, "pred": pred})
        data = more({**data, "probability": 1.0})
    return click_maps(label.shape[1:], data["guidance"], model.sigma)


def train_click_model(volumes: Sequence[VolumeFeatures], config: ClickTrainingConfig, *, progress: bool = True,
                      log: list | None = None, curves: str | Path | None = None) -> ClickNet:
    """Train a :class:`ClickNet` on working grids with labels; returns it in eval mode.

    ``log`` collects each step's loss; ``curves`` is a folder for TensorBoard event files of
    the loss and the learning rate (``tensorboard --logdir`` it).
    """
    from tqdm.auto import tqdm

    from volumes.curves import TrainingCurves

    if not volumes:
        raise ValueError("no labelled volumes to train the click model on")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    channels = int(volumes[0].features.shape[0])
    model = ClickNet(channels, config.projected, use_features=config.use_features, features=config.features,
                     scale=config.scale, intensity_cue=config.intensity_cue)
    seed, more, discrepancy = AddInitialSeedPointd(), AddRandomGuidanced(), FindDiscrepancyRegionsd()
    seed.set_random_state(config.seed)
    more.set_random_state(config.seed + 1)
    loss_fn = DiceCELoss(sigmoid=True)
    scale_intensity = RandScaleIntensity(factors=config.intensity_augment, prob=1.0, channel_wise=True)
    shift_intensity = RandShiftIntensity(offsets=config.intensity_augment, prob=1.0, channel_wise=True)
    scale_intensity.set_random_state(config.seed + 2)
    shift_intensity.set_random_state(config.seed + 3)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to zero
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * cosine(s, config.steps, 1.0, 0.0))
    pairs = [(i, value) for i, vf in enumerate(volumes) for value in config.labels.values()
             if vf.label is not None and bool((vf.label == value).any())]
    if not pairs:
        raise ValueError(f"none of the labels {config.labels} occurs in the training volumes")
    model.train()
    bar = tqdm(range(config.steps), desc="click model" if config.use_features else "deepgrow 3d", disable=not progress)
    start = time.perf_counter()
    writer = TrainingCurves(curves) if curves is not None else None
    for step in bar:
        images, feats, clicks, labels = [], [], [], []
        while len(images) < config.batch_size:
            index, value = pairs[int(rng.integers(len(pairs)))]
            sample = sample_window(volumes[index], value, config.window, rng)
            if sample is None:
                continue
            image, feat, label = sample
            if config.intensity_augment > 0:
                out = shift_intensity(scale_intensity(image))
                image = (out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)).float()
            clicks.append(torch.from_numpy(_clicks_for(model, image, feat, label, config, rng, seed, more, discrepancy)))
            images.append(image)
            feats.append(feat)
            labels.append(torch.from_numpy(label))
        logits = model(torch.stack(feats) if config.use_features else None, torch.stack(images), torch.stack(clicks))
        loss = loss_fn(logits, torch.stack(labels))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        value = float(loss.detach())
        bar.set_postfix(loss=f"{value:.3f}")
        if log is not None:
            log.append({"step": step + 1, "loss": value, "seconds": time.perf_counter() - start})
        if writer is not None:
            writer.add({"loss": value, "lr": optimiser.param_groups[0]["lr"]}, step + 1)
    if writer is not None:
        writer.close()
    return model.eval()


def save_click_model(model: ClickNet, path: str | Path, config: ClickTrainingConfig, **extra: Any) -> Path:
    """``path`` (safetensors) + ``path.json`` (the network's and the training's settings), atomically."""
    from safetensors.torch import save_file

    from volumes.atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    settings = {"network": model.config, "training": asdict(config), **extra}
    with atomic_path(path.with_suffix(".json"), suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(settings, indent=1, default=list) + "\n")
    return path


def load_click_model(path: str | Path) -> tuple[ClickNet, dict[str, Any]]:
    """A saved click model and its settings."""
    from safetensors.torch import load_file

    path = Path(path)
    settings_file = path.with_suffix(".json")
    if not path.is_file() or not settings_file.is_file():
        raise FileNotFoundError(f"click model {path} (and its settings {settings_file.name}) not found")
    settings = json.loads(settings_file.read_text())
    net = settings["network"]
    model = ClickNet(net["feature_channels"], net["projected"], use_features=net["use_features"],
                     features=net["features"], sigma=net["sigma"], scale=net["scale"],
                     intensity_cue=net.get("intensity_cue", False))  # models saved before the cue had none
    model.load_state_dict(load_file(str(path)))
    return model.eval(), settings
