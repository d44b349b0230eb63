"""Does MedSegDiff learn from medical volumes? Synthetic BraTS-like MRI and real scans, on this CPU.

Each task trains the `small` preset centrally within a wall-time budget on 2-D slices of volumes
read through the product's own readers (NIfTI, NRRD), beside MONAI's BasicUNet and DynUNet
(nnU-Net's plan) trained on the same slices for the same wall time; every arm is scored by the
product's scorer (bench/arms.py) with its uncertainty figures and training steps per second.
MedSegDiff is scored twice from the same model: with the shipped fast sampler and with 20-step
DPM-Solver++:

  brats  the built-in BraTS-like generator (T1, T1ce, T2, FLAIR as 4 channels; WT/TC/ET as mask
         channels), 16 training cases, 4 held-out cases (split by case), each held-out case
         scored whole in 3-D, as ``medsegdiff evaluate`` scores it;
  real   the five real scans with hand-drawn lesions shipped in pyradiomics 3.0.1 (two brain MRI,
         one breast MRI, two chest CT; fetched into a cache, never committed). Five patients
         cannot be split by patient, so every third labelled slice is held out: the figure shows
         that the model fits real anatomy and intensities, not that it generalises to new
         patients. Each held-out slice is scored as a 2-D case.

Run: python bench/learning_medical.py [--task brats real] [--budget-s 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

ROOT = Path(__file__).resolve().parents[1]
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
from medsegdiff_core.data.real import fetch_real_data, find_real_data  # noqa: E402
from medsegdiff_core.data.synthetic_brain import BRATS_CLASSES, write_brats_cases  # noqa: E402
from medsegdiff_core.training import fit  # noqa: E402

LESION = {"lesion": [1]}


def brats_task(data: Path, size: int, train_empty: bool = False) -> tuple:
    train_root, test_root = data / "brats" / "train", data / "brats" / "test"
    if not (data / "brats" / ".complete").exists():
        write_brats_cases(train_root, 16, shape=(size, size, 24), seed=1)
        write_brats_cases(test_root, 4, shape=(size, size, 24), seed=2, prefix="BraTS-TEST")
        (data / "brats" / ".complete").touch()
    # Tumour-free slices are left out of training unless asked for; the held-out volumes are
    # scored whole, so a model that never saw one may mark tumour there.
    train = open_dataset(train_root, "brats", None, size, skip_empty=not train_empty, augment=True)
    test = open_dataset(test_root, "brats", None, size)  # whole volumes, scored in 3-D
    return train, test, BRATS_CLASSES, 4, "brats"


def real_task(data: Path, size: int) -> tuple:
    folder = find_real_data() or fetch_real_data()
    train_all, test_all = (
        open_dataset(folder, "volumes", LESION, size, in_channels=1, skip_empty=True, augment=a)
        for a in (True, False)
    )
    held_out = [i for i in range(len(test_all)) if i % 3 == 2]
    kept = [i for i in range(len(train_all)) if i % 3 != 2]
    return Subset(train_all, kept), ItemSubset(test_all, held_out), LESION, 1, "volumes"


TASKS = {"brats": (brats_task, 64), "real": (real_task, 96)}


def run_task(name: str, args: argparse.Namespace) -> dict:
    make, size = TASKS[name]
    options = {"train_empty": True} if name == "brats" and args.train_empty_slices else {}
    train, test, classes, channels, layout = make(args.data, size, **options)
    names = list(classes)
    config = load_config(
        ROOT / "configs" / "fundus-small.yaml",
        [
            f"name=bench-{name}",
            f"data.classes={json.dumps(classes)}",
            f"data.image_channels={channels}",
            f"data.layout={layout}",
            f"model.image_size={size}",
            "train.steps=1000000",
            f"train.time_budget_s={args.budget_s}",
            f"train.out_dir={args.out / name}",
            "train.checkpoint_every=1000000",
        ],
    )
    print(
        f"\n[{name}] {len(train)} training slices, {len(test)} held-out labelled slices, "
        f"{size} px, budget {args.budget_s:.0f} s each",
        flush=True,
    )
    result = fit(config, train_data=train, progress=False, log=lambda _: None)
    seed, batch = config.train.seed, config.train.batch_size
    unets = {
        "BasicUNet": train_supervised(
            basic_unet(channels, len(names)), train, args.budget_s, batch, seed
        ),
        "DynUNet (nnU-Net plan)": train_supervised(
            dyn_unet(channels, len(names), size), train, args.budget_s, batch, seed
        ),
    }
    loaded = load_checkpoint(result.checkpoint)
    rates, figures = {}, {}
    # The shipped fast sampler first, then the many-step one the case ranking may want.
    for sampler, steps in [(args.fast_sampler, args.fast_steps), ("dpm++", 20)]:
        label = f"MedSegDiff {sampler} {steps} x{args.ensemble}"
        figures[label] = score_diffusion(loaded, test, sampler, steps, args.ensemble)
        rates[label] = result.steps / result.seconds
    for label, trained in unets.items():
        figures[label] = score_unet(trained.net, test, classes)
        rates[label] = trained.steps_per_s
    print(header(f"[{name}] held-out", names))
    for label, value in figures.items():
        value["train_steps_per_s"] = rates[label]
        print(row(label, value, names, rates[label]), flush=True)
    return {
        "medsegdiff_steps": result.steps,
        "unet_steps": {label: t.steps for label, t in unets.items()},
        "train_slices": len(train),
        "test_slices": len(test),
        "image_size": size,
        "figures": figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--budget-s", type=float, default=300.0, help="training wall time each")
    parser.add_argument("--ensemble", type=int, default=5)
    shipped = InferenceConfig()
    parser.add_argument("--fast-sampler", default=shipped.sampler, help="default: the shipped one")
    parser.add_argument("--fast-steps", type=int, default=shipped.sampling_steps)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench-medical")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-medical")
    parser.add_argument("--json", type=Path, help="write all figures here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--train-empty-slices",
        action="store_true",
        help="brats: train every arm on the tumour-free slices too",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bench/learning_medical: torch {torch.__version__}, {args.threads} threads")
    report = {name: run_task(name, args) for name in args.task}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
