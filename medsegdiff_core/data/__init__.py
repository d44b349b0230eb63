"""Data: the generic 2-D image/mask folder layout, built-in synthetic fundus sites, and
prediction writers.

Images are float32 (C, H, W) and masks float32 {0, 1} (M, H, W), one channel per configured
class; see :mod:`.folder` for the on-disk layout.
"""

from .folder import (
    IMAGE_SUFFIXES,
    Case,
    SegmentationFolder,
    channels_to_labels,
    check_folder,
    find_cases,
    labels_to_channels,
    read_display_image,
    read_image,
    read_label_map,
)
from .synthetic import (
    FUNDUS_CLASSES,
    GLAUCOMA_CUP_TO_DISC,
    SiteStyle,
    default_site_styles,
    make_fundus_case,
    write_fundus_sites,
)
from .writers import (
    OVERLAY_COLOURS,
    OutputFolder,
    resize_label_map,
    resize_probability,
    write_label_map,
    write_overlay,
    write_uncertainty,
)

__all__ = [
    "FUNDUS_CLASSES",
    "GLAUCOMA_CUP_TO_DISC",
    "IMAGE_SUFFIXES",
    "OVERLAY_COLOURS",
    "Case",
    "OutputFolder",
    "SegmentationFolder",
    "SiteStyle",
    "channels_to_labels",
    "check_folder",
    "default_site_styles",
    "find_cases",
    "labels_to_channels",
    "make_fundus_case",
    "read_display_image",
    "read_image",
    "read_label_map",
    "resize_label_map",
    "resize_probability",
    "write_fundus_sites",
    "write_label_map",
    "write_overlay",
    "write_uncertainty",
]
