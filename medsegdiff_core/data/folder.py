"""The generic 2-D dataset layout: ``FOLDER/images/<name>.<ext>`` and ``FOLDER/masks/<name>.png``.

Images (PNG, JPEG or TIFF; grey, RGB or RGBA; 8 or 16 bit) and masks are matched by file stem.
A mask is a grey label map: 0 = background, other integers = labels. A class configuration maps
channel names to label values, e.g. fundus ``{"disc": [1, 2], "cup": [2]}``, and each class
becomes one binary mask channel, so channels may overlap (multi-label).

In memory an image is float32 (C, H, W) and a mask float32 {0, 1} (M, H, W) in class order.

Every problem a user can cause raises :class:`~medsegdiff_core.errors.DataError` with a one-line
message that starts with the offending path. :func:`check_folder` collects all of a folder's
problems at once; :class:`SegmentationFolder` stops at the first.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "Case",
    "SegmentationFolder",
    "channels_to_labels",
    "check_folder",
    "find_cases",
    "labels_to_channels",
    "link_problems",
    "read_display_image",
    "read_image",
    "read_label_map",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""Image file suffixes recognised in ``images/`` (case-insensitive)."""

_MAX_LISTED = 5  # names quoted in a message before it says "..."
_NORMALISE_EPS = 1e-6


@dataclass
class Case:
    """One image and (optionally) its mask, matched by file stem."""

    name: str
    image_path: Path
    mask_path: Path | None


# --------------------------------------------------------------------------------------------
# Finding cases
# --------------------------------------------------------------------------------------------


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (", ..." if len(names) > _MAX_LISTED else "")


def _link_problem(path: Path) -> str | None:
    """Why ``path``, a symbolic link, cannot be followed (a loop, a missing target), else None.

    Such a link is neither a file nor a folder, so a scan that only keeps files would drop it
    without a word, and a case would go missing from training unnoticed."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{path}: symbolic link loops (it leads back to itself); fix or remove it"
        return f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)"
    return None


def link_problems(folder: Path) -> list[str]:
    """A problem line per visible entry of ``folder`` that is a link that cannot be followed."""
    entries = sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))
    return [problem for problem in map(_link_problem, entries) if problem is not None]


def _visible_files(folder: Path) -> list[Path]:
    # Hidden files (.DS_Store, editor swap files) are never data.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _scan(folder: Path, require_masks: bool) -> tuple[list[Case], list[str]]:
    """Match images and masks; return the cases and every layout problem found.

    Problems that leave nothing to check further (no folder, no images) end the scan early.
    """
    folder = Path(folder)
    if not folder.exists():
        return [], [f"{folder}: data folder does not exist"]
    if not folder.is_dir():
        return [], [f"{folder}: is not a folder"]
    image_dir, mask_dir = folder / "images", folder / "masks"
    if not image_dir.is_dir():
        expected = "expected images/<name>.png and masks/<name>.png"
        return [], [f"{folder}: no images/ folder ({expected})"]

    problems: list[str] = link_problems(image_dir)
    images: dict[str, Path] = {}
    for path in _visible_files(image_dir):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            problems.append(f"{path}: same name as {images[path.stem].name}; names must be unique")
            continue
        images[path.stem] = path
    if not images:
        kinds = ", ".join(IMAGE_SUFFIXES)
        return [], [*problems, f"{image_dir}: no images found (looked for {kinds})"]

    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        problems += link_problems(mask_dir)
        for path in _visible_files(mask_dir):
            if path.suffix.lower() == ".png":
                masks[path.stem] = path
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                # A JPEG mask has compression artefacts that turn into bogus labels.
                problems.append(f"{path}: masks must be PNG label maps (lossless)")
    elif require_masks:
        problems.append(f"{mask_dir}: masks folder does not exist (masks/<name>.png expected)")

    for name in sorted(set(masks) - set(images)):
        problems.append(f"{masks[name]}: mask has no image {image_dir}/{name}.*")
    unmasked = sorted(set(images) - set(masks))
    if require_masks and unmasked and mask_dir.is_dir():
        problems.append(
            f"{mask_dir}: no mask for {len(unmasked)} of {len(images)} images: {_listed(unmasked)}"
        )

    cases = [Case(name, images[name], masks.get(name)) for name in sorted(images)]
    return cases, problems


def find_cases(folder: Path, *, require_masks: bool) -> list[Case]:
    """List the cases of a generic-layout folder, sorted by name.

    Args:
        folder: Folder holding ``images/`` and (for training or evaluation) ``masks/``.
        require_masks: Whether every image must have a mask.

    Raises:
        DataError: The folder or ``images/`` is missing, holds no images, two images share a
            name, a mask has no image, or (``require_masks``) an image has no mask.
    """
    cases, problems = _scan(Path(folder), require_masks)
    if problems:
        raise DataError(problems[0])
    return cases


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _open_fully(path: Path) -> Image.Image:
    """Open and fully decode an image, so a truncated file fails here rather than later."""
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except UnidentifiedImageError:
        # PIL's own message repeats the path; say what it means instead.
        what = "file is empty" if path.stat().st_size == 0 else "not an image in a known format"
        raise DataError(f"{path}: cannot read image ({what})") from None
    except Exception as error:  # PIL's decoders raise many exception types for bad data
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: cannot read image ({reason})") from error


_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _as_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit image as grey ("L") or RGB; alpha, palettes and other colour spaces converted."""
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def _to_float(image: Image.Image) -> np.ndarray:
    """A decoded image as float32 (C, H, W) in [0, 1], never through float64: a float64 copy of
    an 8000 x 8000 photo is 1.5 GB, and the model works in float32 anyway."""
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        array = np.divide(np.asarray(image), np.float32(65535.0), dtype=np.float32)
        return np.clip(array, 0.0, 1.0, out=array)[None]
    if mode == "F":
        array = np.asarray(image, dtype=np.float32).copy()
        low, high = float(array.min()), float(array.max())
        if high > low:
            array -= low
            array /= high - low
        else:
            array[...] = 0.0
        return np.clip(array, 0.0, 1.0, out=array)[None]
    pixels = np.asarray(_as_8bit(image))
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    # One float32 plane per channel, written in place: (C, H, W) without a transposed copy.
    out = np.empty((pixels.shape[2], *pixels.shape[:2]), np.float32)
    for channel in range(pixels.shape[2]):
        np.divide(pixels[..., channel], np.float32(255.0), out=out[channel])
    return out


