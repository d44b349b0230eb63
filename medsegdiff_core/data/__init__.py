"""Data: the dataset layouts (2-D and volume), file decoding, built-in synthetic fundus sites,
and the prediction writers.

Images are float32 (C, H, W) and masks float32 {0, 1} (M, H, W), one channel per configured
class. :mod:`.layouts` says where a site's files are and gives its dataset
(:func:`~.layouts.open_dataset`); :mod:`.images` decodes 2-D files, :mod:`.volumes` 3-D ones;
:mod:`.labels` turns label maps into mask channels and back; :mod:`.check` validates a folder;
:mod:`.writers` writes every prediction file, 2-D and volume.
"""

from .images import IMAGE_SUFFIXES, read_display_image, read_image, read_label_map
from .labels import channels_to_labels, labels_to_channels
from .layouts import PlanarDataset, SegmentationDataset, SliceDataset, open_dataset
from .synthetic import (
    FUNDUS_CLASSES,
    GLAUCOMA_CUP_TO_DISC,
    PUBLIC_STYLE,
    SiteStyle,
    default_site_styles,
    make_fundus_case,
    write_fundus_sites,
    write_public_fundus,
)
from .writers import (
    OVERLAY_COLOURS,
    OutputFolder,
    resize_label_map,
    resize_probability,
    write_label_map,
    write_overlay,
    write_uncertainty,
    write_volume_prediction,
)

__all__ = [
    "FUNDUS_CLASSES",
    "GLAUCOMA_CUP_TO_DISC",
    "IMAGE_SUFFIXES",
    "OVERLAY_COLOURS",
    "PUBLIC_STYLE",
    "OutputFolder",
    "PlanarDataset",
    "SegmentationDataset",
    "SiteStyle",
    "SliceDataset",
    "channels_to_labels",
    "default_site_styles",
    "labels_to_channels",
    "make_fundus_case",
    "open_dataset",
    "read_display_image",
    "read_image",
    "read_label_map",
    "resize_label_map",
    "resize_probability",
    "write_fundus_sites",
    "write_label_map",
    "write_overlay",
    "write_public_fundus",
    "write_uncertainty",
    "write_volume_prediction",
]
