"""Training objective of the diffusion model: noise-prediction MSE, plus the variational bound when
the model also learns its variances (improved-diffusion's hybrid loss).

The network is only seen through ``model_output_fn(x_t, t)``, so the same loss serves any
architecture and any conditioning (the image a mask is segmented from is closed over by the
caller).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from medsegdiff_core.diffusion.schedule import NoiseSchedule
from medsegdiff_core.errors import ConfigError

ModelOutputFn = Callable[[Tensor, Tensor], Tensor]
"""``(x_t (B, C, H, W), t (B,) long) -> eps (B, C, H, W)``, or ``(B, 2C, H, W)`` with learned
variances."""

TimestepSampling = Literal["uniform", "high_noise"]

# The auxiliary segmentation loss reads the x0 estimate (in [-1, 1]) as logits of this scale:
# the inference threshold 0.5 is x0 = 0, and x0 = +-1 is a confident 0.98 / 0.02.
_X0_LOGIT_SCALE = 4.0


@dataclass(frozen=True)
class TrainingObjective:
    """What the training loss adds to the plain MSE on the network's target (the paper's loss
    when every field is at its default).

    Attributes:
        snr_gamma: Min-SNR-gamma weighting (Hang et al., ICCV 2023) of the MSE; None: uniform.
        x0_loss_weight: weight of an auxiliary Dice + BCE loss on the network's own x0 estimate
            against the true mask, each sample weighted by its noise level ``1 - abar_t`` (at low
            noise x0 is in ``x_t`` already, at high noise the estimate is a segmentation from
            the image alone, which is what few-step sampling relies on). 0: off.
        timestep_sampling: ``uniform`` over ``[0, T)`` (the paper), or ``high_noise``: ``t =
            floor(T (1 - u^2))``, which draws the upper half of the chain 71 % of the time.
    """

    snr_gamma: float | None = None
    x0_loss_weight: float = 0.0
    timestep_sampling: TimestepSampling = "uniform"


PLAIN_OBJECTIVE = TrainingObjective()
"""The paper's loss: the MSE alone, uniform timesteps."""

# Half the width of one bin of 8-bit data scaled to [-1, 1]: the decoder NLL of improved-diffusion.
_BIN_HALF_WIDTH = 1.0 / 255.0
# Edge bins extend to infinity; values beyond these thresholds are treated as the edge bins.
_EDGE = 0.999


def draw_timesteps_and_noise(
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    sampling: TimestepSampling = "uniform",
) -> tuple[Tensor, Tensor]:
    """The training draws for a batch shaped like ``x0``: timesteps (``sampling``, see
    :class:`TrainingObjective`), then standard normal noise, each drawn only when not given
    (``t`` is returned as long on ``x0``'s device).

    The one place these draws happen, so every path that computes the loss (including per-sample
    gradients for DP) consumes the random stream identically."""
    if t is None and sampling == "uniform":
        t = torch.randint(
            0, schedule.num_steps, (x0.shape[0],), generator=generator, device=x0.device
        )
    elif t is None:
        u = torch.rand((x0.shape[0],), generator=generator, device=x0.device)
        t = ((1.0 - u.square()) * schedule.num_steps).long().clamp(max=schedule.num_steps - 1)
    else:
        t = t.to(device=x0.device, dtype=torch.long)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return t, noise


