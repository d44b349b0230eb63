"""Does the uncertainty point at the errors? Case scores, pixel AUROC and calibration.

An ensemble's uncertainty is only worth showing a clinician if it singles out what is wrong:
the cases to check first, and within a case the pixels to look at. Three figures, per class,
measure that:

* **Case uncertainty score**: the fraction of the structure that the ensemble's members
  dispute, ``1 - |pixels every member marks| / |pixels any member marks|`` (0 when no member
  marks any pixel: nothing to dispute). Members are binarised at the inference threshold, at the
  model's resolution; a volume sums its slices' counts. Over the cases, the Spearman correlation
  between this score and Dice says whether the score ranks cases by how wrong they are (good:
  strongly negative).
* **Pixel AUROC**: how well the uncertainty map separates the pixels whose predicted label is
  wrong from the rest (1: every wrong pixel is more uncertain than every right one; 0.5: no
  better than chance), at the input's own resolution. Pooled over every pixel of every case, and
  per case (undefined, None, for a case with no wrong or no right pixel).
* **Expected calibration error** of the fused foreground probability: 15 equal-width bins of
  the probability, ``sum_b n_b / N * |mean probability in b - fraction of foreground in b|``.

Everything is accumulated as histograms (2048 uncertainty bins for the AUROC, which makes it
exact up to ties within a bin), so a folder of large volumes is scored in bounded memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.metrics.calibration import calibration_binning

ECE_BINS = 15
_AUROC_BINS = 2048


@dataclass
class PixelReliability:
    """Streaming per-class histograms of uncertainty (wrong vs right pixels) and calibration."""

    num_classes: int
    wrong: np.ndarray = field(init=False)
    right: np.ndarray = field(init=False)
    probability_sum: np.ndarray = field(init=False)
    foreground_sum: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        m = self.num_classes
        self.wrong = np.zeros((m, _AUROC_BINS), np.int64)
        self.right = np.zeros((m, _AUROC_BINS), np.int64)
        self.probability_sum = np.zeros((m, ECE_BINS), np.float64)
        self.foreground_sum = np.zeros((m, ECE_BINS), np.float64)
        self.count = np.zeros((m, ECE_BINS), np.int64)

    def add(
        self,
        probability: np.ndarray,
        uncertainty: np.ndarray,
        predicted: np.ndarray,
        truth: np.ndarray,
    ) -> None:
        """Count one image (or slice): every argument (M, ...) on the same grid.

        Args:
            probability: fused foreground probability in [0, 1].
            uncertainty: uncertainty map; values in [0, 1] (larger ones fall in the top bin).
            predicted: bool, the predicted mask channels.
            truth: bool, the reference mask channels.
        """
        m = self.num_classes
        u = np.clip(uncertainty.reshape(m, -1), 0.0, 1.0)
        u_bin = np.minimum((u * _AUROC_BINS).astype(np.int64), _AUROC_BINS - 1)
        is_wrong = predicted.reshape(m, -1) != truth.reshape(m, -1)
        for j in range(m):
            wrong = np.bincount(u_bin[j], weights=is_wrong[j], minlength=_AUROC_BINS)
            wrong = wrong.astype(np.int64)
            self.wrong[j] += wrong
            self.right[j] += np.bincount(u_bin[j], minlength=_AUROC_BINS) - wrong
        # MONAI's binning ([left, right) bins, 1.0 in the last); its per-bin means become sums
        # so that images can be pooled.
        mean_p, mean_fg, counts = calibration_binning(
            torch.from_numpy(np.clip(probability.reshape(1, m, -1), 0.0, 1.0)).double(),
            torch.from_numpy(truth.reshape(1, m, -1)).double(),
            num_bins=ECE_BINS,
        )
        counts = counts[0].numpy()
        self.count += counts.astype(np.int64)
        self.probability_sum += np.nan_to_num(mean_p[0].numpy()) * counts
        self.foreground_sum += np.nan_to_num(mean_fg[0].numpy()) * counts

    def merge(self, other: PixelReliability) -> None:
        """Add another accumulator's counts to this one (pooling cases)."""
        for name in ("wrong", "right", "probability_sum", "foreground_sum", "count"):
            getattr(self, name)[...] += getattr(other, name)

    def auroc(self) -> list[float | None]:
        """Per class, the AUROC of uncertainty for wrong pixels (None without both kinds)."""
        return [_auroc(self.wrong[j], self.right[j]) for j in range(self.num_classes)]

    def ece(self) -> list[float | None]:
        """Per class, the expected calibration error of the foreground probability."""
        out: list[float | None] = []
        for j in range(self.num_classes):
            n = self.count[j].sum()
            if n == 0:
                out.append(None)
                continue
            gap = np.abs(self.probability_sum[j] - self.foreground_sum[j])  # n_b * |mean gap|
            out.append(float(gap.sum() / n))
        return out


