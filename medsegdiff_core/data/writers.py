"""Writing predictions: every output file, 2-D and volume, is written here.

The model works at a fixed square size; these helpers bring its outputs back to each image's
(H, W) on disk and write label maps (for tools), uncertainty maps and colour overlays (for
people) as PNGs, and put a volume case's slices back together on its image's grid
(:func:`write_volume_prediction`, through :mod:`.volumes`' format-level writers). The
:class:`OutputFolder` guards where a run may write.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..errors import DataError
from .volumes import Volume, write_label_volume, write_volume

__all__ = [
    "OVERLAY_COLOURS",
    "UNCERTAINTY_COLOUR_MAP",
    "OutputFolder",
    "Provenance",
    "UncertaintyScale",
    "assemble_slices",
    "dicom_seg_path",
    "label_colour",
    "label_names",
    "uncertainty_rgb",
    "uncertainty_scale",
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


UNCERTAINTY_COLOUR_MAP = "viridis"
"""Matplotlib colour map of uncertainty PNGs and of the report: perceptually uniform and
readable by colour-blind readers and in grey print; dark purple = certain, yellow = most
uncertain."""

_PAPER = (255, 255, 255)  # background of legends and colour bars
_INK = (20, 20, 20)  # their text


@dataclass(frozen=True)
class UncertaintyScale:
    """What an uncertainty map's values mean: the value drawn in the colour map's last colour,
    the unit, and the lines that explain it under the colour bar."""

    top: float
    unit: str
    caption: tuple[str, ...]


_UNCERTAINTY_SCALES = {
    "entropy": UncertaintyScale(
        1.0,
        "bit",
        (
            "Uncertainty in bits: binary entropy of the ensemble's mean probability, "
            "largest over classes.",
            "0 = all members sure of the same answer; 1 = mean probability 0.5 "
            "(members split, or all unsure).",
        ),
    ),
    "variance": UncertaintyScale(
        0.25,
        "",
        (
            "Uncertainty: variance of the ensemble members' probabilities, largest over classes.",
            "0 = every member gives the same value; 0.25 = half the members sure yes, "
            "half sure no.",
        ),
    ),
}


def uncertainty_scale(kind: str) -> UncertaintyScale:
    """The scale of an ``inference.uncertainty`` kind (``"entropy"`` or ``"variance"``)."""
    if kind not in _UNCERTAINTY_SCALES:
        raise ValueError(f"unknown uncertainty kind {kind!r}; expected one of entropy, variance")
    return _UNCERTAINTY_SCALES[kind]


@functools.cache
def _colour_lut() -> np.ndarray:
    """(256, 3) uint8 RGB of :data:`UNCERTAINTY_COLOUR_MAP`, from 0 to its top."""
    from matplotlib import colormaps

    rgba = colormaps[UNCERTAINTY_COLOUR_MAP](np.linspace(0.0, 1.0, 256))
    return np.rint(rgba[:, :3] * 255).astype(np.uint8)


def uncertainty_rgb(
    unc: np.ndarray, kind: str = "entropy", *, out: np.ndarray | None = None
) -> np.ndarray:
    """(H, W) uncertainty -> (H, W, 3) uint8 in :data:`UNCERTAINTY_COLOUR_MAP`: 0 is its first
    colour and the scale's top (1 bit of entropy, variance 0.25) its last; NaN counts as the top.
    Done in bands of rows (a few MB of floats, whatever the image size); ``out`` receives it."""
    unc = np.asarray(unc)
    if unc.ndim != 2:
        raise ValueError(f"uncertainty must be (H, W), got shape {unc.shape}")
    top, lut = uncertainty_scale(kind).top, _colour_lut()
    if out is None:
        out = np.empty((*unc.shape, 3), np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, unc.shape[1]))
    for start in range(0, unc.shape[0], rows):
        band = np.nan_to_num(unc[start : start + rows].astype(np.float32), nan=top, copy=False)
        band *= np.float32(255.0 / top)
        np.clip(band, 0.0, 255.0, out=band)
        out[start : start + rows] = lut[np.rint(band, out=band).astype(np.uint8)]
    return out


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's own scalable font: no system fonts


def _font_size(width: int) -> int:
    """Text size for a strip under an image ``width`` pixels wide: readable when the image is
    shown whole on a screen (an 8000-pixel photo gets large text, a thumbnail 12 px)."""
    return int(np.clip(round(width / 40), 12, 120))


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _colour_bar(width: int, kind: str) -> Image.Image:
    """A strip with a horizontal colour bar, its ticks in the scale's unit, and what the values
    mean; at least ``width`` pixels wide."""
    scale = uncertainty_scale(kind)
    size = _font_size(width)
    font, pad = _font(size), max(3, size // 2)
    strip_width = max(width, 22 * size)
    bar_width = strip_width - 2 * pad
    lines = [line for text in scale.caption for line in _wrap(text, font, bar_width)]
    line_height = round(size * 1.3)
    height = pad + size + pad // 2 + line_height + len(lines) * line_height + pad
    strip = Image.new("RGB", (strip_width, height), _PAPER)
    lut = _colour_lut()
    gradient = lut[np.linspace(0, 255, bar_width).round().astype(np.intp)]
    strip.paste(Image.fromarray(np.repeat(gradient[None], size, axis=0)), (pad, pad))
    draw = ImageDraw.Draw(strip)
    draw.rectangle([pad - 1, pad - 1, pad + bar_width, pad + size], outline=_INK)
    tick_top = pad + size
    for fraction, anchor in ((0.0, "la"), (0.5, "ma"), (1.0, "ra")):
        x = pad + round(fraction * (bar_width - 1))
        draw.line([x, tick_top, x, tick_top + pad // 2], fill=_INK)
        label = f"{fraction * scale.top:g}" + (f" {scale.unit}" if fraction == 1.0 else "")
        draw.text((x, tick_top + pad // 2), label.strip(), fill=_INK, font=font, anchor=anchor)
    y = tick_top + pad // 2 + line_height
    for line in lines:
        draw.text((pad, y), line, fill=_INK, font=font)
        y += line_height
    return strip


def _canvas(shape: tuple[int, ...], strip: Image.Image) -> np.ndarray:
    """A uint8 RGB page: room for an (H, W) picture at the top left and ``strip`` under it."""
    height, width = shape[:2]
    canvas = np.empty((height + strip.height, max(width, strip.width), 3), np.uint8)
    canvas[:height, width:] = _PAPER
    canvas[height:] = _PAPER
    canvas[height:, : strip.width] = np.asarray(strip)
    return canvas


def write_uncertainty(path: Path, unc: np.ndarray, *, kind: str = "entropy") -> Path:
    """Write an (H, W) uncertainty map as an RGB PNG for people: the map in
    :data:`UNCERTAINTY_COLOUR_MAP` at its own size at the top left (0 = the colour map's first
    colour), and under it a colour bar in the unit of ``kind`` with what the values mean."""
    unc = np.asarray(unc)
    if unc.ndim != 2:
        raise ValueError(f"uncertainty must be (H, W), got shape {unc.shape}")
    canvas = _canvas(unc.shape, _colour_bar(unc.shape[1], kind))
    uncertainty_rgb(unc, kind, out=canvas[: unc.shape[0], : unc.shape[1]])
    return _save(path, canvas)


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


def label_colour(value: int) -> tuple[int, int, int]:
    """RGB of label value ``value`` (>= 1) in overlays, their legends and the report."""
    return OVERLAY_COLOURS[(int(value) - 1) % len(OVERLAY_COLOURS)]


def label_names(classes: Mapping[str, Sequence[int]]) -> dict[int, str]:
    """Label value -> the name shown for it: the most specific class holding it (fundus: 1 =
    disc, 2 = cup; BraTS: 1 = tc, 2 = wt, 4 = et); classes equally specific are joined by /."""
    names = {}
    for value in sorted({int(v) for values in classes.values() for v in values}):
        holders = [(len(values), name) for name, values in classes.items() if value in values]
        fewest = min(count for count, _ in holders)
        names[value] = "/".join(name for count, name in holders if count == fewest)
    return names


def _legend(width: int, entries: Sequence[tuple[tuple[int, int, int], str]]) -> Image.Image:
    """A strip of colour swatches and names, wrapped into rows at least ``width`` wide."""
    size = _font_size(width)
    font, pad = _font(size), max(3, size // 2)
    widths = [size + pad // 2 + math.ceil(font.getlength(text)) for _, text in entries]
    strip_width = max(width, max(widths, default=0) + 2 * pad)
    rows: list[list[tuple[int, tuple[tuple[int, int, int], str]]]] = [[]]
    x = pad
    for entry, entry_width in zip(entries, widths, strict=True):
        if rows[-1] and x + entry_width > strip_width - pad:
            rows.append([])
            x = pad
        rows[-1].append((x, entry))
        x += entry_width + 2 * pad
    line_height = size + pad
    strip = Image.new("RGB", (strip_width, pad + len(rows) * line_height), _PAPER)
    draw = ImageDraw.Draw(strip)
    for row, placed in enumerate(rows):
        y = pad + row * line_height
        for x, (colour, text) in placed:
            draw.rectangle([x, y, x + size - 1, y + size - 1], fill=colour, outline=_INK)
            draw.text((x + size + pad // 2, y + size / 2), text, fill=_INK, font=font, anchor="lm")
    return strip


def write_overlay(
    path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    classes: Mapping[str, Sequence[int]] | None = None,
    alpha: float = 0.45,
) -> Path:
    """Write an RGB PNG of the image with labels tinted and their contours drawn solid, and
    under it a legend naming each label's colour.

    Args:
        path: Output PNG; parent folders are created.
        image: (C, H, W) floats in [0, 1] (grey, RGB, or other channels of which the first is
            shown), or a uint8 (H, W, 3) RGB or (H, W) grey image (as
            :func:`~.images.read_display_image` reads it).
        labels: (H, W) label map of the same size; each non-zero value gets a colour from
            :data:`OVERLAY_COLOURS` (:func:`label_colour`).
        classes: Class name -> label values: the legend names every label of the classes
            (:func:`label_names`); None: it lists "label 1" to the largest label present.
        alpha: Opacity of the label tint inside regions; contours are opaque.

    Returns:
        The written path. The picture is at the top left at the image's own size; the legend
        strip under it may make the page wider than a very narrow image.
    """
    rgb = _as_rgb_uint8(image)
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels are {labels.shape} but the image is {rgb.shape[:2]}")
    if classes is None:
        names = {v: f"label {v}" for v in range(1, int(labels.max(initial=0)) + 1)}
    else:
        names = label_names(classes)
    colours = np.zeros((max(int(labels.max(initial=0)), *names, 0) + 1, 3), np.float32)
    for value in range(1, len(colours)):
        colours[value] = label_colour(value)
    edges = _contours(labels)
    legend = _legend(labels.shape[1], [(label_colour(v), name) for v, name in names.items()])
    canvas = _canvas(labels.shape, legend)
    out = canvas[: labels.shape[0], : labels.shape[1]]
    # Blend in bands of rows: the float maths then needs a few MB, not 3 GB for 8000 x 8000.
    rows = max(1, _BAND_PIXELS // max(1, labels.shape[1]))
    for top in range(0, labels.shape[0], rows):
        band = slice(top, top + rows)
        out[band] = _blend(rgb[band], labels[band], edges[band], colours, alpha)
    return _save(path, canvas)


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
