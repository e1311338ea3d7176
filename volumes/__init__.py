"""volumes: DINOv2-class foundation features on CT and MR volumes, on MONAI.

``import volumes`` is light on purpose (no torch, timm, itk, pydicom...): the public
names below are imported on first use.
"""

from __future__ import annotations

import importlib

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


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"volumes.{name}")
    raise AttributeError(f"module 'volumes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