def _auroc(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """AUROC from two histograms over the same ordered bins; ties count half (Mann-Whitney)."""
    n_pos, n_neg = int(positives.sum()), int(negatives.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.concatenate([[0], np.cumsum(negatives)[:-1]])
    wins = (positives * (below + 0.5 * negatives)).sum()
    return float(wins / (n_pos * n_neg))


@dataclass
class CaseAgreement:
    """Per class, pixels every member marks and pixels any member marks, summed over a case."""

    num_classes: int
    agreed: np.ndarray = field(init=False)
    marked: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.agreed = np.zeros(self.num_classes, np.int64)
        self.marked = np.zeros(self.num_classes, np.int64)

    def add(self, votes: np.ndarray) -> None:
        """Count one image (or slice): ``votes`` bool (K, M, ...), each member binarised."""
        k, m = votes.shape[:2]
        flat = votes.reshape(k, m, -1)
        self.agreed += flat.all(axis=0).sum(axis=-1)
        self.marked += flat.any(axis=0).sum(axis=-1)

    def score(self) -> list[float]:
        """The case uncertainty score per class: the disputed fraction of the structure."""
        return [
            0.0 if marked == 0 else 1.0 - float(agreed) / float(marked)
            for agreed, marked in zip(self.agreed, self.marked, strict=True)
        ]


@dataclass
class CaseReliability:
    """One case's uncertainty figures, per class."""

    score: list[float]
    auroc: list[float | None]
    ece: list[float | None]


def reliability_summary(
    cases: list[CaseReliability],
    dice: np.ndarray,
    pooled: PixelReliability,
    class_names: list[str],
) -> dict[str, Any]:
    """Per class: Spearman(case score, Dice) with its p-value, pooled pixel AUROC and ECE, and
    the means of the per-case values; JSON-serialisable, None where undefined.

    Args:
        cases: per-case figures, in the order of ``dice``'s rows.
        dice: (B, M) Dice of the same cases.
        pooled: every case's pixels together.
        class_names: the M class names.
    """
    from scipy.stats import spearmanr

    scores = np.array([c.score for c in cases], dtype=np.float64).reshape(len(cases), -1)
    auroc, ece = pooled.auroc(), pooled.ece()
    out: dict[str, Any] = {}
    for j, name in enumerate(class_names):
        rho, p_value = None, None
        column, target = scores[:, j], np.asarray(dice, np.float64)[:, j]
        # Spearman is undefined for fewer than 3 cases or a constant column.
        if len(cases) >= 3 and np.ptp(column) > 0 and np.ptp(target) > 0:
            result = spearmanr(column, target)
            rho, p_value = _rounded(result.statistic), _rounded(result.pvalue)
        out[name] = {
            "spearman_score_dice": rho,
            "spearman_p": p_value,
            "pixel_auroc": _rounded(auroc[j]),
            "ece": _rounded(ece[j]),
            "case_pixel_auroc_mean": _mean([c.auroc[j] for c in cases]),
            "case_ece_mean": _mean([c.ece[j] for c in cases]),
            "score_mean": _mean([c.score[j] for c in cases]),
        }
    return out


def case_reliability_row(case: CaseReliability, class_names: list[str]) -> dict[str, Any]:
    """A case's figures as ``{class: {"uncertainty_score", "pixel_auroc", "ece"}}``."""
    return {
        name: {
            "uncertainty_score": _rounded(case.score[j]),
            "pixel_auroc": _rounded(case.auroc[j]),
            "ece": _rounded(case.ece[j]),
        }
        for j, name in enumerate(class_names)
    }


def _rounded(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 6)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return _rounded(sum(kept) / len(kept)) if kept else None
