"""Built-in synthetic multi-site fundus data: optic-disc-centred crops like REFUGE.

Each case is an RGB crop centred on the optic disc with a label map (0 = background, 1 = disc rim,
2 = cup), so the classes ``{"disc": [1, 2], "cup": [2]}`` give the disc (cup included, as REFUGE
is evaluated) and the cup. The anatomy is drawn in unit coordinates (fractions of the image size)
so a case looks the same at every resolution; the acquisition ("site") style is applied last.

Sites are deliberately non-IID, the way hospitals with different cameras and patients are:
exposure, contrast, colour cast, blur and noise differ, and so do disc size (camera field of view)
and the cup-to-disc ratio (glaucoma prevalence). Everything is seeded per case from
``(seed, site, split, index)``, so output is byte-identical across runs and changing one split's
count leaves every other case unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .classes import FUNDUS_CLASSES

__all__ = [
    "FUNDUS_CLASSES",
    "GLAUCOMA_CUP_TO_DISC",
    "PUBLIC_STYLE",
    "SiteStyle",
    "default_site_styles",
    "make_fundus_case",
    "write_fundus_sites",
    "write_public_fundus",
]


GLAUCOMA_CUP_TO_DISC: tuple[float, float] = (0.6, 0.85)
"""Vertical cup-to-disc ratio range drawn for the glaucomatous fraction of a site's cases."""

DEFAULT_CASES: dict[str, int] = {"train": 40, "val": 8, "test": 12}

# Vessels are drawn with PIL at this multiple of the output size and box-filtered down, which
# gives anti-aliased sub-pixel widths without a per-pixel Python loop.
_SUPERSAMPLE = 4
_STEP = 0.012  # vessel random-walk step, in image-size units
_MAX_BEND_STEPS = 70  # arcades turn by at most 70 * bend, then run straight on
_CASE_NAME = re.compile(r"case-\d{4,}\.png")


@dataclass(frozen=True)
class SiteStyle:
    """How one site's camera and population look.

    Intensities are fractions of full scale (1.0 = 255); lengths are fractions of the image size
    unless stated otherwise.

    Attributes:
        name: Short human-readable description, written to ``site.json``.
        brightness: Multiplicative exposure gain.
        contrast: Gain around the image's mean intensity (< 1 flattens the image).
        gamma: Output = input ** gamma; > 1 darkens mid-tones.
        colour_gain: Per-channel (R, G, B) gains: the camera's colour cast.
        noise_sigma: Standard deviation of additive Gaussian sensor noise.
        blur_sigma: Gaussian blur standard deviation in pixels of a 128-px image (scaled with
            the output size): defocus and compression.
        vignetting: Fractional intensity lost at the crop corners (illumination falloff).
        disc_radius: (min, max) vertical optic-disc radius; differs with the camera's field of
            view.
        cup_to_disc: (min, max) vertical cup-to-disc ratio of the site's healthy eyes.
        glaucoma_prevalence: Fraction of cases whose ratio is drawn from
            :data:`GLAUCOMA_CUP_TO_DISC` instead: large, glaucomatous cups.
        vessel_density: Multiplier on the number of vessels and branches.
    """

    name: str = "site"
    brightness: float = 1.0
    contrast: float = 1.0
    gamma: float = 1.0
    colour_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise_sigma: float = 0.01
    blur_sigma: float = 0.3
    vignetting: float = 0.25
    disc_radius: tuple[float, float] = (0.16, 0.21)
    cup_to_disc: tuple[float, float] = (0.3, 0.55)
    glaucoma_prevalence: float = 0.1
    vessel_density: float = 1.0


_BASE_STYLES = (
    SiteStyle(
        name="clean, bright",
        brightness=1.08,
        contrast=1.1,
        gamma=0.95,
        colour_gain=(1.0, 1.0, 1.0),
        noise_sigma=0.008,
        blur_sigma=0.3,
        vignetting=0.2,
        disc_radius=(0.17, 0.22),
        cup_to_disc=(0.3, 0.55),
        glaucoma_prevalence=0.1,
        vessel_density=1.0,
    ),
    SiteStyle(
        name="dark, low contrast, green-blue cast, blurred",
        brightness=0.7,
        contrast=0.7,
        gamma=1.25,
        colour_gain=(0.78, 1.08, 1.2),
        noise_sigma=0.015,
        blur_sigma=1.4,
        vignetting=0.4,
        disc_radius=(0.13, 0.18),
        cup_to_disc=(0.3, 0.5),
        glaucoma_prevalence=0.1,
        vessel_density=0.8,
    ),
    SiteStyle(
        name="noisy, high glaucoma prevalence",
        brightness=0.95,
        contrast=1.0,
        gamma=1.0,
        colour_gain=(1.05, 0.95, 0.88),
        noise_sigma=0.06,
        blur_sigma=0.5,
        vignetting=0.3,
        disc_radius=(0.18, 0.24),
        cup_to_disc=(0.4, 0.65),
        glaucoma_prevalence=0.6,
        vessel_density=1.3,
    ),
)


