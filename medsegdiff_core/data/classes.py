"""What the mask values of the supported datasets mean: shared by the real-data layouts and
the built-in synthetic generators that imitate them (the generators import these, never the
other way round)."""

from __future__ import annotations

FUNDUS_CLASSES: dict[str, list[int]] = {"disc": [1, 2], "cup": [2]}
"""Mask channels of the fundus data: label 1 = disc rim, 2 = cup; the disc channel includes the
cup."""

BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""BraTS modality file suffixes, in channel order."""

BRATS_CLASSES: dict[str, list[int]] = {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}
"""The BraTS evaluation regions as mask channels: whole tumour, tumour core, enhancing tumour."""
