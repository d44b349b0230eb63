"""The arms the learning benchmarks compare, all scored by the product's own scorer.

MedSegDiff is scored with :func:`medsegdiff_core.inference.evaluate_dataset` (what ``medsegdiff
evaluate`` and the model card report). The supervised UNets a hospital could pick instead (MONAI's
BasicUNet and DynUNet, the nnU-Net architecture) are wrapped as a
:data:`~medsegdiff_core.inference.Segmenter` and go through the same
:func:`~medsegdiff_core.inference.score_dataset`: same resizing to the input's resolution, same
empty-mask rules, same uncertainty figures. A UNet's uncertainty is either its sigmoid (one
"member": the entropy of its probability) or MC dropout (K stochastic passes as members).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medsegdiff_core.config import InferenceConfig
from medsegdiff_core.ensemble import Segmentation
from medsegdiff_core.fusion import uncertainty_map
from medsegdiff_core.inference import evaluate_dataset, score_dataset
from medsegdiff_core.training import random_batches, seed_everything


def basic_unet(in_channels: int, out_channels: int, dropout: float = 0.0) -> nn.Module:
    """MONAI's BasicUNet, 2-D, its default features."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(
        spatial_dims=2, in_channels=in_channels, out_channels=out_channels, dropout=dropout
    )


def dyn_unet(in_channels: int, out_channels: int, image_size: int) -> nn.Module:
    """MONAI's DynUNet planned as nnU-Net plans a 2-D network: 3x3 convolutions, the resolution
    halved until the feature map is 4 px (at most 7 levels), 32 filters doubling per level up to
    nnU-Net's 2-D cap of 512, instance norm, leaky ReLU. Deep supervision is left off: every arm
    trains on the plain full-resolution loss."""
    from monai.networks.nets import DynUNet

    levels, size = 1, image_size
    while size // 2 >= 4 and levels < 7:
        size //= 2
        levels += 1
    strides = [1] + [2] * (levels - 1)
    filters = [min(32 * 2**i, 512) for i in range(levels)]
    return DynUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * levels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters,
    )


class ItemSubset:
    """Some items of a layout's dataset, each scored as its own 2-D case (held-out slices of
    volumes, a subset of images): what ``torch.utils.data.Subset`` gives, plus the ``cases``
    and ``target_labels`` the scorer reads."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.cases = [dataset.cases[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    def target_labels(self, index: int) -> Any:
        return self.dataset.target_labels(self.indices[index])


@dataclass
class Trained:
    """A supervised network after its wall-time budget."""

    net: nn.Module
    steps: int
    seconds: float
    parameters: int

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def train_supervised(
    net: nn.Module, train: Any, budget_s: float, batch_size: int, seed: int, lr: float = 1e-3
) -> Trained:
    """Dice + BCE on sigmoid outputs, AdamW, the same batches and wall time as MedSegDiff."""
    from monai.losses import DiceCELoss

    seed_everything(seed)
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    batches = random_batches(train, batch_size, seed=seed, device=torch.device("cpu"))
    start = time.monotonic()
    deadline, steps = start + budget_s, 0
    net.train()
    while time.monotonic() < deadline:
        batch = next(batches)
        loss = loss_fn(net(batch["image"]), batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    seconds = time.monotonic() - start
    return Trained(net.eval(), steps, seconds, sum(p.numel() for p in net.parameters()))


def unet_segmenter(net: nn.Module, *, mc_dropout: int = 0):
    """``net`` as a Segmenter: its sigmoid as the single member, or ``mc_dropout`` passes with
    dropout active as members (mean fused, entropy uncertainty, as for the ensemble)."""

    @torch.no_grad()
    def run(images: torch.Tensor) -> Segmentation:
        if mc_dropout:
            net.eval()
            for module in net.modules():
                if isinstance(module, nn.Dropout | nn.Dropout2d | nn.Dropout3d):
                    module.train()
            members = torch.stack([torch.sigmoid(net(images)) for _ in range(mc_dropout)], 1)
            net.eval()
        else:
            members = torch.sigmoid(net(images))[:, None]
        probability = members.mean(1)
        return Segmentation(members, probability, probability >= 0.5, uncertainty_map(members))

    return run


def score_unet(
    net: nn.Module, dataset: Any, classes: dict[str, list[int]], *, mc_dropout: int = 0
) -> dict:
    """Per-class Dice and the uncertainty figures of a UNet, by the product's scorer."""
    start = time.perf_counter()
    _, summary = score_dataset(
        lambda: unet_segmenter(net, mc_dropout=mc_dropout),
        dataset,
        classes,
        batch_size=12,
        threshold=0.5,
    )
    seconds = time.perf_counter() - start
    return {"summary": summary, "seconds_per_image": seconds / max(summary["num_cases"], 1)}


def score_diffusion(
    loaded: Any, dataset: Any, sampler: str, steps: int, ensemble: int, **options: Any
) -> dict:
    """Per-class Dice and uncertainty figures of a checkpoint's ensemble, as ``evaluate``."""
    schedule = loaded.diffusion.noise_schedule()
    cfg = InferenceConfig(
        sampler=sampler, sampling_steps=steps, ensemble=ensemble, batch_size=12, seed=0, **options
    )
    start = time.perf_counter()
    _, summary = evaluate_dataset(
        loaded.model, schedule, dataset, cfg, loaded.classes, device=torch.device("cpu")
    )
    seconds = time.perf_counter() - start
    return {"summary": summary, "seconds_per_image": seconds / max(summary["num_cases"], 1)}


def header(title: str, class_names: list[str]) -> str:
    dice = " ".join(f"{name:>8}" for name in [*class_names, "mean"])
    unc = " ".join(f"{'rho ' + name:>9}" for name in class_names)
    return f"{title:<40} {dice} {unc} {'AUROC':>6} {'ECE':>6} {'s/img':>7} {'steps/s':>8}"


def row(name: str, result: dict, class_names: list[str], steps_per_s: float | None = None) -> str:
    """Dice per class and mean; Spearman(case score, Dice) per class; mean pooled AUROC, ECE."""
    summary = result["summary"]
    dice = [summary["per_class"][c]["dice"] for c in class_names]
    u = summary.get("uncertainty", {})

    def fmt(value: float | None, width: int, digits: int) -> str:
        return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    rho = " ".join(fmt(u.get(c, {}).get("spearman_score_dice"), 9, 3) for c in class_names)
    auroc = [u[c]["pixel_auroc"] for c in class_names if u.get(c, {}).get("pixel_auroc")]
    ece = [u[c]["ece"] for c in class_names if u.get(c, {}).get("ece") is not None]
    cells = " ".join(f"{d:>8.4f}" for d in [*dice, sum(dice) / len(dice)])
    return (
        f"{name:<40} {cells} {rho} {fmt(sum(auroc) / len(auroc) if auroc else None, 6, 3)} "
        f"{fmt(sum(ece) / len(ece) if ece else None, 6, 4)} "
        f"{result['seconds_per_image']:>7.2f} {fmt(steps_per_s, 8, 2)}"
    )
