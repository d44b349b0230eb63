"""Tests of the synthetic fundus sites, the generic layout's IO and the prediction writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from medsegdiff_core.data import (
    FUNDUS_CLASSES,
    PlanarDataset,
    channels_to_labels,
    default_site_styles,
    labels_to_channels,
    make_fundus_case,
    read_display_image,
    read_image,
    read_label_map,
    resize_label_map,
    resize_probability,
    write_fundus_sites,
    write_label_map,
    write_overlay,
    write_uncertainty,
)
from medsegdiff_core.data.check import check_dataset
from medsegdiff_core.data.layouts import find_layout_cases
from medsegdiff_core.errors import DataError

BRATS_CLASSES = {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}
SMALL = {"train": 4, "val": 1, "test": 2}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_fundus_sites(tmp_path_factory.mktemp("sites"), cases=SMALL, size=64, seed=3)


def _cases(style_index: int, count: int, size: int = 96) -> list[tuple[np.ndarray, np.ndarray]]:
    style = default_site_styles(3)[style_index]
    return [
        make_fundus_case(np.random.default_rng([11, style_index, i]), style, size)
        for i in range(count)
    ]


def _vertical_cdr(labels: np.ndarray) -> float:
    cup_rows = np.flatnonzero((labels == 2).any(axis=1))
    disc_rows = np.flatnonzero((labels > 0).any(axis=1))
    return len(cup_rows) / len(disc_rows)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# --------------------------------------------------------------------------------------------
# Synthetic generator
# --------------------------------------------------------------------------------------------


def test_synthetic_layout_counts_and_metadata(sites: list[Path]) -> None:
    assert [p.name for p in sites] == ["site-0", "site-1", "site-2"]
    for site in sites:
        for split, count in SMALL.items():
            images = sorted((site / split / "images").iterdir())
            masks = sorted((site / split / "masks").iterdir())
            assert [p.name for p in images] == [f"case-{i:04d}.png" for i in range(count)]
            assert [p.name for p in masks] == [p.name for p in images]
        meta = json.loads((site / "site.json").read_text())
        assert meta["classes"] == {"disc": [1, 2], "cup": [2]}
        assert meta["cases"] == SMALL
        assert "noise_sigma" in meta["style"]
    image = Image.open(sites[0] / "train" / "images" / "case-0000.png")
    mask = Image.open(sites[0] / "train" / "masks" / "case-0000.png")
    assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", (64, 64), "L", (64, 64))


def test_synthetic_is_deterministic_and_counts_are_independent(tmp_path: Path) -> None:
    first = write_fundus_sites(tmp_path / "a", num_sites=2, cases={"train": 3}, size=48, seed=7)
    second = write_fundus_sites(tmp_path / "b", num_sites=2, cases={"train": 3}, size=48, seed=7)
    more = write_fundus_sites(tmp_path / "c", num_sites=2, cases={"train": 5}, size=48, seed=7)
    other = write_fundus_sites(tmp_path / "d", num_sites=2, cases={"train": 3}, size=48, seed=8)
    for a, b, c, d in zip(first, second, more, other, strict=True):
        for path in sorted(a.rglob("*.png")):
            rel = path.relative_to(a)
            assert path.read_bytes() == (b / rel).read_bytes()
            assert path.read_bytes() == (c / rel).read_bytes()  # adding cases changes no others
        image = "train/images/case-0000.png"
        assert (a / image).read_bytes() != (d / image).read_bytes()
    # Rewriting with fewer cases removes the stale ones.
    write_fundus_sites(tmp_path / "c", num_sites=2, cases={"train": 2}, size=48, seed=7)
    assert len(list((tmp_path / "c" / "site-0" / "train" / "images").iterdir())) == 2


def test_synthetic_labels_are_a_nested_disc_and_cup() -> None:
    for style_index in range(3):
        for image, labels in _cases(style_index, 6):
            assert image.dtype == np.uint8 and image.shape == (96, 96, 3)
            assert labels.dtype == np.uint8 and labels.shape == (96, 96)
            assert set(np.unique(labels)) == {0, 1, 2}
            cup, disc = labels == 2, labels > 0
            # The cup lies inside the disc with rim all round: it never touches background.
            assert not (ndimage.binary_dilation(cup) & ~disc).any()
            # The disc is a single blob near the crop centre.
            assert ndimage.label(disc)[1] == 1
            cy, cx = ndimage.center_of_mass(disc)
            assert abs(cy - 48) < 15 and abs(cx - 48) < 15


def test_sites_differ_measurably() -> None:
    clean, dark, noisy = (_cases(k, 12) for k in range(3))

    def mean_rgb(cases: list) -> np.ndarray:
        return np.mean([img.reshape(-1, 3).mean(axis=0) for img, _ in cases], axis=0)

    def contrast(cases: list) -> float:
        return float(np.mean([img.mean(axis=-1).std() for img, _ in cases]))

    def noise(cases: list) -> float:
        # High-frequency energy: residual after a small blur, in flat background regions.
        residuals = []
        for img, labels in cases:
            grey = img.mean(axis=-1)
            residuals.append(np.abs(grey - ndimage.uniform_filter(grey, 3))[labels == 0].mean())
        return float(np.mean(residuals))

    def cdr(cases: list) -> float:
        return float(np.mean([_vertical_cdr(labels) for _, labels in cases]))

    assert mean_rgb(clean).mean() > 1.5 * mean_rgb(dark).mean()  # site 1 is dark
    assert contrast(clean) > 1.5 * contrast(dark)  # ... and low-contrast
    # Colour cast: site 1 has relatively more green/blue than red.
    assert mean_rgb(dark)[2] / mean_rgb(dark)[0] > 1.5 * mean_rgb(clean)[2] / mean_rgb(clean)[0]
    assert noise(noisy) > 2 * noise(clean)  # site 2 is noisy
    assert cdr(noisy) > cdr(clean) + 0.08  # ... and has larger cups


def test_cup_is_not_trivially_thresholdable() -> None:
    """No single intensity threshold, even picked per image with the answer in hand, gives the
    cup with Dice > 0.9: the pallor is soft, offset, and overlaid by vessels."""
    best = []
    for style_index in range(3):
        for image, labels in _cases(style_index, 5):
            cup = labels == 2
            channels = [image.mean(axis=-1), *(image[..., c] for c in range(3))]
            best.append(
                max(
                    _dice(channel >= t, cup) for channel in channels for t in np.unique(channel)[1:]
                )
            )
    assert max(best) < 0.9
    assert np.mean(best) > 0.3  # ... yet the pallor is a real cue: the task is learnable


def test_more_sites_than_base_styles_are_distinct() -> None:
    styles = default_site_styles(6)
    assert len(styles) == 6 and len(set(styles)) == 6
    assert default_site_styles(6) == styles  # deterministic
    for style in styles:
        assert style.disc_radius[0] < style.disc_radius[1]
        assert 0 <= style.glaucoma_prevalence <= 1


# --------------------------------------------------------------------------------------------
# Folder IO
# --------------------------------------------------------------------------------------------


def test_segmentation_folder_round_trip(sites: list[Path]) -> None:
    data = PlanarDataset(sites[1] / "train", "generic", FUNDUS_CLASSES, 32, in_channels=3)
    assert len(data) == SMALL["train"] and data.has_masks
    item = data[0]
    assert item["name"] == "case-0000" and item["original_size"] == (64, 64)
    image, mask = item["image"], item["mask"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (2, 32, 32) and mask.dtype == torch.float32
    assert torch.allclose(image.mean(dim=(1, 2)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(image.std(dim=(1, 2), unbiased=False), torch.ones(3), atol=1e-3)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    disc, cup = mask[0].bool(), mask[1].bool()
    assert cup.any() and (cup & ~disc).sum() == 0  # disc contains the cup


def test_segmentation_folder_at_64px_keeps_masks_exact(sites: list[Path]) -> None:
    data = PlanarDataset(sites[0] / "val", "generic", FUNDUS_CLASSES, 64, in_channels=3)
    labels = read_label_map(sites[0] / "val" / "masks" / "case-0000.png")
    expected = labels_to_channels(labels, FUNDUS_CLASSES, source="test")
    assert np.array_equal(data[0]["mask"].numpy(), expected)


def test_augmentation_flips_image_and_mask_together(sites: list[Path]) -> None:
    plain = PlanarDataset(sites[0] / "train", "generic", FUNDUS_CLASSES, 32, in_channels=3)
    augmented = PlanarDataset(
        sites[0] / "train", "generic", FUNDUS_CLASSES, 32, in_channels=3, augment=True, seed=1
    )
    flips = 0
    for _ in range(12):
        item = augmented[0]
        mask = item["mask"]
        if torch.equal(mask, plain[0]["mask"].flip(-1)) and not torch.equal(mask, plain[0]["mask"]):
            flips += 1
            reference = plain[0]["image"].flip(-1)
        else:
            assert torch.equal(mask, plain[0]["mask"])
            reference = plain[0]["image"]
        # Jitter is a small per-channel gain and offset: strongly correlated with the original.
        corr = torch.corrcoef(torch.stack([item["image"].flatten(), reference.flatten()]))[0, 1]
        assert corr > 0.99
    assert 0 < flips < 12


def test_grey_image_is_repeated_for_a_colour_model(tmp_path: Path) -> None:
    _write_case(tmp_path, "a", np.full((20, 24), 100, np.uint8), np.zeros((20, 24), np.uint8))
    data = PlanarDataset(tmp_path, "generic", FUNDUS_CLASSES, 16, in_channels=3)
    assert data[0]["image"].shape == (3, 16, 16)
    assert data[0]["original_size"] == (20, 24)
    rgb = np.zeros((8, 8, 3), np.uint8)
    _write_case(tmp_path / "rgb", "a", rgb, np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"images/a\.png: image has 3 channel\(s\) but the model"):
        PlanarDataset(tmp_path / "rgb", "generic", FUNDUS_CLASSES, 8, in_channels=1)


def test_read_image_modes_and_scaling(tmp_path: Path) -> None:
    grey16 = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    assert image.shape == (1, 2, 2) and image.dtype == np.float32
    assert image[0, 0, 1] == pytest.approx(1.0) and image[0, 1, 0] == pytest.approx(0.5, abs=1e-4)
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert image.shape == (3, 3, 4) and image[0].max() == pytest.approx(1.0)


def test_labels_channels_round_trip_fundus_and_brats() -> None:
    rng = np.random.default_rng(0)
    for classes, values in ((FUNDUS_CLASSES, [0, 1, 2]), (BRATS_CLASSES, [0, 1, 2, 4])):
        labels = rng.choice(values, size=(17, 23))
        channels = labels_to_channels(labels, classes, source="x")
        assert channels.shape == (len(classes), 17, 23) and channels.dtype == np.float32
        back = channels_to_labels(channels.astype(bool), classes)
        assert back.dtype == np.uint8 and np.array_equal(back, labels)
    # Inconsistent channels resolve to the nearest label, lower label on ties.
    odd = np.array([[[0]], [[1]]], dtype=bool)  # cup without disc: as far from 0 as from 2
    assert channels_to_labels(odd, FUNDUS_CLASSES)[0, 0] == 0
    tc_only = np.array([[[0]], [[1]], [[0]]], dtype=bool)  # BraTS: nearest are 0, 1 (dist 1)
    assert channels_to_labels(tc_only, BRATS_CLASSES)[0, 0] == 0


def test_monai_transforms_give_the_written_out_numbers() -> None:
    # Label maps are resized and volumes clipped with MONAI; these are the formulas they replace.
    import torch.nn.functional as F

    from medsegdiff_core.data.layouts import _normalise, _normalise_volume, _resize_labels

    rng = np.random.default_rng(5)
    for _ in range(5):
        h, w = rng.integers(5, 90, 2)
        size = int(rng.integers(4, 70))
        labels = rng.integers(0, 5, (h, w))
        nearest = F.interpolate(
            torch.from_numpy(labels.astype(np.float32))[None, None],
            (size, size),
            mode="nearest-exact",
        )[0, 0].to(torch.int64)
        assert np.array_equal(_resize_labels(labels, size), nearest.numpy())
        volume = rng.normal(0, 500, (*rng.integers(6, 40, 2), int(rng.integers(3, 9))))
        clipped = np.clip(volume, *np.percentile(volume, [0.5, 99.5]))
        whole = (clipped - clipped.mean()) / (clipped.std() + 1e-6)
        normed = _normalise_volume(volume.astype(np.float32), "volume")
        assert normed.dtype == np.float32
        np.testing.assert_allclose(normed, whole, rtol=0, atol=1e-5)
    # Why the z-scores are not MONAI's NormalizeIntensity: a flat image or volume stays near 0
    # (MONAI's: +-1, its float32 rounding noise divided by a std of ~1e-8).
    assert _normalise(torch.full((1, 4, 4), 0.3)).abs().max() < 0.05
    flat = np.full((240, 240, 155), 0.3, np.float32)
    assert np.abs(_normalise_volume(flat, "volume")).max() < 0.05


# --------------------------------------------------------------------------------------------
# Bad input: every message names the file
# --------------------------------------------------------------------------------------------


def _write_case(
    folder: Path, name: str, image: np.ndarray, labels: np.ndarray | None, suffix: str = ".png"
) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{name}{suffix}")
    if labels is not None:
        Image.fromarray(labels).save(folder / "masks" / f"{name}.png")


def _good_case(folder: Path, name: str, size: int = 32) -> None:
    image, labels = make_fundus_case(np.random.default_rng(0), default_site_styles(1)[0], size)
    _write_case(folder, name, image, labels)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    _good_case(tmp_path, "case-1")
    path = tmp_path / "images" / "case-1.png"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError) as error:
        read_image(path)
    assert _one_line(error).startswith(f"{path}: cannot read image")
    with pytest.raises(DataError, match="case-1.png: cannot read image"):
        PlanarDataset(tmp_path, "generic", FUNDUS_CLASSES, 16, in_channels=3)


def test_non_image_with_png_suffix_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(DataError) as error:
        read_image(path)
    assert _one_line(error).startswith(f"{path}: cannot read image")
    with pytest.raises(DataError, match="notes.png"):
        read_label_map(path)


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    image, _ = make_fundus_case(np.random.default_rng(1), default_site_styles(1)[0], 64)
    path = tmp_path / "scan.jpg"
    Image.fromarray(image).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(DataError) as error:
        read_image(path)
    assert _one_line(error).startswith(f"{path}: cannot read image")


def test_mask_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    _write_case(
        tmp_path, "case-0003", np.zeros((128, 128, 3), np.uint8), np.zeros((120, 128), np.uint8)
    )
    mask = tmp_path / "masks" / "case-0003.png"
    with pytest.raises(DataError) as error:
        PlanarDataset(tmp_path, "generic", FUNDUS_CLASSES, 32, in_channels=3)
    assert _one_line(error) == f"{mask}: mask is 128x120 but its image is 128x128"


def test_unknown_label_value_names_the_mask_and_value(tmp_path: Path) -> None:
    labels = np.zeros((16, 16), np.uint8)
    labels[4:8, 4:8] = 7
    _write_case(tmp_path, "a", np.zeros((16, 16, 3), np.uint8), labels)
    with pytest.raises(DataError) as error:
        PlanarDataset(tmp_path, "generic", FUNDUS_CLASSES, 16, in_channels=3)
    message = _one_line(error)
    assert message.startswith(f"{tmp_path / 'masks' / 'a.png'}: label value(s) 7 not in any class")


def test_colour_mask_is_rejected_unless_grey(tmp_path: Path) -> None:
    grey_as_rgb = np.repeat(np.array([[0, 1], [2, 1]], np.uint8)[..., None], 3, axis=-1)
    Image.fromarray(grey_as_rgb).save(tmp_path / "ok.png")
    assert np.array_equal(read_label_map(tmp_path / "ok.png"), [[0, 1], [2, 1]])
    colour = grey_as_rgb.copy()
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad\.png: mask is a colour image"):
        read_label_map(tmp_path / "bad.png")


def test_image_without_mask(tmp_path: Path) -> None:
    _good_case(tmp_path, "a")
    _write_case(tmp_path, "b", np.zeros((32, 32, 3), np.uint8), None)
    with pytest.raises(DataError) as error:
        find_layout_cases(tmp_path, "generic", require_masks=True)
    # one line per image (not one for the folder), so data.skip_cases can leave it out
    assert _one_line(error) == f"{tmp_path / 'images' / 'b.png'}: image has no mask"
    data = PlanarDataset(
        tmp_path, "generic", FUNDUS_CLASSES, 16, in_channels=3, require_masks=False
    )
    assert [c.mask_path is None for c in data.cases] == [False, True]
    assert not data.has_masks
    assert data[1]["mask"].shape == (2, 16, 16) and data[1]["mask"].sum() == 0


def test_inference_folder_without_masks_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "x.tif")
    cases = find_layout_cases(tmp_path, "generic", require_masks=False)
    assert [(c.name, c.mask_path) for c in cases] == [("x", None)]
    with pytest.raises(DataError, match="masks folder does not exist"):
        find_layout_cases(tmp_path, "generic", require_masks=True)


def test_mask_without_image_and_duplicate_stems(tmp_path: Path) -> None:
    _good_case(tmp_path, "a")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "orphan.png")
    with pytest.raises(DataError) as error:
        find_layout_cases(tmp_path, "generic", require_masks=False)
    assert _one_line(error).startswith(f"{tmp_path / 'masks' / 'orphan.png'}: mask has no image")
    (tmp_path / "masks" / "orphan.png").unlink()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    with pytest.raises(DataError, match=r"images/a\.(png|jpg): same name as a\.(png|jpg)"):
        find_layout_cases(tmp_path, "generic", require_masks=True)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        find_layout_cases(missing, "generic", require_masks=True)
    assert _one_line(error) == f"{missing}: data folder does not exist"
    with pytest.raises(DataError, match="no images/ folder"):
        find_layout_cases(tmp_path, "generic", require_masks=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError) as error:
        PlanarDataset(tmp_path, "generic", FUNDUS_CLASSES, 16, in_channels=3)
    assert _one_line(error).startswith(f"{tmp_path / 'images'}: no images found")


def test_check_folder_reports_every_problem_at_once(tmp_path: Path) -> None:
    _good_case(tmp_path, "good")
    _good_case(tmp_path, "truncated")
    truncated = tmp_path / "images" / "truncated.png"
    truncated.write_bytes(truncated.read_bytes()[:100])
    _write_case(
        tmp_path, "small-mask", np.zeros((32, 32, 3), np.uint8), np.zeros((30, 32), np.uint8)
    )
    bad_labels = np.zeros((32, 32), np.uint8)
    bad_labels[0, 0] = 9
    _write_case(tmp_path, "label-9", np.zeros((32, 32, 3), np.uint8), bad_labels)
    _write_case(tmp_path, "no-mask", np.zeros((32, 32, 3), np.uint8), None)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "orphan.png")

    problems = check_dataset(tmp_path, "generic", FUNDUS_CLASSES, 3).problems
    assert all("\n" not in p for p in problems)
    assert len(problems) == 5, problems
    joined = "\n".join(problems)
    for needle in ("orphan.png", "no-mask", "truncated.png", "small-mask.png", "label-9.png"):
        assert needle in joined
    assert "good" not in joined
    assert check_dataset(tmp_path / "nowhere", "generic", FUNDUS_CLASSES, 3).problems == [
        f"{tmp_path / 'nowhere'}: data folder does not exist"
    ]


def test_symlink_loop_in_images_is_a_problem_naming_it(tmp_path: Path) -> None:
    from medsegdiff_core.data.check import problem_kind, require_clean

    layout = "generic"
    _good_case(tmp_path, "a")
    loop = tmp_path / "images" / "b.png"
    loop.symlink_to(loop.name)  # points to itself: neither a file nor a folder
    dead = tmp_path / "masks" / "c.png"
    dead.symlink_to("gone.png")
    expected = [
        f"{loop}: symbolic link loops (it leads back to itself); fix or remove it",
        f"{dead}: broken symbolic link (its target gone.png does not exist)",
    ]
    report = check_dataset(tmp_path, layout)
    assert report.problems == expected and report.cases == 1
    assert [problem_kind(p) for p in report.problems] == ["broken_link", "broken_link"]
    with pytest.raises(DataError) as error:
        require_clean(tmp_path, layout, FUNDUS_CLASSES, 3)
    assert str(loop) in _one_line(error) and str(dead) in str(error.value)
    with pytest.raises(DataError, match=f"^{loop}: symbolic link loops"):
        find_layout_cases(tmp_path, layout, require_masks=False)
    # with the model's classes and channels given, the same
    assert check_dataset(tmp_path, "generic", FUNDUS_CLASSES, 3).problems == expected
    with pytest.raises(DataError, match=f"^{loop}: symbolic link loops"):
        find_layout_cases(tmp_path, "generic", require_masks=False)


def test_symlink_loop_in_volume_images_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    loop = tmp_path / "images" / "a.nii.gz"
    loop.symlink_to(loop.name)
    report = check_dataset(tmp_path, "volumes", require_masks=False)
    assert report.problems[0] == f"{loop}: symbolic link loops (it leads back to itself); " + (
        "fix or remove it"
    )
    assert len(report.problems) == 2 and "no volumes found" in report.problems[1]


def test_check_folder_of_a_clean_site_is_empty(sites: list[Path]) -> None:
    assert check_dataset(sites[2] / "test", "generic", FUNDUS_CLASSES, 3).problems == []


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def test_label_map_written_at_original_resolution(tmp_path: Path) -> None:
    small = np.zeros((32, 32), np.uint8)
    small[8:24, 8:24] = 1
    small[12:20, 12:20] = 2
    big = resize_label_map(small, (100, 75))
    assert big.shape == (100, 75) and big.dtype == np.uint8
    assert set(np.unique(big)) == {0, 1, 2}
    path = write_label_map(tmp_path / "out" / "pred" / "case.png", big)
    assert np.array_equal(read_label_map(path), big)

    prob = np.zeros((2, 32, 32), np.float32)
    prob[0, 8:24, 8:24] = 1.0
    resized = resize_probability(prob, (100, 75))
    assert resized.shape == (2, 100, 75) and resized.dtype == np.float32
    assert resized.min() >= 0.0 and resized.max() <= 1.0 + 1e-6


def test_uncertainty_and_overlay(tmp_path: Path) -> None:
    unc = np.linspace(0, 1, 40 * 30).reshape(40, 30)
    path = write_uncertainty(tmp_path / "u" / "case.png", unc)
    page = np.asarray(Image.open(path))
    assert page.ndim == 3 and page.shape[0] > 40 and page.shape[1] >= 30  # map + colour bar
    mapped = page[:40, :30].reshape(-1, 3)
    lut = _viridis()
    assert np.array_equal(mapped[0], lut[0]) and np.array_equal(mapped[-1], lut[-1])
    assert np.array_equal(mapped, lut[np.rint(unc.reshape(-1) * 255).astype(int)])

    image, labels = make_fundus_case(np.random.default_rng(2), default_site_styles(1)[0], 48)
    as_float = image.transpose(2, 0, 1) / 255.0
    for picture in (image, as_float, as_float[1:2]):  # uint8 RGB, float RGB, float grey
        out = Image.open(write_overlay(tmp_path / "o" / "case.png", picture, labels))
        assert out.mode == "RGB" and out.width >= 48 and out.height > 48  # picture + legend
        pixels = np.asarray(out)[:48, :48]
        assert np.array_equal(pixels[labels == 0], _as_uint8_rgb(picture)[labels == 0])
        assert not np.array_equal(pixels[labels == 2], _as_uint8_rgb(picture)[labels == 2])


def _viridis() -> np.ndarray:
    from matplotlib import colormaps

    return np.rint(colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _as_uint8_rgb(picture: np.ndarray) -> np.ndarray:
    if picture.dtype == np.uint8:
        return picture
    rgb = picture if picture.shape[0] == 3 else np.repeat(picture, 3, axis=0)
    return np.rint(rgb.transpose(1, 2, 0) * 255).astype(np.uint8)


def _peak_bytes_per_pixel(pixels: int, run) -> float:
    """Peak bytes NumPy allocates in ``run()``, per pixel (tracemalloc sees NumPy's buffers)."""
    import tracemalloc

    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1] / pixels
    finally:
        tracemalloc.stop()


