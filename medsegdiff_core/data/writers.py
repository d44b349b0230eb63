"""Writing predictions: every output file, 2-D and volume, is written here.

The model works at a fixed square size; these helpers bring its outputs back to each image's
(H, W) on disk and write label maps (for tools), uncertainty maps and colour overlays (for
people) as PNGs, and put a volume case's slices back together on its image's grid
(:func:`write_volume_prediction`, through :mod:`.volumes`' format-level writers). The
:class:`OutputFolder` guards where a run may write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError
from .volumes import Volume, write_label_volume, write_volume

__all__ = [
    "OVERLAY_COLOURS",
    "OutputFolder",
    "Provenance",
    "assemble_slices",
    "dicom_seg_path",
    "resize_label_map",
    "resize_probability",
    "volume_output_name",
    "write_label_map",
    "write_overlay",
    "write_uncertainty",
    "write_volume_prediction",
]

OVERLAY_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 230, 64),  # green
    (0, 150, 255),  # azure
    (255, 230, 0),  # yellow
    (255, 0, 200),  # magenta
    (0, 255, 255),  # cyan
    (255, 120, 0),  # orange
    (150, 60, 255),  # violet
    (255, 0, 0),  # red
)
"""RGB colour of label value v in overlays: ``OVERLAY_COLOURS[(v - 1) % len(OVERLAY_COLOURS)]``.
Greens and blues come first because they stand out against the reddish retina."""


_BAND_PIXELS = 1 << 18  # pixels per band of rows blended at once in overlays (~10 MB of floats)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class OutputFolder:
    """Where a run writes, kept apart from what it reads: a guard against losing data.

    ``--out`` pointed at the site folder itself would write ``masks/<name>.png`` over the
    ground-truth masks, and then score the prediction against itself (Dice 1.0). So the output
    folder may not be, contain or lie inside an input folder (symbolic links resolved), and no
    file that exists before the run is ever overwritten; files the same run wrote may be.

    Args:
        out_dir: The output folder.
        inputs: The folders the run reads.

    Raises:
        DataError: The output folder overlaps an input folder (both are named).
    """

    def __init__(self, out_dir: Path, inputs: Sequence[Path]) -> None:
        self.out_dir = Path(out_dir)
        self._inputs = [(Path(folder), Path(folder).resolve()) for folder in inputs]
        self._written: set[Path] = set()
        out = self.out_dir.resolve()
        for folder, resolved in self._inputs:
            if out == resolved:
                what = "is the input folder"
            elif _within(out, resolved):
                what = "lies inside the input folder"
            elif _within(resolved, out):
                what = "contains the input folder"
            else:
                continue
            shown = f"{folder}" + (f" ({resolved})" if resolved != folder.absolute() else "")
            raise DataError(
                f"{self.out_dir}: output folder {what} {shown}; predictions would overwrite "
                "the data they are scored against; choose an output folder outside it"
            )

    def claim(self, path: Path) -> Path:
        """Return ``path`` if the run may write it; DataError naming it if it would overwrite a
        file the run did not write, or land in an input folder through a linked sub-folder."""
        path = Path(path)
        resolved = path.resolve()
        if resolved in self._written:
            return path
        for folder, input_dir in self._inputs:
            if _within(resolved, input_dir):
                raise DataError(
                    f"{path}: would be written inside the input folder {folder} (via a "
                    "symbolic link); not writing there"
                )
        if path.exists() or path.is_symlink():
            raise DataError(
                f"{path}: already exists and this run did not write it; not overwriting "
                "(choose an empty output folder or remove the file)"
            )
        self._written.add(resolved)
        return path


def resize_label_map(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (h, w) label map to ``size`` = (H, W) by nearest neighbour; dtype is kept.

    Pixel centres are matched (as ``nearest-exact``), so no label value is invented or shifted
    by half a pixel.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    (h, w), (height, width) = labels.shape, size
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def resize_probability(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize float (M, h, w) per-channel probabilities to (M, H, W) bilinearly; float32.

    Resize probabilities before thresholding, not masks after: the boundary then lands between
    the model's pixels instead of following its coarse grid.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 3:
        raise ValueError(f"prob must be (M, H, W), got shape {prob.shape}")
    if prob.shape[1:] == tuple(size):
        return prob.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(prob))[None]
    resized = F.interpolate(tensor, size=tuple(size), mode="bilinear", antialias=True)
    return resized[0].numpy()


def _save(path: Path, array: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def write_label_map(path: Path, labels: np.ndarray) -> Path:
    """Write an (H, W) label map with values 0..255 as a uint8 grey PNG; returns the path."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label values must be in 0..255, got {labels.min()}..{labels.max()}")
    return _save(path, labels.astype(np.uint8))


