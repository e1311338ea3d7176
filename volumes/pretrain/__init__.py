"""Self-supervised pretraining of slice encoders on unlabelled volumes: the DINOv2 recipe (``volumes pretrain``).

* :mod:`volumes.pretrain.data`: cases -> foreground slices prepared as the bundles prepare
  them -> multi-crop views, streamed with bounded memory;
* :mod:`volumes.pretrain.model`: student and EMA teacher (timm ViT through lightly's masked
  ViT, DINO and iBOT heads);
* :mod:`volumes.pretrain.config`: the settings of a run (:class:`PretrainConfig`);
* :mod:`volumes.pretrain.trainer`: the step (DINO + iBOT + KoLeo), schedules, checkpoints,
  resume, metrics, collapse detection, torchrun DDP.

Outputs (``OUT/``): ``encoder.safetensors`` (the teacher's ViT, timm keys: what
``SliceEncoder(weights=...)`` and the bundles' ``encoder_weights`` read), ``encoder.json``,
``checkpoint.pt``, ``metrics.jsonl``, ``skipped.csv``. See docs/PRETRAIN.md.
"""

from volumes._lazy import lazy_names

# resolved on first use, so `volumes --help` (which reads PretrainConfig's defaults) never imports torch
_LAZY = {"PretrainConfig": "volumes.pretrain.config", "CollapseError": "volumes.pretrain.trainer",
         "PretrainResult": "volumes.pretrain.trainer", "Pretrainer": "volumes.pretrain.trainer",
         "pretrain": "volumes.pretrain.trainer"}

__all__ = ["CollapseError", "PretrainConfig", "PretrainResult", "Pretrainer", "pretrain"]

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
