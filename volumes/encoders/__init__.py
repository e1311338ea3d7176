"""Slice encoders: timm DINOv2 / DINOv3 ViTs and the weight formats they load, a timm CNN adapter, and the
foundation-model zoo (SAM / MedSAM, CLIP / OpenCLIP / BiomedCLIP, BLIP, MAE, ViT IN-21k: :mod:`volumes.encoders.zoo`)."""

from volumes.encoders.slice_encoder import (SliceEncoder, SliceFeatures, default_layers, encoder_names, volume_to_slices,
                                            write_random_encoder)
from volumes.encoders.weights import read_checkpoint
from volumes.encoders.cnn import CNNSliceEncoder, cnn_encoder_names
from volumes.encoders.registry import build_slice_encoder, encoder_families, register_encoder_family
from volumes.encoders.config import EncoderConfig
from volumes.encoders.zoo import ZooSliceEncoder, native_input_size, zoo_encoder_names

__all__ = [
    "CNNSliceEncoder",
    "EncoderConfig",
    "SliceEncoder",
    "SliceFeatures",
    "build_slice_encoder",
    "cnn_encoder_names",
    "default_layers",
    "encoder_families",
    "encoder_names",
    "register_encoder_family",
    "read_checkpoint",
    "volume_to_slices",
    "ZooSliceEncoder",
    "native_input_size",
    "write_random_encoder",
    "zoo_encoder_names",
]
