"""Ensemble fusion: STAPLE against SimpleITK's STAPLEImageFilter, mean/majority, uncertainty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsegdiff_core.errors import ConfigError, DataError
from medsegdiff_core.fusion import fuse_members, staple, uncertainty_map

sitk = pytest.importorskip("SimpleITK")

# ITK's convergence threshold on the change of each rater's sensitivity/specificity.
ITK_TOL = 1e-7


def itk_staple(raters: np.ndarray, confidence_weight: float = 1.0):
    """Run SimpleITK's STAPLE on K binary masks (K, *spatial); returns (W, p, q, elapsed)."""
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1.0)
    f.SetMaximumIterations(100)
    f.SetConfidenceWeight(confidence_weight)
    images = [sitk.GetImageFromArray(r.astype(np.uint8)) for r in raters]
    w = sitk.GetArrayFromImage(f.Execute(images))
    return w, np.array(f.GetSensitivity()), np.array(f.GetSpecificity()), f.GetElapsedIterations()


def ball(shape: tuple[int, ...], radius: float, center: tuple[float, ...] | None = None):
    grids = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    center = center or tuple(s / 2 for s in shape)
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, center, strict=True))
    return dist2 < radius**2


def noisy_copies(mask: np.ndarray, error_rates, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([mask ^ (rng.random(mask.shape) < e) for e in error_rates])


def structured_raters() -> np.ndarray:
    """Raters with systematic errors: one too large, one too small, one shifted, two noisy."""
    truth = ball((64, 64), 14)
    rng = np.random.default_rng(7)
    return np.stack(
        [
            ball((64, 64), 17),
            ball((64, 64), 11),
            ball((64, 64), 14, (35.0, 30.0)),
            truth ^ (rng.random(truth.shape) < 0.05),
            truth ^ (rng.random(truth.shape) < 0.15),
        ]
    )


def random_raters(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    densities = rng.uniform(0.1, 0.6, size=4)
    return np.stack([rng.random((48, 40)) < d for d in densities])


CASES = {
    "noisy_disk_2d": noisy_copies(ball((64, 64), 15), [0.02, 0.05, 0.1, 0.2, 0.3], seed=0),
    "structured_2d": structured_raters(),
    "random_a": random_raters(1),
    "random_b": random_raters(2),
    "noisy_ball_3d": noisy_copies(ball((12, 16, 16), 5), [0.03, 0.08, 0.15], seed=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_staple_matches_itk(name: str) -> None:
    raters = CASES[name]
    w_itk, p_itk, q_itk, elapsed = itk_staple(raters)
    result = staple(torch.from_numpy(raters)[None], tol=ITK_TOL)

    np.testing.assert_allclose(result.probability[0].numpy(), w_itk, atol=1e-5)
    np.testing.assert_allclose(result.sensitivity[0].numpy(), p_itk, atol=1e-6)
    np.testing.assert_allclose(result.specificity[0].numpy(), q_itk, atol=1e-6)
    # ITK reports the 0-based index of the iteration that converged (or the maximum, 100, if
    # none did: the random sets converge slowly); we report the number of iterations run.
    assert result.iterations == min(elapsed + 1, 100)


def test_staple_default_tolerance_close_to_itk() -> None:
    raters = CASES["structured_2d"]
    w_itk, p_itk, _, _ = itk_staple(raters)
    result = staple(torch.from_numpy(raters)[None])
    np.testing.assert_allclose(result.probability[0].numpy(), w_itk, atol=1e-4)
    np.testing.assert_allclose(result.sensitivity[0].numpy(), p_itk, atol=1e-5)


def test_staple_prior_matches_itk_confidence_weight() -> None:
    # ITK's prior is the mean foreground fraction times ConfidenceWeight.
    raters = CASES["noisy_disk_2d"]
    w_itk, p_itk, _, _ = itk_staple(raters, confidence_weight=0.5)
    prior = 0.5 * raters.mean()
    result = staple(torch.from_numpy(raters)[None], tol=ITK_TOL, prior=float(prior))
    np.testing.assert_allclose(result.probability[0].numpy(), w_itk, atol=1e-5)
    np.testing.assert_allclose(result.sensitivity[0].numpy(), p_itk, atol=1e-6)


def test_staple_paper_initialisation_reaches_same_estimate() -> None:
    raters = CASES["noisy_disk_2d"]
    w_itk, _, _, _ = itk_staple(raters)
    result = staple(torch.from_numpy(raters)[None], initial_rate=0.99)
    np.testing.assert_allclose(result.probability[0].numpy(), w_itk, atol=1e-4)


def test_staple_identical_raters_return_their_mask() -> None:
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    result = staple(mask.expand(1, 3, 3, 3))
    assert torch.equal(result.probability[0], mask.float())
    assert torch.equal(result.sensitivity, torch.ones(1, 3))
    assert torch.equal(result.specificity, torch.ones(1, 3))


def test_staple_degenerate_inputs_give_no_nan() -> None:
    # ITK returns NaN for all of these.
    empty = torch.zeros(1, 3, 8, 8)
    full = torch.ones(1, 3, 8, 8)
    single = torch.from_numpy(ball((8, 8), 3)).float()[None, None]
    for decisions, expected in [(empty, 0.0), (full, 1.0), (single, single[0, 0])]:
        result = staple(decisions)
        assert not result.probability.isnan().any()
        assert not result.sensitivity.isnan().any()
        assert not result.specificity.isnan().any()
        torch.testing.assert_close(
            result.probability[0], torch.as_tensor(expected).expand(8, 8).float()
        )


def test_staple_vectorised_equals_separate_calls() -> None:
    problems = [CASES[name][:3, :40, :40] for name in ("noisy_disk_2d", "structured_2d")]
    problems += [random_raters(seed)[:3, :40, :40] for seed in (4, 5)]
    problems.append(np.zeros((3, 40, 40), dtype=bool))
    batch = staple(torch.from_numpy(np.stack(problems)))
    singles = [staple(torch.from_numpy(p)[None]) for p in problems]

    assert batch.iterations == max(s.iterations for s in singles)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch.probability[i], single.probability[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(batch.sensitivity[i], single.sensitivity[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(batch.specificity[i], single.specificity[0], atol=1e-6, rtol=0)


def test_staple_spatial_prior_is_accepted() -> None:
    raters = torch.from_numpy(CASES["random_a"])[None]
    result = staple(raters, prior=torch.full(raters.shape[2:], 0.3))
    same = staple(raters, prior=0.3)
    torch.testing.assert_close(result.probability, same.probability)


def test_staple_rejects_bad_input() -> None:
    with pytest.raises(DataError):
        staple(torch.zeros(3, 8))
    with pytest.raises(DataError, match="binary"):
        staple(torch.full((1, 2, 4, 4), 0.5))
    with pytest.raises(ConfigError, match="prior"):
        staple(torch.zeros(2, 2, 4, 4), prior=torch.zeros(3))
    with pytest.raises(ConfigError, match="prior"):
        staple(torch.zeros(1, 2, 4, 4), prior=1.5)


def make_members(b: int = 2, k: int = 5, m: int = 2, size: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    truth = torch.from_numpy(ball((size, size), size / 4)).float()
    noise = 0.3 * torch.rand(b, k, m, size, size, generator=gen)
    return (truth * 0.7 + noise).clamp(0, 1)


@pytest.mark.parametrize("method", ["staple", "mean", "majority"])
def test_fuse_members_shapes_and_range(method: str) -> None:
    members = make_members()
    fused = fuse_members(members, method)
    assert fused.shape == (2, 2, 24, 24)
    assert fused.dtype == torch.float32
    assert fused.min() >= 0 and fused.max() <= 1

    volume = torch.rand(1, 3, 1, 4, 6, 6)
    assert fuse_members(volume, method).shape == (1, 1, 4, 6, 6)


def test_fuse_members_mean() -> None:
    members = make_members()
    torch.testing.assert_close(fuse_members(members, "mean"), members.mean(dim=1))


def test_fuse_members_majority_is_the_vote() -> None:
    # Three members, one pixel row of four: votes 0/3, 1/3, 2/3, 3/3 at threshold 0.5.
    members = torch.tensor([[0.1, 0.9, 0.6, 0.7], [0.2, 0.4, 0.5, 0.8], [0.0, 0.3, 0.2, 0.99]])
    members = members.reshape(1, 3, 1, 1, 4)
    fused = fuse_members(members, "majority")
    torch.testing.assert_close(fused.flatten(), torch.tensor([0, 1 / 3, 2 / 3, 1]))
    assert torch.equal(fused.flatten() > 0.5, torch.tensor([False, False, True, True]))


def test_fuse_members_staple_runs_per_image_and_channel() -> None:
    members = make_members(b=2, k=4, m=2, size=16)
    fused = fuse_members(members, "staple", threshold=0.6)
    for b in range(2):
        for m in range(2):
            alone = staple((members[b, :, m] >= 0.6)[None]).probability[0]
            torch.testing.assert_close(fused[b, m], alone, atol=1e-6, rtol=0)


def test_fuse_members_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="median"):
        fuse_members(make_members(), "median")  # type: ignore[arg-type]
    with pytest.raises(DataError):
        fuse_members(make_members() * 2)
    with pytest.raises(DataError):
        fuse_members(torch.rand(2, 3, 8))


def test_uncertainty_zero_when_members_agree() -> None:
    soft = make_members(k=1).expand(2, 4, 2, 24, 24)
    binary = (soft > 0.5).float()
    zeros = torch.zeros(2, 2, 24, 24)
    assert torch.equal(uncertainty_map(binary, "variance"), zeros)
    assert torch.equal(uncertainty_map(binary, "entropy"), zeros)
    # Identical but unsure members: no disagreement (variance 0), yet entropy stays positive.
    assert torch.equal(uncertainty_map(soft, "variance"), zeros)
    unsure = torch.full((1, 3, 1, 2, 2), 0.5)
    assert torch.equal(uncertainty_map(unsure, "variance"), torch.zeros(1, 1, 2, 2))
    assert torch.equal(uncertainty_map(unsure, "entropy"), torch.ones(1, 1, 2, 2))


def test_uncertainty_half_split() -> None:
    members = torch.cat([torch.ones(1, 2, 1, 3, 3), torch.zeros(1, 2, 1, 3, 3)], dim=1)
    torch.testing.assert_close(uncertainty_map(members, "entropy"), torch.ones(1, 1, 3, 3))
    torch.testing.assert_close(uncertainty_map(members, "variance"), torch.full((1, 1, 3, 3), 0.25))


def test_uncertainty_rejects_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="std"):
        uncertainty_map(make_members(), "std")  # type: ignore[arg-type]
