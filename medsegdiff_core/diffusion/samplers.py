"""Reverse-process samplers, one object per algorithm, in the style of diffusers' schedulers.

A sampling loop is the same for every algorithm, so swapping the sampler changes one object::

    sampler = make_sampler("ddim", schedule)
    sampler.set_timesteps(50)
    x = torch.randn(shape, generator=generator)
    for t in sampler.timesteps:
        x = sampler.step(model(x, t), int(t), x, generator=generator)

Every sampler uses diffusers' ``"trailing"`` timestep spacing, so the first step is always at
``num_steps - 1`` (pure noise), even with very few steps. ``model_output`` is the network's raw
output, read as the schedule's ``prediction`` says (the noise, or the velocity ``v``; as diffusers'
schedulers read ``prediction_type``), with the channels of ``sample``, or twice as many when the
model also learns its variances (the second half is then ignored by all but
``DDPMSampler(variance="learned_range")``). A ``v`` output gives x0 directly
(``sqrt(abar) x_t - sqrt(1 - abar) v``): going through the noise instead loses about 5e-3 of x0
at high noise in float32 with the cosine schedule. Every sampler clips each x0 estimate to
``[-1, 1]`` by default (``clip_sample=True``): masks live there.

Coefficients are computed in float64 and cast to the sample's dtype; noise is drawn on the
sample's device with the caller's generator. Any batch size works.
"""

import inspect
import math
from fractions import Fraction
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from medsegdiff_core.diffusion.schedule import NoiseSchedule
from medsegdiff_core.errors import ConfigError

SamplerName = Literal["ddpm", "ddim", "dpm++"]
DDPMVariance = Literal["fixed_small", "fixed_large", "learned_range"]


@runtime_checkable
class Sampler(Protocol):
    """What a sampling loop needs from a sampler."""

    timesteps: Tensor
    """Long tensor of the timesteps to visit, descending, starting at ``num_steps - 1``."""

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps and reset any state kept between steps."""
        ...

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Return ``x_prev`` (shape of ``sample``, ``(B, C, H, W)``) from ``x_t = sample``.

        ``model_output`` is the predicted noise at ``timestep``, shape ``(B, C, H, W)`` or
        ``(B, 2C, H, W)``.
        """
        ...


def trailing_timesteps(num_steps: int, num_inference_steps: int) -> Tensor:
    """Trailing timesteps ``round(num_steps * (n - i) / n) - 1`` for ``i = 0 .. n-1``.

    This is diffusers' ``timestep_spacing="trailing"`` computed in exact rational arithmetic
    (ties round to even): diffusers builds it with a float ``np.arange``, which for some ``n``
    (e.g. 61 of 1000) yields an extra timestep ``-1``, and for a few others rounds a tie the other
    way.

    Args:
        num_steps: number of diffusion steps of the training schedule.
        num_inference_steps: ``n``, the number of sampling steps.

    Returns:
        long tensor of shape ``(num_inference_steps,)``, strictly descending, from
        ``num_steps - 1`` down to ``round(num_steps / n) - 1 >= 0``.

    Raises:
        ConfigError: ``num_inference_steps`` is not in ``[1, num_steps]``.
    """
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num_steps:
        raise ConfigError(
            f"num_inference_steps must be an integer in [1, {num_steps}], "
            f"got {num_inference_steps!r}"
        )
    values = [round(Fraction(num_steps * (n - i), n)) - 1 for i in range(n)]
    return torch.tensor(values, dtype=torch.long)


