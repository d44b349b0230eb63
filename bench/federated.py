"""Federated vs centralized vs local-only training on the built-in 3-site non-IID split.

Every arm gets the same number of local optimizer steps per site:

* centralized (upper bound): one model on the pooled data, ``rounds * local_steps * sites`` steps;
* local-only (lower bound): each site alone, ``rounds * local_steps`` steps;
* FedAvg and FedProx: real ``flwr run . local`` simulations, ``rounds`` rounds of
  ``local_steps`` steps per site.

Each model is scored on every site's held-out test images with the fast ensemble sampler.
Also reported, from the federated runs' own history: round overhead (wall time of the training
phase of a round / the slowest site's local compute in that round) and bytes per round. The
simulated sites train side by side, one CPU thread each (``--serial``: Flower's default of one
site after another, where the overhead is also reported against the sum of the sites' compute).

Run: python bench/federated.py [--rounds 25 --local-steps 16] [--json runs/bench-federated.json]
     [--arms fedavg,fedprox] [--overrides "federation.server_momentum=0.5"]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.site import builtin_sites, builtin_sites_folder  # noqa: E402
from medsegdiff_core.checkpoint import load_checkpoint  # noqa: E402
from medsegdiff_core.config import load_config  # noqa: E402
from medsegdiff_core.data.layouts import PlanarDataset, open_dataset  # noqa: E402
from medsegdiff_core.inference import evaluate_dataset  # noqa: E402
from medsegdiff_core.training import fit  # noqa: E402
from server.local_simulation import run_local  # noqa: E402

SITES = 3


def score(checkpoint: Path, tests: list[PlanarDataset], config) -> dict[str, float]:
    """Mean Dice (over classes) per site's test split, and their mean."""
    loaded = load_checkpoint(checkpoint)
    schedule = loaded.diffusion.noise_schedule()
    result = {}
    for index, test in enumerate(tests):
        _, summary = evaluate_dataset(
            loaded.model,
            schedule,
            test,
            config.inference,
            config.data.classes,
            device=torch.device("cpu"),
        )
        result[f"site-{index}"] = summary["mean"]["dice"]
    result["mean"] = statistics.fmean(result.values())
    return result


def train_central(config, folders: list[Path], steps: int, out: Path) -> Path:
    overrides = config.model_dump(mode="json")
    overrides["data"]["train"] = [str(f) for f in folders]
    overrides["train"].update(
        steps=steps, checkpoint_every=steps, out_dir=str(out), warmup_steps=0, ema_decay=None
    )
    from medsegdiff_core.config import parse_config

    return fit(parse_config(overrides), progress=False, log=lambda _: None).checkpoint


def builtin_tests(
    workdir: Path, config, *, train_slices: int = 40
) -> tuple[list[Path], list[PlanarDataset]]:
    """The built-in sites the simulated clients use (written once under ``workdir``, with
    ``train_slices`` training slices each) and their test splits at the model's resolution."""
    sites = builtin_sites(workdir, SITES, train_slices=train_slices)
    size = config.unet_spec().image_size
    channels = config.data.image_channels
    tests = [
        open_dataset(s / "test", "generic", config.data.classes, size, in_channels=channels)
        for s in sites
    ]
    return sites, tests


