"""3-D medical volumes: NIfTI, NRRD and DICOM series in, label volumes out, geometry kept.

Array convention (used by every function here and by :mod:`.layouts`): a volume's voxels are a
numpy array indexed ``[i, j, k]`` in the file's own voxel order (nibabel's order: ``i`` varies
fastest on disk), with an optional 4th axis for the channels/time of a 4-D file. Its geometry is a
4x4 ``affine`` mapping voxel indices ``(i, j, k, 1)`` to world coordinates in millimetres in
**RAS+** as in NIfTI (+x towards the patient's right, +y anterior, +z superior). NRRD and
DICOM files, which store LPS geometry, are converted to RAS on reading and back on writing, so
one affine describes every format.

Nothing is resampled or reoriented: a prediction written with :func:`write_label_volume` lies on
exactly the voxel grid of the image it was made from, which is what viewers and hospital tools
expect. 2-D slices are taken along the voxel axis closest to the world's superior axis
(:func:`axial_axis`), "axial" for the usual acquisitions.

Library choices:

- **nibabel** for NIfTI: the reference reader/writer of the format, it keeps the whole header
  (qform/sform codes, units, descriptions), so a prediction can carry its image's header.
- **SimpleITK** for NRRD: it applies the file's ``space`` (LPS, RAS, ...) and ``space
  directions`` fields to a proper direction matrix on reading and writing; pynrrd returns the raw
  header fields and leaves that bookkeeping to the caller.
- **pydicom** for DICOM series: the series checks need every slice's own tags
  (ImagePositionPatient, ImageOrientationPatient, rescale slope/intercept); a series reader that
  sorts and stacks silently (SimpleITK's) would hide missing or duplicated slices. Compressed
  pixel data (JPEG, JPEG-LS, JPEG 2000, RLE) is decoded by pydicom's plugins: pylibjpeg with
  pylibjpeg-libjpeg, -openjpeg and -rle, and pyjpegls (which highdicom requires anyway): small
  wheels with the codec inside, no system library (python-gdcm covers the same syntaxes too;
  it is not needed).

Every problem with a file raises :class:`~medsegdiff_core.errors.DataError` with a one-line
message that starts with the offending path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import DataError, DataWarning

__all__ = [
    "VOLUME_SUFFIXES",
    "Volume",
    "align_to_grid",
    "axial_axis",
    "check_same_grid",
    "is_volume_path",
    "order_dicom_datasets",
    "read_dicom_datasets",
    "read_dicom_series",
    "read_label_volume",
    "read_volume",
    "volume_format",
    "volume_stem",
    "write_label_volume",
    "write_volume",
]

VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr")
"""File suffixes read as volumes (case-insensitive); a folder of DICOM files is a series."""

VolumeFormat = Literal["nifti", "nrrd", "dicom"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_AFFINE_TOLERANCE_MM = 1e-3  # positions may differ by float rounding between writers
_MAX_LISTED = 5


@dataclass
class Volume:
    """A volume in memory.

    Attributes:
        data: Voxels ``[i, j, k]`` or ``[i, j, k, c]`` (4-D files: channels last), float32 for
            images after rescaling, integers for label volumes.
        affine: 4x4 float64 voxel -> world (RAS+, mm) matrix.
        path: Where it was read from (file, or folder for a DICOM series).
        format: ``"nifti"``, ``"nrrd"`` or ``"dicom"``.
        header: nibabel header of a NIfTI file (copied into predictions), else None.
        reoriented: How :func:`align_to_grid` flipped or permuted the axes to put the volume on
            its image's grid, for reports; None when it was stored on that grid.
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path
    format: VolumeFormat
    header: Any = field(default=None, repr=False)
    reoriented: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(I, J, K)`` in voxels."""
        return tuple(int(n) for n in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along ``i, j, k`` in mm (lengths of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        """Channels of a 4-D file, 1 for a 3-D one."""
        return 1 if self.data.ndim == 3 else int(self.data.shape[3])


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def volume_format(path: Path) -> VolumeFormat | None:
    """``"nifti"``, ``"nrrd"`` or ``"dicom"`` (a folder) for a volume path, else None."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith(".dcm"):
        return "dicom"
    return None


def is_volume_path(path: Path) -> bool:
    """Whether ``path`` names a NIfTI or NRRD file (by suffix) or is a folder (DICOM series)."""
    return volume_format(path) is not None