def read_image(path: Path) -> np.ndarray:
    """Read an image as float32 (C, H, W) scaled to [0, 1].

    Grey images give C = 1 and colour images C = 3 (an alpha channel is dropped); 16-bit images
    are scaled by 65535, 8-bit by 255. Floating-point TIFFs are min-max scaled.

    Raises:
        DataError: The file is missing, truncated, corrupt or not an image.
    """
    return _to_float(_open_fully(Path(path)))


def read_display_image(path: Path) -> np.ndarray:
    """Read an image as it is drawn under an overlay: uint8 (H, W) grey or (H, W, 3) RGB for
    8-bit files, whose pixels need no arithmetic (a fifth of float32's memory); 16-bit and
    floating-point files as :func:`read_image` scales them.

    Raises:
        DataError: As :func:`read_image`.
    """
    image = _open_fully(Path(path))
    if image.mode in _HIGH_DEPTH_MODES or image.mode == "F":
        return _to_float(image)
    return np.asarray(_as_8bit(image))


def read_label_map(path: Path) -> np.ndarray:
    """Read a mask as an int64 (H, W) label map.

    Grey PNGs (8 or 16 bit) are read as is, palette PNGs by palette index. An RGB(A) mask is
    accepted only when its three channels are equal (a grey map saved as colour).

    Raises:
        DataError: The file is unreadable, or is a colour or non-integer image.
    """
    path = Path(path)
    image = _open_fully(path)
    mode = image.mode
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(image)[..., :3]
        if not (rgb == rgb[..., :1]).all():
            raise DataError(
                f"{path}: mask is a colour image; save masks as grey label maps "
                "(0 = background, 1, 2, ... = labels)"
            )
        return rgb[..., 0].astype(np.int64)
    if mode in ("LA", "La"):
        return np.asarray(image.getchannel(0)).astype(np.int64)
    if mode in ("1", "L", "P") or mode.startswith("I"):
        return np.asarray(image).astype(np.int64)
    if mode == "F":
        values = np.asarray(image)
        if np.all(np.isfinite(values)) and np.array_equal(values, np.round(values)):
            return values.astype(np.int64)
    raise DataError(f"{path}: mask must be an integer grey label map, got image mode {mode}")


