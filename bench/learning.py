"""Does MedSegDiff learn, and where does it stand? Train, sample, score — on this machine.

Trains the `small` preset centrally on the built-in 3-site fundus data within a wall-time budget,
then scores on the held-out images of all sites:

  (a) the paper's sampler: 1000-step DDPM, ensemble of 5 fused by STAPLE (on a subset: slow);
  (b) the fast sampler: 20-step DPM-Solver++ (and DDIM), ensemble of 5 (all images and subset);
  (c) a plain deterministic UNet (MONAI BasicUNet, sigmoid + Dice/BCE loss) trained on the same
      data within the same wall-time budget — what a user would pick instead.

Run: python bench/learning.py [--budget-s 720] [--json runs/bench-learning.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Subset

from medsegdiff_core.checkpoint import load_checkpoint
from medsegdiff_core.config import InferenceConfig, load_config
from medsegdiff_core.data.layouts import open_dataset
from medsegdiff_core.data.synthetic import write_fundus_sites
from medsegdiff_core.inference import evaluate_dataset
from medsegdiff_core.metrics import segmentation_metrics, summarize
from medsegdiff_core.training import fit, random_batches, seed_everything

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["disc", "cup"]


def train_basic_unet(
    train, in_channels: int, out_channels: int, budget_s: float, batch_size: int, seed: int
):
    """MONAI's BasicUNet with sigmoid outputs, Dice + BCE loss, AdamW, same time budget."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    seed_everything(seed)
    net = BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels)
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    batches = random_batches(train, batch_size, seed=seed, device=torch.device("cpu"))
    deadline, steps = time.monotonic() + budget_s, 0
    net.train()
    while time.monotonic() < deadline:
        batch = next(batches)
        loss = loss_fn(net(batch["image"]), batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return net.eval(), steps, sum(p.numel() for p in net.parameters())


@torch.no_grad()
def score_unet(net: nn.Module, dataset, class_names: list[str]) -> dict:
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    targets = torch.stack([dataset[i]["mask"] for i in range(len(dataset))]).bool()
    start = time.perf_counter()
    pred = torch.sigmoid(net(images)) >= 0.5
    seconds = time.perf_counter() - start
    summary = summarize(segmentation_metrics(pred, targets, class_names=class_names))
    return {"summary": summary, "seconds_per_image": seconds / len(dataset)}


def score_diffusion(loaded, dataset, sampler: str, steps: int, ensemble: int) -> dict:
    schedule = loaded.diffusion.noise_schedule()
    cfg = InferenceConfig(
        sampler=sampler, sampling_steps=steps, ensemble=ensemble, batch_size=12, seed=0
    )
    start = time.perf_counter()
    _, summary = evaluate_dataset(
        loaded.model, schedule, dataset, cfg, loaded.classes, device=torch.device("cpu")
    )
    seconds = time.perf_counter() - start
    return {"summary": summary, "seconds_per_image": seconds / len(dataset)}


def header(title: str, class_names: list[str]) -> str:
    cells = " ".join(f"{name:>9}" for name in [*class_names, "mean"])
    return f"{title:<44} {cells} {'s/image':>10}"


def row(name: str, result: dict, class_names: list[str] = CLASSES) -> str:
    per_class = result["summary"]["per_class"]
    dice = [per_class[c]["dice"] for c in class_names]
    cells = " ".join(f"{d:>9.4f}" for d in [*dice, sum(dice) / len(dice)])
    return f"{name:<44} {cells} {result['seconds_per_image']:>10.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "fundus-small.yaml")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench-synthetic")
    parser.add_argument("--budget-s", type=float, default=720.0, help="training wall time each")
    parser.add_argument("--subset-per-site", type=int, default=4, help="held-out images for DDPM")
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--fast-steps", type=int, default=20)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-learning")
    parser.add_argument("--json", type=Path, help="write all figures here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sites = write_fundus_sites(args.data, num_sites=3)
    config = load_config(
        args.config,
        [
            f"data.train={[str(s / 'train') for s in sites]}",
            "train.steps=1000000",
            f"train.time_budget_s={args.budget_s}",
            f"train.out_dir={args.out}",
            "train.checkpoint_every=1000000",
        ],
    )
    size = config.unet_spec().image_size
    print(
        f"bench/learning: torch {torch.__version__}, {args.threads} threads, {platform.processor()}"
    )
    print(
        f"data: {args.data} (3 sites), model {config.model.preset} at {size} px, "
        f"training budget {args.budget_s:.0f} s each"
    )

    result = fit(config, progress=False, log=print)
    loaded = load_checkpoint(result.checkpoint)
    print(f"MedSegDiff: {result.steps} steps in {result.seconds:.0f} s")

    folders = [s / "test" for s in sites]
    tests = [open_dataset(f, "generic", config.data.classes, size, in_channels=3) for f in folders]
    held_out = ConcatDataset(tests)
    subset = ConcatDataset([Subset(t, range(min(args.subset_per_site, len(t)))) for t in tests])
    train = ConcatDataset(
        [
            open_dataset(
                s / "train", "generic", config.data.classes, size, in_channels=3, augment=True
            )
            for s in sites
        ]
    )
    unet, unet_steps, unet_params = train_basic_unet(
        train, 3, len(CLASSES), args.budget_s, config.train.batch_size, config.train.seed
    )
    print(
        f"BasicUNet: {unet_steps} steps in {args.budget_s:.0f} s ({unet_params / 1e6:.2f} M params)"
    )

    figures: dict[str, dict] = {}
    k, fast = args.ensemble, args.fast_steps
    print("\n" + header("held-out Dice", CLASSES))

    def record(name: str, value: dict) -> None:
        figures[name] = value
        print(row(name, value), flush=True)  # as soon as measured: the DDPM rows take long

    record(
        f"fast dpm++ {fast} x{k} (all {len(held_out)})",
        score_diffusion(loaded, held_out, "dpm++", fast, k),
    )
    record(
        f"fast ddim {fast} x{k} (all {len(held_out)})",
        score_diffusion(loaded, held_out, "ddim", fast, k),
    )
    record(f"BasicUNet (all {len(held_out)})", score_unet(unet, held_out, CLASSES))
    record(
        f"fast dpm++ {fast} x{k} (subset {len(subset)})",
        score_diffusion(loaded, subset, "dpm++", fast, k),
    )
    record(f"BasicUNet (subset {len(subset)})", score_unet(unet, subset, CLASSES))
    record(
        f"DDPM {args.ddpm_steps} x{k} (subset {len(subset)})",
        score_diffusion(loaded, subset, "ddpm", args.ddpm_steps, k),
    )
    ddpm = figures[f"DDPM {args.ddpm_steps} x{k} (subset {len(subset)})"]["summary"]
    fast_sub = figures[f"fast dpm++ {fast} x{k} (subset {len(subset)})"]["summary"]
    gap = [100 * (fast_sub["per_class"][c]["dice"] - ddpm["per_class"][c]["dice"]) for c in CLASSES]
    print(f"fast - DDPM on the subset, Dice points: disc {gap[0]:+.2f}, cup {gap[1]:+.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "medsegdiff_steps": result.steps,
            "basic_unet_steps": unet_steps,
            "budget_s": args.budget_s,
            "figures": figures,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
