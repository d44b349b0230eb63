"""Gaussian diffusion for segmentation masks, independent of the network.

The sample ``x_t`` is a noisy mask in ``[-1, 1]`` (``x0`` is a binary mask scaled to
``{-1, +1}``). :mod:`.schedule` holds the noise schedule and the forward process, :mod:`.losses`
the training objective and :mod:`.samplers` the reverse-process algorithms; the network is only
ever seen as a function ``(x_t, t) -> predicted noise``.
"""

from medsegdiff_core.diffusion.losses import (
    PLAIN_OBJECTIVE,
    ModelOutputFn,
    TrainingObjective,
    diffusion_loss,
    draw_timesteps_and_noise,
)
from medsegdiff_core.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    Sampler,
    make_sampler,
    trailing_timesteps,
)
from medsegdiff_core.diffusion.schedule import NoiseSchedule, make_betas

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPPSampler",
    "ModelOutputFn",
    "PLAIN_OBJECTIVE",
    "NoiseSchedule",
    "Sampler",
    "TrainingObjective",
    "diffusion_loss",
    "draw_timesteps_and_noise",
    "make_betas",
    "make_sampler",
    "trailing_timesteps",
]
