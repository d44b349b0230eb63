"""Dataset layouts: where a site's images and masks are, and what the mask values mean.

Six layouts, named in the config's ``data.layout`` (``FOLDER`` is the folder given):

=========  ==================================================================  ================
layout     files                                                               mask values
=========  ==================================================================  ================
generic    ``images/<name>.{png,jpg,tif}`` + ``masks/<name>.png``              labels as is
refuge     ``images/<name>.{jpg,png,bmp,tif}`` + ``masks/<name>.{png,bmp}``    0 cup, 128 rim,
                                                                               255 background
ddti       ``images/<name>.{png,jpg}`` + ``masks/<name>.png`` (also            0 / 255 (or 0/1)
           ``image/`` + ``mask/``); images are made grey (1 channel)
isic       ``images/<name>.jpg`` + ``masks/<name>_segmentation.png``           0 / 255 (or 0/1)
brats      ``<case>/<case>_{t1,t1ce,t2,flair}.nii.gz`` + ``<case>_seg.nii.gz``  labels as is
           (BraTS 2023 names ``-t1n/-t1c/-t2w/-t2f`` and ``-seg`` also work)   (1, 2, 4)
volumes    ``images/<name>.{nii.gz,nii,nrrd}`` or ``images/<name>/`` (a DICOM  labels as is
           series) + ``masks/<name>.{nii.gz,nii,nrrd}``
=========  ==================================================================  ================

Mask values are first mapped to labels (REFUGE: background 0, disc rim 1, cup 2; DDTI/ISIC:
lesion 1), then the configured classes turn labels into mask channels
(:func:`~.labels.labels_to_channels`).

One pass over a folder (:func:`scan_layout`) lists its cases and every layout-level problem, one
line each starting with the offending path; :func:`~.check.check_dataset` then reads every case
and :func:`find_layout_cases` stops at the first problem.

Both dataset kinds share :class:`SegmentationDataset` (model-resolution tensors, augmentation,
the item dict) and each defines its own cases: 2-D layouts give a :class:`PlanarDataset`, one item
per image; volume layouts give a :class:`SliceDataset`, one item per 2-D slice along each volume's
axial axis, modalities stacked as channels, each modality z-scored over the whole volume (BraTS:
over the brain, i.e. the non-zero voxels; other volumes: over all voxels after clipping to the
0.5-99.5 percentiles). Use :func:`open_dataset` to get either.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import ClipIntensityPercentiles, Resize
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .classes import BRATS_CLASSES, BRATS_MODALITIES, FUNDUS_CLASSES
from .images import IMAGE_SUFFIXES, read_image, read_label_map
from .labels import class_labels, labels_to_channels
from .volumes import (
    Volume,
    axial_axis,
    check_same_grid,
    read_label_volume,
    read_volume,
    volume_format,
    volume_stem,
)
from .writers import Provenance, assemble_slices, volume_output_name, write_volume_prediction

__all__ = [
    "LAYOUTS",
    "LayoutCase",
    "LayoutSpec",
    "PlanarDataset",
    "SegmentationDataset",
    "SliceDataset",
    "find_layout_cases",
    "layout_spec",
    "link_problems",
    "load_planar_case",
    "load_volume_case",
    "open_dataset",
    "read_planar_labels",
    "scan_layout",
]

LayoutName = Literal["generic", "refuge", "ddti", "isic", "brats", "volumes"]


@dataclass(frozen=True)
class LayoutSpec:
    """What a layout is.

    Attributes:
        name: The config's ``data.layout`` value.
        kind: ``"planar"`` (2-D images) or ``"volume"`` (3-D volumes, used as 2-D slices).
        classes: Default classes (mask channel -> label values after the layout's mapping).
        in_channels: Image channels the layout gives (None: as the files have).
        normalise: Volume intensity normalisation, ``"nonzero"`` or ``"volume"``.
    """

    name: str
    kind: Literal["planar", "volume"]
    classes: dict[str, list[int]]
    in_channels: int | None
    normalise: Literal["nonzero", "volume"] = "volume"


_SPECS: dict[str, LayoutSpec] = {
    "generic": LayoutSpec("generic", "planar", FUNDUS_CLASSES, None),
    "refuge": LayoutSpec("refuge", "planar", FUNDUS_CLASSES, 3),
    "ddti": LayoutSpec("ddti", "planar", {"nodule": [1]}, 1),
    "isic": LayoutSpec("isic", "planar", {"lesion": [1]}, 3),
    "brats": LayoutSpec("brats", "volume", BRATS_CLASSES, 4, "nonzero"),
    "volumes": LayoutSpec("volumes", "volume", {"lesion": [1]}, None),
}
LAYOUTS: tuple[str, ...] = tuple(_SPECS)
"""The layout names, as accepted by ``data.layout`` and ``medsegdiff data check --layout``."""

_MAX_LISTED = 5
_PLANAR_DIRS = {
    "generic": (("images",), ("masks",)),
    "refuge": (("images", "Images"), ("masks", "Masks")),
    "ddti": (("images", "image"), ("masks", "mask")),
    "isic": (("images",), ("masks",)),
}
_MASK_SUFFIXES = {
    "generic": (".png",),
    "refuge": (".png", ".bmp"),
    "ddti": (".png",),
    "isic": (".png",),
}
_REFUGE_VALUES = {255: 0, 128: 1, 0: 2}  # background, disc rim, cup
_BINARY_VALUES = {0: 0, 255: 1, 1: 1}
_BRATS_NAMES = {
    "t1": ("t1", "t1n"),
    "t1ce": ("t1ce", "t1c"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f"),
    "seg": ("seg",),
}


def layout_spec(layout: str) -> LayoutSpec:
    """The :class:`LayoutSpec` of a layout name; ConfigError for an unknown one."""
    if layout not in _SPECS:
        raise ConfigError(f"data.layout: unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    return _SPECS[layout]


@dataclass
class LayoutCase:
    """One case: its image file(s) and (optionally) its mask.

    Attributes:
        name: Case name (file stem, or BraTS case folder name).
        image_paths: One path per modality (one for 2-D layouts; a path may be a DICOM series
            folder).
        mask_path: Mask file, or None (allowed for prediction).
        modalities: Modality names, one per path (2-D layouts: ``("image",)``).
    """

    name: str
    image_paths: tuple[Path, ...]
    mask_path: Path | None
    modalities: tuple[str, ...] = ("image",)

    @property
    def image_path(self) -> Path:
        """The first (for 2-D layouts: the only) image path."""
        return self.image_paths[0]


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _first_dir(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_dir()), None)


# --------------------------------------------------------------------------------------------
# Scanning folders
# --------------------------------------------------------------------------------------------


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
    return [problem for problem in map(_link_problem, _visible(Path(folder))) if problem]


def _scan_planar(
    folder: Path, layout: str, require_masks: bool
) -> tuple[list[LayoutCase], list[str]]:
    image_names, mask_names = _PLANAR_DIRS[layout]
    image_dir, mask_dir = _first_dir(folder, image_names), _first_dir(folder, mask_names)
    if image_dir is None:
        return [], [f"{folder}: no {image_names[0]}/ folder ({layout} layout)"]
    problems: list[str] = link_problems(image_dir)
    suffixes = (*IMAGE_SUFFIXES, ".bmp") if layout == "refuge" else IMAGE_SUFFIXES
    images: dict[str, Path] = {}
    for path in _visible(image_dir):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in images:
                problems.append(f"{path}: same name as {images[path.stem].name}")
                continue
            images[path.stem] = path
    if not images:
        return [], [*problems, f"{image_dir}: no images found (looked for {', '.join(suffixes)})"]
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        problems += link_problems(mask_dir)
        for path in _visible(mask_dir):
            if not path.is_file():
                continue
            stem = path.stem
            if layout == "isic":
                if not stem.endswith("_segmentation"):
                    continue
                stem = stem[: -len("_segmentation")]
            if path.suffix.lower() in _MASK_SUFFIXES[layout]:
                masks[stem] = path
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                lossless = ", ".join(_MASK_SUFFIXES[layout])
                problems.append(f"{path}: masks must be lossless ({lossless})")
    elif require_masks:
        problems.append(f"{folder / mask_names[0]}: masks folder does not exist ({layout} layout)")
    return _pair_by_stem(images, masks, image_dir, require_masks, problems)


def _brats_file(case_dir: Path, key: str) -> Path | None:
    for alias in _BRATS_NAMES[key]:
        for sep in ("_", "-"):
            for suffix in (".nii.gz", ".nii"):
                path = case_dir / f"{case_dir.name}{sep}{alias}{suffix}"
                if path.is_file():
                    return path
    return None


def _scan_brats(folder: Path, require_masks: bool) -> tuple[list[LayoutCase], list[str]]:
    case_dirs = [p for p in _visible(folder) if p.is_dir()]
    problems = link_problems(folder)
    if not case_dirs:
        return [], [*problems, f"{folder}: no case folders (expected <case>/<case>_t1.nii.gz, ...)"]
    cases = []
    for case_dir in case_dirs:
        problems += link_problems(case_dir)
        paths, missing = [], []
        for modality in BRATS_MODALITIES:
            path = _brats_file(case_dir, modality)
            if path is None:
                missing.append(modality)
            paths.append(path)
        if missing:
            expected = case_dir / f"{case_dir.name}_{missing[0]}.nii.gz"
            problems.append(f"{expected}: missing modality {', '.join(missing)} of BraTS case")
            continue
        seg = _brats_file(case_dir, "seg")
        if seg is None and require_masks:
            problems.append(f"{case_dir / (case_dir.name + '_seg.nii.gz')}: case has no mask")
            continue
        cases.append(LayoutCase(case_dir.name, tuple(paths), seg, BRATS_MODALITIES))
    return cases, problems


def _scan_volumes(folder: Path, require_masks: bool) -> tuple[list[LayoutCase], list[str]]:
    image_dir, mask_dir = folder / "images", folder / "masks"
    if not image_dir.is_dir():
        return [], [f"{folder}: no images/ folder (expected images/<name>.nii.gz + masks/)"]
    problems: list[str] = link_problems(image_dir)
    images: dict[str, Path] = {}
    for path in _visible(image_dir):
        if volume_format(path) is None or not path.exists():  # a dead link: reported above
            continue
        stem = volume_stem(path)
        if stem in images:
            problems.append(f"{path}: same name as {images[stem].name}")
            continue
        images[stem] = path
    if not images:
        found = f"{image_dir}: no volumes found (.nii.gz, .nii, .nrrd or DICOM folders)"
        return [], [*problems, found]
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        problems += link_problems(mask_dir)
        for path in _visible(mask_dir):
            if volume_format(path) is not None and path.exists():
                masks[volume_stem(path)] = path
    elif require_masks:
        problems.append(f"{mask_dir}: masks folder does not exist")
    return _pair_by_stem(images, masks, image_dir, require_masks, problems)


def problem_cases(problem: str) -> set[str]:
    """The case names a problem line may be about, read from the path it starts with.

    Problem lines start with the offending path; a case's files carry its name as their stem
    (``images/a.png``, ``masks/a_segmentation.png``, ``masks/a.nii.gz``) or their folder
    (``<case>/<case>_t1.nii.gz``, a DICOM series ``images/<case>/``).
    """
    path = Path(problem.split(": ", 1)[0])
    stem = volume_stem(path)
    return {path.name, path.stem, stem, stem.removesuffix("_segmentation"), path.parent.name}


def scan_layout(
    folder: Path, layout: str, *, require_masks: bool, skip: Collection[str] = ()
) -> tuple[list[LayoutCase], list[str]]:
    """List a folder's cases and every layout-level problem (one line each, path first).

    Cases named in ``skip`` are left out, and so are the problems about them.
    """
    spec = layout_spec(layout)
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        return [], [f"{folder}: data folder {what}"]
    if not any(not p.name.startswith(".") for p in folder.iterdir()):
        expected = "no case folders" if layout == "brats" else "no images/ folder"
        return [], [f"{folder}: data folder is empty ({expected})"]
    if spec.kind == "planar":
        cases, problems = _scan_planar(folder, layout, require_masks)
    elif layout == "brats":
        cases, problems = _scan_brats(folder, require_masks)
    else:
        cases, problems = _scan_volumes(folder, require_masks)
    if skip:
        skipped = set(skip)
        cases = [case for case in cases if case.name not in skipped]
        problems = [line for line in problems if not problem_cases(line) & skipped]
    return cases, problems


def find_layout_cases(
    folder: Path, layout: str, *, require_masks: bool, skip: Collection[str] = ()
) -> list[LayoutCase]:
    """The cases of ``folder`` in ``layout`` (less ``skip``), sorted by name; DataError on the
    first problem."""
    cases, problems = scan_layout(folder, layout, require_masks=require_masks, skip=skip)
    if problems:
        raise DataError(problems[0])
    return cases


# --------------------------------------------------------------------------------------------
# Reading one case
# --------------------------------------------------------------------------------------------


def _map_values(
    values: np.ndarray, mapping: Mapping[int, int], path: Path, meaning: str
) -> np.ndarray:
    present = np.unique(values)
    unknown = [int(v) for v in present if int(v) not in mapping]
    if unknown:
        shown = ", ".join(map(str, unknown[:_MAX_LISTED]))
        raise DataError(f"{path}: mask value(s) {shown} are not {meaning}")
    lookup = np.zeros(int(present.max(initial=0)) + 1, np.int64)
    for value, label in mapping.items():
        if value < lookup.size:
            lookup[value] = label
    return lookup[values]


def read_planar_labels(path: Path, layout: str) -> np.ndarray:
    """Read a 2-D mask of ``layout`` as an int64 (H, W) label map after the layout's mapping.

    REFUGE 0/128/255 become 2 (cup) / 1 (disc rim) / 0; DDTI and ISIC 255 (or 1) becomes 1.

    Raises:
        DataError: The file is unreadable, or holds values the layout does not define.
    """
    labels = read_label_map(path)
    if layout == "refuge":
        return _map_values(labels, _REFUGE_VALUES, Path(path), "REFUGE values 0/128/255")
    if layout in ("ddti", "isic"):
        return _map_values(labels, _BINARY_VALUES, Path(path), "0 or 255 (or 0/1)")
    return labels


def load_planar_case(
    case: LayoutCase, layout: str, classes: Mapping[str, Sequence[int]], in_channels: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and validate a 2-D case: float32 image (in_channels, H, W), labels (H, W) or None."""
    image = read_image(case.image_path)
    channels = image.shape[0]
    if channels == 3 and in_channels == 1 and layout == "ddti":
        image = image.mean(axis=0, keepdims=True)  # ultrasound exported as RGB
    elif channels == 1 and in_channels == 3:
        image = np.repeat(image, 3, axis=0)
    elif channels != in_channels:
        raise DataError(
            f"{case.image_path}: image has {channels} channel(s) but the model expects "
            f"{in_channels}"
        )
    if case.mask_path is None:
        return image, None
    labels = read_planar_labels(case.mask_path, layout)
    if labels.shape != image.shape[1:]:
        (mh, mw), (ih, iw) = labels.shape, image.shape[1:]
        raise DataError(f"{case.mask_path}: mask is {mw}x{mh} but its image is {iw}x{ih}")
    labels_to_channels(labels, classes, source=str(case.mask_path))
    return image, labels


def _check_label_values(volume: Volume, classes: Mapping[str, Sequence[int]]) -> None:
    values = np.unique(volume.data)
    labels_to_channels(values[None, :], classes, source=str(volume.path))


def load_volume_case(
    case: LayoutCase, classes: Mapping[str, Sequence[int]], in_channels: int | None = None
) -> tuple[list[Volume], Volume | None]:
    """Read and validate a volume case: its modalities (same grid) and its label volume or None.

    Raises:
        DataError: A file is unreadable or has NaNs; a modality or the mask is on another grid
            (shape or affine); the channels (modalities, 4-D channels) differ from
            ``in_channels``; the mask has values outside the classes.
    """
    volumes = [read_volume(path) for path in case.image_paths]
    for volume in volumes[1:]:
        check_same_grid(volume, volumes[0])
    channels = sum(v.channels for v in volumes)
    if in_channels is not None and channels != in_channels:
        raise DataError(
            f"{case.image_path}: case has {channels} channel(s) but the model expects {in_channels}"
        )
    if case.mask_path is None:
        return volumes, None
    labels = read_label_volume(case.mask_path, reference=volumes[0])
    _check_label_values(labels, classes)
    return volumes, labels


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

# The z-scores are ours, not MONAI's NormalizeIntensity: it divides by the bare std, so a flat
# image or volume (float32 rounding noise, std ~1e-8) comes out +-1 instead of 0.
_NORMALISE_EPS = 1e-6
_CLIP_PERCENTILES = ClipIntensityPercentiles(lower=0.5, upper=99.5)


def _resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(image)[None]
    if tensor.shape[-2:] == (size, size):
        return tensor[0].clone()
    # Antialiasing matters when shrinking: fine texture would otherwise alias into noise.
    # Not MONAI's Resize: its anti_aliasing is a Gaussian pre-blur, not this antialiased kernel.
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
    return resized[0]


def _resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    # Nearest on the label map (not on channels) keeps every pixel a single valid label.
    resized = Resize((size, size), mode="nearest-exact")(labels[None].astype(np.float32))
    return np.asarray(resized[0]).astype(np.int64)


def _normalise(image: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel z-score: removes most of a site's exposure and colour cast."""
    mean = image.mean(dim=(1, 2), keepdim=True)
    std = image.std(dim=(1, 2), keepdim=True, unbiased=False)
    return (image - mean) / (std + _NORMALISE_EPS)


class SegmentationDataset(Dataset):
    """What the 2-D and the volume datasets share: the settings, model-resolution tensors,
    augmentation and the item dict. Each subclass defines its own cases.

    Each item is a dict:

    - ``"image"``: float32 (C, S, S) at the model's resolution S.
    - ``"mask"``: float32 {0, 1} (M, S, S), one channel per class in class order; zeros when
      the case has no mask.
    - ``"name"``: the item's name (a subclass adds its own keys, see :meth:`_names`).
    - ``"original_size"``: (H, W) of the image (slice) on disk, to write predictions back at.

    Attributes:
        cases: The case each item comes from, one entry per item (a 2-D case is one item; a
            volume case is one item per kept slice).

    Args:
        classes: Channel name -> label values, e.g. ``{"disc": [1, 2], "cup": [2]}``.
        image_size: Side S of the square tensors, in pixels.
        augment: Random horizontal flips and small per-channel gain/offset jitter.
        seed: Seeds the augmentation stream when loading in the main process, for reproducible
            runs. DataLoader worker processes use torch's global RNG instead, which the
            DataLoader seeds differently per worker and epoch (a generator copied into each
            worker would repeat the same flips in every worker and epoch).
    """

    cases: list[LayoutCase]

    def __init__(
        self, classes: Mapping[str, Sequence[int]], image_size: int, *, augment: bool, seed: int
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        class_labels(classes)
        self.classes = {name: list(values) for name, values in classes.items()}
        self.image_size = image_size
        self.augment = augment
        self._generator = torch.Generator().manual_seed(seed)

    def _tensors(
        self,
        items: Iterable[tuple[np.ndarray, np.ndarray | None, str]],
        *,
        normalise: bool,
        empty: str,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Stacked model-resolution images, bool masks and original sizes of ``items``:
        ``(image (C, H, W), labels (H, W) or None, mask file)``; images z-scored per image
        unless ``normalise`` is off (volumes are normalised per volume before slicing)."""
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

    def _hold(
        self,
        items: Iterable[tuple[np.ndarray, np.ndarray | None, str]],
        *,
        normalise: bool,
        empty: str,
    ) -> None:
        """Keep every item's tensors (:meth:`_tensors`) in memory."""
        self._images, self._masks, self._sizes = self._tensors(
            items, normalise=normalise, empty=empty
        )

    def _item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(image, bool mask, original size) of item ``index`` as held in memory."""
        return self._images[index], self._masks[index], self._sizes[index]

    def _names(self, index: int) -> dict:
        """The item's ``"name"`` and any other keys saying where it came from."""
        return {"name": self.cases[index].name}

    def has_labelled_pixels(self) -> bool:
        """Whether any held mask has a pixel of the classes (a folder of empty masks teaches
        nothing; ``data check`` reports it as a problem)."""
        return bool(self._masks.any())

    @property
    def has_masks(self) -> bool:
        """True when every case has a mask."""
        return all(case.mask_path is not None for case in self.cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        held_image, held_mask, original_size = self._item(index)
        image = held_image.clone()
        mask = held_mask.to(torch.float32)
        if self.augment:
            image, mask = self._augment(image, mask)
        return {"image": image, "mask": mask, **self._names(index), "original_size": original_size}

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


class PlanarDataset(SegmentationDataset):
    """A 2-D layout (generic, refuge, ddti, isic) as a dataset: one item per image.

    Items are :class:`SegmentationDataset`'s: each image channel z-scored (zero mean, unit std)
    per image; ``"name"`` is the file stem. All cases are decoded, validated, resized and
    normalised once, at construction: the 2-D datasets this is meant for are small (thousands of
    images at a few hundred pixels), and finding a bad file before training starts beats
    finding it in epoch 7.

    Args:
        folder: The site's folder.
        layout: A planar layout name.
        classes, image_size, augment, seed: As :class:`SegmentationDataset`.
        in_channels: Channels the model takes; a grey image is repeated to 3 channels if needed.
        require_masks: Whether every image must have a mask (training, evaluation).
        skip: Case names to leave out (bad cases a user chose to skip).

    Raises:
        DataError: The first problem :func:`~.check.check_dataset` would report.
    """

    def __init__(
        self,
        folder: Path,
        layout: str,
        classes: Mapping[str, Sequence[int]],
        image_size: int,
        *,
        in_channels: int,
        require_masks: bool = True,
        augment: bool = False,
        seed: int = 0,
        skip: Collection[str] = (),
    ) -> None:
        if layout_spec(layout).kind != "planar":
            raise ConfigError(f"data.layout: {layout} is not a 2-D layout")
        super().__init__(classes, image_size, augment=augment, seed=seed)
        self.folder = Path(folder)
        self.layout = layout
        self.in_channels = in_channels
        self.cases = find_layout_cases(self.folder, layout, require_masks=require_masks, skip=skip)
        self._hold(
            (
                (*load_planar_case(case, layout, self.classes, in_channels), str(case.mask_path))
                for case in self.cases
            ),
            normalise=True,
            empty="no cases",
        )

    def target_labels(self, index: int) -> np.ndarray | None:
        """The case's (H, W) label map at its original size (after the layout's mapping)."""
        case = self.cases[index]
        return None if case.mask_path is None else read_planar_labels(case.mask_path, self.layout)


def _normalise_volume(data: np.ndarray, mode: str) -> np.ndarray:
    """Z-score one modality ``[i, j, k]``: over its non-zero voxels (background stays 0, as in
    BraTS practice) or, with fewer than two of them or in ``"volume"`` mode, over the whole
    volume clipped to its 0.5-99.5 percentiles. float32."""
    data = data.astype(np.float32)
    if mode == "nonzero":
        inside = data != 0
        if inside.sum() > 1:
            values = data[inside]
            out = (data - values.mean()) / (values.std() + _NORMALISE_EPS)
            out[~inside] = 0.0
            return out
    clipped = np.asarray(_CLIP_PERCENTILES(data))  # float32, as the volume
    return (clipped - clipped.mean()) / (clipped.std() + _NORMALISE_EPS)


@dataclass
class _VolumeCase:
    case: LayoutCase
    reference: Volume  # geometry only (data is a zero-size broadcast view)
    axis: int
    slices: list[int]


class SliceDataset(SegmentationDataset):
    """Volume cases as a dataset of 2-D slices along each volume's axial axis: one item per
    kept slice. The cases are :attr:`volume_cases` (case name -> its file(s), geometry, axial
    axis and kept slices); ``cases`` names each item's case.

    Each item is a dict with :class:`SegmentationDataset`'s keys plus where the slice came from:

    - ``"image"``: float32 (C, S, S): modalities (then 4-D channels) stacked; each modality
      z-scored over its whole volume (``normalise``), then the slice resized to S x S.
    - ``"mask"``: float32 {0, 1} (M, S, S), one channel per class; zeros without a mask.
    - ``"name"``: ``"<case>@<slice index>"``, e.g. ``"BraTS-00001@012"``.
    - ``"original_size"``: (H, W) of the slice in voxels: the volume's two in-plane axes in
      ``[i, j, k]`` order (for the usual axial volume, H = I and W = J).
    - ``"case"``: the case name; ``"slice_index"``: the index along the axial axis.

    Write predictions back with :meth:`write_prediction`, which assembles a case's slices into a
    volume on the image's grid.

    Args:
        cases: Volume cases (e.g. from :func:`find_layout_cases`).
        classes: Channel name -> label values.
        image_size: Side S of the square tensors.
        in_channels: Expected channels per case (None: take the first case's).
        normalise: ``"nonzero"`` (z-score over non-zero voxels, background kept 0: skull-stripped
            MRI) or ``"volume"`` (clip to the 0.5-99.5 percentiles, z-score all voxels: CT, MRI
            with background).
        skip_empty: Keep only slices whose mask has a labelled voxel (training); cases without a
            mask keep all slices.
        augment, seed: As :class:`SegmentationDataset`.
        lazy: Hold one case at a time instead of every kept slice (inference over a folder:
            memory no longer grows with the number of volumes). Items must then be read case
            by case, as inference does; each volume is decoded twice (checked at construction,
            read again when its first slice is asked for).

    All cases are read and validated at construction, so a bad case stops a run before any
    training or sampling; without ``lazy`` the kept slices are held in memory.
    """

    def __init__(
        self,
        cases: Sequence[LayoutCase],
        classes: Mapping[str, Sequence[int]],
        image_size: int,
        *,
        in_channels: int | None = None,
        normalise: Literal["nonzero", "volume"] = "volume",
        skip_empty: bool = False,
        augment: bool = False,
        seed: int = 0,
        lazy: bool = False,
    ) -> None:
        super().__init__(classes, image_size, augment=augment, seed=seed)
        self.volume_cases: dict[str, _VolumeCase] = {}
        self.cases: list[LayoutCase] = []  # the case of each item (slice)
        self._slice_index: list[int] = []
        self._normalise, self._skip_empty, self.lazy = normalise, skip_empty, lazy
        self._held_case: tuple[str, torch.Tensor, torch.Tensor, list[tuple[int, int]]] | None
        self._held_case = None
        slices = self._slices(cases, in_channels, register=True)
        empty = "no slices: every case's mask is empty (skip_empty is on)"
        if not lazy:
            self._hold(slices, normalise=False, empty=empty)
            return
        for _ in slices:  # read and check every case; keep only where its slices are
            pass
        if not self.cases:
            raise DataError(empty)

    def _item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        if not self.lazy:
            return super()._item(index)
        case = self.cases[index]
        if self._held_case is None or self._held_case[0] != case.name:
            self._held_case = None  # let the previous case go before reading the next
            slices = self._slices([case], self.in_channels, register=False)
            self._held_case = (case.name, *self._tensors(slices, normalise=False, empty=""))
        _, images, masks, sizes = self._held_case
        position = self.volume_cases[case.name].slices.index(self._slice_index[index])
        return images[position], masks[position], sizes[position]

    def _slices(
        self, cases: Sequence[LayoutCase], in_channels: int | None, *, register: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None, str]]:
        """Read each case and yield its kept slices; with ``register``, record where each item
        came from (at construction)."""
        normalise, skip_empty = self._normalise, self._skip_empty
        for case in cases:
            volumes, labels = load_volume_case(case, self.classes, in_channels)
            channels = [v.data[..., None] if v.data.ndim == 3 else v.data for v in volumes]
            planes = [c[..., n] for c in channels for n in range(c.shape[3])]
            stacked = np.stack([_normalise_volume(p, normalise) for p in planes])  # (C, I, J, K)
            in_channels = stacked.shape[0] if in_channels is None else in_channels
            self.in_channels = in_channels
            reference = volumes[0]
            axis = axial_axis(reference.affine)
            if skip_empty and labels is not None:
                other = tuple(a for a in range(3) if a != axis)
                keep = np.flatnonzero((labels.data != 0).any(axis=other)).tolist()
            else:
                keep = list(range(reference.shape[axis]))
            geometry = Volume(
                np.broadcast_to(np.zeros((), np.uint8), reference.shape),
                reference.affine,
                reference.path,
                reference.format,
                reference.header,
            )
            if register:
                self.volume_cases[case.name] = _VolumeCase(case, geometry, axis, keep)
                self.cases += [case] * len(keep)
                self._slice_index += keep
            for k in keep:
                image = np.ascontiguousarray(np.take(stacked, k, axis=axis + 1))
                label_slice = None if labels is None else np.take(labels.data, k, axis=axis)
                yield image, label_slice, str(case.mask_path)

    def _names(self, index: int) -> dict:
        case, k = self.locate(index)
        return {"name": f"{case}@{k:03d}", "case": case, "slice_index": k}

    def locate(self, index: int) -> tuple[str, int]:
        """(case name, slice index along the axial axis) of item ``index``."""
        return self.cases[index].name, self._slice_index[index]

    def reference(self, case: str) -> Volume:
        """The geometry of a case's (first) image: shape, affine, header; no voxel data."""
        return self.volume_cases[case].reference

    def slices_of(self, case: str) -> list[int]:
        """The slice indices of ``case`` that are items, ascending."""
        return list(self.volume_cases[case].slices)

    def assemble(
        self, case: str, slices: Mapping[int, np.ndarray], *, dtype: np.dtype | type = np.uint8
    ) -> np.ndarray:
        """Put (H, W) slices (at ``original_size``) back into an ``[i, j, k]`` volume
        (:func:`~.writers.assemble_slices`). Slices not given are 0."""
        entry = self.volume_cases[case]
        return assemble_slices(case, entry.reference.shape, entry.axis, slices, dtype=dtype)

    def output_name(self, case: str) -> str:
        """File name of a case's prediction: the input's format (DICOM series -> NIfTI)."""
        return volume_output_name(case, self.volume_cases[case].reference)

    def write_prediction(
        self,
        out_dir: Path,
        case: str,
        labels: Mapping[int, np.ndarray],
        uncertainty: Mapping[int, np.ndarray] | None = None,
        provenance: Provenance | None = None,
    ) -> list[Path]:
        """Write a case's prediction on its image grid
        (:func:`~.writers.write_volume_prediction`): ``out_dir/masks/<case>.<ext>``, with
        ``uncertainty`` ``out_dir/uncertainty/<case>.<ext>``, and for a DICOM series with
        ``provenance`` ``out_dir/dicom-seg/<case>.dcm``; labels and uncertainty map slice index
        -> (H, W) at the slice's ``original_size``. Returns the written paths."""
        entry = self.volume_cases[case]
        return write_volume_prediction(
            out_dir, case, entry.reference, entry.axis, labels, uncertainty, provenance
        )

    def is_dicom(self, case: str) -> bool:
        """Whether the case's image is a DICOM series (its prediction also gets a DICOM-SEG)."""
        return self.volume_cases[case].reference.format == "dicom"

    def target_labels(self, index: int) -> np.ndarray | None:
        """The item's (H, W) label slice at its original size, or None without a mask."""
        case = self.cases[index]
        if case.mask_path is None:
            return None
        entry = self.volume_cases[case.name]
        labels = read_label_volume(case.mask_path, reference=entry.reference).data
        return np.take(labels, self._slice_index[index], axis=entry.axis)


def open_dataset(
    folder: Path,
    layout: str,
    classes: Mapping[str, Sequence[int]] | None,
    image_size: int,
    *,
    in_channels: int | None = None,
    require_masks: bool = True,
    augment: bool = False,
    seed: int = 0,
    skip_empty: bool = False,
    skip: Collection[str] = (),
    lazy: bool = False,
) -> PlanarDataset | SliceDataset:
    """The dataset of a site folder in any layout.

    2-D layouts give a :class:`PlanarDataset` and the volume layouts a :class:`SliceDataset`.
    ``classes`` and ``in_channels`` default to the layout's (:func:`layout_spec`);
    ``skip_empty`` and ``lazy`` (one case in memory at a time, see :class:`SliceDataset`) apply
    to volume layouts only; cases named in ``skip`` are left out.
    """
    spec = layout_spec(layout)
    classes = spec.classes if classes is None else classes
    channels = in_channels or spec.in_channels
    if spec.kind == "planar":
        if channels is None:
            raise ConfigError("data.image_channels: needed for the generic layout")
        return PlanarDataset(
            folder,
            layout,
            classes,
            image_size,
            in_channels=channels,
            require_masks=require_masks,
            augment=augment,
            seed=seed,
            skip=skip,
        )
    cases = find_layout_cases(folder, layout, require_masks=require_masks, skip=skip)
    return SliceDataset(
        cases,
        classes,
        image_size,
        in_channels=channels,
        normalise=spec.normalise,
        skip_empty=skip_empty,
        augment=augment,
        seed=seed,
        lazy=lazy,
    )


def _pair_by_stem(
    images: dict[str, Path],
    masks: dict[str, Path],
    image_dir: Path,
    require_masks: bool,
    problems: list[str],
) -> tuple[list[LayoutCase], list[str]]:
    """Match images and masks by file stem; unmatched files become problems."""
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"{masks[stem]}: mask has no image in {image_dir}")
    if require_masks:
        for stem in sorted(set(images) - set(masks)):
            problems.append(f"{images[stem]}: image has no mask")
    return [LayoutCase(s, (images[s],), masks.get(s)) for s in sorted(images)], problems
