"""The optimisation loop itself (``train_steps``): what one step does to the weights."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from medsegdiff_core.config import parse_config
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.training import ProximalTerm, batch_loss, train_steps


def test_fedprox_gradient_is_added_after_gradient_clipping() -> None:
    """Clipping must bound the loss gradient only: the proximal gradient mu (w - w_ref) is added
    afterwards, whole (as on the DP path). Clipped together, a clip at 1.0 cut mu to ~0.16x."""
    config = parse_config(
        {"model": {"preset": "tiny", "image_size": 32, "base_channels": 8}, "diffusion": {}}
    )
    schedule = config.diffusion.noise_schedule()
    torch.manual_seed(0)
    base = MedSegDiffUNet(config.unet_spec())
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "mask": (torch.rand(4, 2, 32, 32) > 0.5).float(),
    }
    reference = {n: p.detach() - 1.0 for n, p in base.named_parameters()}  # w - w_ref = 1
    mu, clip = 0.3, 1e-3  # a clip that binds: the loss gradient's norm is far above it

    expected_model = copy.deepcopy(base)
    torch.manual_seed(5)
    batch_loss(expected_model, schedule, batch)["loss"].backward()
    norm = nn.utils.clip_grad_norm_(expected_model.parameters(), clip)
    assert norm > 10 * clip
    expected = {
        n: p.detach() - p.grad - mu * (p.detach() - reference[n])
        for n, p in expected_model.named_parameters()
    }

    model = copy.deepcopy(base)
    torch.manual_seed(5)
    train_steps(
        model,
        schedule,
        itertools.repeat(batch),
        torch.optim.SGD(model.parameters(), lr=1.0),
        1,
        grad_clip=clip,
        proximal=ProximalTerm(mu, reference),
    )
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-4, atol=1e-6, msg=name)
