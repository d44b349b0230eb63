"""Medical data: NIfTI/NRRD/DICOM IO with geometry, the dataset layouts, slices, data check,
the synthetic BraTS generator, real pyradiomics scans, and every bad-input kind of issue 4."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medsegdiff_core.data import (
    channels_to_labels,
    read_label_map,
    resize_probability,
    write_label_map,
)
from medsegdiff_core.data.check import add_data_parser, check_dataset, run_data_command
from medsegdiff_core.data.layouts import (
    LAYOUTS,
    PlanarDataset,
    SliceDataset,
    find_layout_cases,
    open_dataset,
    read_planar_labels,
)
from medsegdiff_core.data.real import fetch_real_data, find_real_data
from medsegdiff_core.data.synthetic_brain import BRATS_CLASSES, make_brain_case, write_brats_cases
from medsegdiff_core.data.volumes import (
    Volume,
    axial_axis,
    read_dicom_series,
    read_label_volume,
    read_volume,
    write_label_volume,
)
from medsegdiff_core.errors import DataError, DataWarning

LESION = {"lesion": [1]}
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Helpers: write files in tmp_path with the reference libraries
# --------------------------------------------------------------------------------------------


def _affine() -> np.ndarray:
    """An oblique, anisotropic, non-trivial voxel -> RAS affine."""
    angle = np.deg2rad(12.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 3.0])
    affine[:3, 3] = [-40.5, 12.25, -60.0]
    return affine


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def _volume_case(root: Path, name: str = "case1", shape=(20, 24, 6)) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    image = rng.normal(100, 20, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[5:12, 6:14, 2:4] = 1
    affine = _affine()
    return (
        _save_nifti(root / "images" / f"{name}.nii.gz", image, affine),
        _save_nifti(root / "masks" / f"{name}.nii.gz", mask, affine),
    )


def _write_dicom_series(
    folder: Path,
    stored: np.ndarray,
    *,
    slope: float = 2.0,
    intercept: float = -1024.0,
    pixel_spacing: tuple[float, float] = (0.7, 0.8),  # (between rows, between columns)
    thickness: float = 2.5,
    origin: tuple[float, float, float] = (-100.0, -80.0, 30.0),
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    seed: int = 0,
) -> list[Path]:
    """Write ``stored`` ``[i, j, k]`` (int16) as one DICOM file per slice, in shuffled names."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = stored.shape[1], stored.shape[0]
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    series, study, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(stored.shape[2])
    paths = []
    for k in range(stored.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.Modality = "CT"
        # What a PACS series carries and a DICOM-SEG of it copies: patient, study, frame of
        # reference.
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^J", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.SeriesNumber = 3
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * thickness * normal]
        ds.SliceThickness = thickness
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype(np.int16)).tobytes()
        path = folder / f"IM{order[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _stored(shape=(12, 10, 7)) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (i * 100 + j * 10 + k).astype(np.int16)


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _assert_one_line(error: pytest.ExceptionInfo, path: Path | str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message, message


@pytest.fixture(scope="module")
def brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    write_brats_cases(root, 3, shape=(48, 48, 16), seed=5)
    return root


# --------------------------------------------------------------------------------------------
# Volume IO and round trips
# --------------------------------------------------------------------------------------------


def test_nifti_prediction_round_trip_keeps_affine_shape_and_header(tmp_path: Path) -> None:
    image_path, mask_path = _volume_case(tmp_path / "site")
    dataset = open_dataset(tmp_path / "site", "volumes", LESION, 32, in_channels=1)
    assert isinstance(dataset, SliceDataset)
    assert len(dataset) == 6  # every slice when not skipping empty ones
    item = dataset[3]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["case"] == "case1" and item["slice_index"] == 3
    assert tuple(item["original_size"]) == (20, 24)
    # "Predict" each slice as its own target, written back through the dataset.
    labels = {dataset[i]["slice_index"]: dataset.target_labels(i) for i in range(len(dataset))}
    uncertainty = {k: np.full((20, 24), 0.25, np.float32) for k in labels}
    written = dataset.write_prediction(tmp_path / "out", "case1", labels, uncertainty)
    assert [p.name for p in written] == ["case1.nii.gz", "case1.nii.gz"]
    source, result = nib.load(str(image_path)), nib.load(str(written[0]))
    assert result.shape == source.shape
    assert np.array_equal(result.affine, source.affine)
    assert int(result.header["qform_code"]) == 1 and int(result.header["sform_code"]) == 2
    assert result.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(result.dataobj), np.asarray(nib.load(str(mask_path)).dataobj))
    unc = nib.load(str(written[1]))
    assert np.array_equal(unc.affine, source.affine)
    assert np.allclose(np.asarray(unc.dataobj), 0.25)