def diffusion_loss(
    model_output_fn: ModelOutputFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    learn_sigma: bool = False,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Literal["mean", "none"] = "mean",
    objective: TrainingObjective = PLAIN_OBJECTIVE,
) -> dict[str, Tensor]:
    """Sample ``t`` and noise, noise ``x0`` to ``x_t`` and score the model's prediction.

    Args:
        model_output_fn: called once as ``model_output_fn(x_t, t)``; returns the predicted noise,
            shape ``(B, C, H, W)``, or ``(B, 2C, H, W)`` when ``learn_sigma`` (the second half is
            the variance interpolation value ``v`` in ``[-1, 1]``, see
            :meth:`NoiseSchedule.learned_log_variance`).
        x0: clean masks scaled to ``[-1, 1]``, shape ``(B, C, H, W)``.
        schedule: the noise schedule the model is trained for; its ``prediction`` says what the
            first C output channels are: the noise (``"epsilon"``, the paper) or the velocity
            ``v``, and the loss is the MSE against that target. With ``"v"`` the target at high
            noise is (minus) the mask itself, so the network learns to segment from the image
            alone, which few-step samplers depend on.
        learn_sigma: add the variational-bound term that trains ``v``.
        t: long timesteps of shape ``(B,)``; drawn uniformly from ``[0, num_steps)`` if omitted.
        noise: standard normal noise shaped like ``x0``; drawn if omitted.
        generator: random generator for ``t`` and ``noise``; must live on ``x0``'s device.
        reduction: ``"mean"`` averages over the batch; ``"none"`` keeps one value per sample
            (needed for per-sample clipping in differential privacy).
        objective: what is added to the plain MSE (:class:`TrainingObjective`). Its
            ``snr_gamma`` weights each sample's MSE by ``min(SNR_t, gamma) / SNR_t`` (for noise
            prediction; the equivalent weight for v): it stops the many nearly noise-free steps
            (where denoising a mask is trivial) from dominating.

    Returns:
        ``{"loss", "mse"}`` plus ``"vb"`` when ``learn_sigma`` and ``"seg"`` with an
        ``x0_loss_weight``; each a scalar, or shape ``(B,)`` with ``reduction="none"``.
        ``loss = mse + vb + x0_loss_weight * seg``. Per-sample values are means over all
        non-batch dimensions; ``vb`` is in bits per dimension, scaled by ``num_steps / 1000``.

    Raises:
        ConfigError: the model output has the wrong number of channels for ``learn_sigma``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    channels = x0.shape[1]
    t, noise = draw_timesteps_and_noise(
        schedule, x0, t=t, noise=noise, generator=generator, sampling=objective.timestep_sampling
    )
    snr_gamma = objective.snr_gamma

    x_t = schedule.q_sample(x0, t, noise)
    output = model_output_fn(x_t, t)
    expected = 2 * channels if learn_sigma else channels
    if output.shape[1] != expected:
        raise ConfigError(
            f"model returned {output.shape[1]} channels but learn_sigma={learn_sigma} expects "
            f"{expected} for {channels}-channel masks"
        )
    target = schedule.training_target(x0, t, noise)

    terms = {"mse": _mean_per_sample((output[:, :channels] - target) ** 2)}
    if snr_gamma is not None:
        abar = schedule.extract("alphas_cumprod", t, terms["mse"]).flatten()
        snr = abar / (1.0 - abar)
        # Min-SNR-gamma: x0-space weight min(SNR, gamma), expressed for each target.
        denominator = snr if schedule.prediction == "epsilon" else snr + 1.0
        terms["mse"] = terms["mse"] * torch.clamp(snr, max=snr_gamma) / denominator
    terms["loss"] = terms["mse"]
    if learn_sigma:
        # Stop-gradient on the mean: the bound trains only the variance, the MSE trains the mean.
        pred_x0 = schedule.x0_from_output(x_t, t, output[:, :channels].detach())
        vb = _vb_bits(schedule, x0, x_t, t, pred_x0, output[:, channels:])
        # improved-diffusion's 1/1000 weighting of the bound, written per step.
        terms["vb"] = vb * (schedule.num_steps / 1000.0)
        terms["loss"] = terms["loss"] + terms["vb"]
    if objective.x0_loss_weight:
        noise_level = 1.0 - schedule.extract("alphas_cumprod", t, x0).flatten()
        estimate = schedule.x0_from_output(x_t, t, output[:, :channels])
        terms["seg"] = noise_level * _dice_bce(estimate * _X0_LOGIT_SCALE, (x0 + 1.0) / 2.0)
        terms["loss"] = terms["loss"] + objective.x0_loss_weight * terms["seg"]

    ordered = {key: terms[key] for key in ("loss", "mse", "vb", "seg") if key in terms}
    if reduction == "mean":
        return {key: value.mean() for key, value in ordered.items()}
    return ordered


def _vb_bits(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, pred_x0: Tensor, v: Tensor
) -> Tensor:
    """One term of the variational bound per sample, in bits per dimension; shape ``(B,)``.

    ``KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the decoder NLL
    ``-log p(x0 | x_1)`` for ``t = 0``.
    """
    true_mean, _, true_log_var = schedule.q_posterior_mean_variance(x0, x_t, t)
    # No clipping of the predicted x0 here: the bound must score the model's raw prediction.
    model_mean, _, _ = schedule.q_posterior_mean_variance(pred_x0, x_t, t)
    model_log_var = schedule.learned_log_variance(v, t)

    kl = _normal_kl(true_mean, true_log_var, model_mean, model_log_var)
    kl = _mean_per_sample(kl) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    nll = _mean_per_sample(nll) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def _normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, var1) || N(mean2, var2))`` in nats; inputs broadcast."""
    return 0.5 * (
        -1.0
        + log_var2
        - log_var1
        + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def _discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log probability (nats) of ``x`` under a Gaussian integrated over its bin.

    The data are treated as 8-bit values scaled to ``[-1, 1]`` (bins of width 2/255), with the
    outermost bins extended to infinity; binary masks in ``{-1, 1}`` always fall in those.
    """
    inv_std = torch.exp(-log_scale)
    centred = x - mean
    upper = inv_std * (centred + _BIN_HALF_WIDTH)
    lower = inv_std * (centred - _BIN_HALF_WIDTH)
    # log_ndtr keeps the tails finite where 1 - cdf would round to 0 in float32.
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    bin_mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(
        x < -_EDGE,
        log_cdf_upper,
        torch.where(x > _EDGE, log_survival_lower, torch.log(bin_mass)),
    )


def _dice_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Soft Dice loss (mean over channels) plus binary cross-entropy per sample; shape ``(B,)``.

    Dice weighs a small structure (a cup, a lesion) as much as a large one, where BCE alone is
    dominated by the background; an empty channel scores Dice 1 when predicted empty."""
    probability = torch.sigmoid(logits)
    overlap = (probability * target).flatten(2).sum(-1)
    total = (probability + target).flatten(2).sum(-1)
    dice = 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return dice.mean(dim=1) + _mean_per_sample(bce)


def _mean_per_sample(values: Tensor) -> Tensor:
    """Mean over all dimensions but the first; shape ``(B,)``."""
    return values.flatten(start_dim=1).mean(dim=1)
