"""DICOM Segmentation (DICOM-SEG) output for predictions made on a DICOM series (highdicom).

A PACS stores, and OHIF, 3D Slicer or the PACS viewer display, a DICOM Segmentation object that
references its source series; a NIfTI file next to the series is opened by research tools only.
:func:`write_dicom_seg` turns a predicted label volume into such an object:

- one BINARY segment per configured class, named after the class, holding the voxels whose label
  is one of the class's values (overlapping classes such as BraTS' WT/TC/ET are separate,
  overlapping segments, as the standard allows);
- the algorithm identified as ``FedMedSegDiff`` (family: artificial intelligence) with the
  release's name and version, the package version as the software version;
- the source series' Study, Patient and Frame of Reference, each frame referencing the SOP
  Instance of the source slice it lies on (highdicom copies the patient/study modules and builds
  the references and the plane positions from the source datasets).

Array convention: ``labels`` is ``[i, j, k]`` on the source series' grid, as
:func:`~.volumes.read_dicom_series` returns it and :class:`~.volumes.Volume` holds it: voxel
``[i, j, k]`` is pixel (row ``j``, column ``i``) of slice ``k``, slice ``k`` being
``read_dicom_datasets(folder)[k]`` (the series sorted along the slice normal). Frame ``k`` of the
SEG's pixel array is therefore ``labels[:, :, k].T``; reading the SEG back by source instance
gives exactly the class masks of ``labels`` (``tests/test_dicom.py`` checks this).

Library choice: **highdicom** (the Imaging Data Commons team's library for the DICOM SEG, SR
and parametric-map IODs) builds the multi-frame functional groups, bit-packs BINARY
frames and fills the referenced series/instance sequences correctly; writing those by hand with
pydicom is where hand-made SEG files usually fail validation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .volumes import order_dicom_datasets, read_dicom_datasets

__all__ = ["ALGORITHM_NAME", "write_dicom_seg"]

ALGORITHM_NAME = "FedMedSegDiff"
"""AlgorithmName of every segment's Algorithm Identification."""

_LO = 64  # maximum length of a DICOM LO (long string) value
_SEG_SERIES_OFFSET = 1000  # SEG series number = source series number + this


def _clip(text: str, limit: int = _LO) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "~"


def _source_datasets(source: Path | str | Sequence[Any]) -> tuple[list[Any], Path | None]:
    if isinstance(source, str | Path):
        folder = Path(source)
        return read_dicom_datasets(folder), folder
    return order_dicom_datasets(list(source)), None


