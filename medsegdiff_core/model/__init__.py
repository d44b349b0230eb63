"""The MedSegDiff network: UNet denoiser with Dynamic Conditional Encoding and the FF-Parser."""

from .dce import DynamicConditionalEncoding
from .ff_parser import FFParser
from .presets import PRESETS, UNetSpec, resolve_spec
from .unet import MedSegDiffUNet

__all__ = [
    "PRESETS",
    "DynamicConditionalEncoding",
    "FFParser",
    "MedSegDiffUNet",
    "UNetSpec",
    "resolve_spec",
]
