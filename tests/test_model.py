"""The MedSegDiff network: shapes, DCE/FF-Parser behaviour, and what Opacus will need."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsegdiff_core.model import (
    PRESETS,
    DynamicConditionalEncoding,
    FFParser,
    MedSegDiffUNet,
    resolve_spec,
)


@pytest.mark.parametrize(
    ("image_channels", "mask_channels", "size"), [(1, 1, 32), (3, 2, 48), (4, 3, 32)]
)
def test_any_channels_and_sizes(image_channels: int, mask_channels: int, size: int) -> None:
    spec = resolve_spec(
        "tiny", image_channels=image_channels, mask_channels=mask_channels, image_size=size
    )
    model = MedSegDiffUNet(spec)
    x = torch.randn(2, mask_channels, size, size)
    out = model(x, torch.tensor([3, 900]), torch.randn(2, image_channels, size, size))
    assert out.shape == x.shape


def test_learn_sigma_doubles_output_channels() -> None:
    model = MedSegDiffUNet(resolve_spec("tiny", mask_channels=2, learn_sigma=True))
    out = model(torch.randn(1, 2, 32, 32), torch.tensor([10]), torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 4, 32, 32)


def test_image_size_must_divide_by_downsampling_factor() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        MedSegDiffUNet(resolve_spec("tiny", image_size=30))


def test_reference_presets_have_the_paper_settings() -> None:
    b = PRESETS["b"]
    assert (b.base_channels, b.num_res_blocks, b.image_size) == (128, 2, 256)
    assert b.image_size // max(b.attention_ds) == 16  # attention at 16 px features
    assert PRESETS["pp"].base_channels == 512 and PRESETS["pp"].num_res_blocks == 12


def test_no_batchnorm_anywhere() -> None:
    for name in ("tiny", "small", "b"):
        model = MedSegDiffUNet(resolve_spec(name))
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_denoise_with_cached_image_features_equals_forward() -> None:
    torch.manual_seed(0)
    model = MedSegDiffUNet(resolve_spec("tiny", mask_channels=2)).eval()
    for p in model.parameters():  # leave the zero-initialised identity start
        p.data.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 32, 32)
    x = torch.randn(6, 2, 32, 32)  # 3 members per image, image-major
    t = torch.tensor([5, 50, 500, 5, 50, 500])
    with torch.no_grad():
        cached = model.denoise(x, t, model.encode_image(images))
        direct = model(x, t, images.repeat_interleave(3, dim=0))
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-4)


def test_image_features_do_not_depend_on_mask_or_step() -> None:
    model = MedSegDiffUNet(resolve_spec("tiny"))
    image = torch.randn(1, 3, 32, 32)
    a = model.encode_image(image)
    b = model.encode_image(image.clone())
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert "timesteps" not in model.encode_image.__code__.co_varnames


def test_ff_parser_starts_as_identity_and_filters_frequencies() -> None:
    parser = FFParser(4, 16, 16)
    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(parser(x), x, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        parser.weight_real.zero_()
        parser.weight_real[:, 0, 0] = 1.0  # keep only the DC component
    out = parser(x)
    torch.testing.assert_close(
        out, x.mean(dim=(-2, -1), keepdim=True).expand_as(x), atol=1e-5, rtol=1e-5
    )


def test_ff_parser_weights_get_gradients() -> None:
    parser = FFParser(2, 8, 8)
    parser(torch.randn(1, 2, 8, 8)).pow(2).sum().backward()
    assert parser.weight_real.grad.abs().sum() > 0 and parser.weight_imag.grad.abs().sum() > 0


def test_dce_is_the_papers_normalised_product() -> None:
    torch.manual_seed(0)
    dce = DynamicConditionalEncoding(4, 8)
    m, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ln = nn.functional.layer_norm
    attention = ln(m, m.shape[1:]) * ln(c, c.shape[1:]) * c  # FF-Parser is the identity at init
    expected = m + dce.block(attention)
    torch.testing.assert_close(dce(m, c), expected, atol=1e-5, rtol=1e-4)


def test_image_actually_conditions_the_output() -> None:
    torch.manual_seed(0)
    model = MedSegDiffUNet(resolve_spec("tiny"))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([100])
    with torch.no_grad():
        a = model(x, t, torch.randn(1, 3, 32, 32))
        b = model(x, t, torch.randn(1, 3, 32, 32))
    assert (a - b).abs().max() > 1e-3
