"""Ensemble inference: members batched, the image encoded once, same result as one by one."""

from __future__ import annotations

import pytest
import torch

from medsegdiff_core.config import InferenceConfig
from medsegdiff_core.diffusion import NoiseSchedule, make_sampler
from medsegdiff_core.ensemble import sample_members, segment
from medsegdiff_core.model import MedSegDiffUNet, resolve_spec


@pytest.fixture(scope="module")
def model() -> MedSegDiffUNet:
    torch.manual_seed(0)
    net = MedSegDiffUNet(resolve_spec("tiny", mask_channels=2)).eval()
    for p in net.parameters():  # a non-trivial function, not the zero-initialised start
        p.data.add_(0.05 * torch.randn_like(p))
    return net


SCHEDULE = NoiseSchedule.from_name("linear", 1000)


def test_batched_ensemble_equals_members_one_by_one(model: MedSegDiffUNet) -> None:
    images = torch.randn(2, 3, 32, 32)
    cfg = InferenceConfig(sampler="ddim", sampling_steps=8, ensemble=3)
    batched = sample_members(
        model, SCHEDULE, images, cfg, generator=torch.Generator().manual_seed(1)
    )

    # Reference: the plain loop, one member at a time, re-encoding the image at every step.
    noise = torch.randn((6, 2, 32, 32), generator=torch.Generator().manual_seed(1))
    for index in range(6):
        sampler = make_sampler("ddim", SCHEDULE, clip_sample=True)
        sampler.set_timesteps(8)
        x = noise[index : index + 1]
        image = images[index // 3 : index // 3 + 1]
        with torch.no_grad():
            for t in sampler.timesteps.tolist():
                x = sampler.step(model(x, torch.tensor([t]), image), t, x)
        expected = (x.clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(
            batched[index // 3, index % 3], expected[0], atol=1e-4, rtol=1e-4
        )


def test_image_is_encoded_once_per_call(model: MedSegDiffUNet) -> None:
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        cfg = InferenceConfig(sampler="dpm++", sampling_steps=10, ensemble=4)
        members = sample_members(model, SCHEDULE, torch.randn(3, 3, 32, 32), cfg)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert members.shape == (3, 4, 2, 32, 32)
    assert members.min() >= 0 and members.max() <= 1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_segment_outputs(model: MedSegDiffUNet, sampler: str) -> None:
    cfg = InferenceConfig(sampler=sampler, sampling_steps=5, ensemble=3, fusion="staple")
    result = segment(
        model, SCHEDULE, torch.randn(2, 3, 32, 32), cfg, generator=torch.Generator().manual_seed(0)
    )
    assert result.probability.shape == (2, 2, 32, 32)
    assert result.mask.dtype == torch.bool
    assert torch.equal(result.mask, result.probability >= 0.5)
    assert result.uncertainty.min() >= 0 and result.uncertainty.max() <= 1
    # members start from different noise, so a stochastic model gives different members
    assert (result.members[:, 0] - result.members[:, 1]).abs().max() > 0


def test_seeded_inference_is_reproducible(model: MedSegDiffUNet) -> None:
    cfg = InferenceConfig(sampler="ddpm", sampling_steps=10, ensemble=2)
    images = torch.randn(1, 3, 32, 32)
    a = sample_members(model, SCHEDULE, images, cfg, generator=torch.Generator().manual_seed(3))
    b = sample_members(model, SCHEDULE, images, cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bf16_autocast_policy() -> None:
    """bf16 on CUDA always; on a CPU for inference only, and only with native bf16."""
    from medsegdiff_core.training import autocast_dtype, cpu_computes_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cuda, True) is torch.bfloat16
    assert autocast_dtype(cuda, False) is None
    assert autocast_dtype(cpu, True) is None  # CPU training stays float32
    native = torch.bfloat16 if cpu_computes_bf16() else None
    assert autocast_dtype(cpu, True, inference=True) is native
    assert autocast_dtype(cpu, False, inference=True) is None
