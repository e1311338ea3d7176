"""Decoders on slice-encoder features: a UNet-style 2D decoder and a light 3D refinement head."""

from volumes.decoders.unet import InstanceNorm2d, InstanceNorm3d, Refine3D, SliceUNetDecoder, use_fast_instance_norms

__all__ = ["SliceUNetDecoder", "Refine3D", "InstanceNorm2d", "InstanceNorm3d", "use_fast_instance_norms"]