def test_write_label_volume_nrrd_keeps_geometry(tmp_path: Path) -> None:
    image_path, _ = _volume_case(tmp_path)
    reference = read_volume(image_path)
    labels = (reference.data > 100).astype(np.uint8)
    out = write_label_volume(tmp_path / "pred.nrrd", labels, reference)
    back = read_label_volume(out, reference=reference)  # same grid, or it raises
    assert np.array_equal(back.data, labels)
    assert np.allclose(back.affine, reference.affine, atol=1e-5)


def test_dicom_series_orientation_spacing_and_rescale(tmp_path: Path) -> None:
    stored = _stored()
    _write_dicom_series(tmp_path / "series", stored, slope=2.0, intercept=-1024.0)
    volume = read_dicom_series(tmp_path / "series")
    assert volume.shape == stored.shape
    assert volume.data.dtype == np.float32
    assert np.array_equal(volume.data, stored * 2.0 - 1024.0)
    # i runs along rows (column spacing 0.8), j down columns (row spacing 0.7), k = slices.
    assert np.allclose(volume.spacing, (0.8, 0.7, 2.5))
    # DICOM is LPS; the affine is RAS: x and y flip sign.
    expected = np.diag([-0.8, -0.7, 2.5, 1.0])
    expected[:3, 3] = [100.0, 80.0, 30.0]
    assert np.allclose(volume.affine, expected)
    assert axial_axis(volume.affine) == 2
    # SimpleITK's own series reader agrees on voxels and geometry.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    itk = reader.Execute()
    assert np.allclose(np.asarray(itk.GetSpacing()), volume.spacing)
    itk_voxels = np.moveaxis(sitk.GetArrayFromImage(itk), (0, 1, 2), (2, 1, 0))
    assert np.allclose(itk_voxels, volume.data)
    assert np.allclose(np.asarray(itk.GetOrigin()) * [-1, -1, 1], volume.affine[:3, 3])


def test_dicom_series_oblique_and_reversed_order(tmp_path: Path) -> None:
    stored = _stored((8, 8, 5))
    # Coronal slices: rows along x, columns along -z; the normal is +y (slices stacked in y).
    orientation = (1, 0, 0, 0, 0, -1)
    _write_dicom_series(tmp_path / "cor", stored, orientation=orientation, thickness=3.0)
    volume = read_dicom_series(tmp_path / "cor")
    assert np.array_equal(volume.data, stored * 2.0 - 1024.0)
    assert np.allclose(volume.spacing, (0.8, 0.7, 3.0))
    assert axial_axis(volume.affine) == 1  # the j axis runs head-feet
    # DICOM series -> label volume written as NIfTI on the same grid.
    labels = (volume.data > 0).astype(np.uint8)
    out = write_label_volume(tmp_path / "cor.nii.gz", labels, volume)
    assert np.allclose(nib.load(str(out)).affine, volume.affine, atol=1e-4)


def test_dicom_series_with_nifti_mask_in_volumes_layout(tmp_path: Path) -> None:
    stored = _stored((16, 12, 6))
    _write_dicom_series(tmp_path / "site" / "images" / "ct1", stored)
    reference = read_dicom_series(tmp_path / "site" / "images" / "ct1")
    mask = np.zeros(stored.shape, np.uint8)
    mask[4:10, 3:8, 2:4] = 1
    write_label_volume(tmp_path / "site" / "masks" / "ct1.nii.gz", mask, reference)
    dataset = open_dataset(tmp_path / "site", "volumes", LESION, 16, skip_empty=True)
    assert [dataset[i]["slice_index"] for i in range(len(dataset))] == [2, 3]
    assert dataset.output_name("ct1") == "ct1.nii.gz"  # DICOM in -> NIfTI out
    labels = {dataset[i]["slice_index"]: dataset.target_labels(i) for i in range(len(dataset))}
    (out,) = dataset.write_prediction(tmp_path / "out", "ct1", labels)
    back = read_label_volume(out, reference=reference)
    assert np.array_equal(back.data, mask)


