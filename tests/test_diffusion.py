"""Tests of medsegdiff_core.diffusion: schedules, the training loss and the samplers.

The samplers are checked step for step against diffusers' schedulers configured with the same
betas. diffusers keeps ``alphas_cumprod`` in float32 and re-derives each step's beta as
``1 - abar_t / abar_prev`` from it, which loses up to 0.1 % of the small betas near ``t = 0``; the
reference schedulers are therefore given our float64 ``alphas_cumprod`` so that the comparison
measures the algorithms, not float32 round-off.
"""

import math

import pytest
import torch

from medsegdiff_core.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    NoiseSchedule,
    Sampler,
    diffusion_loss,
    make_betas,
    make_sampler,
    trailing_timesteps,
)
from medsegdiff_core.errors import ConfigError

try:
    import diffusers
except ImportError:  # only the comparisons with diffusers skip; the rest must always run
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")

# Our float64 alphas_cumprod, handed to DPMSolverMultistepScheduler, meets its np.array() call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SCHEDULE_NAMES = ["linear", "cosine"]
SHAPE = (3, 1, 8, 8)


@pytest.fixture(scope="module", params=SCHEDULE_NAMES)
def schedule(request: pytest.FixtureRequest) -> NoiseSchedule:
    # Betas rounded to float32 so that diffusers (which stores them as float32) sees the same ones.
    return NoiseSchedule(make_betas(request.param, 1000).float().double())


def reference(cls: type, schedule: NoiseSchedule, **config: object):
    """A diffusers scheduler with our betas, trailing spacing and float64 alphas_cumprod."""
    scheduler = cls(
        num_train_timesteps=schedule.num_steps,
        trained_betas=schedule.betas.numpy(),
        timestep_spacing="trailing",
        prediction_type="epsilon",
        **config,
    )
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def fake_eps(sample: torch.Tensor, t: int, learned: bool = False) -> torch.Tensor:
    """A deterministic stand-in for the network; with ``learned`` it also returns ``v``."""
    eps = 0.3 * sample + math.sin(t)
    if learned:
        return torch.cat([eps, torch.tanh(sample + 0.001 * t)], dim=1)
    return eps


def start_sample(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_both(ours, theirs, num_inference_steps: int, *, learned=False, **step_kwargs):
    """Run the same loop (same start, same noise) with our sampler and a diffusers scheduler."""
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    a = b = start_sample()
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ours.timesteps:
        a = ours.step(fake_eps(a, int(t), learned), int(t), a, generator=gen_a)
        b = theirs.step(fake_eps(b, int(t), learned), t, b, generator=gen_b, **step_kwargs)
        b = b.prev_sample
    return a, b


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor, rel: float) -> None:
    """``|ours - theirs| <= rel * max(1, max |theirs|)``: samples far outside [-1, 1] (no clipping,
    cosine schedule) are only as exact as float32 allows relative to their size."""
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} at scale {scale:.3g}"


# --- schedule -------------------------------------------------------------------------------


@needs_diffusers
def test_linear_betas_match_diffusers_and_rescale_with_num_steps() -> None:
    ref = diffusers.DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    schedule = NoiseSchedule.from_name("linear", 1000)
    assert schedule.betas.dtype == torch.float64
    torch.testing.assert_close(schedule.betas.float(), ref.betas)
    torch.testing.assert_close(
        schedule.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=0
    )
    short = make_betas("linear", 250)
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)


