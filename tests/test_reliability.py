"""The uncertainty figures (medsegdiff_core/reliability.py) against MONAI's and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import CalibrationErrorMetric, compute_roc_auc

from medsegdiff_core.reliability import (
    CaseAgreement,
    CaseReliability,
    PixelReliability,
    reliability_summary,
)


def _case(seed: int, m: int = 2, side: int = 48):
    rng = np.random.default_rng(seed)
    truth = rng.random((m, side, side)) < 0.3
    probability = np.clip(truth * 0.4 + rng.random(truth.shape) * 0.6, 0, 1).astype(np.float32)
    uncertainty = (1 - np.abs(probability - 0.5) * 2).astype(np.float32)
    return probability, uncertainty, probability >= 0.5, truth


def test_pooled_auroc_and_ece_match_monai_on_all_pixels_at_once() -> None:
    cases = [_case(seed) for seed in range(3)]
    pooled = PixelReliability(2)
    for case in cases:
        part = PixelReliability(2)
        part.add(*case)
        pooled.merge(part)
    columns = zip(*cases, strict=True)
    probability, uncertainty, predicted, truth = (np.concatenate(x, axis=1) for x in columns)
    wrong = predicted != truth
    for j in range(2):
        expected = compute_roc_auc(
            torch.from_numpy(uncertainty[j].ravel()).double(),
            torch.from_numpy(wrong[j].ravel()).double(),
        )
        assert pooled.auroc()[j] == pytest.approx(float(expected), abs=1e-4)
    ece = CalibrationErrorMetric(num_bins=15)(
        torch.from_numpy(probability[None]).double(), torch.from_numpy(truth[None]).double()
    )
    assert pooled.ece() == pytest.approx(ece[0].tolist(), abs=1e-6)  # MONAI: float32


def test_an_uncertainty_that_marks_exactly_the_errors_has_auroc_1_and_the_reverse_0() -> None:
    probability, _, predicted, truth = _case(7, m=1)
    wrong = (predicted != truth).astype(np.float32)
    perfect, backwards = PixelReliability(1), PixelReliability(1)
    perfect.add(probability, wrong, predicted, truth)
    backwards.add(probability, 1 - wrong, predicted, truth)
    assert perfect.auroc() == [1.0] and backwards.auroc() == [0.0]
    nothing_wrong = PixelReliability(1)
    nothing_wrong.add(probability, wrong, truth, truth)
    assert nothing_wrong.auroc() == [None]  # no wrong pixel: undefined, not 0.5


def test_case_score_is_the_disputed_fraction_of_the_structure() -> None:
    votes = np.zeros((4, 2, 8, 8), bool)
    votes[:, 0, :2, :2] = True  # 4 pixels every member marks
    votes[0, 0, 2, :4] = True  # 4 more only member 0 marks
    agreement = CaseAgreement(2)
    agreement.add(votes[..., :4, :])  # a volume's slices add up
    agreement.add(votes[..., 4:, :])
    assert agreement.score() == [0.5, 0.0]  # class 1: no member marks anything, nothing disputed


def test_summary_ranks_cases_by_score_against_dice() -> None:
    pooled = PixelReliability(1)
    probability, uncertainty, predicted, truth = _case(1, m=1)
    pooled.add(probability, uncertainty, predicted, truth)
    cases = [CaseReliability([s], [0.9], [0.01]) for s in (0.1, 0.2, 0.3, 0.4)]
    dice = np.array([[0.95], [0.9], [0.7], [0.4]])  # the more disputed, the worse
    summary = reliability_summary(cases, dice, pooled, ["lesion"])["lesion"]
    assert summary["spearman_score_dice"] == -1.0
    assert summary["pixel_auroc"] == pytest.approx(pooled.auroc()[0], abs=1e-6)
    assert summary["case_pixel_auroc_mean"] == 0.9 and summary["score_mean"] == 0.25
    constant = reliability_summary(cases[:2], dice[:2], pooled, ["lesion"])["lesion"]
    assert constant["spearman_score_dice"] is None  # two cases: no correlation to speak of