def volume_stem(path: Path) -> str:
    """File name without a volume suffix: ``case1.nii.gz`` -> ``case1``."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1 or 2) whose world direction is closest to superior-inferior."""
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = directions / np.maximum(np.linalg.norm(directions, axis=0), 1e-12)
    return int(np.argmax(np.abs(unit[2])))


def _check_finite(data: np.ndarray, path: Path) -> None:
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        if bad.any():
            where = tuple(int(v) for v in np.argwhere(bad)[0])
            raise DataError(
                f"{path}: {int(bad.sum())} voxel(s) are NaN or infinite (first at voxel {where})"
            )


# --------------------------------------------------------------------------------------------
# NIfTI (nibabel)
# --------------------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _messages_named(path: Path) -> Iterator[None]:
    """Re-emit what nibabel says while reading ``path`` as DataWarnings that start with the path.

    nibabel reports header repairs ("pixdim[0] (qfac) should be 1 (default) or -1; setting qfac
    to 1") on its ``nibabel.global`` logger, and some problems as warnings, without naming the
    file: among a site's hundreds of volumes nobody could tell which one was repaired. A repair
    can flip an axis, so it is worth a warning rather than an INFO line nobody sees."""
    logger = logging.getLogger("nibabel.global")
    saved = logger.handlers[:], logger.level, logger.propagate
    collect = _Collect()
    logger.handlers, logger.propagate = [collect], False
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.handlers, logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])
    for record in collect.records:
        message = record.getMessage().strip().replace("\n", "; ")
        warnings.warn(f"{path}: NIfTI header: {message}", DataWarning, stacklevel=3)
    for warning in caught:
        message = str(warning.message).strip().replace("\n", "; ")
        category = warning.category if issubclass(warning.category, Warning) else DataWarning
        warnings.warn(f"{path}: {message}", category, stacklevel=3)


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        with _messages_named(path):
            image = nib.load(str(path), mmap=False)
            # Scaled data as float32 (scl_slope/inter applied); integer files stay exact.
            data = np.asarray(image.dataobj)
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except Exception as error:  # nibabel/gzip/zlib raise many types for truncated files
        what = "file is empty" if path.stat().st_size == 0 else _first_line(error)
        raise DataError(f"{path}: cannot read NIfTI ({what})") from None
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 5 and data.shape[3] == 1:  # (I, J, K, 1, C): NIfTI's vector intent
        data = data[:, :, :, 0]
    if data.ndim not in (3, 4):
        raise DataError(f"{path}: expected a 3-D or 4-D volume, got shape {data.shape}")
    affine = image.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: NIfTI header has no valid voxel-to-world affine")
    return Volume(data, np.asarray(affine, dtype=np.float64), path, "nifti", image.header)


# --------------------------------------------------------------------------------------------
# NRRD (SimpleITK)
# --------------------------------------------------------------------------------------------


def _sitk_affine(image: Any) -> np.ndarray:
    """RAS affine of a SimpleITK image (whose geometry is LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


def _read_nrrd(path: Path) -> Volume:
    import SimpleITK as sitk

    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)  # (K, J, I) or (K, J, I, C)
    except Exception as error:
        what = "file is empty" if path.stat().st_size == 0 else _first_line(error)
        raise DataError(f"{path}: cannot read NRRD ({what})") from None
    if image.GetDimension() != 3:
        raise DataError(f"{path}: expected a 3-D volume, got {image.GetDimension()}-D")
    data = np.ascontiguousarray(np.moveaxis(array, (0, 1, 2), (2, 1, 0)))
    return Volume(data, _sitk_affine(image), path, "nrrd")


def _write_sitk(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import SimpleITK as sitk

    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(data, (0, 1, 2), (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing[None, :]).ravel()])
    sitk.WriteImage(image, str(path), useCompression=True)


# --------------------------------------------------------------------------------------------
# DICOM series (pydicom; compressed pixel data through pylibjpeg's plugins and pyjpegls)
# --------------------------------------------------------------------------------------------


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )


def _syntax_label(syntax: Any) -> str:
    """``JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90)``, or the bare UID
    when pydicom does not know its name."""
    name = getattr(syntax, "name", "") or ""
    return f"{name} ({syntax})" if name and name != str(syntax) else str(syntax)


def _check_decodable(path: Path, ds: Any) -> Any:
    """The file's transfer syntax UID; raise DataError (one line naming the file and the syntax)
    when no installed pixel-data decoder handles it.

    pydicom decodes the native (uncompressed) syntaxes and RLE itself; JPEG Baseline/Extended/
    Lossless go through pylibjpeg-libjpeg, JPEG-LS through pyjpegls (or pylibjpeg-libjpeg), JPEG
    2000 through pylibjpeg-openjpeg, RLE also through pylibjpeg-rle (faster)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is None:  # no File Meta Information: pydicom read it as Implicit VR Little Endian
        return ImplicitVRLittleEndian
    try:
        available = get_decoder(syntax).is_available
    except Exception:  # NotImplementedError for a syntax pydicom has no decoder for at all
        available = False
    if not available:
        raise DataError(
            f"{path}: unsupported DICOM transfer syntax {_syntax_label(syntax)}: no installed "
            "decoder reads its pixel data (JPEG, JPEG-LS, JPEG 2000, RLE and uncompressed are read)"
        )
    return syntax


