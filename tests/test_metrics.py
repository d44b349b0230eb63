"""Segmentation metrics on hand-checkable masks, empty-mask conventions, summary and table."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medsegdiff_core.errors import ConfigError, DataError, MedSegDiffError
from medsegdiff_core.metrics import (
    CaseMetrics,
    case_rows,
    format_table,
    segmentation_metrics,
    summarize,
)


def square(top: int, left: int, size: int = 10, shape: tuple[int, int] = (32, 32)) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[top : top + size, left : left + size] = True
    return mask


def pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two single masks as one case with one class: (1, 1, *spatial)."""
    return a[None, None], b[None, None]


def test_dice_iou_of_offset_squares() -> None:
    # Shifted 3 px sideways: overlap 10 x 7 = 70 px; Dice 2*70/200, IoU 70/(200-70).
    m = segmentation_metrics(*pair(square(5, 5), square(5, 8)))
    assert m.dice.item() == pytest.approx(0.7)
    assert m.iou.item() == pytest.approx(7 / 13)
    # Shifted (2, 3): overlap 8 x 7 = 56 px; Dice 112/200, IoU 56/144.
    m = segmentation_metrics(*pair(square(5, 5), square(7, 8)))
    assert m.dice.item() == pytest.approx(0.56)
    assert m.iou.item() == pytest.approx(56 / 144)


@pytest.mark.parametrize("shift", [(0, 3), (3, 0)])
def test_hd95_of_square_shifted_by_three(shift: tuple[int, int]) -> None:
    # MONAI's boundary is the 36-pixel ring of the 10x10 square. For the shift (0, 3), the
    # distances from A's ring to B's ring are: left column 8 x 3, top and bottom rows
    # 3, 2, 1, 0 x 7 each, right column 1, 2, 3, 3, 3, 3, 2, 1 (B's top/bottom rows are closer
    # near the corners). That is 14 values of 3 out of 36 - more than the top 5% - so the 95th
    # percentile is 3, and by symmetry the same holds from B to A: HD95 = HD = 3.
    m = segmentation_metrics(*pair(square(5, 5), square(5 + shift[0], 5 + shift[1])))
    assert m.hd95.item() == pytest.approx(3.0)


def test_identical_masks_are_perfect() -> None:
    m = segmentation_metrics(*pair(square(5, 5), square(5, 5)))
    assert (m.dice.item(), m.iou.item(), m.hd95.item()) == (1.0, 1.0, 0.0)


def test_empty_mask_conventions() -> None:
    empty, full = torch.zeros(32, 32, dtype=torch.bool), square(5, 5)
    both_empty = segmentation_metrics(*pair(empty, empty))
    assert (both_empty.dice.item(), both_empty.iou.item(), both_empty.hd95.item()) == (1, 1, 0)
    for pred, target in [(empty, full), (full, empty)]:
        one_empty = segmentation_metrics(*pair(pred, target))
        assert (one_empty.dice.item(), one_empty.iou.item()) == (0.0, 0.0)
        assert math.isnan(one_empty.hd95.item())


def test_summary_counts_undefined_hd95() -> None:
    empty, a, b = torch.zeros(32, 32, dtype=torch.bool), square(5, 5), square(5, 8)
    pred = torch.stack([a, empty, empty])[:, None]
    target = torch.stack([b, a, empty])[:, None]
    summary = summarize(segmentation_metrics(pred, target, class_names=["disc"]))
    disc = summary["per_class"]["disc"]
    assert summary["num_cases"] == 3
    assert disc["dice"] == pytest.approx((0.7 + 0 + 1) / 3)
    assert disc["iou"] == pytest.approx((7 / 13 + 0 + 1) / 3)
    assert disc["hd95"] == pytest.approx((3 + 0) / 2)  # the undefined case is left out...
    assert disc["hd95_undefined"] == 1  # ...and reported
    assert summary["mean"]["hd95_undefined"] == 1


def test_spacing_scales_hd95_per_axis() -> None:
    a, b = pair(square(5, 5), square(5, 8))  # shifted along the last (W) axis
    assert segmentation_metrics(a, b, spacing=(2.0, 2.0)).hd95.item() == pytest.approx(6.0)
    # Spacing is in tensor axis order: only the W spacing matters for this shift.
    assert segmentation_metrics(a, b, spacing=(4.0, 0.5)).hd95.item() == pytest.approx(1.5)