@pytest.mark.parametrize("t", [0, 10, 250, 500, 900, 998])
def test_cosine_schedule_follows_nichol_dhariwal(t: int) -> None:
    def f(step: float) -> float:
        return math.cos((step / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    schedule = NoiseSchedule.from_name("cosine", 1000)
    # alphas_cumprod[t] is abar after step t, i.e. at continuous time (t + 1) / T.
    assert schedule.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12)


@needs_diffusers
def test_cosine_betas_match_diffusers_and_are_clipped() -> None:
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    betas = make_betas("cosine", 1000)
    torch.testing.assert_close(betas.float(), ref.betas, rtol=1e-5, atol=1e-7)
    assert betas.max().item() == pytest.approx(0.999)


@needs_diffusers
def test_posterior_matches_hand_formula_and_diffusers(schedule: NoiseSchedule) -> None:
    ref = reference(diffusers.DDPMScheduler, schedule)
    betas, abar = schedule.betas, schedule.alphas_cumprod
    for t in [1, 2, 100, 500, 999]:
        expected = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
        assert schedule.posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-12)
        assert ref._get_variance(t).item() == pytest.approx(expected.item(), rel=1e-9)
    assert schedule.posterior_variance[0].item() == 0.0
    assert schedule.posterior_log_variance_clipped[0] == schedule.posterior_log_variance_clipped[1]

    x0, x_t = torch.rand(SHAPE) * 2 - 1, torch.randn(SHAPE)
    t = torch.tensor([0, 37, 999])
    mean, var, log_var = schedule.q_posterior_mean_variance(x0, x_t, t)
    assert mean.shape == SHAPE and var.shape == (3, 1, 1, 1) and log_var.shape == (3, 1, 1, 1)
    for i, step in enumerate(t.tolist()):
        abar_prev = abar[step - 1].item() if step > 0 else 1.0
        a, b = abar[step].item(), betas[step].item()
        hand = (math.sqrt(abar_prev) * b * x0[i] + math.sqrt(1 - b) * (1 - abar_prev) * x_t[i]) / (
            1 - a
        )
        torch.testing.assert_close(mean[i], hand)


@needs_diffusers
def test_q_sample_matches_diffusers_and_inverts(schedule: NoiseSchedule) -> None:
    ref = reference(diffusers.DDPMScheduler, schedule)
    x0, noise = torch.rand(SHAPE) * 2 - 1, torch.randn(SHAPE)
    t = torch.tensor([0, 400, 999])
    x_t = schedule.q_sample(x0, t, noise)
    assert x_t.dtype == torch.float32 and x_t.shape == SHAPE
    torch.testing.assert_close(x_t, ref.add_noise(x0, noise, t))
    # Inverting near t = 999 divides by sqrt(abar) ~ 1e-4 (cosine), which float32 cannot absorb;
    # float64 inputs get float64 coefficients.
    x0, noise = x0.double(), noise.double()
    x_t = schedule.q_sample(x0, t, noise)
    assert x_t.dtype == torch.float64
    torch.testing.assert_close(schedule.predict_eps_from_x0(x_t, t, x0), noise)
    torch.testing.assert_close(schedule.predict_x0_from_eps(x_t, t, noise), x0)


def test_extract_casts_to_input_dtype_and_shape() -> None:
    schedule = NoiseSchedule.from_name("linear", 100)
    like = torch.zeros(2, 3, 4, 5, dtype=torch.float16)
    picked = schedule.extract("betas", torch.tensor([0, 99]), like)
    assert picked.dtype == torch.float16 and picked.shape == (2, 1, 1, 1)
    assert picked[1].item() == pytest.approx(0.2, rel=1e-3)


def test_respace_keeps_alphas_cumprod() -> None:
    schedule = NoiseSchedule.from_name("cosine", 1000)
    assert schedule.respace(range(1000)) is schedule
    kept = trailing_timesteps(1000, 10)
    chain = schedule.respace(kept)
    assert chain.num_steps == 10
    torch.testing.assert_close(chain.alphas_cumprod, schedule.alphas_cumprod[kept.flip(0)])