def _read_dicom_file(path: Path, pixels: bool) -> tuple[Any, np.ndarray | None]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as error:
        what = "file is empty" if path.stat().st_size == 0 else _first_line(error)
        raise DataError(f"{path}: cannot read DICOM ({what})") from None
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag not in ds:
            raise DataError(f"{path}: DICOM slice has no {tag}; cannot place it in 3-D")
    if not pixels:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        if frames != 1 or samples != 1 or "Rows" not in ds or "Columns" not in ds:
            raise DataError(
                f"{path}: expected one 2-D grey slice per file, got {frames} frame(s) of "
                f"{samples} sample(s) per pixel"
            )
        return ds, None
    if "PixelData" not in ds:
        raise DataError(f"{path}: cannot read DICOM (no pixel data)")
    syntax = _check_decodable(path, ds)
    try:
        array = ds.pixel_array
    except Exception as error:
        # pydicom lists each plugin's failure on a line of its own: keep them, on one line.
        what = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        what = what or type(error).__name__
        if getattr(syntax, "is_compressed", False):
            what = f"{_syntax_label(syntax)}: {what}"
        raise DataError(f"{path}: cannot read DICOM pixel data ({what})") from None
    if array.ndim != 2:
        raise DataError(
            f"{path}: expected one 2-D grey slice per file, got pixel data {array.shape}"
        )
    return ds, array


def _position(ds: Any) -> np.ndarray:
    return np.asarray(ds.ImagePositionPatient, dtype=np.float64)


def _order_slices(where: Path, slices: list[tuple[Path, Any, Any]]) -> list[tuple[Path, Any, Any]]:
    """``(path, dataset, pixels-or-None)`` of one series, checked and sorted along the slice normal.

    The order comes from ImagePositionPatient projected on the normal (row x column direction of
    ImageOrientationPatient). InstanceNumber plays no part: DICOM asks neither that the numbers
    be contiguous nor that they follow the positions, and exporters renumber, drop or repeat
    them. What the positions cannot explain is refused, each with a one-line message: several
    series, slices of other sizes or orientations, two slices at one position or with one
    SOPInstanceUID (duplicated), uneven spacing along the normal (missing slices)."""
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds, _ in slices}
    if len(series) > 1:
        raise DataError(f"{where}: holds {len(series)} DICOM series; put one series per folder")

    def size(ds: Any, pixels: Any) -> tuple[int, int]:
        return tuple(pixels.shape) if pixels is not None else (int(ds.Rows), int(ds.Columns))

    path0, ds0, pixels0 = slices[0]
    orientation = np.asarray(ds0.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    for path, ds, pixels in slices[1:]:
        if size(ds, pixels) != size(ds0, pixels0):
            raise DataError(
                f"{path}: slice is {size(ds, pixels)} but {path0.name} is {size(ds0, pixels0)}"
            )
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), orientation):
            raise DataError(f"{path}: ImageOrientationPatient differs from {path0.name}'s")

    slices = sorted(slices, key=lambda item: float(_position(item[1]) @ normal))
    offsets = np.asarray([float(_position(ds) @ normal) for _, ds, _ in slices])
    if len(slices) > 1:
        gaps = np.diff(offsets)
        tolerance = max(1e-3, 0.01 * float(np.max(np.abs(gaps))))
        for index, gap in enumerate(gaps):
            if gap < tolerance:
                raise DataError(
                    f"{slices[index + 1][0]}: duplicated slice: same position as "
                    f"{slices[index][0].name} ({offsets[index]:.2f} mm along the slice normal)"
                )
        step = float(np.median(gaps))
        for index, gap in enumerate(gaps):
            if abs(gap - step) > max(0.1 * step, 1e-3):
                missing = max(round(gap / step) - 1, 1)
                raise DataError(
                    f"{where}: missing slice(s): {missing} gap(s) of {gap:.2f} mm between "
                    f"{slices[index][0].name} and {slices[index + 1][0].name} "
                    f"(series spacing {step:.2f} mm)"
                )
    seen: dict[str, Path] = {}
    for path, ds, _ in slices:
        uid = str(getattr(ds, "SOPInstanceUID", "") or "")
        if uid and uid in seen:
            raise DataError(
                f"{path}: duplicated slice: SOPInstanceUID {uid} also in {seen[uid].name}"
            )
        seen[uid] = path
    return slices