def test_png_512_prediction_comes_back_at_512(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir()
    yy, xx = np.mgrid[:512, :512]
    disc = (yy - 256) ** 2 + (xx - 240) ** 2 < 120**2
    cup = (yy - 256) ** 2 + (xx - 240) ** 2 < 60**2
    rgb = np.stack([disc * 180 + 40, disc * 90 + 30, cup * 100 + 20], -1).astype(np.uint8)
    Image.fromarray(rgb).save(site / "images" / "eye.png")
    Image.fromarray((disc.astype(np.uint8) + cup).astype(np.uint8)).save(site / "masks" / "eye.png")
    classes = {"disc": [1, 2], "cup": [2]}
    dataset = PlanarDataset(site, "generic", classes, 64, in_channels=3)
    item = dataset[0]
    assert tuple(item["original_size"]) == (512, 512)
    probability = resize_probability(item["mask"].numpy(), item["original_size"])
    labels = channels_to_labels(probability >= 0.5, classes)
    out = write_label_map(tmp_path / "pred" / "eye.png", labels)
    back = read_label_map(out)
    assert back.shape == (512, 512)
    truth = read_label_map(site / "masks" / "eye.png")
    assert np.mean(back == truth) > 0.99


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def test_synthetic_brats_is_deterministic_and_nested() -> None:
    first = make_brain_case(np.random.default_rng([3, 1]), (40, 40, 12))
    again = make_brain_case(np.random.default_rng([3, 1]), (40, 40, 12))
    for name in first[0]:
        assert np.array_equal(first[0][name], again[0][name])
    seg = first[1]
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
    assert (seg == 4).any() and (seg == 2).any()
    # Nesting: necrosis (1) inside the enhancing rim (4) inside oedema (2): in-plane, 1 never
    # touches 2 (slices are thick, so across slices it may).
    from scipy import ndimage

    assert (seg == 1).any() and (seg == 2).any()
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    assert not (ndimage.binary_dilation(seg == 1, in_plane) & (seg == 2)).any()
    assert 0.005 < (seg > 0).mean() < 0.2
    t1ce, flair = first[0]["t1ce"], first[0]["flair"]
    assert t1ce[seg == 4].mean() > t1ce[(seg == 0) & (t1ce > 0)].mean() + 0.2  # enhancing rim
    assert flair[seg == 2].mean() > flair[(seg == 0) & (flair > 0)].mean() + 0.2  # oedema
    assert (first[0]["t1"][seg > 0] > 0).all()  # tumour inside the brain


def test_lazy_slice_dataset_holds_one_case_and_gives_the_same_items(brats: Path) -> None:
    held = open_dataset(brats, "brats", None, 32)
    lazy = open_dataset(brats, "brats", None, 32, lazy=True)
    assert not hasattr(lazy, "_images")  # nothing of any case held after construction
    assert len(lazy) == len(held) and lazy.volume_cases.keys() == held.volume_cases.keys()
    for index in range(len(held)):
        a, b = held[index], lazy[index]
        assert a["name"] == b["name"] and a["original_size"] == b["original_size"]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["mask"], b["mask"], rtol=0, atol=0)
        held_case = lazy._held_case
        assert held_case is not None and held_case[0] == b["case"]  # only this case in memory
        assert len(held_case[1]) == len(lazy.slices_of(b["case"]))


def test_brats_layout_slices(brats: Path) -> None:
    full = open_dataset(brats, "brats", None, 32)
    assert isinstance(full, SliceDataset)
    assert len(full) == 3 * 16
    item = full[5]
    assert item["image"].shape == (4, 32, 32) and item["mask"].shape == (3, 32, 32)
    assert item["name"] == f"{item['case']}@{item['slice_index']:03d}"
    # WT contains TC contains ET.
    masks = np.stack([full[i]["mask"].numpy() for i in range(len(full))])
    assert (masks[:, 1] <= masks[:, 0]).all() and (masks[:, 2] <= masks[:, 1]).all()
    trained = open_dataset(brats, "brats", BRATS_CLASSES, 32, skip_empty=True, augment=True)
    assert 0 < len(trained) < len(full)
    assert all(trained[i]["mask"].sum() > 0 for i in range(len(trained)))
    # Per-modality z-score over the brain: background is 0, brain voxels ~ N(0, 1).
    case = full.volume_cases[item["case"]].case
    volume = read_volume(case.image_paths[1]).data
    from medsegdiff_core.data.layouts import _normalise_volume

    normed = _normalise_volume(volume, "nonzero")
    assert abs(normed[volume != 0].mean()) < 1e-3 and abs(normed[volume != 0].std() - 1) < 1e-3
    assert (normed[volume == 0] == 0).all()


def test_refuge_values_map_to_disc_and_cup(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.full((40, 50), 255, np.uint8)
    mask[10:30, 10:40] = 128
    mask[15:25, 20:30] = 0
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "images" / "g0001.jpg")
    Image.fromarray(mask).save(tmp_path / "masks" / "g0001.bmp")
    labels = read_planar_labels(tmp_path / "masks" / "g0001.bmp", "refuge")
    assert labels[0, 0] == 0 and labels[12, 12] == 1 and labels[20, 25] == 2
    dataset = open_dataset(tmp_path, "refuge", None, 20)
    assert isinstance(dataset, PlanarDataset)
    disc, cup = dataset[0]["mask"].numpy()
    assert disc.sum() > cup.sum() > 0 and (cup <= disc).all()