def test_three_dimensional_masks() -> None:
    a = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    b = a.clone()
    a[0, 0, 4:10, 4:10, 4:10] = True
    b[0, 0, 6:12, 4:10, 4:10] = True  # shifted by 2 along D
    m = segmentation_metrics(a, b, spacing=(2.5, 1.0, 1.0))
    assert m.dice.item() == pytest.approx(2 * 4 * 36 / (2 * 216))
    assert m.hd95.item() == pytest.approx(5.0)


def test_multi_class_values_are_separate() -> None:
    a, b, far = square(5, 5), square(5, 8), square(20, 20)
    pred = torch.stack([a, a])[None]  # (1, 2, H, W)
    target = torch.stack([b, a])[None]
    m = segmentation_metrics(pred, target, class_names=["disc", "cup"])
    torch.testing.assert_close(m.dice, torch.tensor([[0.7, 1.0]]))
    torch.testing.assert_close(m.hd95, torch.tensor([[3.0, 0.0]]))
    # Two cases and two classes, each with its own value.
    pred = torch.stack([torch.stack([a, a]), torch.stack([far, a])])
    target = torch.stack([torch.stack([b, a]), torch.stack([a, b])])
    m = segmentation_metrics(pred, target.float())
    assert m.class_names == ("class0", "class1")
    torch.testing.assert_close(m.dice, torch.tensor([[0.7, 1.0], [0.0, 0.7]]))


def test_rejects_bad_input() -> None:
    with pytest.raises(MedSegDiffError, match=r"\(1, 1, 8, 8\).*\(1, 2, 8, 8\)"):
        segmentation_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(DataError, match="binary"):
        segmentation_metrics(torch.full((1, 1, 8, 8), 0.7), torch.zeros(1, 1, 8, 8))
    with pytest.raises(DataError):
        segmentation_metrics(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(DataError, match="spacing"):
        segmentation_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), spacing=(1.0,))
    with pytest.raises(ConfigError, match="class names"):
        segmentation_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), class_names="ab")


def table_fixture() -> tuple[CaseMetrics, dict]:
    empty, a, b = torch.zeros(32, 32, dtype=torch.bool), square(5, 5), square(5, 8)
    pred = torch.stack([torch.stack([a, a]), torch.stack([empty, a])])
    target = torch.stack([torch.stack([b, empty]), torch.stack([a, a])])
    metrics = segmentation_metrics(pred, target, class_names=["disc", "cup"])
    return metrics, summarize(metrics)


def test_summary_and_rows_are_json_ready() -> None:
    metrics, summary = table_fixture()
    rows = case_rows(metrics, ["img1", "img2"])
    text = json.dumps({"cases": rows, "summary": summary}, allow_nan=False)
    assert json.loads(text)["cases"][1]["per_class"]["disc"]["hd95"] is None
    assert summary["per_class"]["cup"]["hd95"] == 0.0
    assert summary["mean"]["dice"] == pytest.approx((0.35 + 0.5) / 2)
    # A class whose HD95 is undefined in every case has no HD95 mean (None, not NaN).
    only_missed = summarize(segmentation_metrics(*pair(square(5, 5), torch.zeros(32, 32))))
    assert only_missed["per_class"]["class0"]["hd95"] is None
    assert only_missed["mean"]["hd95"] is None


def test_summarize_batches_equals_summarize_concatenated() -> None:
    metrics, summary = table_fixture()
    halves = [
        CaseMetrics(metrics.dice[i : i + 1], metrics.iou[i : i + 1], metrics.hd95[i : i + 1], n)
        for i, n in [(0, metrics.class_names), (1, metrics.class_names)]
    ]
    assert summarize(halves) == summary


def test_format_table_is_aligned_and_complete() -> None:
    metrics, summary = table_fixture()
    table = format_table(case_rows(metrics, ["img1", "img2"]), summary)
    lines = table.splitlines()
    header, first = lines[0], lines[2]
    assert header.split()[:4] == ["case", "disc", "dice", "disc"]
    assert first.startswith("img1") and "0.7000" in first and "3.00" in first
    assert "n/a" in lines[3]
    assert lines[5].startswith("mean")
    assert len({len(line) for line in lines[:6]}) == 1  # all table lines equally wide
    assert "disc: hd95 undefined in 1 of 2 cases" in table
    assert "cup: hd95 undefined in 1 of 2 cases" in table
