"""Slice encoders: timm DINOv2 / DINOv3 ViTs and the weight formats they load."""

from volumes.encoders.slice_encoder import SliceEncoder, SliceFeatures, default_layers, encoder_names, volume_to_slices
from volumes.encoders.weights import read_checkpoint

__all__ = ["SliceEncoder", "SliceFeatures", "default_layers", "encoder_names", "read_checkpoint", "volume_to_slices"]
