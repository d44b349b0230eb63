"""Dynamic Conditional Encoding (MedSegDiff, Sec. 2.1, Eq. 3).

At one encoder scale, the mask-path features ``m`` (from the noisy mask) and the image features
``c`` (from the conditional encoder) are fused by an attention-like product:

    A(m, c) = (LN(FFParser(m)) * LN(c)) * c

The normalised product acts as a spatial attention map over the image features, so the image
evidence that agrees with the current mask estimate is emphasised. The result goes through one
residual block and is added to the mask path.

Design choice (see README, "Architecture"): the image features ``c`` come from an encoder that
sees only the image, never the noisy mask or the timestep. The paper's equation is unchanged, but
the image encoding can then be computed once per image and reused at every sampling step and for
every ensemble member — the main source of inference speed.
"""

from __future__ import annotations

from torch import Tensor, nn

from .ff_parser import FFParser
from .layers import ResBlock


class DynamicConditionalEncoding(nn.Module):
    """Fuse image features into mask features at one scale: ``m + block(A(m, c))``.

    Args:
        channels: feature channels of both paths at this scale.
        size: spatial size (H = W) of the feature maps at this scale, for the FF-Parser.
        use_ff_parser: the paper's FF-Parser on ``m``; off only for ablations.
    """

    def __init__(self, channels: int, size: int, use_ff_parser: bool = True) -> None:
        super().__init__()
        self.ff_parser = FFParser(channels, size, size) if use_ff_parser else nn.Identity()
        # GroupNorm with one group is LayerNorm over the whole (C, H, W) feature map; unlike a
        # hand-written channel LayerNorm it has per-sample gradients in every Opacus mode.
        self.norm_mask = nn.GroupNorm(1, channels)
        self.norm_image = nn.GroupNorm(1, channels)
        self.block = ResBlock(channels, channels)

    def forward(self, mask_features: Tensor, image_features: Tensor) -> Tensor:
        filtered = self.ff_parser(mask_features)
        attention = self.norm_mask(filtered) * self.norm_image(image_features)
        return mask_features + self.block(attention * image_features)
