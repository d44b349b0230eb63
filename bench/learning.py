"""Does MedSegDiff learn, and does it beat a supervised UNet? Train, sample, score — on this CPU.

Every arm trains centrally on the built-in 3-site fundus data (64 px) within the same wall-time
budget, and every arm is scored on the held-out images of all sites by the product's scorer
(``evaluate_dataset`` / ``score_dataset``, see bench/arms.py): per-class Dice, Spearman(case
uncertainty score, Dice), pooled pixel AUROC for errors and ECE, seconds per image and training
steps per second.

  MedSegDiff    the config's model and training options; with ``--ablate`` one row per option
                set in ABLATIONS (same budget, same seeds), with the fast sampler;
  BasicUNet     MONAI's BasicUNet with dropout 0.1, sigmoid + Dice/BCE; scored twice: its
                sigmoid (dropout off) and MC dropout with as many passes as the ensemble has
                members;
  DynUNet       MONAI's DynUNet as nnU-Net plans it for the image size.

``--few-step`` adds the few-step table for the (first) MedSegDiff model: DDIM 1, 2, 4, 10 and
DPM-Solver++ 20 steps on all held-out images, and 1000-step DDPM on a subset beside the same
subset at the fast settings.

Run: python bench/learning.py [--budget-s 600] [--ablate] [--few-step] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arms import (  # noqa: E402
    ItemSubset,
    basic_unet,
    dyn_unet,
    header,
    row,
    score_diffusion,
    score_unet,
    train_supervised,
)

from medsegdiff_core.checkpoint import load_checkpoint  # noqa: E402
from medsegdiff_core.config import InferenceConfig, load_config  # noqa: E402
from medsegdiff_core.data.layouts import open_dataset  # noqa: E402
from medsegdiff_core.data.synthetic import write_fundus_sites  # noqa: E402
from medsegdiff_core.training import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["disc", "cup"]
# Training options measured against each other (config overrides); the first is the baseline.
ABLATIONS = {
    "paper loss": ["diffusion.x0_loss_weight=0", "diffusion.timestep_sampling=uniform"],
    "+ x0 Dice/BCE loss": ["diffusion.x0_loss_weight=1.0", "diffusion.timestep_sampling=uniform"],
    "+ high-noise timesteps": [
        "diffusion.x0_loss_weight=0",
        "diffusion.timestep_sampling=high_noise",
    ],
    "+ both (default)": ["diffusion.x0_loss_weight=1.0", "diffusion.timestep_sampling=high_noise"],
}


def train_medsegdiff(args: argparse.Namespace, sites: list[Path], name: str, extra: list[str]):
    config = load_config(
        args.config,
        [
            f"data.train={[str(s / 'train') for s in sites]}",
            "train.steps=1000000",
            f"train.time_budget_s={args.budget_s}",
            f"train.out_dir={args.out / name.replace(' ', '_').replace('/', '_')}",
            "train.checkpoint_every=1000000",
            *extra,
        ],
    )
    result = fit(config, progress=False, log=lambda _: None)
    return config, load_checkpoint(result.checkpoint), result.steps / result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "fundus-small.yaml")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench-synthetic")
    parser.add_argument("--budget-s", type=float, default=600.0, help="training wall time each")
    parser.add_argument(
        "--ablate",
        nargs="*",
        choices=list(ABLATIONS),
        help="one MedSegDiff per ABLATIONS row named (all rows if none is named)",
    )
    parser.add_argument("--few-step", action="store_true", help="the few-step sampler table")
    parser.add_argument("--subset-per-site", type=int, default=4, help="held-out images for DDPM")
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    shipped = InferenceConfig()
    parser.add_argument("--fast-sampler", default=shipped.sampler, help="default: the shipped one")
    parser.add_argument("--fast-steps", type=int, default=shipped.sampling_steps)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-learning")
    parser.add_argument("--json", type=Path, help="write all figures here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sites = write_fundus_sites(args.data, num_sites=3)
    base = load_config(args.config)
    size, classes = base.unet_spec().image_size, base.data.classes
    print(
        f"bench/learning: torch {torch.__version__}, {args.threads} threads, {platform.processor()}"
    )
    print(
        f"data: {args.data} (3 sites), {size} px, training budget {args.budget_s:.0f} s per arm; "
        f"fast sampler {args.fast_sampler} {args.fast_steps} x{args.ensemble}"
    )
    tests = [open_dataset(s / "test", "generic", classes, size, in_channels=3) for s in sites]
    held_out = ConcatDataset(tests)
    subset = ConcatDataset(
        [ItemSubset(t, list(range(min(args.subset_per_site, len(t))))) for t in tests]
    )
    train = ConcatDataset(
        [
            open_dataset(s / "train", "generic", classes, size, in_channels=3, augment=True)
            for s in sites
        ]
    )
    figures: dict[str, dict] = {}
    k, fast = args.ensemble, args.fast_steps
    print("\n" + header(f"held-out ({len(held_out)} images)", CLASSES), flush=True)

    def record(name: str, value: dict, steps_per_s: float | None = None) -> None:
        value["train_steps_per_s"] = steps_per_s
        figures[name] = value
        print(row(name, value, CLASSES, steps_per_s), flush=True)  # the slow rows come last

    models = {}
    if args.ablate is None:
        arms = {"MedSegDiff": []}
    else:
        arms = {name: ABLATIONS[name] for name in args.ablate or ABLATIONS}
    for name, extra in arms.items():
        _, loaded, rate = train_medsegdiff(args, sites, name, extra)
        models[name] = loaded
        label = f"{name} {args.fast_sampler} {fast} x{k}"
        record(label, score_diffusion(loaded, held_out, args.fast_sampler, fast, k), rate)
    seed, batch = base.train.seed, base.train.batch_size
    # One BasicUNet, trained with dropout 0.1: its sigmoid (dropout off) and MC dropout (on)
    # are the two cheap uncertainties a user of the same network has.
    unet = train_supervised(
        basic_unet(3, len(CLASSES), dropout=0.1), train, args.budget_s, batch, seed
    )
    record("BasicUNet sigmoid", score_unet(unet.net, held_out, classes), unet.steps_per_s)
    record(
        f"BasicUNet MC dropout x{k}",
        score_unet(unet.net, held_out, classes, mc_dropout=k),
        unet.steps_per_s,
    )
    dyn = train_supervised(dyn_unet(3, len(CLASSES), size), train, args.budget_s, batch, seed)
    record(
        "DynUNet (nnU-Net plan) sigmoid", score_unet(dyn.net, held_out, classes), dyn.steps_per_s
    )
    first = next(iter(models.values()))
    counts = {"MedSegDiff": sum(p.numel() for p in first.model.parameters())}
    counts |= {"BasicUNet": unet.parameters, "DynUNet": dyn.parameters}
    print("parameters: " + ", ".join(f"{n} {c / 1e6:.2f} M" for n, c in counts.items()))

    if args.few_step:
        loaded = first
        print("\n" + header("few-step, same model, ensemble of " + str(k), CLASSES), flush=True)
        # (sampler, steps, DDIM eta): eta 1 draws fresh noise at the second step, so the
        # members of a 2-step ensemble differ by more than their starting noise.
        settings = [("ddim", 1, 0.0), ("ddim", 2, 0.0), ("ddim", 2, 1.0), ("ddim", 4, 0.0)]
        settings += [("ddim", 10, 0.0), ("dpm++", 20, 0.0)]
        for sampler, steps, eta in settings:
            label = f"{sampler} {steps}{f' eta {eta:g}' if eta else ''} x{k}"
            record(f"{label} (all)", score_diffusion(loaded, held_out, sampler, steps, k, eta=eta))
        for sampler, steps, eta in [("ddim", 1, 0.0), ("ddim", 2, 0.0), ("ddim", 2, 1.0)]:
            label = f"{sampler} {steps}{f' eta {eta:g}' if eta else ''} x{k}"
            record(
                f"{label} (subset {len(subset)})",
                score_diffusion(loaded, subset, sampler, steps, k, eta=eta),
            )
        record(
            f"{args.fast_sampler} {fast} x{k} (subset {len(subset)})",
            score_diffusion(loaded, subset, args.fast_sampler, fast, k),
        )
        record(
            f"DDPM {args.ddpm_steps} x{k} (subset {len(subset)})",
            score_diffusion(loaded, subset, "ddpm", args.ddpm_steps, k),
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"budget_s": args.budget_s, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
