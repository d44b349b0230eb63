"""DICOM in and out (issue 17): compressed series read like uncompressed ones, slices ordered by
position whatever their InstanceNumbers, and predictions written as DICOM-SEG that references its
source series, read back with highdicom and checked by dicom3tools' ``dciodvfy``.

Every file is real, on disk: series are written by tests/test_medical.py's helper, compressed by
pydicom's encoders (JPEG-LS: pyjpegls, JPEG 2000: pylibjpeg-openjpeg, RLE: pydicom) or by
SimpleITK's GDCM (JPEG Lossless, for which pydicom has no encoder), and decoded by the runtime
dependencies only (pylibjpeg-libjpeg, -openjpeg, -rle, pyjpegls)."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import (
    MPEG2MPML,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from test_medical import _assert_one_line, _stored, _write_dicom_series

from medsegdiff_core.data import channels_to_labels
from medsegdiff_core.data.dicom_seg import ALGORITHM_NAME, write_dicom_seg
from medsegdiff_core.data.volumes import (
    read_dicom_datasets,
    read_dicom_series,
    read_label_volume,
    write_label_volume,
)
from medsegdiff_core.errors import DataError

BRATS_LIKE = {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}  # nested, overlapping segments
# JPEG 2000 with openjpeg's 6 resolution levels needs at least 32 pixels a side.
SHAPE = (34, 32, 4)


def _series(folder: Path, stored: np.ndarray, **kwargs) -> list[Path]:
    """:func:`_write_dicom_series` plus the patient, study and frame-of-reference attributes a
    PACS series carries (highdicom copies them into the SEG)."""
    paths = _write_dicom_series(folder, stored, **kwargs)
    frame_of_reference = generate_uid()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^J", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.SeriesNumber = 3
        ds.save_as(path)
    return paths


def _compress(paths: list[Path], out: Path, syntax: str) -> Path:
    out.mkdir(parents=True)
    for path in paths:
        if syntax == JPEGLosslessSV1:  # GDCM (inside SimpleITK) writes JPEG Lossless SV1
            writer = sitk.ImageFileWriter()
            writer.SetImageIO("GDCMImageIO")
            writer.KeepOriginalImageUIDOn()
            writer.SetUseCompression(True)
            writer.SetCompressor("JPEG")
            writer.SetFileName(str(out / path.name))
            writer.Execute(sitk.ReadImage(str(path)))
        else:
            ds = pydicom.dcmread(path)
            ds.compress(syntax)
            ds.save_as(out / path.name)
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    stored = _stored(SHAPE) - 300  # negative values too: signed decoding must be right
    # Slope 1, intercept 0: GDCM rewrites the rescale of what it re-encodes; stored = values.
    paths = _series(tmp_path_factory.mktemp("raw") / "ct", stored, slope=1.0, intercept=0.0)
    return paths, stored


# --------------------------------------------------------------------------------------------
# Compressed DICOM in
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "syntax",
    [JPEGLosslessSV1, JPEG2000Lossless, JPEGLSLossless, RLELossless],
    ids=["jpeg-lossless", "jpeg2000", "jpeg-ls", "rle"],
)
def test_compressed_series_reads_as_uncompressed(raw, tmp_path: Path, syntax: str) -> None:
    paths, stored = raw
    reference = read_dicom_series(paths[0].parent)
    folder = _compress(paths, tmp_path / "compressed", syntax)
    assert {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in folder.iterdir()} == {syntax}
    volume = read_dicom_series(folder)
    assert np.array_equal(volume.data, stored)
    assert np.array_equal(volume.data, reference.data)
    assert np.allclose(volume.affine, reference.affine)


@pytest.mark.parametrize("syntax", [MPEG2MPML, "1.2.826.0.1.3680043.9999.1"], ids=str)
def test_unsupported_transfer_syntax_is_one_line_naming_file_and_syntax(
    raw, tmp_path: Path, syntax: str
) -> None:
    paths, _ = raw
    folder = _compress(paths, tmp_path / "s", JPEG2000Lossless)
    victim = sorted(folder.iterdir())[1]
    ds = pydicom.dcmread(victim)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(victim)
    with pytest.raises(DataError) as error:
        read_dicom_series(folder)
    _assert_one_line(error, victim)
    assert "unsupported DICOM transfer syntax" in str(error.value)
    assert syntax in str(error.value)


def test_corrupt_compressed_slice_is_one_line_naming_file_and_syntax(raw, tmp_path: Path) -> None:
    paths, _ = raw
    folder = _compress(paths, tmp_path / "s", JPEG2000Lossless)
    victim = sorted(folder.iterdir())[2]
    ds = pydicom.dcmread(victim)
    stream = next(generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([stream[: len(stream) // 2]])  # the codestream cut in half
    ds.save_as(victim)
    with pytest.raises(DataError) as error:
        read_dicom_series(folder)
    _assert_one_line(error, victim)
    assert "JPEG 2000" in str(error.value) and "pixel data" in str(error.value)


# --------------------------------------------------------------------------------------------
# Slice order by position, not InstanceNumber
# --------------------------------------------------------------------------------------------


def _renumber(paths: list[Path], numbers: list[int | None]) -> None:
    for path, number in zip(paths, numbers, strict=True):  # paths are in position order
        ds = pydicom.dcmread(path)
        if number is None:
            del ds.InstanceNumber
        else:
            ds.InstanceNumber = number
        ds.save_as(path)


@pytest.mark.parametrize(
    "numbers",
    [[1, 2, 3, 4, 9], [50, 40, 30, 20, 10], [7, 7, 7, 7, 7], [None] * 5],
    ids=["gap", "reversed", "repeated", "absent"],
)
def test_instance_numbers_do_not_decide_the_slice_order(tmp_path: Path, numbers) -> None:
    stored = _stored((6, 5, 5))
    paths = _write_dicom_series(tmp_path / "s", stored)
    _renumber(paths, numbers)
    volume = read_dicom_series(tmp_path / "s")
    assert np.array_equal(volume.data, stored * 2.0 - 1024.0)
    assert np.allclose(volume.spacing, (0.8, 0.7, 2.5))
    assert [p.name for p in [Path(d.filename) for d in read_dicom_datasets(tmp_path / "s")]] == [
        p.name for p in paths
    ]


def test_what_positions_cannot_explain_is_still_refused(tmp_path: Path) -> None:
    # Mixed orientations.
    paths = _write_dicom_series(tmp_path / "o", _stored((6, 5, 4)))
    ds = pydicom.dcmread(paths[2])
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ds.save_as(paths[2])
    with pytest.raises(DataError, match="ImageOrientationPatient differs") as error:
        read_dicom_series(tmp_path / "o")
    assert "\n" not in str(error.value) and str(tmp_path / "o") in str(error.value)
    # Uneven spacing (a slice missing in the middle), whatever the InstanceNumbers say.
    paths = _write_dicom_series(tmp_path / "m", _stored((6, 5, 5)))
    paths[2].unlink()
    _renumber([paths[0], paths[1], paths[3], paths[4]], [1, 2, 3, 4])
    with pytest.raises(DataError, match="missing slice") as error:
        read_dicom_series(tmp_path / "m")
    _assert_one_line(error, tmp_path / "m")
    # Two slices at one position (different SOP instances).
    paths = _write_dicom_series(tmp_path / "d", _stored((6, 5, 4)))
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "d" / "again.dcm")
    with pytest.raises(DataError, match="duplicated slice: same position") as error:
        read_dicom_series(tmp_path / "d")
    _assert_one_line(error, tmp_path / "d")
    # One SOP instance at two positions.
    paths = _write_dicom_series(tmp_path / "u", _stored((6, 5, 4)))
    first = pydicom.dcmread(paths[0])
    ds = pydicom.dcmread(paths[3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    ds.save_as(paths[3])
    with pytest.raises(DataError, match="duplicated slice: SOPInstanceUID") as error:
        read_dicom_series(tmp_path / "u")
    _assert_one_line(error, paths[3])


# --------------------------------------------------------------------------------------------
# DICOM-SEG out
# --------------------------------------------------------------------------------------------


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[3:20, 5:25, 1:3] = 2  # edema, two slices
    labels[8:14, 10:18, 1:3] = 1  # necrosis inside
    labels[10:12, 12:14, 2] = 4  # enhancing, one slice; slice 0 and 3 stay empty
    labels[30, 2, 1] = 4  # a lone voxel near the edge: catches a rows/columns swap
    return labels


@pytest.fixture(scope="module")
def seg_case(raw, tmp_path_factory: pytest.TempPathFactory):
    paths, _ = raw
    series = paths[0].parent
    reference = read_dicom_series(series)
    labels = _labels(reference.shape)
    out = tmp_path_factory.mktemp("seg")
    nifti = write_label_volume(out / "masks" / "ct.nii.gz", labels, reference)
    seg = write_dicom_seg(
        out / "dicom-seg" / "ct.dcm",
        labels,
        series,
        BRATS_LIKE,
        release_name="brats-demo",
        release_version=3,
    )
    return series, reference, labels, nifti, seg


def test_dicom_seg_round_trip(seg_case) -> None:
    series, reference, labels, nifti, path = seg_case
    sources = read_dicom_datasets(series)
    seg = hd.seg.segread(path)
    # Same patient, study and frame of reference; a new series of Segmentation Storage.
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    # It references every source instance of the series, and each frame its own slice.
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    source_uids = [ds.SOPInstanceUID for ds in sources]
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == (
        sorted(source_uids)
    )
    frame_sources = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert frame_sources == {source_uids[1], source_uids[2]}  # slices 0 and 3 are empty
    # One segment per class, in the config's order, named after it, made by FedMedSegDiff.
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(BRATS_LIKE)
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2, 3]
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == ALGORITHM_NAME
        assert "brats-demo" in algorithm.AlgorithmVersion and "3" in algorithm.AlgorithmVersion
    # Pixel data, by source instance: exactly each class's voxels of the label volume ...
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids,
        segment_numbers=[1, 2, 3],
        assert_missing_frames_are_empty=True,
    )  # (slices k, rows j, columns i, segments)
    masks = np.transpose(pixels, (2, 1, 0, 3)).astype(bool)  # [i, j, k, segment]
    for n, values in enumerate(BRATS_LIKE.values()):
        assert np.array_equal(masks[..., n], np.isin(labels, values))
    # ... so the labels they encode equal the NIfTI prediction written beside it.
    decoded = np.stack(
        [channels_to_labels(np.moveaxis(masks[:, :, k], 2, 0), BRATS_LIKE) for k in range(4)],
        axis=2,
    )
    assert np.array_equal(decoded, read_label_volume(nifti, reference=reference).data)
    # pydicom alone reads the same bits (frame k of the file = its referenced source slice).
    plain = pydicom.dcmread(path)
    assert plain.pixel_array.shape == (2 * 3, 32, 34)  # 2 non-empty slices x 3 segments


def test_dicom_seg_from_shuffled_datasets_and_bad_calls(seg_case, tmp_path: Path) -> None:
    series, _, labels, _, first = seg_case
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.iterdir())]
    path = write_dicom_seg(
        tmp_path / "again.dcm",
        labels,
        datasets[::-1],
        BRATS_LIKE,
        release_name="r",
        release_version=1,
    )
    uids = [ds.SOPInstanceUID for ds in read_dicom_datasets(series)]
    again, before = hd.seg.segread(path), hd.seg.segread(first)
    assert np.array_equal(
        again.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3]),
        before.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3]),
    )
    # Nothing found: every slice's frame, all empty (highdicom would warn if asked to omit all).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = write_dicom_seg(
            tmp_path / "empty.dcm",
            labels * 0,
            series,
            BRATS_LIKE,
            release_name="r",
            release_version=1,
        )
    empty = hd.seg.segread(empty)
    assert empty.NumberOfFrames == 4 * 3
    assert not empty.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3]).any()
    with pytest.raises(ValueError, match="Columns, Rows, slices"):
        write_dicom_seg(
            tmp_path / "x.dcm",
            labels.transpose(1, 0, 2),
            series,
            BRATS_LIKE,
            release_name="r",
            release_version=1,
        )
    with pytest.raises(ValueError, match="belong to no class"):
        write_dicom_seg(
            tmp_path / "x.dcm", labels * 3, series, BRATS_LIKE, release_name="r", release_version=1
        )
    with pytest.raises(ValueError, match="inside its source series folder"):
        write_dicom_seg(
            series / "seg.dcm", labels, series, BRATS_LIKE, release_name="r", release_version=1
        )
    assert not (series / "seg.dcm").exists()


def _dciodvfy(path: Path) -> tuple[list[str], str]:
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    report = result.stdout + result.stderr
    return [line for line in report.splitlines() if line.startswith("Error")], report


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dciodvfy not installed (Debian package dicom3tools; .ci/run installs it as root)",
)
def test_dicom_seg_passes_dciodvfy(seg_case, tmp_path: Path) -> None:
    *_, path = seg_case
    errors, report = _dciodvfy(path)
    assert not errors, report
    assert "Segmentation" in report  # it recognised the IOD it checked against
    # The validator is awake: the same object without a mandatory attribute is an error.
    broken = pydicom.dcmread(path)
    del broken.SegmentSequence[0].SegmentLabel
    broken.save_as(tmp_path / "broken.dcm")
    errors, _ = _dciodvfy(tmp_path / "broken.dcm")
    assert any("SegmentLabel" in line for line in errors)