def run_federated(
    workdir: Path,
    name: str,
    experiment: str,
    overrides: str,
    *,
    side_by_side: bool = False,
    train_slices: int = 40,
) -> Path:
    """One ``flwr run . local`` simulation of the built-in sites named ``name``; its run folder.

    The run reads the built-in sites already under ``workdir`` (linked, not written again), with
    ``train_slices`` training slices each (``federation.simulated_train_slices``)."""
    run_workdir = workdir / name
    folder = builtin_sites_folder(SITES, train_slices)
    link = run_workdir / "data" / folder
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(workdir / "data" / folder, target_is_directory=True)
    if train_slices != 40:
        overrides = f"federation.simulated_train_slices={train_slices} {overrides}"
    code = run_local(
        workdir / f"flwr-home-{name}",
        num_supernodes=SITES,
        run_config={
            "workdir": str(run_workdir),
            "experiment": experiment,
            "overrides": f"name={name} federation.release_name={name} {overrides}",
        },
        side_by_side=side_by_side,
    )
    if code != 0:
        sys.exit(f"{name}: federated run failed with exit code {code}")
    return run_workdir / "runs" / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="configs/federated-tiny.yaml")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--local-steps", type=int, default=16)
    parser.add_argument("--proximal-mu", type=float, default=0.01)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-federated")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--arms",
        default="central,local,fedavg,fedprox",
        help="comma-separated subset of central, local, fedavg, fedprox",
    )
    parser.add_argument(
        "--overrides", default="", help="extra experiment overrides for the federated arms"
    )
    parser.add_argument(
        "--serial", action="store_true", help="simulated sites train one after another"
    )
    args = parser.parse_args()
    arms = set(args.arms.split(","))

    config = load_config(ROOT / args.experiment)
    workdir = args.work.resolve()
    sites, tests = builtin_tests(workdir, config)
    per_site_steps = args.rounds * args.local_steps
    print(
        f"bench/federated: {args.experiment}, {SITES} sites, {args.rounds} rounds x "
        f"{args.local_steps} local steps; torch {torch.__version__}"
    )

    results: dict[str, dict] = {}
    if "central" in arms:
        start = time.monotonic()
        central = train_central(
            config, [s / "train" for s in sites], per_site_steps * SITES, workdir / "central"
        )
        results["centralized"] = {
            "dice": score(central, tests, config),
            "seconds": time.monotonic() - start,
        }
    for index, site in enumerate(sites if "local" in arms else []):
        start = time.monotonic()
        ckpt = train_central(config, [site / "train"], per_site_steps, workdir / f"local-{index}")
        results[f"local-only site-{index}"] = {
            "dice": score(ckpt, tests, config),
            "seconds": time.monotonic() - start,
        }

    strategies = [s for s in ("fedavg", "fedprox") if s in arms]
    for strategy in strategies:
        overrides = (
            f"federation.strategy={strategy} "
            f"federation.rounds={args.rounds} federation.local_steps={args.local_steps} "
            f"federation.proximal_mu={args.proximal_mu} federation.evaluate_every={args.rounds} "
            + args.overrides
        )
        start = time.monotonic()
        run_dir = run_federated(
            workdir, f"bench-{strategy}", args.experiment, overrides, side_by_side=not args.serial
        )
        history = json.loads((run_dir / "state.json").read_text())["history"]
        results[strategy] = {
            "dice": score(run_dir / "final" / "model.json", tests, config),
            "seconds": time.monotonic() - start,
            "round_overhead": [r["round_overhead"] for r in history],
            "update_bytes_per_round": [r["update_bytes"] for r in history],
            "model_bytes": history[-1]["model_bytes"],
            "round_wall_s": [r["train_wall_s"] for r in history],
        }
        if args.serial:
            # The sites trained one after another: the compute a round waits for is their sum.
            results[strategy]["round_overhead_vs_serial_compute"] = [
                r["train_wall_s"] / sum(s["train-seconds"] for s in r["site_train"].values())
                for r in history
            ]

    print()
    header = " ".join(f"{f'site-{k}':>8}" for k in range(SITES))
    print(f"{'held-out Dice (mean of classes)':<28} {header} {'mean':>8} {'wall s':>8}")
    for name, value in results.items():
        dice = value["dice"]
        cells = " ".join(f"{dice[f'site-{k}']:>8.4f}" for k in range(SITES))
        print(f"{name:<28} {cells} {dice['mean']:>8.4f} {value['seconds']:>8.0f}")
    central_mean = results["centralized"]["dice"]["mean"] if "centralized" in results else None
    for strategy in strategies:
        value = results[strategy]
        overhead = [o for o in value["round_overhead"] if o]
        serial = value.get("round_overhead_vs_serial_compute")
        against_sum = f", {statistics.median(serial):.3f} of all sites' compute" if serial else ""
        share = f"{100 * value['dice']['mean'] / central_mean:.1f}%" if central_mean else "-"
        print(
            f"{strategy}: {share} of centralized Dice; round overhead median "
            f"{statistics.median(overhead):.3f} of the slowest site (first round, with Ray "
            f"start-up, {overhead[0]:.3f}; max of the rest {max(overhead[1:], default=0):.3f})"
            f"{against_sum}; update bytes per round "
            f"{statistics.median(value['update_bytes_per_round']):,.0f} received, "
            f"{value['model_bytes'] * SITES:,} sent"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