@pytest.mark.parametrize(
    ("schedule_name", "num_steps", "needle"),
    [
        ("quadratic", 100, "'quadratic'"),
        ("linear", 0, "0"),
        ("cosine", -3, "-3"),
        ("linear", 20, "20"),
    ],
)
def test_bad_schedule_raises_config_error(schedule_name: str, num_steps: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        NoiseSchedule.from_name(schedule_name, num_steps)  # type: ignore[arg-type]


# --- loss -----------------------------------------------------------------------------------


def test_loss_shapes_and_reductions() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.randint(0, 2, SHAPE).float() * 2 - 1
    gen = torch.Generator().manual_seed(0)
    mean = diffusion_loss(lambda x, t: 0.5 * x, x0, schedule, generator=gen)
    assert set(mean) == {"loss", "mse"} and mean["loss"].shape == ()
    gen = torch.Generator().manual_seed(0)
    per_sample = diffusion_loss(lambda x, t: 0.5 * x, x0, schedule, generator=gen, reduction="none")
    assert per_sample["loss"].shape == (3,)
    torch.testing.assert_close(per_sample["loss"].mean(), mean["loss"])
    with pytest.raises(ConfigError, match="2 channels"):
        diffusion_loss(lambda x, t: torch.cat([x, x], 1), x0, schedule)


def test_perfect_predictor_has_zero_mse() -> None:
    schedule = NoiseSchedule.from_name("cosine", 1000)
    x0 = torch.randint(0, 2, SHAPE).float() * 2 - 1
    noise, t = torch.randn(SHAPE), torch.tensor([0, 500, 999])
    terms = diffusion_loss(lambda x, step: noise, x0, schedule, t=t, noise=noise)
    assert terms["mse"].item() == 0.0 and terms["loss"].item() == 0.0


def test_learned_sigma_loss_is_finite_and_trains_both_halves() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.randint(0, 2, SHAPE).float() * 2 - 1
    output = torch.randn(3, 2, 8, 8).mul(0.5).requires_grad_()
    t = torch.tensor([0, 1, 700])  # t = 0 exercises the decoder NLL, t > 0 the KL
    terms = diffusion_loss(lambda x, step: output, x0, schedule, learn_sigma=True, t=t)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(torch.isfinite(value) for value in terms.values())

    terms["vb"].backward(retain_graph=True)
    # Stop-gradient on the mean: the bound reaches only the variance half.
    assert output.grad[:, :1].abs().max() == 0 and output.grad[:, 1:].abs().max() > 0
    output.grad = None
    terms["loss"].backward()
    assert output.grad[:, :1].abs().max() > 0 and output.grad[:, 1:].abs().max() > 0


def test_vb_term_is_the_posterior_kl_in_bits() -> None:
    schedule = NoiseSchedule.from_name("linear", 500)
    x0 = torch.randint(0, 2, SHAPE).float() * 2 - 1
    noise, step = torch.randn(SHAPE), 200
    t = torch.full((3,), step)
    offset = 0.1

    def model(x, _t):
        return torch.cat([noise + offset, torch.zeros_like(noise)], dim=1)  # v = 0: halfway

    vb = diffusion_loss(model, x0, schedule, learn_sigma=True, t=t, noise=noise, reduction="none")
    # Hand formula in float64: the means differ by coef1 * sqrt(1/abar - 1) * offset everywhere.
    abar = schedule.alphas_cumprod[step].item()
    coef1 = schedule.posterior_mean_coef1[step].item()
    true_log_var = math.log(schedule.posterior_variance[step].item())
    model_log_var = 0.5 * (math.log(schedule.betas[step].item()) + true_log_var)
    gap = coef1 * math.sqrt(1 / abar - 1) * offset
    kl = 0.5 * (
        -1
        + model_log_var
        - true_log_var
        + math.exp(true_log_var - model_log_var)
        + gap**2 * math.exp(-model_log_var)
    )
    expected = kl / math.log(2) * (500 / 1000)
    torch.testing.assert_close(vb["vb"], torch.full((3,), expected), rtol=1e-4, atol=0)


def test_vb_vanishes_when_model_equals_posterior() -> None:
    schedule = NoiseSchedule.from_name("cosine", 1000)
    x0 = torch.randint(0, 2, SHAPE).float() * 2 - 1
    noise, t = torch.randn(SHAPE), torch.tensor([1, 400, 999])
    # Exact noise and v = -1 (variance beta-tilde) reproduce q(x_{t-1} | x_t, x0) exactly.
    output = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    terms = diffusion_loss(lambda x, s: output, x0, schedule, learn_sigma=True, t=t, noise=noise)
    assert terms["vb"].item() == pytest.approx(0.0, abs=1e-5)


# --- samplers against diffusers --------------------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("n", [1, 3, 7, 20, 50, 250, 1000])
def test_timesteps_equal_diffusers_trailing(n: int) -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    for ours, cls in [
        (DDPMSampler(schedule), diffusers.DDPMScheduler),
        (DDIMSampler(schedule), diffusers.DDIMScheduler),
        (DPMSolverPPSampler(schedule), diffusers.DPMSolverMultistepScheduler),
    ]:
        theirs = reference(cls, schedule)
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert ours.timesteps.dtype == torch.long
        assert torch.equal(ours.timesteps, theirs.timesteps)
        assert ours.timesteps[0].item() == 999


def test_trailing_timesteps_are_exact_where_diffusers_float_arange_is_not() -> None:
    # diffusers returns 62 timesteps ending in -1 for 61 steps of 1000.
    steps = trailing_timesteps(1000, 61)
    assert len(steps) == 61 and steps[-1].item() >= 0
    assert bool((steps[1:] < steps[:-1]).all())


@needs_diffusers
@pytest.mark.parametrize("n", [1000, 50])
def test_ddpm_matches_diffusers(schedule: NoiseSchedule, n: int) -> None:
    ours, theirs = run_both(DDPMSampler(schedule), reference(diffusers.DDPMScheduler, schedule), n)
    # diffusers also adds noise on a respaced chain's last step, with std sqrt(1e-20).
    assert_matches(ours, theirs, rel=1e-5)


@needs_diffusers
def test_ddpm_learned_range_matches_diffusers(schedule: NoiseSchedule) -> None:
    ours = DDPMSampler(schedule, variance="learned_range")
    theirs = reference(diffusers.DDPMScheduler, schedule, variance_type="learned_range")
    a, b = run_both(ours, theirs, 1000, learned=True)
    assert_matches(a, b, rel=1e-5)


@needs_diffusers
@pytest.mark.parametrize(
    ("variance", "diffusers_variance"),
    [("fixed_large", "fixed_large"), ("learned_range", "learned_range")],
)
def test_respaced_ddpm_steps_match_diffusers(
    schedule: NoiseSchedule, variance: str, diffusers_variance: str
) -> None:
    ours = DDPMSampler(schedule, variance=variance)  # type: ignore[arg-type]
    theirs = reference(diffusers.DDPMScheduler, schedule, variance_type=diffusers_variance)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    x = start_sample()
    # The last step is left out: we return the posterior mean there (improved-diffusion), while
    # diffusers adds noise whenever t > 0, and a trailing chain ends at t = 19.
    for t in ours.timesteps[:-1].tolist():
        out = fake_eps(x, t, learned=variance == "learned_range")
        a = ours.step(out, t, x, generator=torch.Generator().manual_seed(t))
        b = theirs.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert_matches(a, b, rel=1e-5)
        x = a


@needs_diffusers
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_matches_diffusers(schedule: NoiseSchedule, clip: bool) -> None:
    ours = DDIMSampler(schedule, clip_sample=clip)
    theirs = reference(diffusers.DDIMScheduler, schedule, clip_sample=clip)
    a, b = run_both(ours, theirs, 20, use_clipped_model_output=True)
    assert_matches(a, b, rel=1e-6)


@needs_diffusers
def test_stochastic_ddim_matches_diffusers(schedule: NoiseSchedule) -> None:
    ours = DDIMSampler(schedule, eta=1.0)
    theirs = reference(diffusers.DDIMScheduler, schedule)
    a, b = run_both(ours, theirs, 20, eta=1.0, use_clipped_model_output=True)
    assert_matches(a, b, rel=1e-6)


@needs_diffusers
@pytest.mark.parametrize(("clip", "n"), [(False, 20), (True, 20), (False, 5), (False, 1)])
def test_dpm_solver_pp_matches_diffusers(schedule: NoiseSchedule, clip: bool, n: int) -> None:
    ours = DPMSolverPPSampler(schedule, clip_sample=clip)
    # Dynamic thresholding capped at 1 is exactly clamping to [-1, 1].
    theirs = reference(
        diffusers.DPMSolverMultistepScheduler,
        schedule,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        thresholding=clip,
        sample_max_value=1.0,
    )
    a, b = run_both(ours, theirs, n)
    # diffusers rounds its noise levels to float32.
    assert_matches(a, b, rel=2e-6)


def test_samplers_use_only_the_eps_half_of_a_learned_sigma_output() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    x = start_sample()
    eps = fake_eps(x, 999)
    doubled = torch.cat([eps, torch.full_like(eps, 0.7)], dim=1)
    for sampler in (DDIMSampler(schedule), DPMSolverPPSampler(schedule), DDPMSampler(schedule)):
        sampler.set_timesteps(10)
        plain = sampler.step(eps, 999, x, generator=torch.Generator().manual_seed(0))
        sampler.set_timesteps(10)
        both = sampler.step(doubled, 999, x, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(plain, both)


# --- samplers on their own ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n", "dtype", "atol"),
    [
        ("ddim", 20, torch.float32, 1e-4),
        ("dpm++", 20, torch.float32, 1e-4),
        ("ddpm", 50, torch.float32, 1e-4),
        # One to three steps start from abar ~ 1e-8 (cosine): float32 would lose ~1e-3 there.
        ("ddim", 1, torch.float64, 1e-9),
        ("dpm++", 3, torch.float64, 1e-9),
        ("ddpm", 1000, torch.float64, 1e-9),
    ],
)
def test_true_noise_recovers_x0(
    schedule: NoiseSchedule, name: str, n: int, dtype: torch.dtype, atol: float
) -> None:
    x0 = torch.randint(0, 2, SHAPE, generator=torch.Generator().manual_seed(3)).to(dtype) * 2 - 1
    noise = start_sample(seed=4).to(dtype)
    sampler = make_sampler(name, schedule)  # type: ignore[arg-type]
    assert isinstance(sampler, Sampler)
    sampler.set_timesteps(n)
    first = sampler.timesteps[:1].expand(SHAPE[0])
    x = schedule.q_sample(x0, first, noise)
    gen = torch.Generator().manual_seed(5)
    for t in sampler.timesteps.tolist():
        t_batch = torch.full((SHAPE[0],), t)
        eps = schedule.predict_eps_from_x0(x, t_batch, x0)
        x = sampler.step(eps, t, x, generator=gen)
    # DDPM wanders off the forward trajectory, but its last step (abar_prev = 1) is exactly x0.
    assert x.dtype == dtype
    torch.testing.assert_close(x, x0, atol=atol, rtol=0)


def test_dpm_solver_state_resets_with_set_timesteps() -> None:
    schedule = NoiseSchedule.from_name("cosine", 1000)
    sampler = DPMSolverPPSampler(schedule, clip_sample=True)
    results = []
    for _ in range(2):
        sampler.set_timesteps(8)
        x = start_sample()
        for t in sampler.timesteps.tolist():
            x = sampler.step(fake_eps(x, t), t, x)
        results.append(x)
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


def test_batch_members_are_sampled_independently() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    sampler = DDIMSampler(schedule)
    sampler.set_timesteps(10)
    batch = start_sample()
    x = batch
    for t in sampler.timesteps.tolist():
        x = sampler.step(fake_eps(x, t), t, x)
    single = batch[1:2]
    for t in sampler.timesteps.tolist():
        single = sampler.step(fake_eps(single, t), t, single)
    torch.testing.assert_close(x[1:2], single)


def test_sampler_errors() -> None:
    schedule = NoiseSchedule.from_name("linear", 100)
    with pytest.raises(ConfigError, match="'euler'"):
        make_sampler("euler", schedule)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'variance'"):
        make_sampler("ddim", schedule, variance="fixed_small")
    with pytest.raises(ConfigError, match="'learned'"):
        DDPMSampler(schedule, variance="learned")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="101"):
        DDIMSampler(schedule).set_timesteps(101)
    with pytest.raises(ConfigError, match="0"):
        DDIMSampler(schedule).set_timesteps(0)
    sampler = DDPMSampler(schedule, variance="learned_range")
    x = start_sample()
    with pytest.raises(ConfigError, match="learned_range"):
        sampler.step(x, 99, x)
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 98"):
        sampler.step(torch.cat([x, x], dim=1), 98, x)