class _TrailingSampler:
    """Shared plumbing: timestep bookkeeping, splitting the model output, clipping x0."""

    timesteps: Tensor

    def __init__(self, schedule: NoiseSchedule, clip_sample: bool) -> None:
        self.schedule = schedule
        self.clip_sample = clip_sample
        self.set_timesteps(schedule.num_steps)

    @property
    def num_inference_steps(self) -> int:
        """Number of timesteps chosen by :meth:`set_timesteps`."""
        return int(self.timesteps.shape[0])

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` trailing timesteps and reset the sampler's state."""
        self.timesteps = trailing_timesteps(self.schedule.num_steps, num_inference_steps)
        self._position = {t: i for i, t in enumerate(self.timesteps.tolist())}
        # abar of every visited step as Python floats (float64), then abar = 1 after the last.
        self._abar = self.schedule.alphas_cumprod[self.timesteps].tolist() + [1.0]
        self._reset()

    def _reset(self) -> None:
        """Hook for subclasses: rebuild per-loop state after the timesteps change."""

    def _index(self, timestep: int | Tensor) -> int:
        """Position of ``timestep`` in :attr:`timesteps`."""
        key = int(timestep)
        if key not in self._position:
            raise ValueError(
                f"timestep {key} is not one of the {self.num_inference_steps} timesteps set by "
                "set_timesteps()"
            )
        return self._position[key]

    def _clip(self, x0: Tensor) -> Tensor:
        # Masks live in [-1, 1]; an x0 prediction outside that range is never right.
        return x0.clamp(-1.0, 1.0) if self.clip_sample else x0

    def _x0_and_eps(self, prediction: Tensor, sample: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """x0 and noise implied by the network's prediction at the ``i``-th visited step, each
        by its direct formula (unclipped)."""
        alpha, sigma = math.sqrt(self._abar[i]), math.sqrt(1.0 - self._abar[i])
        if self.schedule.prediction == "v":
            return alpha * sample - sigma * prediction, alpha * prediction + sigma * sample
        return (sample - sigma * prediction) / alpha, prediction


def _split_model_output(model_output: Tensor, sample: Tensor) -> tuple[Tensor, Tensor | None]:
    """Split ``(B, C or 2C, H, W)`` into the prediction (noise or v) and the variance values (or
    None)."""
    channels = sample.shape[1]
    if model_output.shape[1] == channels:
        return model_output, None
    if model_output.shape[1] == 2 * channels:
        return model_output[:, :channels], model_output[:, channels:]
    raise ValueError(
        f"model_output has {model_output.shape[1]} channels; expected {channels} or "
        f"{2 * channels} for a {channels}-channel sample"
    )


class DDPMSampler(_TrailingSampler):
    """Ancestral sampling (Ho et al. 2020), optionally on a respaced chain.

    With ``num_inference_steps < num_steps`` the visited timesteps form a shorter Markov chain
    whose betas are ``1 - abar_t / abar_prev_t`` (improved-diffusion respacing; diffusers'
    ``DDPMScheduler.set_timesteps`` does the same). No noise is added on the last step, which
    returns the posterior mean.

    Args:
        schedule: the training noise schedule.
        clip_sample: clamp the predicted x0 to ``[-1, 1]`` before forming the posterior mean.
        variance: reverse-process variance: ``"fixed_small"`` (posterior variance beta-tilde),
            ``"fixed_large"`` (beta), or ``"learned_range"`` (interpolated by the second half
            of a ``2C``-channel model output, see :meth:`NoiseSchedule.learned_log_variance`).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        clip_sample: bool = True,
        variance: DDPMVariance = "fixed_small",
    ) -> None:
        if variance not in ("fixed_small", "fixed_large", "learned_range"):
            raise ConfigError(
                f"unknown DDPM variance {variance!r}; "
                "expected 'fixed_small', 'fixed_large' or 'learned_range'"
            )
        self.variance = variance
        super().__init__(schedule, clip_sample)

    def _reset(self) -> None:
        self._chain = self.schedule.respace(self.timesteps)

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``x_prev ~ p(x_prev | x_t)``; see :class:`Sampler`."""
        prediction, v = _split_model_output(model_output, sample)
        if self.variance == "learned_range" and v is None:
            raise ConfigError(
                "variance='learned_range' needs a model that learns sigma "
                f"({2 * sample.shape[1]} output channels), got {model_output.shape[1]}"
            )
        # The respaced chain is indexed in ascending time; self.timesteps is descending.
        i = self._index(timestep)
        k = self.num_inference_steps - 1 - i
        t = torch.full((sample.shape[0],), k, dtype=torch.long, device=sample.device)

        x0 = self._clip(self._x0_and_eps(prediction, sample, i)[0])
        mean, _, log_var = self._chain.q_posterior_mean_variance(x0, sample, t)
        if k == 0:
            return mean
        if self.variance == "fixed_large":
            log_var = self._chain.extract("log_betas", t, sample)
        elif self.variance == "learned_range":
            log_var = self._chain.learned_log_variance(v, t)
        noise = torch.randn(
            sample.shape, generator=generator, device=sample.device, dtype=sample.dtype
        )
        return mean + torch.exp(0.5 * log_var) * noise


class DDIMSampler(_TrailingSampler):
    """DDIM (Song et al. 2021): deterministic for ``eta = 0``, DDPM-like for ``eta = 1``.

    When ``clip_sample`` clamps the x0 prediction, the noise is re-derived from the clamped x0
    (as guided-diffusion does; diffusers' ``use_clipped_model_output=True``), so that the step
    stays on the line through x0 and x_t.

    Args:
        schedule: the training noise schedule.
        eta: scale of the noise added at each step, ``>= 0``.
        clip_sample: clamp the predicted x0 to ``[-1, 1]``.
    """

    def __init__(
        self, schedule: NoiseSchedule, *, eta: float = 0.0, clip_sample: bool = True
    ) -> None:
        if not eta >= 0.0:
            raise ConfigError(f"DDIM eta must be >= 0, got {eta!r}")
        self.eta = float(eta)
        super().__init__(schedule, clip_sample)

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Return ``x_prev``; see :class:`Sampler`."""
        prediction, _ = _split_model_output(model_output, sample)
        i = self._index(timestep)
        abar, abar_prev = self._abar[i], self._abar[i + 1]

        x0, eps = self._x0_and_eps(prediction, sample, i)
        if self.clip_sample:
            x0 = self._clip(x0)
            eps = (sample - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)

        sigma = self.eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        direction = math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0))
        prev = math.sqrt(abar_prev) * x0 + direction * eps
        if sigma > 0.0:
            noise = torch.randn(
                sample.shape, generator=generator, device=sample.device, dtype=sample.dtype
            )
            prev = prev + sigma * noise
        return prev


class DPMSolverPPSampler(_TrailingSampler):
    """DPM-Solver++ multistep (Lu et al. 2022) with data (x0) prediction, orders 1 and 2.

    Matches diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_type="midpoint", final_sigmas_type="zero")``: the first step is first order (no
    history yet), the middle steps are second order (2M), and the last step goes to noise level 0,
    so it returns the x0 prediction itself. The x0 prediction of the previous step is kept between
    :meth:`step` calls and cleared by :meth:`set_timesteps`; a step that does not follow its
    predecessor in :attr:`timesteps` falls back to first order.

    Args:
        schedule: the training noise schedule.
        order: 1 (equivalent to deterministic DDIM) or 2.
        clip_sample: clamp each x0 prediction to ``[-1, 1]`` (the default of every sampler here).
            Not diffusers' default (its ``thresholding=True, sample_max_value=1.0`` is
            equivalent): masks live in ``[-1, 1]``.
        lower_order_final: kept for parity with diffusers. Because the last step lands on noise
            level 0, where the second-order correction is undefined, the last step is always
            first order, and for ``order <= 2`` this flag changes nothing.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        order: Literal[1, 2] = 2,
        clip_sample: bool = True,
        lower_order_final: bool = True,
    ) -> None:
        if order not in (1, 2):
            raise ConfigError(f"DPM-Solver++ order must be 1 or 2, got {order!r}")
        self.order = order
        self.lower_order_final = lower_order_final
        super().__init__(schedule, clip_sample)

    def _reset(self) -> None:
        # Signal and noise scales alpha = sqrt(abar), sigma = sqrt(1 - abar) of every visited
        # step, then (1, 0) for the final clean sample; lambda = log(alpha / sigma) is the
        # log-SNR the solver steps in.
        self._alpha = [math.sqrt(a) for a in self._abar]
        self._sigma = [math.sqrt(1.0 - a) for a in self._abar]
        self._lambda = [
            math.log(a) - math.log(s)
            for a, s in zip(self._alpha[:-1], self._sigma[:-1], strict=True)
        ]
        self._prev_x0: Tensor | None = None
        self._prev_index: int | None = None

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Return ``x_prev``; see :class:`Sampler`. ``generator`` is unused (deterministic)."""
        prediction, _ = _split_model_output(model_output, sample)
        i = self._index(timestep)
        x0 = self._clip(self._x0_and_eps(prediction, sample, i)[0])
        prev_x0, prev_index = self._prev_x0, self._prev_index
        self._prev_x0, self._prev_index = x0, i

        if i == self.num_inference_steps - 1:
            # sigma_next = 0: the first-order update reduces exactly to the x0 prediction.
            return x0

        alpha_next, sigma_next = self._alpha[i + 1], self._sigma[i + 1]
        h = self._lambda[i + 1] - self._lambda[i]
        phi = -math.expm1(-h)  # 1 - exp(-h), accurate for small h
        prev = (sigma_next / self._sigma[i]) * sample + (alpha_next * phi) * x0
        if self.order == 2 and prev_x0 is not None and prev_index == i - 1:
            # Midpoint 2M correction from the slope of x0 in lambda over the previous step.
            r = (self._lambda[i] - self._lambda[i - 1]) / h
            prev = prev + (0.5 * alpha_next * phi / r) * (x0 - prev_x0)
        return prev


_SAMPLERS: dict[str, type[DDPMSampler] | type[DDIMSampler] | type[DPMSolverPPSampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "dpm++": DPMSolverPPSampler,
}


def make_sampler(name: SamplerName, schedule: NoiseSchedule, **kwargs: object) -> Sampler:
    """Build the sampler called ``name`` (``"ddpm"``, ``"ddim"`` or ``"dpm++"``).

    Args:
        name: the algorithm.
        schedule: the training noise schedule.
        **kwargs: keyword options of that sampler's class (e.g. ``eta`` for DDIM).

    Raises:
        ConfigError: unknown name, or an option the sampler does not have.
    """
    cls = _SAMPLERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown sampler {name!r}; expected one of {sorted(_SAMPLERS)}")
    options = set(inspect.signature(cls.__init__).parameters) - {"self", "schedule"}
    unknown = sorted(set(kwargs) - options)
    if unknown:
        raise ConfigError(
            f"sampler {name!r} has no option {unknown[0]!r}; it accepts {sorted(options)}"
        )
    return cls(schedule, **kwargs)
