"""``medsegdiff data check DIR --layout NAME``: validate a site's folder before training.

:func:`check_dataset` reads every case of a folder the way training would and returns a
:class:`Report`: what was found (cases, modalities, sizes, spacings, label values, class balance)
and *every* problem, one line each starting with the offending path, rather than stopping at the
first. It is the first thing a hospital runs on its data.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .images import read_image
from .labels import class_labels
from .layouts import (
    LAYOUTS,
    layout_spec,
    load_planar_case,
    load_volume_case,
    scan_layout,
)
from .volumes import axial_axis

__all__ = [
    "Report",
    "add_data_parser",
    "check_dataset",
    "problem_kind",
    "require_clean",
    "run_data_command",
]


@dataclass
class Report:
    """What :func:`check_dataset` found.

    Attributes:
        folder: The folder checked.
        layout: Its layout name.
        classes: The classes checked against.
        cases: Cases found (readable or not).
        masked: Cases with a mask.
        modalities: Modality names of a case (2-D layouts: ``["image"]``).
        channels: Counter of image channel counts.
        sizes: Counter of image sizes, ``"WxH"`` (2-D) or ``"IxJxK"`` (volumes, voxels).
        spacings: Counter of voxel sizes ``"sx x sy x sz mm"`` (volumes only).
        label_values: Label value -> pixel/voxel count over all readable masks (after the
            layout's value mapping).
        class_pixels: Class name -> pixels/voxels inside it.
        total_pixels: Pixels/voxels of all readable masks.
        slices: (all axial slices, slices with a label) of the volume cases with masks.
        problems: Every problem, one line each, path first.
        notes: What was fixed on reading and is worth knowing (a mask reoriented onto its
            image's grid), one line each, path first; not problems.
    """

    folder: Path
    layout: str
    classes: dict[str, list[int]]
    cases: int = 0
    masked: int = 0
    modalities: list[str] = field(default_factory=list)
    channels: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    spacings: Counter = field(default_factory=Counter)
    label_values: Counter = field(default_factory=Counter)
    class_pixels: dict[str, int] = field(default_factory=dict)
    total_pixels: int = 0
    slices: tuple[int, int] = (0, 0)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def class_balance(self) -> dict[str, float]:
        """Class name -> fraction of mask pixels/voxels in it."""
        total = max(self.total_pixels, 1)
        return {name: self.class_pixels.get(name, 0) / total for name in self.classes}

    def format(self) -> str:
        """The report as text, for the terminal."""

        def counts(counter: Counter) -> str:
            return ", ".join(f"{key} ({n})" for key, n in counter.most_common(6)) or "-"

        lines = [
            f"folder:       {self.folder}",
            f"layout:       {self.layout}",
            f"cases:        {self.cases} ({self.masked} with masks)",
            f"modalities:   {', '.join(self.modalities) or '-'}",
            f"channels:     {counts(self.channels)}",
            f"sizes:        {counts(self.sizes)}",
        ]
        if self.spacings:
            lines.append(f"spacing (mm): {counts(self.spacings)}")
        if self.slices != (0, 0):
            lines.append(f"slices:       {self.slices[1]} of {self.slices[0]} have labels")
        values = ", ".join(f"{v}: {n}" for v, n in sorted(self.label_values.items())) or "-"
        lines.append(f"label values: {values} (pixels/voxels)")
        balance = ", ".join(f"{name} {100 * f:.2f}%" for name, f in self.class_balance.items())
        lines.append(f"class balance: {balance}")
        if self.notes:
            lines.append(f"notes ({len(self.notes)}):")
            lines += [f"  {note}" for note in self.notes]
        if self.problems:
            lines.append(f"problems ({len(self.problems)}):")
            lines += [f"  {problem}" for problem in self.problems]
        else:
            lines.append("problems:     none")
        return "\n".join(lines)


def _count_labels(report: Report, labels: np.ndarray) -> None:
    values, counts = np.unique(labels, return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        report.label_values[int(value)] += int(count)
    for name, members in report.classes.items():
        inside = int(counts[np.isin(values, members)].sum())
        report.class_pixels[name] = report.class_pixels.get(name, 0) + inside
    report.total_pixels += int(labels.size)


def check_dataset(
    folder: Path,
    layout: str,
    classes: Mapping[str, Sequence[int]] | None = None,
    in_channels: int | None = None,
    *,
    require_masks: bool = True,
    skip: Collection[str] = (),
) -> Report:
    """Check every case of ``folder`` in ``layout``; returns the :class:`Report`.

    Args:
        folder: The site's folder.
        layout: One of :data:`~.layouts.LAYOUTS`.
        classes: Channel name -> label values; the layout's default when None.
        in_channels: Image channels the model takes; the layout's default (or, for the generic
            and volumes layouts, whatever the first readable case has) when None.
        require_masks: Whether every case needs a mask (training, evaluation); False for a
            folder to predict on.
        skip: Case names to leave out, with the problems about them (``data.skip_cases``).

    Raises:
        ConfigError: Unknown layout or invalid classes (a problem of the command, not the data).
    """
    spec = layout_spec(layout)
    classes = {k: list(v) for k, v in (spec.classes if classes is None else classes).items()}
    class_labels(classes)
    channels_expected = in_channels or spec.in_channels
    report = Report(Path(folder), layout, classes)
    cases, report.problems = scan_layout(
        Path(folder), layout, require_masks=require_masks, skip=skip
    )
    report.cases = len(cases)
    report.masked = sum(case.mask_path is not None for case in cases)
    if cases:
        report.modalities = list(cases[0].modalities)
    all_slices = labelled_slices = 0
    for case in cases:
        try:
            if spec.kind == "planar":
                image, labels = load_planar_case(
                    case, layout, classes, channels_expected or read_channels(case.image_path)
                )
                channels_expected = channels_expected or image.shape[0]
                report.channels[image.shape[0]] += 1
                report.sizes[f"{image.shape[2]}x{image.shape[1]}"] += 1
            else:
                volumes, label_volume = load_volume_case(case, classes, channels_expected)
                first = volumes[0]
                channels = sum(v.channels for v in volumes)
                channels_expected = channels_expected or channels
                report.channels[channels] += 1
                report.sizes["x".join(map(str, first.shape))] += 1
                report.spacings[" x ".join(f"{s:.3g}" for s in first.spacing)] += 1
                labels = None if label_volume is None else label_volume.data
                if label_volume is not None and label_volume.reoriented:
                    report.notes.append(f"{label_volume.path}: {label_volume.reoriented}")
                if labels is not None:
                    axis = axial_axis(first.affine)
                    other = tuple(a for a in range(3) if a != axis)
                    all_slices += labels.shape[axis]
                    labelled_slices += int((labels != 0).any(axis=other).sum())
        except DataError as error:
            report.problems.append(str(error))
            continue
        if labels is not None:
            _count_labels(report, labels)
    report.slices = (all_slices, labelled_slices)
    if report.masked and report.total_pixels and not any(report.class_pixels.values()):
        report.problems.append(f"{folder}: no mask has any labelled pixel of the classes")
    return report


def require_clean(
    folder: Path,
    layout: str,
    classes: Mapping[str, Sequence[int]],
    in_channels: int | None,
    *,
    skip: Collection[str] = (),
) -> Report:
    """:func:`check_dataset` for training: DataError listing every problem unless there are none.

    Training on a folder with a bad case would either stop hours in or quietly learn from a
    broken mask; refusing up front, with all problems on one line, lets the site fix them or
    name the bad cases in ``data.skip_cases`` and go on.
    """
    report = check_dataset(folder, layout, classes, in_channels, require_masks=True, skip=skip)
    if report.problems:
        listed = "; ".join(report.problems)
        raise DataError(
            f"{folder}: {len(report.problems)} problem(s) in training data; fix them or leave "
            f"the bad cases out with data.skip_cases: {listed}"
        )
    return report


def read_channels(path: Path) -> int:
    """Channels of a 2-D image file (1 grey, 3 colour); DataError if unreadable."""
    return int(read_image(path).shape[0])


# What a problem is, from its text after the path: lets a site report counts per kind without the
# file names (which can hold record numbers). First match wins; unknown wording is "other".
_PROBLEM_KINDS = (
    ("channels", re.compile(r"channel\(s\) but the model expects")),
    ("shape_mismatch", re.compile(r" but its image is |differs from its image|slice is .* but ")),
    ("label_values", re.compile(r"label value|mask value|labelled pixel|not a label map")),
    ("non_finite", re.compile(r"NaN or infinite")),
    ("duplicate", re.compile(r"same name as|duplicated slice")),
    ("format", re.compile(r"lossless|colour image|grey label map|expected a 3-D|must be 3-D")),
    ("unreadable", re.compile(r"cannot read|not a volume|no valid voxel-to-world")),
    ("broken_link", re.compile(r"symbolic link")),
    (
        "missing",
        re.compile(r"does not exist|has no (image|mask)|no mask for|missing|no \S+/ folder"),
    ),
)


def problem_kind(problem: str) -> str:
    """The kind of a :attr:`Report.problems` line (``unreadable``, ``shape_mismatch``, ...)."""
    text = problem.split(": ", 1)[-1]
    return next((kind for kind, pattern in _PROBLEM_KINDS if pattern.search(text)), "other")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data check DIR --layout NAME [--classes JSON] [--in-channels N] [--no-masks]``."""
    data = subparsers.add_parser("data", help="inspect and validate a site's data folder")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser(
        "check", help="list a folder's cases, sizes, labels, class balance and all problems"
    )
    check.add_argument("folder", type=Path, metavar="DIR", help="the site's data folder")
    check.add_argument("--layout", choices=LAYOUTS, default="generic", help="folder layout")
    check.add_argument(
        "--classes",
        default=None,
        metavar="JSON",
        help='mask channel -> label values, e.g. \'{"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}\' '
        "(default: the layout's)",
    )
    check.add_argument("--in-channels", type=int, default=None, help="image channels expected")
    check.add_argument(
        "--no-masks", action="store_true", help="masks are optional (a folder to predict on)"
    )
    fetch = data_sub.add_parser(
        "fetch-samples",
        help="download the five real labelled scans of the pyradiomics 3.0.1 sdist into a "
        "local cache (volumes layout) and print the folder; never needed to train or predict",
    )
    fetch.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache folder (default: $FEDMEDSEGDIFF_REAL_DATA or ~/.cache/fedmedsegdiff/real-data)",
    )
    fetch.add_argument(
        "--sdist", type=Path, default=None, help="an already downloaded pyradiomics-3.0.1.tar.gz"
    )
    return data


def _parse_classes(text: str | None) -> dict[str, list[int]] | None:
    if text is None:
        return None
    try:
        classes = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--classes: not valid JSON ({error.msg})") from None
    if not isinstance(classes, dict) or not all(isinstance(v, list) for v in classes.values()):
        raise ConfigError('--classes: expected an object like {"lesion": [1]}')
    return classes


def run_data_command(args: argparse.Namespace) -> int:
    """Run a ``data`` subcommand; prints the report and returns 0 if fine, 1 with problems."""
    if args.data_command == "fetch-samples":
        from .real import fetch_real_data

        print(fetch_real_data(args.cache, sdist=args.sdist))
        return 0
    if args.data_command != "check":
        raise ConfigError(f"data: unknown command {args.data_command!r}")
    report = check_dataset(
        args.folder,
        args.layout,
        _parse_classes(args.classes),
        args.in_channels,
        require_masks=not args.no_masks,
    )
    print(report.format())
    return 0 if report.ok else 1
