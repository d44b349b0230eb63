"""Noise schedules of the Gaussian diffusion and the closed forms derived from them.

Notation follows Ho et al. (2020) and Nichol & Dhariwal (2021): ``beta_t`` is the variance added at
step ``t``, ``abar_t = prod_{s<=t} (1 - beta_s)`` (``alphas_cumprod``) and
``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``. Timesteps are 0-based: ``t = 0`` is the first
noising step and ``t = num_steps - 1`` the last.

All schedule values are kept in float64 on the CPU; the methods gather the entries for a batch of
timesteps and cast them to the dtype and device of their input, so callers work in float32 (or
lower) without losing the precision of the schedule itself.
"""

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from medsegdiff_core.errors import ConfigError

ScheduleName = Literal["linear", "cosine"]
PredictionType = Literal["epsilon", "v"]

_COSINE_OFFSET = 0.008
_MAX_BETA = 0.999


def make_betas(schedule: ScheduleName, num_steps: int) -> Tensor:
    """Return the betas of a named schedule.

    Args:
        schedule: ``"linear"`` (Ho et al., rescaled by ``1000 / num_steps`` as in
            improved-diffusion, so that any ``num_steps`` spans the same noise levels) or
            ``"cosine"`` (Nichol & Dhariwal 2021, offset ``s = 0.008``, betas clipped at 0.999).
        num_steps: number of diffusion steps ``T``.

    Returns:
        float64 tensor of shape ``(num_steps,)`` with values in ``(0, 1)``.

    Raises:
        ConfigError: unknown schedule name, ``num_steps < 1``, or a linear schedule so short that
            its betas reach 1 (``num_steps <= 20``).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"diffusion num_steps must be an integer >= 1, got {num_steps!r}")
    if schedule == "linear":
        scale = 1000.0 / num_steps
        beta_end = scale * 0.02
        if beta_end >= 1.0:
            raise ConfigError(
                f"linear noise schedule with num_steps={num_steps} has betas up to {beta_end:g}; "
                "use num_steps >= 21 or the cosine schedule"
            )
        return torch.linspace(scale * 1e-4, beta_end, num_steps, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        abar = torch.cos((steps + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
        # Clipping keeps the last steps from being pure noise (abar_T = 0 would make x0 from eps
        # a division by zero).
        return (1.0 - abar[1:] / abar[:-1]).clamp(max=_MAX_BETA)
    raise ConfigError(f"unknown noise schedule {schedule!r}; expected 'linear' or 'cosine'")


class NoiseSchedule:
    """The forward process ``q`` and its posterior, derived from a 1-D tensor of betas.

    Attributes (float64, CPU, shape ``(num_steps,)``; treat them as read-only):
        betas: ``beta_t``.
        alphas_cumprod: ``abar_t``.
        alphas_cumprod_prev: ``abar_{t-1}``, with ``abar_{-1} = 1``.
        posterior_variance: ``beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)``, the variance
            of ``q(x_{t-1} | x_t, x0)``; it is 0 at ``t = 0``.
        posterior_log_variance_clipped: its log, with the ``t = 0`` entry replaced by the
            ``t = 1`` entry so that the log stays finite (as improved-diffusion does).
        posterior_mean_coef1, posterior_mean_coef2: the posterior mean is
            ``coef1 * x0 + coef2 * x_t``.
        log_betas: ``log(beta_t)``, the upper end of the learned variance range.

    The tensor methods take ``x`` of shape ``(B, ...)`` (typically ``(B, C, H, W)``) and ``t``, a
    long tensor of shape ``(B,)`` with values in ``[0, num_steps)``.

    ``prediction`` is what the network trained on this schedule outputs: the noise (``"epsilon"``,
    the paper) or the velocity (``"v"``). It travels with the schedule, as diffusers' schedulers
    carry ``prediction_type``, so the loss and every sampler read the network's output the same
    way and no caller can forget to say it.
    """

    def __init__(self, betas: Tensor, prediction: PredictionType = "epsilon") -> None:
        if prediction not in ("epsilon", "v"):
            raise ConfigError(f"unknown prediction {prediction!r}; expected 'epsilon' or 'v'")
        self.prediction: PredictionType = prediction
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ConfigError(
                f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}"
            )
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError(
                f"betas must lie in (0, 1), got min {betas.min().item():g}, "
                f"max {betas.max().item():g}"
            )
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])

        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = abar.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()

        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta-tilde_0 is 0; borrow the next step's value (or beta_0 for a one-step chain) so the
        # log, used as the lower end of the learned variance range, is finite.
        first = self.posterior_variance[1:2] if len(betas) > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([first, self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)

        self._cast_cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def from_name(
        cls, schedule: ScheduleName, num_steps: int, prediction: PredictionType = "epsilon"
    ) -> "NoiseSchedule":
        """Build the schedule of :func:`make_betas` (``schedule``, ``num_steps``)."""
        return cls(make_betas(schedule, num_steps), prediction)

    @property
    def num_steps(self) -> int:
        """Number of diffusion steps ``T``."""
        return int(self.betas.shape[0])

    def respace(self, timesteps: Sequence[int] | Tensor) -> "NoiseSchedule":
        """Return the schedule of the sub-chain that visits only ``timesteps``.

        The kept steps keep their ``abar`` values; the betas are re-derived as
        ``beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}`` (improved-diffusion's respacing), so index
        ``i`` of the result is the ``i``-th smallest kept timestep.

        Args:
            timesteps: distinct timesteps in ``[0, num_steps)``, any order.

        Returns:
            a schedule with ``len(timesteps)`` steps.
        """
        kept = torch.as_tensor(timesteps, dtype=torch.long).flatten().unique(sorted=True)
        if kept.numel() == 0 or kept[0] < 0 or kept[-1] >= self.num_steps:
            raise ValueError(f"timesteps must be in [0, {self.num_steps}), got {kept.tolist()}")
        if kept.numel() == self.num_steps:
            return self
        abar = self.alphas_cumprod[kept]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return NoiseSchedule(1.0 - abar / abar_prev, self.prediction)

    def extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Gather the attribute ``name`` at timesteps ``t``, shaped to broadcast against ``like``.

        Args:
            name: one of the float64 attributes listed in the class docstring.
            t: long tensor of shape ``(B,)``.
            like: tensor of shape ``(B, ...)`` whose dtype and device the result takes.

        Returns:
            tensor of shape ``(B, 1, ..., 1)`` with ``like.ndim`` dimensions.
        """
        key = (name, like.device, like.dtype)
        values = self._cast_cache.get(key)
        if values is None:
            # Cast on the CPU first: some accelerators (MPS) have no float64.
            values = getattr(self, name).to(like.dtype).to(like.device)
            self._cast_cache[key] = values
        picked = values[t.to(device=like.device, dtype=torch.long)]
        return picked.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample ``x_t ~ q(x_t | x0)`` with the given standard normal ``noise``.

        Args:
            x0: clean samples, shape ``(B, C, H, W)``.
            t: long timesteps, shape ``(B,)``.
            noise: standard normal noise, same shape as ``x0``.

        Returns:
            ``x_t``, same shape as ``x0``.
        """
        return (
            self.extract("sqrt_alphas_cumprod", t, x0) * x0
            + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert :meth:`q_sample`: ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``.

        All tensors have shape ``(B, C, H, W)`` except ``t``, of shape ``(B,)``.
        """
        return (
            self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def velocity(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The v-prediction target ``sqrt(abar) * eps - sqrt(1 - abar) * x0`` (Salimans & Ho)."""
        return (
            self.extract("sqrt_alphas_cumprod", t, x0) * noise
            - self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def eps_from_velocity(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """The noise implied by a v-prediction: ``sqrt(abar) * v + sqrt(1 - abar) * x_t``."""
        return (
            self.extract("sqrt_alphas_cumprod", t, x_t) * v
            + self.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
        )

    def training_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network should output for ``x_t = q_sample(x0, t, noise)``."""
        return noise if self.prediction == "epsilon" else self.velocity(x0, t, noise)

    def x0_from_output(self, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """The clean sample implied by the network's output (its first ``C`` channels), each
        prediction type by its direct formula: ``sqrt(abar) x_t - sqrt(1 - abar) v`` for ``v``
        (through the noise it would lose ~5e-3 at high noise in float32)."""
        if self.prediction == "epsilon":
            return self.predict_x0_from_eps(x_t, t, output)
        return (
            self.extract("sqrt_alphas_cumprod", t, x_t) * x_t
            - self.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * output
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Solve :meth:`q_sample` for the noise: ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``.

        All tensors have shape ``(B, C, H, W)`` except ``t``, of shape ``(B,)``.
        """
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self.extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def learned_log_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """Log variance of ``p(x_{t-1} | x_t)`` from a learned interpolation value.

        improved-diffusion's ``learned_range``: with ``frac = (v + 1) / 2``,
        ``log var = frac * log(beta_t) + (1 - frac) * log(beta-tilde_t)`` (clipped log). The
        network only chooses where to sit between the two variances that bound the true
        reverse-process variance, which is far easier to learn than the variance itself.

        Args:
            v: interpolation values, nominally in ``[-1, 1]``, shape ``(B, C, H, W)``.
            t: long timesteps, shape ``(B,)``.

        Returns:
            log variance, same shape as ``v``.
        """
        frac = (v + 1.0) / 2.0
        max_log = self.extract("log_betas", t, v)
        min_log = self.extract("posterior_log_variance_clipped", t, v)
        return frac * max_log + (1.0 - frac) * min_log

    def q_posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean and variance of the posterior ``q(x_{t-1} | x_t, x0)``.

        Args:
            x0: clean (or predicted clean) samples, shape ``(B, C, H, W)``.
            x_t: noisy samples at ``t``, same shape.
            t: long timesteps, shape ``(B,)``.

        Returns:
            ``(mean, variance, log_variance_clipped)``: the mean has the shape of ``x0``, the
            variance and log variance have shape ``(B, 1, 1, 1)``.
        """
        mean = (
            self.extract("posterior_mean_coef1", t, x_t) * x0
            + self.extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self.extract("posterior_variance", t, x_t)
        log_variance = self.extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance
