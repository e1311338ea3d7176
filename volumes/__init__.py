"""volumes: DINOv2-class foundation features on CT and MR volumes, on MONAI.

``import volumes`` is light on purpose (no torch, timm, itk, pydicom...): the public
names below are imported on first use.
"""

from __future__ import annotations

from volumes._lazy import lazy_names

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_bundle": "volumes.inference",
    "BatchInference": "volumes.inference",
    "build_slice_encoder": "volumes.encoders",
    "EncoderConfig": "volumes.encoders",
    "build_aggregator": "volumes.aggregators",
    "register_aggregator": "volumes.aggregators",
    "EmbeddingCache": "volumes.cache",
    "SliceEmbedder": "volumes.embedding",
    "SliceEncoder": "volumes.encoders",
    "SliceFeatures": "volumes.encoders",
    "encoder_names": "volumes.encoders",
    "load_volume": "volumes.data.io",
    "LoadVolumed": "volumes.data.io",
    "discover_cases": "volumes.data.discovery",
    "Case": "volumes.data.discovery",
    "generate_phantom": "volumes.data.phantoms",
    "write_cohort": "volumes.data.phantoms",
    "preprocessing": "volumes.transforms",
    "IntensityPresetd": "volumes.transforms",
    "PrepareSlicesd": "volumes.transforms",
    "SliceClassifier": "volumes.networks",
    "SliceSegmenter": "volumes.networks",
}

# Submodules resolve as attributes too, so bundle configs can write `$import volumes`
# and then `volumes.transforms.preprocessing(...)`.
_SUBMODULES = (
    "aggregators", "apps", "bundle", "cache", "classification", "cli", "data", "decoders", "embedding", "encoders",
    "evaluation", "inference", "networks", "pacs", "segmentation", "transforms",
)

__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_names(__name__, _LAZY, submodules=_SUBMODULES)