def test_velocity_round_trips_to_noise_and_perfect_v_has_zero_loss() -> None:
    from medsegdiff_core.diffusion import NoiseSchedule, diffusion_loss

    schedule = NoiseSchedule.from_name("cosine", 1000)
    torch.manual_seed(0)
    x0 = torch.randn(4, 2, 8, 8).sign()
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    x_t = schedule.q_sample(x0, t, noise)
    v = schedule.velocity(x0, t, noise)
    torch.testing.assert_close(schedule.eps_from_velocity(x_t, t, v), noise, atol=1e-4, rtol=1e-4)
    # at the last step v is (minus) the clean mask: the network must segment from the image
    torch.testing.assert_close(v[3], -x0[3], atol=1e-3, rtol=0)
    v_schedule = NoiseSchedule.from_name("cosine", 1000, prediction="v")
    losses = diffusion_loss(
        lambda xt, tt: v_schedule.velocity(x0, tt, noise), x0, v_schedule, t=t, noise=noise
    )
    assert float(losses["loss"]) < 1e-10
    # the same output read as noise is wrong: the prediction type is what makes it right
    as_noise = diffusion_loss(lambda xt, tt: v, x0, schedule, t=t, noise=noise)
    assert float(as_noise["loss"]) > 0.1
    assert v_schedule.respace([0, 500, 999]).prediction == "v"