# --------------------------------------------------------------------------------------------
# Labels <-> channels
# --------------------------------------------------------------------------------------------


def _class_labels(classes: Mapping[str, Sequence[int]]) -> list[int]:
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
    known = np.asarray([0, *_class_labels(classes)])
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
    labels = np.asarray([0, *_class_labels(classes)])
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


# --------------------------------------------------------------------------------------------
# Loading and validating one case
# --------------------------------------------------------------------------------------------


def _load_case(
    case: Case, classes: Mapping[str, Sequence[int]], in_channels: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and validate a case: image (in_channels, H, W) and label map (H, W) or None."""
    image = read_image(case.image_path)
    channels = image.shape[0]
    if channels != in_channels:
        if channels == 1 and in_channels == 3:
            image = np.repeat(image, 3, axis=0)  # grey photo for a colour model
        else:
            raise DataError(
                f"{case.image_path}: image has {channels} channel(s) but the model expects "
                f"{in_channels}"
            )
    if case.mask_path is None:
        return image, None
    labels = read_label_map(case.mask_path)
    if labels.shape != image.shape[1:]:
        (mh, mw), (ih, iw) = labels.shape, image.shape[1:]
        raise DataError(f"{case.mask_path}: mask is {mw}x{mh} but its image is {iw}x{ih}")
    labels_to_channels(labels, classes, source=str(case.mask_path))  # validates label values
    return image, labels


def check_folder(
    folder: Path,
    classes: Mapping[str, Sequence[int]],
    *,
    in_channels: int,
    require_masks: bool = True,
) -> list[str]:
    """Return every problem of a dataset folder, one line each; an empty list means it is fine.

    Checks the layout (as :func:`find_cases`) and then decodes every case (as
    :class:`SegmentationFolder`), so one run reports all bad files rather than the first.
    """
    _class_labels(classes)
    cases, problems = _scan(Path(folder), require_masks)
    for case in cases:
        try:
            _load_case(case, classes, in_channels)
        except DataError as error:
            problems.append(str(error))
    return problems


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(image)[None]
    if tensor.shape[-2:] == (size, size):
        return tensor[0].clone()
    # Antialiasing matters when shrinking: fine texture would otherwise alias into noise.
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
    return resized[0]


def _resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    # Nearest on the label map (not on channels) keeps every pixel a single valid label.
    tensor = torch.from_numpy(labels.astype(np.float32))[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    return resized[0, 0].to(torch.int64).numpy()


def _normalise(image: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel z-score: removes most of a site's exposure and colour cast."""
    mean = image.mean(dim=(1, 2), keepdim=True)
    std = image.std(dim=(1, 2), keepdim=True, unbiased=False)
    return (image - mean) / (std + _NORMALISE_EPS)


class SegmentationFolder(Dataset):
    """A generic-layout folder as a PyTorch dataset of fixed-size, normalised tensors.

    All cases are decoded, validated, resized and normalised once, at construction: the 2-D
    datasets this is meant for are small (thousands of images at a few hundred pixels), and
    finding a bad file before training starts beats finding it in epoch 7.

    Each item is a dict:

    - ``"image"``: float32 (C, S, S), each channel z-scored (zero mean, unit std) per image.
    - ``"mask"``: float32 {0, 1} (M, S, S), one channel per class in class order; zeros when
      the case has no mask.
    - ``"name"``: the file stem.
    - ``"original_size"``: (H, W) of the image on disk, to write predictions back at.

    Args:
        folder: Folder with ``images/`` and ``masks/``.
        classes: Channel name -> label values, e.g. ``{"disc": [1, 2], "cup": [2]}``.
        image_size: Side S of the square tensors, in pixels.
        in_channels: Channels the model takes; a grey image is repeated to 3 channels if needed.
        require_masks: Whether every image must have a mask (training, evaluation).
        augment: Random horizontal flips and small per-channel gain/offset jitter.
        seed: Seeds the augmentation stream when loading in the main process, for reproducible
            runs. DataLoader worker processes use torch's global RNG instead, which the
            DataLoader seeds differently per worker and epoch (a generator copied into each
            worker would repeat the same flips in every worker and epoch).

    Raises:
        DataError: The first problem :func:`check_folder` would report.
    """

    def __init__(
        self,
        folder: Path,
        classes: Mapping[str, Sequence[int]],
        image_size: int,
        *,
        in_channels: int,
        require_masks: bool = True,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self._settings(classes, image_size, augment=augment, seed=seed)
        self.folder = Path(folder)
        self.in_channels = in_channels
        self.cases = find_cases(self.folder, require_masks=require_masks)
        self._hold(
            (*_load_case(case, self.classes, in_channels), str(case.mask_path))
            for case in self.cases
        )

    def _settings(
        self, classes: Mapping[str, Sequence[int]], image_size: int, *, augment: bool, seed: int
    ) -> None:
        """Check and keep the settings every dataset of this family shares."""
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        _class_labels(classes)
        self.classes = {name: list(values) for name, values in classes.items()}
        self.image_size = image_size
        self.augment = augment
        self._generator = torch.Generator().manual_seed(seed)

    def _hold(
        self,
        items: Iterable[tuple[np.ndarray, np.ndarray | None, str]],
        *,
        normalise: bool = True,
        empty: str = "no cases",
    ) -> None:
        """Keep ``(image (C, H, W), labels (H, W) or None, mask file)`` items in memory, resized
        to ``image_size``; images z-scored per image unless ``normalise`` is off (volumes are
        normalised per volume before slicing)."""
        self._images, self._masks, self._sizes = self._tensors(
            items, normalise=normalise, empty=empty
        )

    def _tensors(
        self,
        items: Iterable[tuple[np.ndarray, np.ndarray | None, str]],
        *,
        normalise: bool,
        empty: str,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Stacked model-resolution images, bool masks and original sizes of ``items``."""
        size = self.image_size
        images, masks, sizes = [], [], []
        for image, labels, source in items:
            sizes.append((int(image.shape[1]), int(image.shape[2])))
            resized = _resize_image(image, size)
            images.append(_normalise(resized) if normalise else resized)
            if labels is None:
                masks.append(torch.zeros((len(self.classes), size, size), dtype=bool))
            else:
                channels = labels_to_channels(
                    _resize_labels(labels, size), self.classes, source=source
                )
                masks.append(torch.from_numpy(channels).bool())
        if not images:
            raise DataError(empty)
        return torch.stack(images), torch.stack(masks), sizes  # bool masks: 1/4 of float32's

    def has_labelled_pixels(self) -> bool:
        """Whether any mask holds a pixel of the classes (a folder of empty masks teaches
        nothing; ``data check`` reports it as a problem)."""
        return bool(self._masks.any())

    @property
    def has_masks(self) -> bool:
        """True when every case has a mask."""
        return all(case.mask_path is not None for case in self.cases)

    def __len__(self) -> int:
        return len(self.cases)

    def _item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(image, bool mask, original size) of item ``index`` as held in memory."""
        return self._images[index], self._masks[index], self._sizes[index]

    def __getitem__(self, index: int) -> dict:
        held_image, held_mask, original_size = self._item(index)
        image = held_image.clone()
        mask = held_mask.to(torch.float32)
        if self.augment:
            image, mask = self._augment(image, mask)
        return {
            "image": image,
            "mask": mask,
            "name": self.cases[index].name,
            "original_size": original_size,
        }

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream, e.g. per federated round, so that a round replayed
        in a fresh process (after a crash) augments exactly as the first attempt did."""
        self._generator.manual_seed(seed)

    def _augment(
        self, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        in_worker = torch.utils.data.get_worker_info() is not None
        generator = None if in_worker else self._generator
        if torch.rand((), generator=generator) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        channels = image.shape[0]
        gain = 1.0 + 0.1 * (2 * torch.rand((channels, 1, 1), generator=generator) - 1)
        offset = 0.1 * (2 * torch.rand((channels, 1, 1), generator=generator) - 1)
        return image * gain + offset, mask.contiguous()