def test_isic_and_ddti_layouts(tmp_path: Path) -> None:
    isic = tmp_path / "isic"
    (isic / "images").mkdir(parents=True)
    (isic / "masks").mkdir()
    Image.fromarray(np.full((30, 40, 3), 120, np.uint8)).save(isic / "images" / "ISIC_0000001.jpg")
    lesion = np.zeros((30, 40), np.uint8)
    lesion[5:20, 5:25] = 255
    Image.fromarray(lesion).save(isic / "masks" / "ISIC_0000001_segmentation.png")
    item = open_dataset(isic, "isic", None, 16)[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert item["mask"].sum() > 0

    ddti = tmp_path / "ddti"
    (ddti / "image").mkdir(parents=True)
    (ddti / "mask").mkdir()
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(ddti / "image" / "1.png")
    Image.fromarray(lesion).save(ddti / "mask" / "1.png")
    item = open_dataset(ddti, "ddti", None, 16)[0]
    assert item["image"].shape == (1, 16, 16)  # RGB ultrasound export made grey


# --------------------------------------------------------------------------------------------
# Bad input: each a one-line DataError naming the file
# --------------------------------------------------------------------------------------------


def test_bad_truncated_png(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "images" / "a.png"
    )
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "masks" / "a.png")
    bad = _truncate(tmp_path / "images" / "a.png")
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path, "generic", LESION, 16, in_channels=3)
    _assert_one_line(error, bad)


def test_bad_corrupt_jpeg(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "images" / "ISIC_1.jpg"
    )
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(
        tmp_path / "masks" / "ISIC_1_segmentation.png"
    )
    bad = _truncate(tmp_path / "images" / "ISIC_1.jpg", 0.3)
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path, "isic", None, 16)
    _assert_one_line(error, bad)


def test_bad_truncated_nifti(tmp_path: Path) -> None:
    image, _ = _volume_case(tmp_path)
    _truncate(image, 0.5)
    with pytest.raises(DataError) as error:
        read_volume(image)
    _assert_one_line(error, image)
    # Uncompressed, cut inside the voxel data.
    raw = tmp_path / "raw.nii"
    _save_nifti(raw, np.ones((10, 10, 10), np.float32), np.eye(4))
    _truncate(raw, 0.6)
    with pytest.raises(DataError) as error:
        read_volume(raw)
    _assert_one_line(error, raw)
    # Not gzip at all.
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti file")
    with pytest.raises(DataError) as error:
        read_volume(junk)
    _assert_one_line(error, junk)


def test_bad_corrupt_dicom(tmp_path: Path) -> None:
    paths = _write_dicom_series(tmp_path / "s", _stored((6, 6, 5)))
    paths[2].write_bytes(b"\x00" * 50 + b"garbage")
    with pytest.raises(DataError) as error:
        read_dicom_series(tmp_path / "s")
    _assert_one_line(error, paths[2])
    # Truncated pixel data.
    paths = _write_dicom_series(tmp_path / "t", _stored((6, 6, 5)))
    _truncate(paths[1], 0.8)
    with pytest.raises(DataError) as error:
        read_dicom_series(tmp_path / "t")
    _assert_one_line(error, paths[1])


def test_bad_mask_shape_differs(tmp_path: Path) -> None:
    _, mask = _volume_case(tmp_path)
    _save_nifti(mask, np.zeros((20, 24, 5), np.uint8), _affine())
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path, "volumes", LESION, 16)
    _assert_one_line(error, mask)
    assert "shape" in str(error.value)


def test_bad_mask_affine_differs(tmp_path: Path) -> None:
    _, mask = _volume_case(tmp_path)
    shifted = _affine()
    shifted[:3, 3] += [0.0, 2.0, 0.0]
    data = np.asarray(nib.load(str(mask)).dataobj)
    _save_nifti(mask, data, shifted)
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path, "volumes", LESION, 16)
    _assert_one_line(error, mask)
    assert "affine" in str(error.value)


def test_nifti_header_repair_warning_names_the_file(tmp_path: Path) -> None:
    path = _save_nifti(tmp_path / "qfac.nii", np.ones((4, 5, 3), np.float32), np.eye(4))
    raw = bytearray(path.read_bytes())
    raw[76:80] = np.float32(0.5).tobytes()  # pixdim[0], the qfac nibabel repairs to 1
    path.write_bytes(bytes(raw))
    with pytest.warns(DataWarning) as caught:
        volume = read_volume(path)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{path}: ") and "qfac" in m for m in messages), messages
    assert volume.shape == (4, 5, 3)
    # nibabel's own logger is left as it was
    assert nib.imageglobals.logger.level == 0 and nib.imageglobals.logger.handlers


