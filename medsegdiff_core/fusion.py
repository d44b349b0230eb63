"""Fusing the masks of an ensemble of diffusion samples into one segmentation.

MedSegDiff is stochastic: sampling the same image several times (different noise seeds, or
different federated models) gives an ensemble of K slightly different soft masks. This module turns
such an ensemble into one foreground-probability map and into maps of where the members disagree.

* :func:`staple` - binary STAPLE (Warfield, Zou & Wells, IEEE TMI 23(7), 2004), vectorised over
  many independent problems.
* :func:`fuse_members` - STAPLE, mean or majority fusion of ensemble members.
* :func:`uncertainty_map` - per-pixel variance or entropy of the ensemble.

STAPLE reproduces ITK's ``STAPLEImageFilter`` (what ``SimpleITK.STAPLE`` runs, and what the tests
compare against), which differs from the paper in a few places:

* Initialisation: ITK does not start from guessed sensitivities/specificities. It starts from the
  soft vote W = mean of the decisions and runs the M-step first. ``initial_rate`` gives the paper's
  start instead (every rater's sensitivity = specificity = ``initial_rate``, E-step first); both
  usually converge to the same fixed point.
* Prior: a single foreground prior per problem, the fraction of foreground decisions over all
  raters and pixels (ITK's ``ConfidenceWeight`` = 1). The paper also allows a spatial prior;
  ``prior`` accepts one.
* Convergence: ITK stops once no rater's sensitivity or specificity moved by more than 1e-7 (it
  compares squared changes with 1e-14) since the previous iteration, never after the first.
  Here ``tol`` is that threshold on the absolute change; pass ``tol=1e-7`` to reproduce ITK's
  iteration count exactly.
* Degenerate inputs: ITK returns NaN everywhere when every rater marks nothing (or everything),
  and for a single rater whose mask is empty. Here the probabilities are computed in log space and
  a sensitivity (specificity) with no foreground (background) mass to estimate it from is set to 1,
  so the result is the raters' common mask and never NaN.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from medsegdiff_core.errors import ConfigError, DataError

FusionMethod = Literal["staple", "mean", "majority"]
UncertaintyKind = Literal["variance", "entropy"]

_FUSION_METHODS = ("staple", "mean", "majority")
_UNCERTAINTY_KINDS = ("variance", "entropy")

# Smallest positive float64: clamping log arguments to it turns log(0) into a large finite number,
# so perfect raters (sensitivity exactly 1) give certain rather than NaN probabilities.
_TINY = torch.finfo(torch.float64).tiny


class StapleResult(NamedTuple):
    """Output of :func:`staple` for N problems with K raters.

    Attributes:
        probability: (N, *spatial) float32 posterior probability W that each pixel is foreground.
        sensitivity: (N, K) float32 estimated true-positive rate of each rater.
        specificity: (N, K) float32 estimated true-negative rate of each rater.
        iterations: EM iterations run (one M-step plus one E-step each); the maximum over the N
            problems. ITK's ``GetElapsedIterations()`` is this minus one when it converged.
    """

    probability: Tensor
    sensitivity: Tensor
    specificity: Tensor
    iterations: int


def staple(
    decisions: Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    prior: float | Tensor | None = None,
    initial_rate: float | None = None,
) -> StapleResult:
    """Estimate the hidden true segmentation from K binary raters with STAPLE (EM).

    Args:
        decisions: bool or {0, 1} tensor of shape (N, K, *spatial): N independent problems (for
            example images x classes flattened), each rated by K raters.
        max_iter: upper bound on EM iterations.
        tol: a problem has converged once no rater's sensitivity or specificity changed by more
            than ``tol`` in one iteration; converged problems are frozen while others continue.
        prior: foreground prior probability: a float, a tensor of shape (N,) (one per problem) or
            one broadcastable to (N, *spatial) (a spatial prior). Default: per problem, the
            fraction of foreground decisions over all raters and pixels, as ITK does.
        initial_rate: if given, start from sensitivity = specificity = ``initial_rate`` for every
            rater (the paper's start) instead of ITK's start from the mean vote.

    Returns:
        :class:`StapleResult` with ``probability`` (N, *spatial), ``sensitivity`` and
        ``specificity`` (N, K), and ``iterations``.
    """
    if decisions.ndim < 3 or decisions.shape[1] == 0:
        raise DataError(
            f"STAPLE decisions must have shape (N, K, *spatial) with K >= 1, got "
            f"{tuple(decisions.shape)}"
        )
    if max_iter < 1:
        raise ConfigError(f"STAPLE max_iter must be at least 1, got {max_iter}")
    if tol < 0:
        raise ConfigError(f"STAPLE tol must be non-negative, got {tol}")
    if initial_rate is not None and not 0.0 < initial_rate < 1.0:
        raise ConfigError(f"STAPLE initial_rate must be in (0, 1), got {initial_rate}")

    n, k, *spatial = decisions.shape
    d = _as_binary(decisions, "STAPLE decisions").reshape(n, k, -1).to(torch.float64)
    g = _prior(prior, d, spatial)
    log_prior_odds = _log(g) - _log(1.0 - g)

    if initial_rate is None:
        w = d.mean(dim=1)
    else:
        rate = torch.full((n, k), initial_rate, dtype=torch.float64, device=d.device)
        w = _e_step(d, rate, rate, log_prior_odds)

    # NaN as "previous" rates makes the first change NaN, which never counts as converged: like
    # ITK, a problem always runs at least two iterations.
    p = torch.full((n, k), math.nan, dtype=torch.float64, device=d.device)
    q = p.clone()
    active = torch.ones(n, dtype=torch.bool, device=d.device)
    iterations = 0
    for step in range(max_iter):
        iterations = step + 1
        p_new, q_new = _m_step(d, w)
        w_new = _e_step(d, p_new, q_new, log_prior_odds)
        change = torch.maximum((p_new - p).abs(), (q_new - q).abs()).amax(dim=1)
        # Freezing converged problems makes one batched call equal N separate calls.
        p = torch.where(active[:, None], p_new, p)
        q = torch.where(active[:, None], q_new, q)
        w = torch.where(active[:, None], w_new, w)
        active &= ~(change <= tol)
        if not bool(active.any()):
            break

    return StapleResult(
        probability=w.reshape(n, *spatial).float(),
        sensitivity=p.float(),
        specificity=q.float(),
        iterations=iterations,
    )


def fuse_members(
    members: Tensor,
    method: FusionMethod = "staple",
    threshold: float = 0.5,
) -> Tensor:
    """Fuse the soft masks of K ensemble members into one foreground probability per pixel.

    Args:
        members: soft masks in [0, 1] of shape (B, K, M, *spatial): B images, K ensemble members,
            M mask channels (classes), then any spatial dims (H, W or D, H, W).
        method: ``"staple"`` binarises every member at ``threshold`` (foreground at or above it)
            and runs :func:`staple` per image and channel (all B*M problems in one call);
            ``"mean"`` is the members' mean soft mask; ``"majority"`` is the fraction of members
            voting foreground, so ``> 0.5`` on it is the strict majority vote (``>= 0.5`` sends
            ties of an even ensemble to foreground).
        threshold: binarisation threshold for ``"staple"`` and ``"majority"``.

    Returns:
        (B, M, *spatial) float32 foreground probability in [0, 1].
    """
    if method not in _FUSION_METHODS:
        raise ConfigError(f"unknown fusion method {method!r}; expected one of {_FUSION_METHODS}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"fusion threshold must be in [0, 1], got {threshold}")
    soft = _check_members(members)
    if method == "mean":
        return soft.mean(dim=1)
    votes = soft >= threshold
    if method == "majority":
        return votes.float().mean(dim=1)
    b, k, m, *spatial = soft.shape
    problems = votes.transpose(1, 2).reshape(b * m, k, *spatial)
    return staple(problems).probability.reshape(b, m, *spatial)


def uncertainty_map(members: Tensor, kind: UncertaintyKind = "entropy") -> Tensor:
    """Per-pixel uncertainty of an ensemble; high values mark where a clinician should look twice.

    * ``"variance"``: population variance of the members' soft masks, in [0, 0.25]. It measures
      disagreement only: 0 when all members give the same value (even an unsure 0.5), 0.25 when
      half the members say certainly foreground and half certainly background.
    * ``"entropy"``: binary entropy, in bits, of the member-mean probability, in [0, 1]. It
      measures total uncertainty: 0 where the ensemble is unanimous and certain, 1 where the
      mean is 0.5, whether because members disagree or because they are all unsure.

    Args:
        members: soft masks in [0, 1] of shape (B, K, M, *spatial).
        kind: ``"variance"`` or ``"entropy"``.

    Returns:
        (B, M, *spatial) float32 uncertainty map.
    """
    if kind not in _UNCERTAINTY_KINDS:
        raise ConfigError(
            f"unknown uncertainty kind {kind!r}; expected one of {_UNCERTAINTY_KINDS}"
        )
    soft = _check_members(members)
    if kind == "variance":
        return soft.var(dim=1, correction=0)
    mean = soft.mean(dim=1)
    nats = -(torch.special.xlogy(mean, mean) + torch.special.xlogy(1.0 - mean, 1.0 - mean))
    return (nats / math.log(2.0)).clamp(0.0, 1.0)


def _m_step(d: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Sensitivity and specificity (N, K) of each rater given the current posterior W (N, S)."""
    fg_mass = w.sum(dim=-1, keepdim=True)
    bg_mass = (1.0 - w).sum(dim=-1, keepdim=True)
    true_pos = torch.einsum("nks,ns->nk", d, w)
    false_pos = torch.einsum("nks,ns->nk", d, 1.0 - w)
    # Without foreground (background) mass the rate is unidentifiable; 1 ("no error seen") keeps
    # the E-step finite where ITK would divide 0 by 0.
    p = torch.where(fg_mass > 0, true_pos / fg_mass.clamp_min(_TINY), 1.0)
    q = torch.where(bg_mass > 0, (bg_mass - false_pos) / bg_mass.clamp_min(_TINY), 1.0)
    return p.clamp(0.0, 1.0), q.clamp(0.0, 1.0)


def _e_step(d: Tensor, p: Tensor, q: Tensor, log_prior_odds: Tensor) -> Tensor:
    """Posterior foreground probability W (N, S) given rater rates p, q (N, K) and the prior."""
    # log P(D | fg) - log P(D | bg) is linear in the decisions: a constant for "all raters say
    # background" plus one weight per foreground vote. Log space avoids the 0/0 that ITK's plain
    # products hit with perfect raters or many raters.
    log_p, log_1mp = _log(p), _log(1.0 - p)
    log_q, log_1mq = _log(q), _log(1.0 - q)
    vote_weight = (log_p - log_1mp) - (log_1mq - log_q)
    all_background = (log_1mp - log_q).sum(dim=1, keepdim=True)
    log_odds = log_prior_odds + all_background + torch.einsum("nks,nk->ns", d, vote_weight)
    return torch.sigmoid(log_odds)


def _prior(prior: float | Tensor | None, d: Tensor, spatial: list[int]) -> Tensor:
    """Foreground prior as (N, 1) or (N, S) float64, broadcastable against W."""
    n = d.shape[0]
    if prior is None:
        return d.mean(dim=(1, 2)).unsqueeze(1)
    g = torch.as_tensor(prior, dtype=torch.float64, device=d.device)
    if g.ndim == 0:
        g = g.expand(n, 1)
    elif g.shape == (n,):
        g = g.unsqueeze(1)
    else:
        try:
            g = g.expand(n, *spatial).reshape(n, -1)
        except RuntimeError:
            raise ConfigError(
                f"STAPLE prior of shape {tuple(g.shape)} does not broadcast to "
                f"(N, *spatial) = {(n, *spatial)}"
            ) from None
    if not bool(((g >= 0) & (g <= 1)).all()):
        raise ConfigError("STAPLE prior must lie in [0, 1]")
    return g


def _log(x: Tensor) -> Tensor:
    return torch.log(x.clamp_min(_TINY))


def _as_binary(x: Tensor, name: str) -> Tensor:
    """``x`` as a bool tensor; values other than 0/1 are a user error, not silently thresholded."""
    if x.dtype == torch.bool:
        return x
    if not bool(((x == 0) | (x == 1)).all()):
        raise DataError(f"{name} must be binary (bool or 0/1), got other values")
    return x.bool()


def _check_members(members: Tensor) -> Tensor:
    """Validate an ensemble of soft masks (B, K, M, *spatial) and return it as float32."""
    if members.ndim < 4:
        raise DataError(
            f"ensemble members must have shape (B, K, M, *spatial), got {tuple(members.shape)}"
        )
    soft = members.float()
    # The comparison is False for NaN, so NaN is rejected too.
    if not bool(((soft >= 0) & (soft <= 1)).all()):
        raise DataError("ensemble member masks must be probabilities in [0, 1]")
    return soft
