"""Ensemble inference: K stochastic samples per image, fused, with an uncertainty map.

MedSegDiff's masks are samples from a distribution, so the paper runs the sampler several times
and fuses the results with STAPLE. Two things make this fast here:

* the K members of each image (and several images) run as **one batch**;
* the image is **encoded once**: the conditional encoder does not depend on the noisy mask or
  the step, so its features are computed before the loop and reused at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import InferenceConfig
from .diffusion import NoiseSchedule, make_sampler
from .fusion import fuse_members, uncertainty_map
from .model import MedSegDiffUNet


@dataclass
class Segmentation:
    """Result for B images with K members and M mask channels (classes).

    Attributes:
        members: (B, K, M, H, W) soft member masks in [0, 1].
        probability: (B, M, H, W) fused foreground probability.
        mask: (B, M, H, W) bool, ``probability >= threshold``.
        uncertainty: (B, M, H, W) in [0, 1]; high where the members disagree.
    """

    members: Tensor
    probability: Tensor
    mask: Tensor
    uncertainty: Tensor


def make_configured_sampler(schedule: NoiseSchedule, cfg: InferenceConfig, learn_sigma: bool):
    """A fresh sampler set to ``cfg.sampling_steps`` (samplers may keep state between steps)."""
    # Every sampler clips its x0 estimates to [-1, 1] by default: that keeps early, high-noise
    # steps from overshooting, which matters most for the few-step samplers.
    kwargs: dict[str, object] = {}
    if cfg.sampler == "ddpm" and learn_sigma:
        kwargs["variance"] = "learned_range"
    if cfg.sampler == "ddim":
        kwargs["eta"] = cfg.eta
    sampler = make_sampler(cfg.sampler, schedule, **kwargs)
    sampler.set_timesteps(cfg.sampling_steps)
    return sampler


@torch.no_grad()
def sample_members(
    model: MedSegDiffUNet,
    schedule: NoiseSchedule,
    images: Tensor,
    cfg: InferenceConfig,
    *,
    generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """Sample ``cfg.ensemble`` masks for each image as one batch: (B, C, S, S) -> (B, K, M, S, S).

    Returned values are soft masks in [0, 1] (the final sample mapped from [-1, 1]).
    The samplers read the network's output as ``schedule.prediction`` says.
    """
    model.eval()
    batch, members = images.shape[0], cfg.ensemble
    spec = model.spec
    device = images.device
    sampler = make_configured_sampler(schedule, cfg, spec.learn_sigma)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        features = model.encode_image(images)  # once per image, reused at every step
    x = torch.randn(
        (batch * members, spec.mask_channels, spec.image_size, spec.image_size),
        generator=generator,
        device=device,
    )
    for t in sampler.timesteps.tolist():
        timesteps = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model.denoise(x, timesteps, features).float()
        x = sampler.step(output, t, x, generator=generator)
    soft = ((x.clamp(-1, 1) + 1) / 2).reshape(batch, members, *x.shape[1:])
    return soft


def segment(
    model: MedSegDiffUNet,
    schedule: NoiseSchedule,
    images: Tensor,
    cfg: InferenceConfig,
    *,
    generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None,
) -> Segmentation:
    """Sample an ensemble per image, fuse it (``cfg.fusion``) and map its uncertainty."""
    members = sample_members(
        model,
        schedule,
        images,
        cfg,
        generator=generator,
        amp_dtype=amp_dtype,
    )
    probability = fuse_members(members, cfg.fusion, threshold=cfg.threshold)
    return Segmentation(
        members=members,
        probability=probability,
        mask=probability >= cfg.threshold,
        uncertainty=uncertainty_map(members, cfg.uncertainty),
    )