def test_large_image_paths_use_uint8_and_float32_not_float64(tmp_path: Path) -> None:
    # An 8000 x 8000 photo costs 192 MB as uint8 and 1.5 GB per float64 copy: reading it, the
    # overlay, the label map and the uncertainty map must stay within a few bytes per pixel.
    size, pixels = 1000, 1000 * 1000
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    image = read_image(tmp_path / "big.png")
    assert image.dtype == np.float32 and image.shape == (3, size, size)
    assert np.array_equal(image, (rgb.transpose(2, 0, 1) / 255.0).astype(np.float32))
    shown = read_display_image(tmp_path / "big.png")
    assert shown.dtype == np.uint8 and np.array_equal(shown, rgb)
    labels = np.zeros((size, size), np.uint8)
    labels[200:800, 200:800], labels[400:600, 400:600] = 1, 2
    bits = labels_to_channels(labels, FUNDUS_CLASSES, source="x") > 0.5
    unc = rng.random((size, size), dtype=np.float32)

    assert _peak_bytes_per_pixel(pixels, lambda: read_image(tmp_path / "big.png")) < 20  # was 60
    assert _peak_bytes_per_pixel(pixels, lambda: read_display_image(tmp_path / "big.png")) < 8
    out = tmp_path / "o.png"
    assert _peak_bytes_per_pixel(pixels, lambda: write_overlay(out, shown, labels)) < 20  # was 100
    assert _peak_bytes_per_pixel(pixels, lambda: channels_to_labels(bits, FUNDUS_CLASSES)) < 4
    assert _peak_bytes_per_pixel(pixels, lambda: write_uncertainty(out, unc)) < 12  # was 24
    # the overlay drawn on the uint8 image is the one drawn on the float image
    from_uint8 = np.asarray(Image.open(write_overlay(tmp_path / "u8.png", shown, labels)))
    from_float = np.asarray(Image.open(write_overlay(tmp_path / "f32.png", image, labels)))
    assert np.array_equal(from_uint8, from_float)
    assert np.array_equal(from_uint8[:size, :size][labels == 0], rgb[labels == 0])


def test_channels_to_labels_lookup_matches_per_pixel_distances() -> None:
    rng = np.random.default_rng(4)
    many = {f"c{i}": [i + 1] for i in range(13)}  # more classes than the lookup table takes
    for classes in (FUNDUS_CLASSES, BRATS_CLASSES, {"a": [1, 3], "b": [2, 3], "c": [3]}, many):
        bits = rng.random((len(classes), 37, 41)) < 0.4
        labels = np.asarray([0, *sorted({v for vs in classes.values() for v in vs})])
        member = np.stack([np.isin(labels, v) for v in classes.values()], axis=1)  # (L, M)
        distance = (member[:, :, None, None] != bits[None]).sum(axis=1)  # (L, H, W)
        expected = labels[np.argmin(distance, axis=0)]  # ties: the lower label
        assert np.array_equal(channels_to_labels(bits, classes), expected)