def write_dicom_seg(
    path: Path,
    labels: np.ndarray,
    source: Path | str | Sequence[Any],
    classes: Mapping[str, Sequence[int]],
    *,
    release_name: str,
    release_version: int | str,
    series_number: int | None = None,
    property_codes: Mapping[str, tuple[Any, Any]] | None = None,
) -> Path:
    """Write the predicted ``labels`` of a DICOM series as a DICOM Segmentation file.

    How the prediction writer calls it, for a case whose image is a DICOM series folder
    ``series`` (the ``volumes`` layout) and whose label volume ``labels`` has just been written
    as NIfTI with :func:`~.volumes.write_label_volume` (same array, same grid)::

        write_dicom_seg(
            out / "dicom-seg" / f"{case}.dcm",      # never inside the input folder
            labels,                                   # [i, j, k] uint8, reference.shape
            series,                                   # reference.path (a folder), or datasets
            config.data.classes,                      # {"wt": [1, 2, 4], "tc": [1, 4], ...}
            release_name=release.name,
            release_version=release.version,
        )

    Args:
        path: The ``.dcm`` file to write (parent folders are created).
        labels: Integer label volume ``[i, j, k]`` on the source series' grid (the shape
            ``(Columns, Rows, number of slices)``); 0 is background, every other value must
            belong to at least one class.
        source: The source series' folder, or its datasets (any order: they are sorted along
            the slice normal as :func:`~.volumes.read_dicom_series` sorts them; pixel data is
            not needed).
        classes: The config's ``data.classes``, class name -> label values; segment ``n`` (from
            1, in the mapping's order) is class ``n``, labelled with its name.
        release_name: Name of the model release that made the prediction.
        release_version: Its version (the ``N`` of ``<name>-vN``).
        series_number: The SEG's SeriesNumber; default the source's plus 1000.
        property_codes: Per class name, ``(segmented property category, type)`` as pydicom
            ``Code`` objects (CID 7150 / 7151), e.g. ``(codes.SCT.Tissue, codes.SCT.Tumor)``;
            classes not listed get the generic SCT "Tissue"/"Tissue".

    Returns:
        ``path``. The object has SOP Class Segmentation Storage, SegmentationType BINARY, the
        source's Study Instance UID and Frame of Reference UID, a new Series Instance UID, one
        frame per source slice holding at least one segmented voxel (empty slices are omitted,
        so a small lesion gives a small file; an all-empty prediction keeps every slice's frame),
        each referencing its source instance.

    Raises:
        DataError: The source series fails the series checks of
            :func:`~.volumes.read_dicom_series` (one line naming the file).
        ValueError: ``labels`` is not on the source's grid, has values outside the classes, or
            ``path`` lies inside the source folder (the series would then hold two series).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from .. import __version__

    path = Path(path)
    datasets, folder = _source_datasets(source)
    if folder is not None and path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{path}: a DICOM-SEG may not be written inside its source series folder")
    if not classes:
        raise ValueError("classes: at least one class is needed for a segmentation")
    labels = np.asarray(labels)
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    expected = (columns, rows, len(datasets))
    if labels.shape != expected:
        raise ValueError(
            f"labels must be [i, j, k] = (Columns, Rows, slices) = {expected} of the source "
            f"series, got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, labels.round()):
        raise ValueError("labels must be integer label values")
    known = {0, *(int(v) for values in classes.values() for v in values)}
    present = {int(v) for v in np.unique(labels)}
    if present - known:
        raise ValueError(
            f"label values {sorted(present - known)} belong to no class of {sorted(classes)}"
        )

    # (frames = slices k, rows = j, columns = i, segments): frame k is labels[:, :, k].T.
    frames = np.stack(
        [np.isin(labels, [int(v) for v in values]) for values in classes.values()], axis=-1
    )
    pixel_array = np.ascontiguousarray(np.transpose(frames, (2, 1, 0, 3))).astype(np.uint8)

    # "fundus v3" for a release; "model (unreleased)" for a plain checkpoint
    numbered = str(release_version).isdigit()
    version = f"{release_name} {'v' if numbered else '('}{release_version}{'' if numbered else ')'}"
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=_clip(version),
        source=ALGORITHM_NAME,
        parameters={
            "release": str(release_name),
            "release_version": str(release_version),
            "package_version": __version__,
        },
    )
    property_codes = dict(property_codes or {})
    descriptions = []
    for number, name in enumerate(classes, start=1):
        category, kind = property_codes.get(name, (codes.SCT.Tissue, codes.SCT.Tissue))
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=_clip(str(name)),
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    if series_number is None:
        series_number = int(getattr(datasets[0], "SeriesNumber", 0) or 0) + _SEG_SERIES_OFFSET
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=ALGORITHM_NAME,
            manufacturer_model_name=_clip(str(release_name)),
            software_versions=__version__,
            device_serial_number=_clip(version),
            series_description=_clip(f"{ALGORITHM_NAME} {version}"),
            content_label="FEDMEDSEGDIFF",
            content_description=_clip(f"{ALGORITHM_NAME} segmentation, release {version}"),
            content_qualification=hd.ContentQualificationValues.RESEARCH,
            # Empty slices are left out; a prediction with nothing found keeps every frame.
            omit_empty_frames=bool(pixel_array.any()),
        )
    except (ValueError, AttributeError) as error:  # source series highdicom cannot use
        where = folder if folder is not None else "DICOM series"
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{where}: cannot build a DICOM-SEG on this series ({text})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path
