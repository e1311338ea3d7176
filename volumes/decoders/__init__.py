"""Decoders on slice-encoder features: 2D decoders (UNETR-style and light) and a light 3D refinement head."""

from volumes.decoders.light import LightSliceDecoder
from volumes.decoders.unet import InstanceNorm2d, InstanceNorm3d, Refine3D, SliceUNetDecoder, use_fast_instance_norms

DECODERS = {"unetr": SliceUNetDecoder, "light": LightSliceDecoder}

__all__ = ["DECODERS", "LightSliceDecoder", "SliceUNetDecoder", "Refine3D", "InstanceNorm2d", "InstanceNorm3d",
           "use_fast_instance_norms"]
