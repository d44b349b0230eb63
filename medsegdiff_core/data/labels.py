"""Label maps <-> mask channels: the class configuration and the two conversions.

A class configuration maps channel names to label values, e.g. fundus
``{"disc": [1, 2], "cup": [2]}`` or BraTS ``{"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}``; each
class becomes one binary mask channel, so channels may overlap (multi-label). The same rules
serve 2-D label maps and label volumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["channels_to_labels", "class_labels", "labels_to_channels"]

_MAX_LISTED = 5  # label values quoted in a message before it says "..."


def class_labels(classes: Mapping[str, Sequence[int]]) -> list[int]:
    """All label values used by the classes, sorted; checks the class configuration."""
    if not classes:
        raise ConfigError("classes: at least one class is needed, e.g. {disc: [1, 2], cup: [2]}")
    for name, values in classes.items():
        if not len(values):
            raise ConfigError(f"classes.{name}: lists no label values")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ConfigError(f"classes.{name}: label {value!r} is not an integer")
            if not 1 <= value <= 255:
                raise ConfigError(
                    f"classes.{name}: label {value} must be in 1..255 (0 is background)"
                )
    return sorted({int(v) for values in classes.values() for v in values})


def _describe_classes(classes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{name}={list(values)}" for name, values in classes.items())


def labels_to_channels(
    label_map: np.ndarray, classes: Mapping[str, Sequence[int]], *, source: str
) -> np.ndarray:
    """Split an (H, W) label map into float32 (M, H, W) binary channels, one per class.

    Channel ``m`` is 1 where the label is one of class ``m``'s values, so channels may overlap
    (the fundus disc channel contains the cup).

    Args:
        label_map: Integer (H, W) label map; 0 is background.
        classes: Channel name -> label values, in channel order.
        source: What the label map came from (usually its path), named in errors.

    Raises:
        DataError: A label value is neither 0 nor in any class.
    """
    known = np.asarray([0, *class_labels(classes)])
    values = np.unique(label_map)
    unknown = values[~np.isin(values, known)]
    if unknown.size:
        shown = ", ".join(str(int(v)) for v in unknown[:_MAX_LISTED])
        shown += ", ..." if unknown.size > _MAX_LISTED else ""
        raise DataError(
            f"{source}: label value(s) {shown} not in any class "
            f"({_describe_classes(classes)}; 0 = background)"
        )
    return np.stack([np.isin(label_map, list(v)) for v in classes.values()]).astype(np.float32)


def channels_to_labels(channels: np.ndarray, classes: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Merge (M, H, W) binary channels back into a uint8 (H, W) label map.

    Each pixel gets the label whose class-membership vector is nearest (Hamming distance) to the
    pixel's channel vector; background 0 belongs to no class. Ties go to the lower label value:
    under fundus classes a pixel marked cup but not disc is as far from background as from cup,
    and becomes background. For valid label maps ``channels_to_labels(labels_to_channels(x))``
    is ``x`` whenever no two labels belong to exactly the same classes.

    Args:
        channels: (M, H, W) bool, or numbers thresholded at 0.5.
        classes: The mapping the channels were made with.
    """
    channels = np.asarray(channels)
    if channels.ndim != 3 or channels.shape[0] != len(classes):
        raise ValueError(f"channels must be ({len(classes)}, H, W), got {channels.shape}")
    bits = channels if channels.dtype == bool else channels > 0.5
    labels = np.asarray([0, *class_labels(classes)])
    # membership[l, m]: label l is in class m.
    membership = np.stack([np.isin(labels, list(v)) for v in classes.values()], axis=1)
    member = membership.astype(np.int32)
    if len(classes) > 12:  # too many bit patterns to tabulate: per-pixel distances
        flat = bits.reshape(len(classes), -1).astype(np.int32)
        distance = member @ (1 - flat) + (1 - member) @ flat  # (L, H*W)
        nearest = np.argmin(distance, axis=0)  # first minimum: the lower label wins ties
        return labels[nearest].astype(np.uint8).reshape(channels.shape[1:])
    # A pixel's label depends only on its channel bits: solve the 2^M patterns once and look
    # every pixel up, in uint8/uint16, instead of int32/int64 distances per pixel and label
    # (gigabytes for an 8000 x 8000 image).
    code_type = np.uint8 if len(classes) <= 8 else np.uint16
    codes = np.zeros(bits.shape[1:], code_type)
    for m in range(len(classes)):
        codes |= bits[m].astype(code_type) << code_type(m)
    patterns = (np.arange(2 ** len(classes))[:, None] >> np.arange(len(classes))) & 1  # (P, M)
    distance = member @ (1 - patterns.T) + (1 - member) @ patterns.T  # (L, P)
    table = labels[np.argmin(distance, axis=0)].astype(np.uint8)  # first minimum: lower label
    return table[codes]
