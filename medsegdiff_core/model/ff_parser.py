"""FF-Parser: the paper's learnable frequency filter (MedSegDiff, Sec. 2.2).

The noisy-mask features carry high-frequency noise that would corrupt the image features they
are fused with. The FF-Parser takes the 2-D FFT of the feature map, multiplies it element-wise by a
learnable complex attention map (one value per channel and frequency), and transforms back.
Cost is O(C·H·W·log(HW)) — negligible next to the convolutions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FFParser(nn.Module):
    """Learnable complex filter in the 2-D Fourier domain of a (B, C, H, W) feature map.

    The filter is stored as two real tensors (real and imaginary parts) of shape
    (C, H, W // 2 + 1) — the half spectrum of a real signal — because optimisers, safetensors and
    federated aggregation all handle real tensors. It starts as the identity (1 + 0j).
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.weight_real = nn.Parameter(torch.ones(channels, height, width // 2 + 1))
        self.weight_imag = nn.Parameter(torch.zeros(channels, height, width // 2 + 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.height, self.width):
            raise ValueError(
                f"FF-Parser built for {self.height}x{self.width} features, got "
                f"{x.shape[-2]}x{x.shape[-1]}: the model's image_size must match its input"
            )
        dtype = x.dtype
        # FFTs run in float32: half-precision FFTs are unsupported for non-power-of-two sizes
        # and lose too much precision in the spectrum.
        spectrum = torch.fft.rfft2(x.float(), norm="ortho")
        spectrum = spectrum * torch.complex(self.weight_real.float(), self.weight_imag.float())
        return torch.fft.irfft2(spectrum, s=(self.height, self.width), norm="ortho").to(dtype)