def _read_slices(folder: Path, pixels: bool) -> list[tuple[Path, Any, Any]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM series folder does not exist")
    files = _dicom_files(folder)
    if not files:
        raise DataError(f"{folder}: no DICOM files in the series folder")
    return _order_slices(folder, [(path, *_read_dicom_file(path, pixels)) for path in files])


def read_dicom_series(folder: Path) -> Volume:
    """Read one DICOM series (every file of ``folder``) as a float32 volume.

    Slices are ordered by their position along the slice normal (ImagePositionPatient projected
    on the cross product of ImageOrientationPatient's row and column directions), not by file
    name or InstanceNumber (which DICOM does not require to be contiguous: a gap in the numbers
    is not a missing slice); values are ``stored * RescaleSlope + RescaleIntercept`` (e.g.
    Hounsfield units). The volume is indexed ``[i, j, k]`` = (column, row, slice): voxel
    ``[i, j, k]`` is pixel (row ``j``, column ``i``) of the ``k``-th slice along the normal, the
    order :func:`read_dicom_datasets` returns. The affine is the RAS version of the DICOM patient
    (LPS) geometry; slice spacing comes from the positions, not SliceThickness.

    Pixel data may be uncompressed or in the JPEG (Baseline, Extended, Lossless), JPEG-LS, JPEG
    2000 or RLE transfer syntaxes (decoders: pylibjpeg-libjpeg, pyjpegls, pylibjpeg-openjpeg,
    pylibjpeg-rle / pydicom).

    Raises:
        DataError: A file is not DICOM, has no pixel data, or its transfer syntax has no
            installed decoder (the message names the syntax); the files belong to several
            series; slices differ in size or orientation; two slices share a position or a
            SOPInstanceUID (duplicated); positions are unevenly spaced (missing slices).
    """
    folder = Path(folder)
    slices = _read_slices(folder, pixels=True)
    _, ds0, _ = slices[0]
    orientation = np.asarray(ds0.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = (float(v) for v in ds0.PixelSpacing)
    rescaled = []
    for _, ds, pixels in slices:
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        rescaled.append(pixels.astype(np.float64) * slope + intercept)

    # Stored pixels are (rows, columns) = (j, i); stack as [i, j, k].
    data = np.stack([pixels.T for pixels in rescaled], axis=2).astype(np.float32)
    if len(slices) > 1:
        slice_step = (_position(slices[-1][1]) - _position(slices[0][1])) / (len(slices) - 1)
    else:
        thickness = float(getattr(ds0, "SliceThickness", 1.0) or 1.0)
        slice_step = normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i runs along a row: the column spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = _position(slices[0][1])
    _check_finite(data, folder)
    return Volume(data, _LPS_TO_RAS @ lps, folder, "dicom")


def read_dicom_datasets(folder: Path) -> list[Any]:
    """The datasets (without pixel data) of the series in ``folder``, in the slice order of
    :func:`read_dicom_series`: ``datasets[k]`` is slice ``k`` of the volume.

    Runs the same series checks (one series, sizes, orientations, positions) and raises the same
    DataErrors; for writers that reference the source instances (DICOM-SEG)."""
    return [ds for _, ds, _ in _read_slices(Path(folder), pixels=False)]


def order_dicom_datasets(datasets: Any, where: Path | str = "DICOM series") -> list[Any]:
    """Already-read datasets of one series, checked and sorted as :func:`read_dicom_series`
    orders its slices; ``where`` names the series in error messages (each dataset is named by
    its ``filename`` when it has one)."""
    slices = []
    for index, ds in enumerate(datasets):
        name = getattr(ds, "filename", None)
        path = Path(name) if isinstance(name, str | Path) and name else Path(f"{where}[{index}]")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"):
            if tag not in ds:
                raise DataError(f"{path}: DICOM slice has no {tag}; cannot place it in 3-D")
        slices.append((path, ds, None))
    if not slices:
        raise DataError(f"{where}: no DICOM datasets given")
    return [ds for _, ds, _ in _order_slices(Path(where), slices)]


# --------------------------------------------------------------------------------------------
# Public readers and writers
# --------------------------------------------------------------------------------------------


def read_volume(path: Path) -> Volume:
    """Read a NIfTI/NRRD file or a DICOM series folder as a float32 volume.

    Returns:
        A :class:`Volume` with ``data`` float32 ``[i, j, k]`` (or ``[i, j, k, c]``) in the
        file's physical units (DICOM: rescaled, e.g. HU) and the RAS affine.

    Raises:
        DataError: The path is missing, of an unknown kind, truncated or corrupt, or has NaN or
            infinite voxels.
    """
    path = Path(path)
    kind = volume_format(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if kind == "nifti":
        volume = _read_nifti(path)
    elif kind == "nrrd":
        volume = _read_nrrd(path)
    elif kind == "dicom":
        volume = read_dicom_series(path if path.is_dir() else path.parent)
    else:
        kinds = ", ".join(VOLUME_SUFFIXES)
        raise DataError(f"{path}: not a volume (expected {kinds} or a DICOM series folder)")
    _check_finite(volume.data, path)
    volume.data = volume.data.astype(np.float32, copy=False)
    return volume


def read_label_volume(path: Path, reference: Volume | None = None) -> Volume:
    """Read a label volume as int64 ``[i, j, k]``; optionally put it on ``reference``'s grid.

    A label volume whose grid is the reference's up to axis flips and permutations (the same
    voxels in world space, stored e.g. LAS instead of LPS as converters differ) is reoriented
    onto the reference's voxel order; :attr:`Volume.reoriented` then says so.

    Raises:
        DataError: As :func:`read_volume`; or the volume is 4-D, has non-integer values, or
            lies on another grid than the reference (the message names what differs: shape,
            spacing, direction or origin).
    """
    path = Path(path)
    volume = read_volume(path)
    data = volume.data
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a label volume must be 3-D, got shape {data.shape}")
    if not np.array_equal(data, np.round(data)):
        raise DataError(f"{path}: label volume has non-integer values (not a label map)")
    volume.data = data.astype(np.int64)
    if reference is not None:
        volume = align_to_grid(volume, reference)
    return volume


def _grid_difference(shape: tuple[int, ...], affine: np.ndarray, reference: Volume) -> str | None:
    """What differs between the grid (shape, affine) and the reference's, or None if nothing.

    Names the first of shape, spacing, direction, origin that differs, so a user knows whether
    the mask was resampled, rotated or shifted; positions are compared where the grid's corners
    land, in mm."""
    name = reference.path.name
    if tuple(shape) != reference.shape:
        given, expected = "x".join(map(str, shape)), "x".join(map(str, reference.shape))
        return f"shape differs from its image {name} ({given} vs {expected} voxels)"
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    if np.abs(spacing - np.asarray(reference.spacing)).max() > _AFFINE_TOLERANCE_MM:
        given = "x".join(f"{v:.4g}" for v in spacing)
        expected = "x".join(f"{v:.4g}" for v in reference.spacing)
        return f"spacing differs from its image {name} ({given} vs {expected} mm)"
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    corners *= np.asarray(reference.shape, float) - 1
    linear = np.asarray(affine)[:3, :3] - reference.affine[:3, :3]
    turned = float(np.abs(corners @ linear.T).max())
    if turned > _AFFINE_TOLERANCE_MM:
        return (
            f"direction differs from its image {name} (voxel-to-world affines rotate the grid "
            f"apart by up to {turned:.3g} mm)"
        )
    shift = float(np.abs(np.asarray(affine)[:3, 3] - reference.affine[:3, 3]).max())
    if shift > _AFFINE_TOLERANCE_MM:
        return f"origin differs from its image {name} (voxel-to-world affines {shift:.3g} mm apart)"
    return None


def check_same_grid(volume: Volume, reference: Volume) -> None:
    """Raise DataError (naming ``volume.path`` and what differs) unless it has ``reference``'s
    shape and affine."""
    problem = _grid_difference(volume.shape, volume.affine, reference)
    if problem is not None:
        raise DataError(f"{volume.path}: {problem}")


def align_to_grid(volume: Volume, reference: Volume) -> Volume:
    """``volume`` on ``reference``'s grid: as it is, or with its axes flipped and permuted when
    that alone puts it there (same voxels in world space, other storage order).

    Only flips and permutations are applied, never resampling: each voxel keeps its value and its
    place in the world. Anything else is a real mismatch, and raises as :func:`check_same_grid`
    does, describing the grid after any flips (a mask both flipped and shifted: origin differs).
    """
    from nibabel.orientations import (
        apply_orientation,
        inv_ornt_aff,
        io_orientation,
        ornt2axcodes,
        ornt_transform,
    )

    if _grid_difference(volume.shape, volume.affine, reference) is None:
        return volume
    own, target = io_orientation(volume.affine), io_orientation(reference.affine)
    transform = ornt_transform(own, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        check_same_grid(volume, reference)  # same axis order: nothing to flip, a real mismatch
    data = apply_orientation(volume.data, transform)
    affine = volume.affine @ inv_ornt_aff(transform, volume.shape)
    problem = _grid_difference(data.shape[:3], affine, reference)
    if problem is not None:
        raise DataError(f"{volume.path}: {problem}")
    stored, wanted = "".join(ornt2axcodes(own)), "".join(ornt2axcodes(target))
    return Volume(
        np.ascontiguousarray(data),
        reference.affine.copy(),
        volume.path,
        volume.format,
        volume.header,
        reoriented=f"stored {stored} but its image is {wanted}: reoriented onto the image's grid "
        "(axes flipped/permuted, no resampling)",
    )


def _output_format(path: Path) -> VolumeFormat:
    kind = volume_format(path) if not Path(path).is_dir() else None
    if kind not in ("nifti", "nrrd"):
        raise ValueError(f"{path}: write volumes as .nii, .nii.gz or .nrrd")
    return kind


def write_volume(path: Path, data: np.ndarray, reference: Volume, *, dtype: Any = None) -> Path:
    """Write ``data`` (``[i, j, k]``, reference's shape) on ``reference``'s grid; returns ``path``.

    The format follows ``path``'s suffix (``.nii``/``.nii.gz``: nibabel, with the reference's
    NIfTI header copied when it has one; ``.nrrd``: SimpleITK). ``dtype`` defaults to
    ``data``'s.
    """
    path = Path(path)
    data = np.asarray(data)
    if tuple(data.shape[:3]) != reference.shape or data.ndim != 3:
        raise ValueError(f"data must be {reference.shape} [i, j, k], got {data.shape}")
    data = data.astype(dtype or data.dtype, copy=False)
    kind = _output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "nifti":
        import nibabel as nib

        header = reference.header.copy() if reference.header is not None else None
        image = nib.Nifti1Image(data, reference.affine, header=header)
        image.set_data_dtype(data.dtype)
        # Label and probability values are stored as is, never rescaled.
        image.header.set_slope_inter(1.0, 0.0)
        if header is not None:
            image.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
            image.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
        else:
            image.set_qform(reference.affine, code=1)
            image.set_sform(reference.affine, code=1)
        nib.save(image, str(path))
    else:
        _write_sitk(path, data, reference.affine)
    return path


def write_label_volume(path: Path, labels: np.ndarray, reference: Volume) -> Path:
    """Write an integer label volume on the grid of the image it was predicted from.

    Args:
        path: ``.nii.gz``/``.nii`` (the reference's NIfTI header is copied: affine, qform/sform
            codes, units) or ``.nrrd``; parent folders are created.
        labels: ``[i, j, k]`` label values 0..255 with the reference's spatial shape (the
            same voxel order as :attr:`Volume.data`).
        reference: The image volume (as read by :func:`read_volume`).

    Returns:
        The written path; it has exactly the reference's shape and affine, dtype uint8.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label values must be in 0..255, got {labels.min()}..{labels.max()}")
    return write_volume(path, labels, reference, dtype=np.uint8)