def write_uncertainty(path: Path, unc: np.ndarray) -> Path:
    """Write an (H, W) uncertainty map in [0, 1] as a grey PNG (255 = most uncertain)."""
    unc = np.asarray(unc)
    if unc.ndim != 2:
        raise ValueError(f"uncertainty must be (H, W), got shape {unc.shape}")
    # float32 and in place: the map is as large as the image (64 M pixels for 8000 x 8000).
    grey = np.nan_to_num(unc.astype(np.float32), nan=1.0, copy=False)
    np.clip(grey, 0.0, 1.0, out=grey)
    grey *= 255.0
    return _save(path, np.rint(grey, out=grey).astype(np.uint8))


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(C, H, W) floats in [0, 1] or uint8 (H, W, 3) / (H, W) -> uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        if image.ndim == 2:
            return np.repeat(image[..., None], 3, axis=-1)
        if image.ndim == 3 and image.shape[-1] == 3:
            return image
        raise ValueError(f"uint8 image must be (H, W, 3) or (H, W), got {image.shape}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {image.shape}")
    # Not RGB (e.g. MRI modalities): show the first channel in grey.
    planes = image[:3] if image.shape[0] == 3 else image[:1].repeat(3, axis=0)
    rgb = np.empty((*planes.shape[1:], 3), np.uint8)
    for channel, plane in enumerate(planes):  # one float32 plane at a time, never float64
        value = np.nan_to_num(plane.astype(np.float32), copy=False)
        np.clip(value, 0.0, 1.0, out=value)
        value *= 255.0
        rgb[..., channel] = np.rint(value, out=value)
    return rgb


