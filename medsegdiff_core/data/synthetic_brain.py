"""Built-in synthetic brain-tumour MRI in the BraTS layout: 4 modalities, labels 1/2/4.

Each case is a skull-stripped head (background exactly 0, as BraTS ships it) with white and grey
matter, ventricles and one glioma-like tumour: an irregular oedema region (label 2) around an
enhancing rim (label 4) around a necrotic core (label 1), nested as in BraTS, so the standard
regions are whole tumour WT = {1, 2, 4}, tumour core TC = {1, 4} and enhancing tumour ET = {4}.
The four modalities differ the way the real ones do: T1 shows anatomy, T1ce lights up the
enhancing rim, T2 shows fluid (ventricles, oedema, necrosis) bright, FLAIR shows oedema bright with
the ventricles dark. A smooth bias field and Rician-like noise differ per case.

Written as ``ROOT/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` with a BraTS-like affine
(``-sx, -sy, sz`` diagonal), so :mod:`.layouts`' ``brats`` reader is exercised end to end.
Every case is seeded from ``(seed, index)``: arrays are identical across runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .classes import BRATS_CLASSES, BRATS_MODALITIES

__all__ = [
    "BRATS_CLASSES",
    "BRATS_MODALITIES",
    "make_brain_case",
    "write_brats_cases",
]


# Tissue intensities per modality (fractions of full scale): background, WM, GM, CSF,
# oedema (2), enhancing rim (4), necrosis (1).
_TISSUES = ("wm", "gm", "csf", "oedema", "enhancing", "necrosis")
_INTENSITY = {
    "t1": (0.75, 0.55, 0.15, 0.45, 0.55, 0.25),
    "t1ce": (0.75, 0.55, 0.15, 0.45, 1.40, 0.20),
    "t2": (0.35, 0.50, 1.00, 0.85, 0.60, 0.95),
    "flair": (0.45, 0.55, 0.08, 1.00, 0.75, 0.40),
}


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised radius (1 on the surface) of every voxel; grid is (3, I, J, K) in mm."""
    offset = (grid - centre[:, None, None, None]) / radii[:, None, None, None]
    return np.sqrt((offset**2).sum(axis=0))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / (noise.std() + 1e-8)


def make_brain_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (64, 64, 24),
    spacing: tuple[float, float, float] = (3.0, 3.0, 6.0),
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Draw one synthetic case.

    Args:
        rng: Source of randomness (seed it for reproducible cases).
        shape: Volume size ``(I, J, K)`` in voxels; ``K`` is the axial (slice) axis.
        spacing: Voxel size along ``i, j, k`` in mm (the head is ~170 x 200 x 140 mm whatever
            the shape, so the spacing sets how much of it fits).

    Returns:
        ``(modalities, seg)``: ``{"t1": float32 [i, j, k] in [0, ~1.6], ...}`` in
        :data:`BRATS_MODALITIES` order, 0 outside the brain; and the uint8 ``[i, j, k]`` label
        volume with values 0, 1 (necrosis), 2 (oedema), 4 (enhancing).
    """
    extent = np.asarray(shape, float) * np.asarray(spacing, float)
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    centre = extent / 2 + rng.uniform(-0.03, 0.03, 3) * extent
    head_radii = np.minimum(np.array([68.0, 84.0, 62.0]), 0.46 * extent) * rng.uniform(0.9, 1.0, 3)
    # An irregular brain outline: the radius wobbles with smooth noise.
    wobble = 0.04 * _smooth_noise(rng, shape, sigma=4.0)
    brain = _ellipsoid(grid, centre, head_radii) < 1.0 + wobble
    cortex = brain & ~(_ellipsoid(grid, centre, head_radii * 0.82) < 1.0 + wobble)
    ventricles = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        vc = centre + np.array([side * 0.18 * head_radii[0], -0.05 * head_radii[1], 0.05])
        vr = head_radii * np.array([0.10, 0.30, 0.22]) * rng.uniform(0.8, 1.2)
        ventricles |= _ellipsoid(grid, vc, vr) < 1.0
    ventricles &= brain

    # The tumour: somewhere in one hemisphere, away from the ventricles' centre.
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    t_centre = centre + direction * head_radii * rng.uniform(0.25, 0.5)
    t_radius = rng.uniform(0.28, 0.42) * head_radii.min() * rng.uniform(0.85, 1.15, 3)
    shape_noise = 0.12 * _smooth_noise(rng, shape, sigma=2.5)
    r = _ellipsoid(grid, t_centre, t_radius) + shape_noise
    oedema_scale = rng.uniform(1.4, 1.9)
    necrosis_scale = rng.uniform(0.45, 0.65)
    seg = np.zeros(shape, np.uint8)
    seg[(r < oedema_scale) & brain] = 2
    seg[(r < 1.0) & brain] = 4
    seg[(r < necrosis_scale) & brain] = 1

    tissue = {
        "wm": brain & ~cortex,
        "gm": cortex,
        "csf": ventricles,
        "oedema": seg == 2,
        "enhancing": seg == 4,
        "necrosis": seg == 1,
    }
    bias = 1.0 + 0.1 * _smooth_noise(rng, shape, sigma=8.0)
    texture = 0.04 * _smooth_noise(rng, shape, sigma=1.0)
    modalities: dict[str, np.ndarray] = {}
    for name in BRATS_MODALITIES:
        volume = np.zeros(shape)
        for label, value in zip(_TISSUES, _INTENSITY[name], strict=True):
            volume[tissue[label]] = value  # later tissues (tumour) overwrite anatomy
        volume = ndimage.gaussian_filter(volume, 0.7) * bias + texture
        noise = rng.normal(0.0, 0.03, (2, *shape))
        volume = np.sqrt((volume + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude
        volume[~brain] = 0.0
        modalities[name] = volume.astype(np.float32)
    return modalities, seg


def write_brats_cases(
    root: Path,
    num_cases: int = 8,
    *,
    shape: tuple[int, int, int] = (64, 64, 24),
    spacing: tuple[float, float, float] = (3.0, 3.0, 6.0),
    seed: int = 0,
    prefix: str = "BraTS-SYN",
) -> list[Path]:
    """Write ``num_cases`` cases in the BraTS layout under ``root``; returns the case folders.

    Files: ``root/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz`` (float32) and ``<case>_seg.nii.gz``
    (uint8, labels 0/1/2/4); case names are ``<prefix>-00000``, ``-00001``, ...
    """
    import nibabel as nib

    root = Path(root)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = np.asarray(shape, float) * np.asarray(spacing) / 2 * np.array([1, 1, -1])
    folders = []
    for index in range(num_cases):
        rng = np.random.default_rng([seed, index])
        modalities, seg = make_brain_case(rng, shape, spacing)
        name = f"{prefix}-{index:05d}"
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for modality, volume in {**modalities, "seg": seg}.items():
            image = nib.Nifti1Image(volume, affine)
            image.header.set_xyzt_units("mm")
            image.set_qform(affine, code=1)
            image.set_sform(affine, code=1)
            nib.save(image, str(folder / f"{name}_{modality}.nii.gz"))
        folders.append(folder)
    return folders