PUBLIC_STYLE = SiteStyle(
    name="public archive: bright, high contrast, warm cast, large discs, sparse vessels",
    brightness=1.2,
    contrast=1.35,
    gamma=0.85,
    colour_gain=(1.12, 0.9, 0.8),
    noise_sigma=0.025,
    blur_sigma=0.9,
    vignetting=0.1,
    disc_radius=(0.22, 0.27),
    cup_to_disc=(0.25, 0.45),
    glaucoma_prevalence=0.3,
    vessel_density=0.6,
)
"""The public pretraining set's look (:func:`write_public_fundus`): outside every built-in
site's range in exposure, contrast, colour cast, disc size and vessel density, the way a public
dataset comes from other cameras and patients than the hospitals that fine-tune on it."""

# The public set's cases are seeded as a "site" with this number, which no site reaches
# (sites are numbered from 0), and split "public", which no site writes: its own seed range.
_PUBLIC_SITE = 2**32 - 1


def default_site_styles(num_sites: int) -> list[SiteStyle]:
    """Return ``num_sites`` clearly different site styles.

    Site 0 is clean and bright; site 1 dark, low-contrast, blurred, with a green/blue cast and
    smaller discs; site 2 noisy with a high share of large (glaucomatous) cups. Further sites are
    deterministic random mixtures of these three with some jitter, so they stay plausible while
    differing from each other.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    styles = list(_BASE_STYLES[:num_sites])
    for k in range(len(_BASE_STYLES), num_sites):
        rng = np.random.default_rng([0x5175, k])
        styles.append(_mix_styles(rng, f"mixture {k}"))
    return styles


def _mix_styles(rng: np.random.Generator, name: str) -> SiteStyle:
    """A random convex mixture of the base styles, each parameter jittered by up to 10 %."""
    weights = rng.dirichlet(np.ones(len(_BASE_STYLES)))
    values: dict = {"name": name}
    for field in dataclasses.fields(SiteStyle)[1:]:  # all numeric after "name"
        base = np.array([getattr(s, field.name) for s in _BASE_STYLES], dtype=np.float64)
        mixed = np.tensordot(weights, base, axes=1) * rng.uniform(0.9, 1.1)
        values[field.name] = (
            tuple(round(float(v), 4) for v in mixed) if mixed.ndim else round(float(mixed), 4)
        )
    values["glaucoma_prevalence"] = min(values["glaucoma_prevalence"], 1.0)
    return SiteStyle(**values)


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """A rotated ellipse with a wobbly boundary, in unit coordinates."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order, relative amplitude, phase)

    def rho(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius: < 1 inside, 1 on the boundary, grows ~linearly outside."""
        dx, dy = x - self.cx, y - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / self.rx
        v = (-dx * s + dy * c) / self.ry
        theta = np.arctan2(v, u)
        wobble = np.ones_like(theta)
        for order, amp, phase in self.harmonics:
            wobble += amp * np.cos(order * theta + phase)
        return np.hypot(u, v) / wobble

    def scaled(self, factor: float, dx: float = 0.0, dy: float = 0.0) -> _Shape:
        return dataclasses.replace(
            self, cx=self.cx + dx, cy=self.cy + dy, rx=self.rx * factor, ry=self.ry * factor
        )


def _wobbly_shape(
    rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, amplitude: float
) -> _Shape:
    harmonics = tuple(
        (order, float(rng.uniform(0.2, 1.0) * amplitude / order), float(rng.uniform(0, 2 * np.pi)))
        for order in (2, 3, 4, 5)
    )
    return _Shape(cx, cy, rx, ry, float(rng.normal(0.0, 0.12)), harmonics)


def _sample_cup_to_disc(rng: np.random.Generator, style: SiteStyle) -> float:
    low, high = style.cup_to_disc
    if rng.random() < style.glaucoma_prevalence:
        low, high = GLAUCOMA_CUP_TO_DISC
    return float(rng.uniform(low, high))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise with about ``cells`` blobs across the image."""
    coarse = rng.standard_normal((cells + 3, cells + 3))
    fine = ndimage.zoom(coarse, (size + 1) / cells, order=3, mode="reflect", grid_mode=True)
    return fine[1 : size + 1, 1 : size + 1].astype(np.float32)


# --------------------------------------------------------------------------------------------
# Vessels
# --------------------------------------------------------------------------------------------


def _walk_vessel(
    rng: np.random.Generator,
    start: tuple[float, float],
    heading: float,
    width: float,
    bend: float,
    density: float,
    depth: int,
    out: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    """Random-walk one vessel from ``start``; append (points (n, 2), widths (n,)) and recurse
    into branches. ``bend`` (radians per step) curves the arcades round towards the macula."""
    x, y = start
    points, widths = [(x, y)], [width]
    # The course follows a smooth curve (``bend`` per step, capped) and meanders around it with a
    # bounded, correlated deviation: real vessels wiggle but do not loop.
    course, deviation = heading, 0.0
    for step in range(int(1.6 / _STEP)):
        if step < _MAX_BEND_STEPS:
            course += bend
        deviation = 0.9 * deviation + rng.normal(0.0, 0.07)
        heading = course + deviation
        x += _STEP * math.cos(heading)
        y += _STEP * math.sin(heading)
        width *= 0.993
        points.append((x, y))
        widths.append(width)
        if not (-0.05 < x < 1.05 and -0.05 < y < 1.05):
            break
        if depth < 2 and width > 0.006 and rng.random() < 0.02 * density:
            side = rng.choice((-1.0, 1.0))
            child_width = width * rng.uniform(0.5, 0.75)
            _walk_vessel(
                rng,
                (x, y),
                heading + side * rng.uniform(0.4, 1.1),
                child_width,
                bend * 0.5 + side * rng.uniform(0.0, 0.02),
                density,
                depth + 1,
                out,
            )
            width *= 0.9  # the parent thins where it gives off a branch
    out.append((np.asarray(points), np.asarray(widths)))


def _render_vessels(
    vessels: list[tuple[np.ndarray, np.ndarray]], size: int, darkness: list[float]
) -> np.ndarray:
    """Rasterise vessels into an occlusion map in [0, 1], shape (size, size)."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for (points, widths), dark in zip(vessels, darkness, strict=True):
        fill = int(round(255 * dark))
        pix = points * big
        for i in range(len(pix) - 1):
            w = max(1.0, widths[i] * big)
            (x0, y0), (x1, y1) = pix[i], pix[i + 1]
            draw.line((x0, y0, x1, y1), fill=fill, width=int(round(w)))
            r = w / 2
            draw.ellipse((x1 - r, y1 - r, x1 + r, y1 + r), fill=fill)  # round joints, no gaps
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _vessel_tree(
    rng: np.random.Generator, disc: _Shape, cup: _Shape, temporal: float, density: float
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[float]]:
    """Central retinal vessels: they leave the cup on its nasal side, run up and down as the
    superior and inferior arcades curving temporally, plus a few smaller nasal/temporal ones."""
    vessels: list[tuple[np.ndarray, np.ndarray]] = []
    darkness: list[float] = []
    trunk = 0.075 * disc.ry * 2  # major vein calibre ~ 7.5 % of the disc diameter
    origin_x = cup.cx - temporal * 0.35 * cup.rx
    # (heading, vertical: -1 superior / +1 inferior / 0 horizontal, is_vein); y points down.
    trunks = [(v * math.pi / 2, v, vein) for v in (-1.0, 1.0) for vein in (True, False)]
    for _ in range(rng.poisson(2.0 * density) + 1):
        nasal = rng.random() < 0.6  # smaller vessels, more of them nasal (heading pi)
        heading = float(rng.uniform(-0.6, 0.6)) + (math.pi if nasal else 0.0)
        trunks.append((heading, 0.0, bool(rng.random() < 0.5)))
    for heading, vertical, is_vein in trunks:
        start = (
            origin_x + rng.normal(0.0, 0.15) * cup.rx,
            cup.cy + rng.normal(0.0, 0.25) * cup.ry,
        )
        if vertical:
            heading += -vertical * temporal * rng.uniform(0.0, 0.25)
            bend = -vertical * temporal * rng.uniform(0.008, 0.02)
        else:
            heading = heading if temporal > 0 else math.pi - heading
            bend = float(rng.normal(0.0, 0.01))
        width = trunk * (1.0 if is_vein else 0.7) * (1.0 if vertical else 0.55)
        width *= rng.uniform(0.85, 1.15)
        before = len(vessels)
        _walk_vessel(rng, start, heading, width, bend, density, 0, vessels)
        dark = rng.uniform(0.8, 0.95) if is_vein else rng.uniform(0.55, 0.7)
        darkness.extend([dark] * (len(vessels) - before))
    return vessels, darkness


# --------------------------------------------------------------------------------------------
# A case
# --------------------------------------------------------------------------------------------


def make_fundus_case(
    rng: np.random.Generator, style: SiteStyle, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one optic-disc-centred fundus crop.

    Args:
        rng: Source of all randomness; the same generator state gives the same case.
        style: The acquiring site's look and population.
        size: Side length of the square output in pixels (at least 16).

    Returns:
        ``(image, labels)``: RGB ``uint8`` (size, size, 3) and a ``uint8`` (size, size) label map
        with 0 = background, 1 = disc rim (disc minus cup), 2 = cup.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(grid, grid)

    # Anatomy. The disc is a slightly vertical oval near the crop centre; the cup sits a little
    # temporal of the disc centre (temporal = +1: to the right, a left eye).
    temporal = float(rng.choice((-1.0, 1.0)))
    disc_ry = float(rng.uniform(*style.disc_radius))
    disc_rx = disc_ry / rng.uniform(1.0, 1.15)
    disc = _wobbly_shape(
        rng, 0.5 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.03), disc_rx, disc_ry, 0.05
    )
    cdr = _sample_cup_to_disc(rng, style)
    cup_ry = cdr * disc_ry
    cup_rx = cup_ry * (disc_rx / disc_ry) * rng.uniform(0.85, 1.05)
    room = max(0.0, 0.85 * disc_rx - cup_rx)
    cup = _wobbly_shape(
        rng,
        disc.cx + temporal * rng.uniform(0.0, min(0.2 * disc_rx, room)),
        disc.cy + rng.normal(0.0, 0.04) * disc_ry,
        cup_rx,
        cup_ry,
        0.04,
    )
    disc_rho = disc.rho(x, y)
    # The rim never vanishes in the ground truth, even for a huge cup.
    cup_mask = (cup.rho(x, y) < 1.0) & (disc_rho < 0.9)
    labels = np.where(disc_rho < 1.0, 1, 0).astype(np.uint8)
    labels[cup_mask] = 2

    # Retina background: orange-red, pigmentation varies between people, choroidal texture.
    base = np.array([0.78, 0.36, 0.15]) * rng.uniform(0.85, 1.12, size=3)
    texture = 1.0 + 0.07 * _smooth_noise(rng, size, 6) + 0.035 * _smooth_noise(rng, size, 20)
    img = base[:, None, None] * texture[None]

    # Peripapillary halo (atrophy): a paler ring just outside the disc in some eyes; it blurs
    # the disc boundary the way it does in real images.
    halo_strength = rng.uniform(0.0, 0.3) * (rng.random() < 0.5)
    halo = halo_strength * np.exp(-(((disc_rho - 1.0) / rng.uniform(0.1, 0.3)) ** 2))
    halo *= disc_rho > 1.0
    img = img * (1 - halo) + np.array([0.85, 0.62, 0.4])[:, None, None] * halo

    # Neuroretinal rim: yellow-orange with a slightly soft edge and a brighter temporal side.
    rim_colour = np.array([0.96, 0.66, 0.40]) * rng.uniform(0.9, 1.05, size=3)
    disc_alpha = _sigmoid((1.0 - disc_rho) / rng.uniform(0.02, 0.05))
    side = 1.0 + 0.12 * temporal * (x - disc.cx) / disc.rx
    disc_colour = rim_colour[:, None, None] * np.clip(side, 0.8, 1.2)[None]
    img = img * (1 - disc_alpha) + disc_colour * disc_alpha

    # Cup pallor: paler and brighter, with a gradual edge. Pallor is only a cue: its extent and
    # centre do not quite match the cup contour, so no threshold recovers the cup exactly.
    pallor = cup.scaled(
        rng.uniform(0.9, 1.02),
        rng.normal(0.0, 0.04) * cup.rx,
        rng.normal(0.0, 0.04) * cup.ry,
    )
    pallor_alpha = _sigmoid((1.0 - pallor.rho(x, y)) / rng.uniform(0.12, 0.25))
    pallor_alpha *= rng.uniform(0.55, 0.9) * disc_alpha
    pallor_colour = np.array([1.0, 0.88, 0.68]) * rng.uniform(0.92, 1.0, size=3)
    img = img * (1 - pallor_alpha) + pallor_colour[:, None, None] * pallor_alpha

    # Vessels, drawn over the disc: they occlude parts of the rim and cup as in real images.
    vessels, darkness = _vessel_tree(rng, disc, cup, temporal, style.vessel_density)
    occlusion = _render_vessels(vessels, size, darkness)
    vessel_colour = np.array([0.42, 0.07, 0.05])[:, None, None] * rng.uniform(0.8, 1.2)
    img = img * (1 - occlusion) + vessel_colour * occlusion

    # Illumination: falloff from a centre near the disc plus a gentle gradient.
    lx, ly = 0.5 + rng.normal(0, 0.1), 0.5 + rng.normal(0, 0.1)
    r2 = ((x - lx) ** 2 + (y - ly) ** 2) / 0.5
    gradient = 1.0 + rng.normal(0, 0.06) * (x - 0.5) + rng.normal(0, 0.06) * (y - 0.5)
    img = img * ((1.0 - style.vignetting * r2) * gradient)[None]

    image = _apply_site(rng, img, style, size)
    return image, labels


def _apply_site(rng: np.random.Generator, img: np.ndarray, style: SiteStyle, size: int):
    """Camera and acquisition: colour cast, exposure, contrast, gamma, blur, noise -> uint8."""
    img = img * np.asarray(style.colour_gain)[:, None, None]
    img = img * style.brightness * rng.uniform(0.9, 1.1)  # per-visit exposure varies too
    mean = img.mean()
    img = np.clip(mean + style.contrast * (img - mean), 0.0, 1.0) ** style.gamma
    if style.blur_sigma > 0:
        sigma = style.blur_sigma * size / 128
        img = ndimage.gaussian_filter(img, sigma=(0, sigma, sigma), mode="nearest")
    img = img + rng.normal(0.0, style.noise_sigma, size=img.shape)
    img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img.transpose(1, 2, 0))


# --------------------------------------------------------------------------------------------
# Writing sites
# --------------------------------------------------------------------------------------------


def _case_rng(seed: int, site: int, split: str, index: int) -> np.random.Generator:
    # crc32 is stable across processes, unlike hash(str).
    return np.random.default_rng([seed, site, zlib.crc32(split.encode()), index])


def write_fundus_sites(
    root: Path,
    *,
    num_sites: int = 3,
    cases: dict[str, int] | None = None,
    size: int = 128,
    seed: int = 0,
    progress: bool = False,
    train_slices_per_site: int | None = None,
) -> list[Path]:
    """Write a synthetic multi-site fundus dataset in the generic folder layout.

    Writes ``root/site-<k>/<split>/images/case-<NNNN>.png`` (RGB) and
    ``root/site-<k>/<split>/masks/case-<NNNN>.png`` (label map: 1 = disc rim, 2 = cup) for each
    site ``k`` (styles from :func:`default_site_styles`) and split, plus ``root/site-<k>/site.json``
    describing the style, counts and classes ``{"disc": [1, 2], "cup": [2]}``. Stale
    ``case-*.png`` files from an earlier run with larger counts are removed.

    Args:
        root: Output folder; created if missing.
        num_sites: Number of sites (hospitals).
        cases: Cases per split, default ``{"train": 40, "val": 8, "test": 12}``.
        size: Image side length in pixels.
        seed: Base seed; the same seed gives byte-identical files.
        progress: Show a progress bar.
        train_slices_per_site: Training slices (cases: one 2-D image each) per site, the DP
            unit; sets ``cases["train"]`` (default: ``cases``' own, 40 by default). Cases are
            seeded per index, so 400 slices are the 40 of the default and 360 more.

    Returns:
        The site folders, in site order.
    """
    cases = dict(DEFAULT_CASES if cases is None else cases)
    if train_slices_per_site is not None:
        if train_slices_per_site < 0:
            raise ValueError(f"train_slices_per_site is negative: {train_slices_per_site}")
        cases["train"] = int(train_slices_per_site)
    for split, count in cases.items():
        if not split or Path(split).name != split or split.startswith("."):
            raise ValueError(f"split name {split!r} is not a plain folder name")
        if count < 0:
            raise ValueError(f"case count for split {split!r} is negative: {count}")
    styles = default_site_styles(num_sites)
    root = Path(root)

    jobs = [(k, split, i) for k in range(num_sites) for split, n in cases.items() for i in range(n)]
    for k, style in enumerate(styles):
        site_dir = root / f"site-{k}"
        _prepare_splits(site_dir, cases)
        meta = {
            "site": k,
            "style": dataclasses.asdict(style),
            "size": size,
            "seed": seed,
            "cases": cases,
            "classes": FUNDUS_CLASSES,
            "labels": {"0": "background", "1": "disc rim", "2": "cup"},
        }
        (site_dir / "site.json").write_text(json.dumps(meta, indent=2) + "\n")

    for k, split, i in _maybe_progress(jobs, progress):
        image, labels = make_fundus_case(_case_rng(seed, k, split, i), styles[k], size)
        _write_case(root / f"site-{k}" / split, i, image, labels)
    return [root / f"site-{k}" for k in range(num_sites)]


def write_public_fundus(
    root: Path, n: int, *, val: int = 0, size: int = 128, seed: int = 0, progress: bool = False
) -> Path:
    """Write a public pretraining set: ``n`` training and ``val`` validation fundus cases.

    Writes ``root/train/{images,masks}/case-<NNNN>.png`` (and ``root/val/...``) in the generic
    layout, with the classes of the sites, and ``root/public.json``. The cases are disjoint from
    every site's of :func:`write_fundus_sites` (their own seed range) and drawn from a shifted
    distribution, :data:`PUBLIC_STYLE`: a model pretrained on them starts federated fine-tuning
    from somewhere sensible, without having seen any site's images or their style.

    Returns:
        ``root``.
    """
    if n < 1 or val < 0:
        raise ValueError(f"the public set needs n >= 1 and val >= 0, got n={n}, val={val}")
    root = Path(root)
    cases = {"train": n, "val": val}
    _prepare_splits(root, cases)
    meta = {
        "public": True,
        "style": dataclasses.asdict(PUBLIC_STYLE),
        "size": size,
        "seed": seed,
        "cases": cases,
        "classes": FUNDUS_CLASSES,
        "labels": {"0": "background", "1": "disc rim", "2": "cup"},
    }
    (root / "public.json").write_text(json.dumps(meta, indent=2) + "\n")
    jobs = [(split, i) for split, count in cases.items() for i in range(count)]
    for split, i in _maybe_progress(jobs, progress):
        # Each case from (seed, public "site", "public/<split>", index): no site's seed.
        rng = _case_rng(seed, _PUBLIC_SITE, f"public/{split}", i)
        image, labels = make_fundus_case(rng, PUBLIC_STYLE, size)
        _write_case(root / split, i, image, labels)
    return root


def _prepare_splits(folder: Path, cases: dict[str, int]) -> None:
    """``folder/<split>/{images,masks}`` for each split, without cases beyond its count."""
    for split, count in cases.items():
        for sub in ("images", "masks"):
            split_folder = folder / split / sub
            split_folder.mkdir(parents=True, exist_ok=True)
            _remove_stale(split_folder, count)


def _write_case(split_dir: Path, index: int, image: np.ndarray, labels: np.ndarray) -> None:
    name = f"case-{index:04d}.png"
    Image.fromarray(image).save(split_dir / "images" / name, format="PNG")
    Image.fromarray(labels).save(split_dir / "masks" / name, format="PNG")


def _remove_stale(folder: Path, count: int) -> None:
    for path in folder.iterdir():
        if _CASE_NAME.fullmatch(path.name) and int(path.stem[5:]) >= count:
            path.unlink()


def _maybe_progress(jobs: list, progress: bool) -> Iterator:
    if not progress:
        return iter(jobs)
    from tqdm import tqdm  # only needed for interactive use

    return iter(tqdm(jobs, desc="synthetic fundus", unit="case"))
