"""Decoders on slice-encoder features: a UNet-style 2D decoder and a light 3D refinement head."""

from volumes.decoders.unet import Refine3D, SliceUNetDecoder

__all__ = ["SliceUNetDecoder", "Refine3D"]