def test_unknown_prediction_is_a_config_error() -> None:
    from medsegdiff_core.diffusion import NoiseSchedule
    from medsegdiff_core.errors import ConfigError

    with pytest.raises(ConfigError, match="'x1'"):
        NoiseSchedule.from_name("linear", 100, prediction="x1")  # type: ignore[arg-type]


def test_diffusion_config_builds_a_schedule_that_carries_its_prediction() -> None:
    from medsegdiff_core.config import DiffusionConfig

    schedule = DiffusionConfig(steps=200, schedule="cosine", prediction="v").noise_schedule()
    assert (schedule.num_steps, schedule.prediction) == (200, "v")


@pytest.mark.parametrize("name", ["ddim", "dpm++", "ddpm"])
def test_v_prediction_gives_x0_directly_at_high_noise(name: str) -> None:
    """A perfect v at t = 999 (cosine, float32) must give x0 to float32 precision: the old path
    through the noise (v -> eps -> x0) was off by about 5e-3 there."""
    schedule = NoiseSchedule.from_name("cosine", 1000, prediction="v")
    x0 = torch.randint(0, 2, SHAPE, generator=torch.Generator().manual_seed(3)).float() * 2 - 1
    noise = start_sample(seed=4)
    t = torch.full((SHAPE[0],), 999)
    x_t = schedule.q_sample(x0, t, noise)
    v = schedule.velocity(x0, t, noise)
    torch.testing.assert_close(schedule.x0_from_output(x_t, t, v), x0, atol=1e-5, rtol=0)
    sampler = make_sampler(name, schedule)  # type: ignore[arg-type]
    sampler.set_timesteps(1)
    out = sampler.step(v, 999, x_t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_every_sampler_clips_x0_by_default() -> None:
    """One default, as the README states: each x0 estimate is clipped to [-1, 1]."""
    schedule = NoiseSchedule.from_name("linear", 1000)
    x = start_sample()
    for cls in (DDPMSampler, DDIMSampler, DPMSolverPPSampler):
        sampler = cls(schedule)
        assert sampler.clip_sample, cls.__name__
        sampler.set_timesteps(1)
        # a wildly wrong noise prediction: the one-step result is the (clipped) x0 estimate
        out = sampler.step(torch.full_like(x, -50.0), 999, x)
        assert out.abs().max() <= 1.0 + 1e-6, cls.__name__


def test_x0_loss_scores_the_networks_mask_estimate_and_high_noise_sampling() -> None:
    from medsegdiff_core.diffusion import TrainingObjective, draw_timesteps_and_noise

    schedule = NoiseSchedule.from_name("linear", 1000, prediction="v")
    x0 = torch.randint(0, 2, SHAPE, generator=torch.Generator().manual_seed(3)).float() * 2 - 1
    noise = start_sample(seed=4)
    t = torch.tensor([10, 500, 999])
    objective = TrainingObjective(x0_loss_weight=0.5)
    right = diffusion_loss(
        lambda xt, tt: schedule.velocity(x0, tt, noise),
        x0,
        schedule,
        t=t,
        noise=noise,
        reduction="none",
        objective=objective,
    )
    wrong = diffusion_loss(
        lambda xt, tt: schedule.velocity(-x0, tt, noise),
        x0,
        schedule,
        t=t,
        noise=noise,
        reduction="none",
        objective=objective,
    )
    assert right["seg"].shape == (3,)
    torch.testing.assert_close(right["loss"], right["mse"] + 0.5 * right["seg"])
    # the exact mask scores far better than its inverse; more so the noisier the step
    assert bool((wrong["seg"] > right["seg"] + 0.1)[1:].all())
    assert float(wrong["seg"][2]) > float(wrong["seg"][0])
    t_drawn, _ = draw_timesteps_and_noise(
        schedule,
        torch.zeros(20000, 1, 1, 1),
        generator=torch.Generator().manual_seed(0),
        sampling="high_noise",
    )
    upper = float((t_drawn >= 500).float().mean())
    assert 0.69 < upper < 0.73 and int(t_drawn.max()) <= 999 and int(t_drawn.min()) >= 0
