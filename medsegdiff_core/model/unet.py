"""The MedSegDiff denoiser: a UNet over the noisy mask, conditioned on the image.

Two encoders run side by side, one per input:

* the **mask path** sees the noisy mask ``x_t`` and the timestep ``t`` and predicts the noise;
* the **image path** (conditional encoder) sees only the raw image.

At the end of every encoder stage the image features are fused into the mask path by Dynamic
Conditional Encoding with the FF-Parser (:mod:`.dce`), and the deepest image features are added
at the bottleneck (the paper's Eq. 2, ``E^I + E^x``). The decoder is a plain UNet decoder with skip
connections from the (already conditioned) mask path.

Because the image path depends on neither ``x_t`` nor ``t``, :meth:`MedSegDiffUNet.encode_image`
runs once per image and :meth:`MedSegDiffUNet.denoise` reuses its features at every sampling
step and for every ensemble member.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dce import DynamicConditionalEncoding
from .layers import Downsample, ResBlock, SelfAttention, TimestepEmbedding, Upsample, group_norm
from .presets import UNetSpec


class _Stage(nn.Module):
    """Residual blocks (optionally with attention) at one resolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        embed_dim: int | None,
        attention_heads: int | None,
        dropout: float,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attentions = nn.ModuleList()
        for i in range(num_blocks):
            self.blocks.append(
                ResBlock(in_channels if i == 0 else out_channels, out_channels, embed_dim, dropout)
            )
            self.attentions.append(
                SelfAttention(out_channels, attention_heads) if attention_heads else nn.Identity()
            )


class ImageEncoder(nn.Module):
    """The conditional encoder: image -> one feature map per stage (time-independent)."""

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        widths = [spec.base_channels * m for m in spec.channel_mult]
        self.stem = nn.Conv2d(spec.image_channels, spec.base_channels, 3, padding=1)
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        in_ch = spec.base_channels
        for level, width in enumerate(widths):
            self.stages.append(
                _Stage(in_ch, width, spec.cond_res_blocks, None, None, spec.dropout).blocks
            )
            in_ch = width
            last = level == len(widths) - 1
            self.downsamples.append(nn.Identity() if last else Downsample(width))

    def forward(self, image: Tensor) -> list[Tensor]:
        features = []
        h = self.stem(image)
        for blocks, downsample in zip(self.stages, self.downsamples, strict=True):
            for block in blocks:
                h = block(h)
            features.append(h)
            h = downsample(h)
        return features


class MedSegDiffUNet(nn.Module):
    """Noise predictor ``eps_theta(x_t, image, t)`` of MedSegDiff.

    Shapes: ``x_t`` (B, mask_channels, S, S), ``image`` (B, image_channels, S, S), ``t`` (B,);
    output (B, mask_channels, S, S), or (B, 2 * mask_channels, S, S) with ``learn_sigma`` (noise,
    then the variance interpolation values).
    """

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        if spec.image_size % spec.downsampling_factor:
            raise ValueError(
                f"image_size {spec.image_size} is not divisible by the UNet's downsampling factor "
                f"{spec.downsampling_factor}"
            )
        self.spec = spec
        base = spec.base_channels
        embed_dim = 4 * base
        widths = [base * m for m in spec.channel_mult]

        self.time_embed = TimestepEmbedding(base, embed_dim)
        self.image_encoder = ImageEncoder(spec)
        self.mask_stem = nn.Conv2d(spec.mask_channels, base, 3, padding=1)

        self.down_stages = nn.ModuleList()
        self.fusions = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_widths = [base]
        in_ch = base
        for level, width in enumerate(widths):
            ds = 2**level
            heads = spec.num_heads if ds in spec.attention_ds else None
            self.down_stages.append(
                _Stage(in_ch, width, spec.num_res_blocks, embed_dim, heads, spec.dropout)
            )
            self.fusions.append(
                DynamicConditionalEncoding(width, spec.image_size // ds, spec.use_ff_parser)
            )
            skip_widths += [width] * spec.num_res_blocks
            in_ch = width
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(width))
                skip_widths.append(width)

        mid_heads = spec.num_heads if spec.attention_ds else None
        self.mid_block1 = ResBlock(in_ch, in_ch, embed_dim, spec.dropout)
        self.mid_attention = SelfAttention(in_ch, mid_heads) if mid_heads else nn.Identity()
        self.mid_block2 = ResBlock(in_ch, in_ch, embed_dim, spec.dropout)

        self.up_stages = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            ds = 2**level
            heads = spec.num_heads if ds in spec.attention_ds else None
            width = widths[level]
            stage = nn.ModuleList()
            for _ in range(spec.num_res_blocks + 1):
                block = ResBlock(in_ch + skip_widths.pop(), width, embed_dim, spec.dropout)
                stage.append(
                    nn.ModuleList([block, SelfAttention(width, heads) if heads else nn.Identity()])
                )
                in_ch = width
            self.up_stages.append(stage)
            self.upsamples.append(Upsample(width) if level > 0 else nn.Identity())

        self.out = nn.Sequential(
            group_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, spec.out_channels, 3, padding=1)
        )
        # A zero output layer starts the model at "predict zero noise", the standard choice.
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def encode_image(self, image: Tensor) -> list[Tensor]:
        """Image features, one map per stage; depends on the image only (cacheable)."""
        return self.image_encoder(image)

    def denoise(self, x_t: Tensor, timesteps: Tensor, image_features: list[Tensor]) -> Tensor:
        """Predict the noise in ``x_t`` given precomputed image features.

        ``image_features`` may have batch 1 or the batch of ``x_t``... or any divisor of it:
        features of B images are broadcast over B*K ensemble members laid out image-major
        (member j of image i at index i*K + j).
        """
        batch = x_t.shape[0]
        features = [_expand_to(f, batch) for f in image_features]
        emb = self.time_embed(timesteps.expand(batch) if timesteps.dim() == 0 else timesteps)

        h = self.mask_stem(x_t)
        skips = [h]
        for level, stage in enumerate(self.down_stages):
            for block, attention in zip(stage.blocks, stage.attentions, strict=True):
                h = attention(block(h, emb))
                skips.append(h)
            # Fuse after the stage's last block and replace its skip, so the decoder also sees
            # conditioned features.
            h = self.fusions[level](h, features[level])
            skips[-1] = h
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)

        h = h + features[-1]
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)

        for stage, upsample in zip(self.up_stages, self.upsamples, strict=True):
            for block, attention in stage:
                h = attention(block(torch.cat([h, skips.pop()], dim=1), emb))
            h = upsample(h)
        return self.out(h)

    def forward(self, x_t: Tensor, timesteps: Tensor, image: Tensor) -> Tensor:
        return self.denoise(x_t, timesteps, self.encode_image(image))


def _expand_to(features: Tensor, batch: int) -> Tensor:
    if features.shape[0] == batch:
        return features
    if batch % features.shape[0]:
        raise ValueError(
            f"cannot broadcast image features of batch {features.shape[0]} to batch {batch}"
        )
    return features.repeat_interleave(batch // features.shape[0], dim=0)