def _flip_i(affine: np.ndarray, size: int) -> np.ndarray:
    """The affine of the same grid stored with the i axis reversed."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, size - 1
    return affine @ flip


def test_mask_with_flipped_or_permuted_axes_is_reoriented_onto_its_image(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image_path, mask_path = _volume_case(tmp_path)
    reference = read_volume(image_path)
    mask = np.asarray(nib.load(str(mask_path)).dataobj)
    # dcm2niix and other converters store the same voxels in another axis order (LAS vs LPS)
    _save_nifti(mask_path, np.ascontiguousarray(mask[::-1]), _flip_i(_affine(), mask.shape[0]))
    flipped = read_label_volume(mask_path, reference=reference)
    assert np.array_equal(flipped.data, mask) and flipped.reoriented
    assert np.allclose(flipped.affine, reference.affine)
    permuted = tmp_path / "permuted.nii.gz"
    _save_nifti(permuted, np.ascontiguousarray(mask.transpose(1, 0, 2)), _affine()[:, [1, 0, 2, 3]])
    assert np.array_equal(read_label_volume(permuted, reference=reference).data, mask)

    report = check_dataset(tmp_path, "volumes", LESION)
    assert report.ok, report.format()
    assert len(report.notes) == 1 and report.notes[0].startswith(f"{mask_path}: stored ")
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "check", str(tmp_path), "--layout", "volumes"])
    assert run_data_command(args) == 0
    out = capsys.readouterr().out
    assert "notes (1):" in out and "reoriented onto the image's grid" in out
    # the slices hold the mask where the image is: the lesion box, not its mirror image
    dataset = open_dataset(tmp_path, "volumes", LESION, 16)
    index = next(i for i in range(len(dataset)) if dataset[i]["slice_index"] == 2)
    assert np.array_equal(dataset.target_labels(index), mask[:, :, 2])


@pytest.mark.parametrize(
    ("kind", "shape", "change"),
    [
        ("origin differs", (20, 24, 6), lambda a: a + np.pad([[0, 0, 0, 2.0]], ((0, 3), (0, 0)))),
        ("spacing differs", (20, 24, 6), lambda a: a @ np.diag([1.0, 1.0, 1.5, 1.0])),
        ("shape differs", (20, 24, 5), lambda a: a),
        ("shape differs", (24, 20, 5), lambda a: a[:, [1, 0, 2, 3]]),  # permuted, but 5 slices
        ("direction differs", (20, 24, 6), lambda a: _rotate_z(a, 20.0)),
        # flipped (fixable) and shifted (not): the real difference is named
        (
            "origin differs",
            (20, 24, 6),
            lambda a: _flip_i(a, 20) + [[0, 0, 0, 0], [0, 0, 0, 3.0], [0] * 4, [0] * 4],
        ),
    ],
)
def test_mask_on_another_grid_names_what_differs(
    tmp_path: Path, kind: str, shape: tuple[int, int, int], change
) -> None:
    image_path, mask_path = _volume_case(tmp_path)
    _save_nifti(mask_path, np.zeros(shape, np.uint8), change(_affine()))
    with pytest.raises(DataError) as error:
        read_label_volume(mask_path, reference=read_volume(image_path))
    _assert_one_line(error, mask_path)
    assert f"{mask_path}: {kind} from its image case1.nii.gz" in str(error.value)
    report = check_dataset(tmp_path, "volumes", LESION)
    assert len(report.problems) == 1 and kind in report.problems[0] and not report.notes


def _rotate_z(affine: np.ndarray, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation @ affine


def test_bad_label_values_outside_classes(brats: Path, tmp_path: Path) -> None:
    case = shutil.copytree(sorted(brats.iterdir())[0], tmp_path / "site" / "BraTS-SYN-00000")
    seg = case / f"{case.name}_seg.nii.gz"
    image = nib.load(str(seg))
    data = np.asarray(image.dataobj).copy()
    data[data == 4] = 3  # BraTS 2023 label for ET under the 2021 classes
    _save_nifti(seg, data, image.affine)
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path / "site", "brats", BRATS_CLASSES, 16)
    _assert_one_line(error, seg)
    assert "3" in str(error.value)
    # A REFUGE mask with a value that is neither cup, rim nor background.
    refuge = tmp_path / "refuge"
    (refuge / "images").mkdir(parents=True)
    (refuge / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(refuge / "images" / "g1.png")
    Image.fromarray(np.full((8, 8), 64, np.uint8)).save(refuge / "masks" / "g1.png")
    with pytest.raises(DataError) as error:
        open_dataset(refuge, "refuge", None, 8)
    _assert_one_line(error, refuge / "masks" / "g1.png")


def test_bad_dicom_missing_slice(tmp_path: Path) -> None:
    paths = _write_dicom_series(tmp_path / "s", _stored((6, 6, 7)))
    paths[3].unlink()
    with pytest.raises(DataError) as error:
        read_dicom_series(tmp_path / "s")
    _assert_one_line(error, tmp_path / "s")
    assert "missing" in str(error.value)
    # A gap in InstanceNumber alone is no missing slice (positions decide): tests/test_dicom.py.


def test_bad_dicom_duplicated_slice(tmp_path: Path) -> None:
    paths = _write_dicom_series(tmp_path / "s", _stored((6, 6, 5)))
    copy = tmp_path / "s" / "copy.dcm"
    shutil.copy(paths[2], copy)
    with pytest.raises(DataError) as error:
        read_dicom_series(tmp_path / "s")
    assert "duplicated" in str(error.value)
    _assert_one_line(error, tmp_path / "s")
    # Same position, different InstanceNumber.
    ds = pydicom.dcmread(copy)
    ds.InstanceNumber = 6
    ds.save_as(copy)
    with pytest.raises(DataError) as error:
        read_dicom_series(tmp_path / "s")
    assert "duplicated" in str(error.value) and "same position" in str(error.value)


def test_bad_nifti_nan(tmp_path: Path) -> None:
    data = np.ones((8, 8, 4), np.float32)
    data[3, 4, 1] = np.nan
    path = _save_nifti(tmp_path / "nan.nii.gz", data, np.eye(4))
    with pytest.raises(DataError) as error:
        read_volume(path)
    _assert_one_line(error, path)
    assert "NaN" in str(error.value) and "(3, 4, 1)" in str(error.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bad_empty_folder(tmp_path: Path, layout: str) -> None:
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path, layout, None, 16, in_channels=3 if layout == "generic" else None)
    _assert_one_line(error, tmp_path)


def test_bad_image_without_mask_ok_for_predict_error_for_train(tmp_path: Path) -> None:
    _volume_case(tmp_path, "a")
    _volume_case(tmp_path, "b")
    lonely = tmp_path / "masks" / "b.nii.gz"
    lonely.unlink()
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path, "volumes", LESION, 16)
    _assert_one_line(error, tmp_path / "images" / "b.nii.gz")
    predict = open_dataset(tmp_path, "volumes", LESION, 16, require_masks=False)
    assert {predict[i]["case"] for i in range(len(predict))} == {"a", "b"}
    assert predict.target_labels(len(predict) - 1) is None
    # The same for a 2-D layout.
    isic = tmp_path / "isic"
    (isic / "images").mkdir(parents=True)
    (isic / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(isic / "images" / "ISIC_2.jpg")
    with pytest.raises(DataError) as error:
        open_dataset(isic, "isic", None, 8)
    _assert_one_line(error, isic / "images" / "ISIC_2.jpg")
    assert len(open_dataset(isic, "isic", None, 8, require_masks=False)) == 1


def test_bad_missing_brats_modality(brats: Path, tmp_path: Path) -> None:
    case = shutil.copytree(sorted(brats.iterdir())[1], tmp_path / "site" / "BraTS-SYN-00001")
    (case / f"{case.name}_t1ce.nii.gz").unlink()
    with pytest.raises(DataError) as error:
        find_layout_cases(tmp_path / "site", "brats", require_masks=True)
    _assert_one_line(error, case / f"{case.name}_t1ce.nii.gz")
    assert "t1ce" in str(error.value)


# --------------------------------------------------------------------------------------------
# data check: every problem at once, and the report
# --------------------------------------------------------------------------------------------


def test_check_dataset_lists_all_problems(brats: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    cases = [shutil.copytree(c, site / c.name) for c in sorted(brats.iterdir())]
    good = check_dataset(site, "brats")
    assert good.ok and good.cases == 3 and good.modalities == ["t1", "t1ce", "t2", "flair"]
    assert good.sizes == {"48x48x16": 3} and set(good.label_values) <= {0, 1, 2, 4}
    assert 0 < good.class_balance["et"] < good.class_balance["tc"] < good.class_balance["wt"]
    assert 0 < good.slices[1] < good.slices[0] == 48
    # Break three cases in three ways, plus a stray one without modalities.
    (cases[0] / f"{cases[0].name}_flair.nii.gz").unlink()
    _truncate(cases[1] / f"{cases[1].name}_t2.nii.gz")
    seg = cases[2] / f"{cases[2].name}_seg.nii.gz"
    image = nib.load(str(seg))
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 7
    _save_nifti(seg, data, image.affine)
    report = check_dataset(site, "brats")
    assert not report.ok and len(report.problems) == 3, report.format()
    text = report.format()
    for path in ("_flair.nii.gz", "_t2.nii.gz", "_seg.nii.gz"):
        assert path in text


def test_fetch_samples_is_an_explicit_command(tmp_path: Path) -> None:
    # A stand-in for the pyradiomics 3.0.1 sdist (the real one is a 35 MB download): the
    # command extracts the five cases' image and label files into the cache, volumes layout.
    import subprocess
    import sys
    import tarfile

    from medsegdiff_core.data.real import PYRADIOMICS_CASES

    sdist = tmp_path / "pyradiomics-3.0.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for case in PYRADIOMICS_CASES:
            for kind in ("image", "label"):
                member = tmp_path / f"{case}_{kind}.nrrd"
                member.write_bytes(f"{case} {kind}".encode())
                tar.add(member, arcname=f"pyradiomics-3.0.1/data/{case}_{kind}.nrrd")
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "medsegdiff_core.cli", "data", "fetch-samples"]
        + ["--cache", str(cache), "--sdist", str(sdist)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder == cache / "pyradiomics-3.0.1"
    assert (folder / "images" / "lung1.nrrd").read_bytes() == b"lung1 image"
    assert (folder / "masks" / "brain2.nrrd").read_bytes() == b"brain2 label"


def test_data_check_cli(brats: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "check", str(brats), "--layout", "brats"])
    assert run_data_command(args) == 0
    out = capsys.readouterr().out
    assert "cases:        3" in out and "problems:     none" in out
    args = parser.parse_args(
        ["data", "check", str(brats), "--layout", "brats", "--classes", '{"et": [4]}']
    )
    assert run_data_command(args) == 1  # labels 1 and 2 are in no class
    assert "label value(s) 1, 2 not in any class" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Real scans (pyradiomics 3.0.1 sdist), fetched into a cache, never committed
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_data() -> Path:
    found = find_real_data()
    if found is None and os.environ.get("FEDMEDSEGDIFF_NO_FETCH") != "1":
        try:
            found = fetch_real_data()
        except DataError as error:
            pytest.skip(f"real pyradiomics scans not cached and cannot be fetched: {error}")
    if found is None:
        pytest.skip("real pyradiomics scans not cached (FEDMEDSEGDIFF_NO_FETCH=1)")
    return found


def test_real_nrrd_cases_round_trip(real_data: Path, tmp_path: Path) -> None:
    report = check_dataset(real_data, "volumes")
    assert report.ok, report.format()
    assert report.cases == 5 and report.slices == (178, 27)
    brain1 = read_volume(real_data / "images" / "brain1.nrrd")
    assert brain1.shape == (256, 256, 25)
    assert np.allclose(brain1.spacing, (0.78125, 0.78125, 6.5), atol=1e-3)
    mask = read_label_volume(real_data / "masks" / "brain1.nrrd", reference=brain1)
    assert int((mask.data != 0).any(axis=(0, 1)).sum()) == 7
    out = write_label_volume(tmp_path / "brain1.nrrd", mask.data, brain1)
    back = read_label_volume(out, reference=brain1)
    assert np.array_equal(back.data, mask.data)
    # As slices: only the 7 lesion slices when skipping empty ones, at the model's size.
    cases = [c for c in find_layout_cases(real_data, "volumes", require_masks=True)]
    brain = [c for c in cases if c.name.startswith("brain")]
    dataset = SliceDataset(brain, LESION, 64, skip_empty=True)
    assert len(dataset) == 7 + 3
    assert dataset.output_name("brain1") == "brain1.nrrd"


def test_volume_geometry_only_reference_is_cheap(brats: Path) -> None:
    dataset = open_dataset(brats, "brats", None, 16)
    case = next(iter(dataset.volume_cases))
    reference = dataset.reference(case)
    assert isinstance(reference, Volume) and reference.data.strides == (0, 0, 0)
    assert reference.shape == (48, 48, 16)
    with gzip.open(dataset.volume_cases[case].case.image_path) as handle:
        assert handle.read(4)  # a real gzip file


# --------------------------------------------------------------------------------------------
# Predicting and evaluating on medical layouts; training refuses bad folders
# --------------------------------------------------------------------------------------------


def _untrained_checkpoint(path: Path, classes: dict, image_channels: int) -> Path:
    """A tiny model straight from its initialisation: enough to exercise the file paths."""
    import torch

    from medsegdiff_core.checkpoint import save_checkpoint
    from medsegdiff_core.config import DiffusionConfig, InferenceConfig
    from medsegdiff_core.model import MedSegDiffUNet
    from medsegdiff_core.model.presets import resolve_spec

    torch.manual_seed(0)
    spec = resolve_spec(
        "tiny", image_size=16, image_channels=image_channels, mask_channels=len(classes)
    )
    return save_checkpoint(
        path,
        MedSegDiffUNet(spec),
        diffusion=DiffusionConfig(prediction="v"),
        classes=classes,
        inference=InferenceConfig(sampling_steps=2, ensemble=2, batch_size=8),
    )


def _nifti_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    image = nib.load(str(path))
    return tuple(image.shape[:3]), image.affine


def test_evaluate_volumes_writes_nifti_on_the_input_grid_and_3d_metrics(tmp_path: Path) -> None:
    import torch

    from medsegdiff_core.cli import main

    site = tmp_path / "site"
    _volume_case(site, "a")
    _volume_case(site, "b", shape=(18, 20, 5))
    stored = _stored((16, 12, 6))
    _write_dicom_series(site / "images" / "ct1", stored)
    reference = read_dicom_series(site / "images" / "ct1")
    mask = np.zeros(stored.shape, np.uint8)
    mask[4:10, 3:8, 2:4] = 1
    write_label_volume(site / "masks" / "ct1.nii.gz", mask, reference)
    # float32 like the model, whatever NumPy promoted the intensity normalisation to
    assert open_dataset(site, "volumes", LESION, 16)[0]["image"].dtype == torch.float32
    checkpoint = _untrained_checkpoint(tmp_path / "model", LESION, 1)
    out = tmp_path / "out"
    args = ["--quiet", "evaluate", "--checkpoint", str(checkpoint), "--data", str(site)]
    assert main([*args, "--layout", "volumes", "--out", str(out)]) == 0

    for name in ("a", "b"):
        shape, affine = _nifti_geometry(site / "images" / f"{name}.nii.gz")
        for kind in ("masks", "uncertainty"):
            got_shape, got_affine = _nifti_geometry(out / kind / f"{name}.nii.gz")
            assert got_shape == shape and np.allclose(got_affine, affine, atol=1e-5)
        assert set(np.unique(nib.load(str(out / "masks" / f"{name}.nii.gz")).dataobj)) <= {0, 1}
    dicom_out = read_label_volume(out / "masks" / "ct1.nii.gz", reference=reference)
    assert dicom_out.shape == stored.shape  # DICOM series in -> NIfTI on the series' grid
    # ... and a DICOM-SEG referencing the series, holding the same labels (tests/test_dicom.py
    # checks the object itself in depth, and runs a DICOM validator on it).
    seg = hd.seg.segread(out / "dicom-seg" / "ct1.dcm")
    source = pydicom.dcmread(next((site / "images" / "ct1").iterdir()))
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "FedMedSegDiff"
    assert algorithm.AlgorithmVersion == "model (unreleased)"  # a checkpoint, not a release
    assert not (out / "dicom-seg" / "a.dcm").exists()  # NIfTI inputs get no DICOM-SEG
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["case"] for row in metrics["cases"]] == ["a", "b", "ct1"]  # per case, in 3-D
    assert metrics["summary"]["num_cases"] == 3
    # One uncertainty score per volume, its slices' counts summed; pooled figures over them all.
    assert all(
        0 <= row["uncertainty"]["lesion"]["uncertainty_score"] <= 1 for row in metrics["cases"]
    )
    assert 0.0 <= metrics["summary"]["uncertainty"]["lesion"]["ece"] <= 1.0


def test_predict_brats_cases_without_masks(brats: Path, tmp_path: Path) -> None:
    from medsegdiff_core.cli import main

    site = tmp_path / "site"
    for case in sorted(brats.iterdir())[:2]:
        copied = shutil.copytree(case, site / case.name)
        (copied / f"{case.name}_seg.nii.gz").unlink()  # predicting needs no masks
    checkpoint = _untrained_checkpoint(tmp_path / "model", BRATS_CLASSES, 4)
    out = tmp_path / "out"
    args = ["--quiet", "predict", "--checkpoint", str(checkpoint), "--input", str(site)]
    assert main([*args, "--layout", "brats", "--out", str(out)]) == 0
    for case in sorted(site.iterdir()):
        shape, affine = _nifti_geometry(case / f"{case.name}_t1.nii.gz")
        got_shape, got_affine = _nifti_geometry(out / "masks" / f"{case.name}.nii.gz")
        assert got_shape == shape and np.allclose(got_affine, affine, atol=1e-5)
    assert not (out / "metrics.json").exists()


def test_training_refuses_a_folder_with_problems_unless_they_are_skipped(
    fundus_sites: list[Path], tmp_path: Path
) -> None:
    from medsegdiff_core.config import load_config
    from medsegdiff_core.training import load_folders

    site = shutil.copytree(fundus_sites[0] / "train", tmp_path / "train")
    names = sorted(p.stem for p in (site / "images").iterdir())
    _truncate(site / "images" / f"{names[1]}.png")
    bad_mask = site / "masks" / f"{names[3]}.png"
    labels = np.array(Image.open(bad_mask))
    labels[0, 0] = 9  # a label in no class
    Image.fromarray(labels).save(bad_mask)
    (site / "masks" / f"{names[5]}.png").unlink()
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"data.train=[{site}]"])
    with pytest.raises(DataError) as error:
        load_folders(config, "train")
    message = str(error.value)
    assert "\n" not in message and "3 problem(s)" in message and "data.skip_cases" in message
    for name in (names[1], names[3], names[5]):
        assert name in message
    skipped = config.model_copy(
        update={"data": config.data.model_copy(update={"skip_cases": [names[1], names[3]]})}
    )
    with pytest.raises(DataError, match=f"1 problem.*{names[5]}"):
        load_folders(skipped, "train")
    skipped.data.skip_cases.append(names[5])
    dataset = load_folders(skipped, "train")
    assert len(dataset) == len(names) - 3
    assert {dataset[i]["name"] for i in range(len(dataset))} == set(names) - {
        names[1],
        names[3],
        names[5],
    }