def _contours(labels: np.ndarray) -> np.ndarray:
    """Labelled pixels that touch (4-neighbourhood) a pixel of another label."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    return edge & (labels != 0)


def write_overlay(
    path: Path, image: np.ndarray, labels: np.ndarray, *, alpha: float = 0.45
) -> Path:
    """Write an RGB PNG of the image with labels tinted and their contours drawn solid.

    Args:
        path: Output PNG; parent folders are created.
        image: (C, H, W) floats in [0, 1] (grey, RGB, or other channels of which the first is
            shown), or a uint8 (H, W, 3) RGB or (H, W) grey image (as
            :func:`~.images.read_display_image` reads it).
        labels: (H, W) label map of the same size; each non-zero value gets a colour from
            :data:`OVERLAY_COLOURS`.
        alpha: Opacity of the label tint inside regions; contours are opaque.

    Returns:
        The written path.
    """
    rgb = _as_rgb_uint8(image)
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels are {labels.shape} but the image is {rgb.shape[:2]}")
    colours = np.zeros((int(labels.max(initial=0)) + 1, 3), np.float32)
    for value in range(1, len(colours)):
        colours[value] = OVERLAY_COLOURS[(value - 1) % len(OVERLAY_COLOURS)]
    edges = _contours(labels)
    out = np.empty_like(rgb)
    # Blend in bands of rows: the float maths then needs a few MB, not 3 GB for 8000 x 8000.
    rows = max(1, _BAND_PIXELS // max(1, labels.shape[1]))
    for top in range(0, labels.shape[0], rows):
        band = slice(top, top + rows)
        out[band] = _blend(rgb[band], labels[band], edges[band], colours, alpha)
    return _save(path, out)


def _blend(
    rgb: np.ndarray, labels: np.ndarray, edges: np.ndarray, colours: np.ndarray, alpha: float
) -> np.ndarray:
    """uint8 RGB of a band: labels tinted at ``alpha``, contours in solid colour."""
    tint = colours[np.clip(labels, 0, None).astype(np.intp)]
    inside = (labels != 0)[..., None]
    mixed = np.where(inside, np.float32(1 - alpha) * rgb + np.float32(alpha) * tint, rgb)
    # Solid contours show the predicted boundary even where the tint is hard to see.
    mixed = np.where(edges[..., None], tint, mixed)
    return np.rint(mixed).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


def volume_output_name(case: str, reference: Volume) -> str:
    """File name of a case's prediction: the input's format (DICOM series -> NIfTI)."""
    if reference.format == "nrrd":
        return f"{case}.nrrd"
    if reference.format == "nifti" and reference.path.name.lower().endswith(".nii"):
        return f"{case}.nii"
    return f"{case}.nii.gz"


def assemble_slices(
    case: str,
    shape: tuple[int, ...],
    axis: int,
    slices: Mapping[int, np.ndarray],
    *,
    dtype: np.dtype | type = np.uint8,
) -> np.ndarray:
    """Put (H, W) slices, by index along ``axis``, back into an ``[i, j, k]`` volume of
    ``shape``; slices not given are 0. ``case`` names the volume in errors."""
    volume = np.zeros(shape, dtype=dtype)
    for k, plane in slices.items():
        view = np.moveaxis(volume, axis, 0)[k]
        if view.shape != np.shape(plane):
            raise ValueError(f"slice {k} of {case} must be {view.shape}, got {np.shape(plane)}")
        view[...] = plane
    return volume


@dataclass(frozen=True)
class Provenance:
    """What made a prediction, for outputs that name it (DICOM-SEG's algorithm identification)."""

    classes: Mapping[str, Sequence[int]]
    release_name: str
    release_version: int | str


def dicom_seg_path(out_dir: Path, case: str) -> Path:
    """Where a DICOM series' prediction goes as a DICOM Segmentation object."""
    return Path(out_dir) / "dicom-seg" / f"{case}.dcm"


def write_volume_prediction(
    out_dir: Path,
    case: str,
    reference: Volume,
    axis: int,
    labels: Mapping[int, np.ndarray],
    uncertainty: Mapping[int, np.ndarray] | None = None,
    provenance: Provenance | None = None,
) -> list[Path]:
    """Write ``out_dir/masks/<case>.<ext>`` (uint8 labels) and, if given,
    ``out_dir/uncertainty/<case>.<ext>`` (float32 in [0, 1]) on the grid of ``reference``; for a
    DICOM series with ``provenance``, also ``out_dir/dicom-seg/<case>.dcm``, a DICOM
    Segmentation of the same labels referencing the series (:mod:`.dicom_seg`).

    Args:
        out_dir: Output folder.
        case: Case name.
        reference: The case's image geometry (shape, affine, header, format).
        axis: The axial axis the slices were cut along.
        labels: Slice index -> (H, W) label map at the slice's original size.
        uncertainty: Slice index -> (H, W) uncertainty, same sizes.
        provenance: Classes and release for the DICOM-SEG (None: no DICOM-SEG).

    Returns:
        The written paths.
    """
    name = volume_output_name(case, reference)
    label_volume = assemble_slices(case, reference.shape, axis, labels)
    paths = [write_label_volume(Path(out_dir) / "masks" / name, label_volume, reference)]
    if provenance is not None and reference.format == "dicom":
        from .dicom_seg import write_dicom_seg

        path = write_dicom_seg(
            dicom_seg_path(out_dir, case),
            label_volume,
            reference.path,
            provenance.classes,
            release_name=provenance.release_name,
            release_version=provenance.release_version,
        )
        paths.append(path)
    if uncertainty is not None:
        volume = assemble_slices(case, reference.shape, axis, uncertainty, dtype=np.float32)
        paths.append(write_volume(Path(out_dir) / "uncertainty" / name, volume, reference))
    return paths
