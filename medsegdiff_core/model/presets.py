"""Architecture presets: named sizes of the MedSegDiff UNet.

``b`` follows the reference code's defaults for 256 px (128 channels, 2 residual blocks,
attention at 16 px, i.e. downsampling factor 16); ``pp`` the MedSegDiff++ widths it names
(512 channels, 12 residual blocks). ``tiny`` and ``small`` are ours: ``tiny`` runs the test suite
in seconds, ``small`` trains to a useful model on a laptop CPU at 64 px.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class UNetSpec:
    """Everything that determines the network's parameter shapes.

    Attributes:
        image_size: side of the square input in pixels; must be divisible by
            ``2 ** (len(channel_mult) - 1)``.
        image_channels: channels of the raw image (1 ultrasound/CT, 3 fundus, 4 BraTS).
        mask_channels: binary mask channels, one per class.
        base_channels: width of the first stage; stage ``i`` has ``base * channel_mult[i]``.
        channel_mult: width multiplier per resolution stage.
        num_res_blocks: residual blocks per stage in the mask (noise) path.
        cond_res_blocks: residual blocks per stage in the image (conditional) encoder.
        attention_ds: downsampling factors at which self-attention is used (e.g. 16 means
            16 px features for a 256 px input).
        num_heads: attention heads.
        dropout: dropout inside residual blocks.
        learn_sigma: predict the variance too (output has ``2 * mask_channels`` channels).
        use_ff_parser: the paper's FF-Parser in every conditional fusion (off only to ablate).
    """

    image_size: int = 64
    image_channels: int = 3
    mask_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    cond_res_blocks: int = 1
    attention_ds: tuple[int, ...] = field(default=(8,))
    num_heads: int = 1
    dropout: float = 0.0
    learn_sigma: bool = False
    use_ff_parser: bool = True

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def out_channels(self) -> int:
        return self.mask_channels * (2 if self.learn_sigma else 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channel_mult"] = list(self.channel_mult)
        data["attention_ds"] = list(self.attention_ds)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetSpec:
        data = dict(data)
        data["channel_mult"] = tuple(data["channel_mult"])
        data["attention_ds"] = tuple(data["attention_ds"])
        return cls(**data)


PRESETS: dict[str, UNetSpec] = {
    "tiny": UNetSpec(
        image_size=32, base_channels=16, channel_mult=(1, 2, 2), attention_ds=(), num_res_blocks=1
    ),
    "small": UNetSpec(
        image_size=64, base_channels=32, channel_mult=(1, 2, 2, 4), attention_ds=(8,)
    ),
    "b": UNetSpec(
        image_size=256,
        base_channels=128,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        cond_res_blocks=1,
        attention_ds=(16,),
    ),
    "l": UNetSpec(
        image_size=256,
        base_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        cond_res_blocks=2,
        attention_ds=(16,),
        num_heads=4,
    ),
    "pp": UNetSpec(
        image_size=256,
        base_channels=512,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=12,
        cond_res_blocks=2,
        attention_ds=(16,),
        num_heads=8,
    ),
}


def resolve_spec(preset: str, **overrides: Any) -> UNetSpec:
    """The preset's spec with the given fields replaced (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
