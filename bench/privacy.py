"""Differential privacy: what DP-SGD costs per step, and what it costs in Dice.

* ``--part overhead`` (default, about a minute on a 2-core CPU at the defaults): one training
  step on the same batch, plain (``train_steps``: AdamW, clip_grad_norm) against DP-SGD
  (``dp_train_steps``: Opacus per-sample gradients, clipping and noise) in each grad-sample
  mode. Prints the median step time, DP/plain ratio (goal <= 1.5) and peak memory of each (CUDA:
  ``max_memory_allocated``; CPU: the growth of the process's peak RSS during the arm, read from
  ``/proc/self/status`` after resetting it through ``/proc/self/clear_refs``).
* ``--part utility`` (long: three federated simulations): Dice on every built-in site's held-out
  test images of the federated model trained without DP and with epsilon 8 and 3 per site
  (noise chosen by Opacus for the plan, under ``--accountant``), same rounds and local steps,
  on built-in sites of ``--train-slices-per-site`` training slices each (default 40: q = 0.2
  at batch 8; 500 gives q = 0.016).
* ``--part accounting`` (seconds, no training): for one history (noise ``--noise``, ``--rounds``
  x ``--local-steps`` steps) at each sample rate of ``--sample-rates`` (default 0.2 and 0.016),
  epsilon under Opacus' RDP and PRV accountants side by side and their ratio, and the noise
  each would plan for the ``--epsilons`` targets (what ``privacy.accountant`` changes).
* ``--part pretrain`` (not in ``all``): a public model, trained centrally (``training.fit``,
  what ``medsegdiff train`` runs) for ``--pretrain-steps`` steps on the built-in public set
  (``write_public_fundus``: ``--public-cases`` cases disjoint from every site's, in a shifted
  style), signed as release ``--public-name`` under ``--work``/releases with a key of its own
  (``--work``/keys/public-signing.pem), and its Dice on every built-in site's test split before
  any fine-tuning. It prints the ``--initial-release`` and ``--public-key`` to pass on.
* ``--initial-release PATH --public-key PATH``: the utility runs start from that signed release
  (``federation.initial_release``) as well as from a random initialisation, and the table's
  first row is the release's own Dice before any fine-tuning. ``--train-slices-per-site``
  takes a list (``40,400,2000``): one table per site size. ``--dp-overrides`` is the DP recipe
  (``privacy.*`` keys) of every DP arm.
* ``--part ablation`` (not in ``all``): each DP option of ``ABLATION`` alone (``--arms``), at
  the first site size and ``--ablation-epsilon``, same rounds and seeds; ``public-clip`` with
  ``--public-clip C``, ``recipe`` with ``--dp-overrides``.
* ``--part clip`` (not in ``all``; needs ``--initial-release``): per-slice gradient-norm
  quantiles of the public model on the public set, whose median is a clipping bound that costs
  the sites no privacy.

Run: python bench/privacy.py [--part overhead|utility|ablation|clip|accounting|pretrain|all]
     [--preset small --size 64 --batch 8] [--modes vmap,hooks,functorch,ghost]
     [--rounds 25 --local-steps 16]
     [--train-slices-per-site 40,400,2000] [--dp-overrides "privacy.trainable=norms"]
     [--arms dp-sgd,augment --ablation-epsilon 8 --public-clip 1.33] [--accountant rdp|prv]
     [--noise 1.0 --sample-rates 0.2,0.016]
     [--initial-release PATH --public-key PATH] [--pretrain-steps 400 --public-cases 200]
     [--json runs/x.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsegdiff_core.config import load_config, parse_config  # noqa: E402
from medsegdiff_core.model import MedSegDiffUNet  # noqa: E402
from medsegdiff_core.privacy import (  # noqa: E402
    PrivacyPlan,
    account,
    dp_train_steps,
    plan_privacy,
    prv_epsilon,
)
from medsegdiff_core.training import make_optimizer, random_batches, train_steps  # noqa: E402

SITES = 3


# --- memory -----------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory an arm adds: CUDA allocations, or on CPU the growth of peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            gc.collect()
            with contextlib.suppress(OSError, AttributeError):  # give freed heap back first
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        self.added_mib = max(peak - self.base, 0) / 2**20


# --- overhead ---------------------------------------------------------------------------------


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    config = parse_config(
        {
            "model": {"preset": args.preset, "image_size": args.size},
            "diffusion": {"prediction": "v"},
        }
    )
    spec = config.unet_spec()
    schedule = config.diffusion.noise_schedule()
    torch.manual_seed(0)
    base = MedSegDiffUNet(spec).to(device)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    # One fixed batch: a dataset of exactly `batch` slices, every one in every step (plain:
    # the whole dataset per batch; DP: Poisson sampling with rate 1).
    batch = [
        {
            "image": torch.randn(spec.image_channels, args.size, args.size),
            "mask": (torch.rand(spec.mask_channels, args.size, args.size) > 0.5).float(),
        }
        for _ in range(args.batch)
    ]
    amp = torch.bfloat16 if device.type == "cuda" else None
    print(
        f"bench/privacy overhead: preset {args.preset}, {args.size} px, batch {args.batch}, "
        f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters, device {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        flush=True,
    )

    def timed(run, steps: int) -> tuple[list[float], float]:
        base.load_state_dict(state)
        stamps: list[float] = []
        with PeakMemory(device) as memory:
            start = time.perf_counter()

            def on_step(_: int, __: float) -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

            run(on_step, steps)
        times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
        return times[args.warmup :], memory.added_mib

    def plain(on_step, steps: int) -> None:
        optimizer = make_optimizer(base, 1e-4, 0.0)
        batches = random_batches(batch, args.batch, seed=0, device=device)
        train_steps(
            base,
            schedule,
            batches,
            optimizer,
            steps,
            grad_clip=1.0,
            amp_dtype=amp,
            on_step=on_step,
        )

    def private(mode: str):
        def run(on_step, steps: int) -> None:
            plan = PrivacyPlan(
                noise_multiplier=1.0,
                sample_rate=1.0,
                steps=steps,
                max_grad_norm=1.0,
                delta=1e-5,
                delta_is_default=False,
                target_epsilon=float("inf"),
                num_examples=args.batch,
                planned_rounds=1,
                noise_calibrated=False,
            )
            optimizer = make_optimizer(base, 1e-4, 0.0)
            dp_train_steps(
                base,
                schedule,
                batch,
                plan,
                optimizer,
                grad_sample_mode=mode,
                amp_dtype=amp,
                on_step=on_step,
            )

        return run

    arms: dict[str, Any] = {"plain": plain}
    arms |= {f"dp-{mode}": private(mode) for mode in args.modes.split(",")}
    results: dict[str, Any] = {}
    # One untimed step of each arm first (lazy initialisation, allocator warm-up), then the
    # arms interleaved so that a busy machine slows them alike.
    for run in arms.values():
        timed(run, 1)
    samples: dict[str, list[float]] = {name: [] for name in arms}
    memory: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, run in arms.items():
            steps, added = timed(run, args.warmup + args.iters)
            samples[name] += steps
            memory[name] = max(memory.get(name, 0.0), added)
    plain_median = statistics.median(samples["plain"])
    print(f"{'arm':<14} {'median ms':>10} {'ratio':>7} {'peak MiB':>9}")
    for name in arms:
        median = statistics.median(samples[name])
        results[name] = {
            "median_s": median,
            "samples_s": samples[name],
            "ratio": median / plain_median,
            "peak_added_mib": memory[name],
        }
        print(
            f"{name:<14} {1000 * median:>10.1f} {median / plain_median:>7.2f} {memory[name]:>9.1f}",
            flush=True,
        )
    best = min((n for n in results if n != "plain"), key=lambda n: results[n]["ratio"])
    print(
        f"fastest DP mode: {best.removeprefix('dp-')} at {results[best]['ratio']:.2f}x a plain "
        "step (goal <= 1.5)"
    )
    return {"config": vars(args) | {"device": str(device)}, "arms": results}


# --- utility ----------------------------------------------------------------------------------


def _federated_dice(
    args: argparse.Namespace, config, name: str, overrides: str, slices: int, tests: list
) -> dict[str, Any]:
    """One federated simulation of ``--rounds`` x ``--local-steps``; its held-out Dice and the
    epsilon each site's card entry states."""
    from federated import run_federated, score

    start = time.monotonic()
    run_dir = run_federated(
        args.work.resolve(),
        name,
        args.experiment,
        f"federation.rounds={args.rounds} federation.local_steps={args.local_steps} "
        f"federation.evaluate_every={args.rounds} {overrides}",
        side_by_side=True,
        train_slices=slices,
    )
    dice = score(run_dir / "final" / "model.json", tests, config)
    card_path = next((run_dir.parents[1] / "releases").glob("*/model-card.json"))
    card = json.loads(card_path.read_text())
    epsilons = {site: entry.get("epsilon") for site, entry in card["privacy"]["sites"].items()}
    return {"dice": dice, "epsilon": epsilons, "seconds": time.monotonic() - start}


def _dp_overrides(args: argparse.Namespace, epsilon: str, recipe: str) -> str:
    """A DP arm at ``epsilon`` under ``--accountant`` with the ``recipe``'s privacy.* keys."""
    return (
        f"privacy.enabled=true privacy.target_epsilon={epsilon} "
        f"privacy.accountant={args.accountant} {recipe}"
    )


def _print_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    header = " ".join(f"{f'site-{k}':>8}" for k in range(SITES))
    width = max(len(title), *(len(name) for name in rows))
    print(f"\n{title:<{width}} {header} {'mean':>8}")
    for name, dice in rows.items():
        cells = " ".join(f"{dice[f'site-{k}']:>8.4f}" for k in range(SITES))
        print(f"{name:<{width}} {cells} {dice['mean']:>8.4f}", flush=True)


def _site_tests(
    args: argparse.Namespace, config, slices: int
) -> tuple[list, dict[str, dict[str, float]]]:
    """The built-in sites' test splits (sites of ``slices`` training slices written if
    missing), and the table's first row: the public model's own Dice, when runs start from it."""
    from federated import builtin_tests, score

    _, tests = builtin_tests(args.work.resolve(), config, train_slices=slices)
    rows: dict[str, dict[str, float]] = {}
    if args.initial_release is not None:
        rows["public model, not fine-tuned"] = score(
            args.initial_release / "model.json", tests, config
        )
    return tests, rows


def utility(args: argparse.Namespace) -> dict[str, Any]:
    """No DP and each epsilon of ``--epsilons``, per site size and starting point."""
    sys.path.insert(0, str(ROOT / "bench"))
    config = load_config(ROOT / args.experiment)
    inits = {"random": ""}
    if args.initial_release is not None:
        inits["public"] = initial_release_overrides(args)
    arms = {"no DP": "privacy.enabled=false"}
    arms |= {
        f"eps {e}": _dp_overrides(args, e, args.dp_overrides) for e in args.epsilons.split(",")
    }
    results: dict[str, Any] = {}
    for slices in args.train_slices_per_site:
        print(
            f"bench/privacy utility: {args.experiment}, {SITES} sites of {slices} training "
            f"slices, {args.rounds} rounds x {args.local_steps} local steps, "
            f"{args.accountant} accountant, DP recipe: {args.dp_overrides or '(none)'}",
            flush=True,
        )
        tests, rows = _site_tests(args, config, slices)
        for init, start in inits.items():
            for index, (arm, privacy) in enumerate(arms.items()):
                name = f"bench-privacy-{slices}-{init}-{index}"
                result = _federated_dice(args, config, name, f"{privacy}{start}", slices, tests)
                results[f"{slices}/{init}/{arm}"] = result
                rows[f"{init} init, {arm}"] = result["dice"]
                print(
                    f"{slices} slices, {init} init, {arm}: Dice {result['dice']['mean']:.4f}, "
                    f"epsilon per site {result['epsilon']}, {result['seconds']:.0f} s",
                    flush=True,
                )
        _print_table(f"{slices} slices/site", rows)
        for init in inits:
            plain = rows[f"{init} init, no DP"]["mean"]
            for arm in list(arms)[1:]:
                share = rows[f"{init} init, {arm}"]["mean"] / plain
                print(f"  {init} init, {arm}: {100 * share:.1f} % of no DP")
    return results


# The DP training options (privacy.* keys), each alone on top of the same DP run.
ABLATION = {
    "dp-sgd": "",
    "lr": "privacy.lr=3e-4",
    "large-batch": "privacy.expected_batch_size=32 privacy.local_steps=4",
    "augment": "privacy.augmentation_multiplicity=4",
    "decoder": "privacy.trainable=decoder",
    "norms": "privacy.trainable=norms",
    "ema": "privacy.iterate_averaging=0.9",
}


def ablation(args: argparse.Namespace) -> dict[str, Any]:
    """Each DP option alone at one site size and epsilon (``--ablation-epsilon``), same rounds
    and seeds; ``public-clip`` uses ``--public-clip`` (from ``--part clip``), ``recipe`` the
    ``--dp-overrides``."""
    sys.path.insert(0, str(ROOT / "bench"))
    config = load_config(ROOT / args.experiment)
    slices = args.train_slices_per_site[0]
    tests, rows = _site_tests(args, config, slices)
    arms = dict(ABLATION)
    if args.public_clip is not None:
        arms["public-clip"] = f"privacy.max_grad_norm={args.public_clip}"
    if args.dp_overrides:
        arms["recipe"] = args.dp_overrides
    chosen = args.arms.split(",") if args.arms else list(arms)
    start = initial_release_overrides(args)
    print(
        f"bench/privacy ablation: {slices} slices/site, epsilon {args.ablation_epsilon}, "
        f"{args.rounds} rounds x {args.local_steps} local steps, "
        f"{'public' if start else 'random'} init",
        flush=True,
    )
    results: dict[str, Any] = {}
    for arm in chosen:
        overrides = _dp_overrides(args, args.ablation_epsilon, arms[arm]) + start
        result = _federated_dice(
            args, config, f"bench-privacy-ablation-{slices}-{arm}", overrides, slices, tests
        )
        results[arm] = result | {"overrides": arms[arm]}
        rows[f"{arm} ({arms[arm] or 'DP-SGD, no option'})"] = result["dice"]
        print(
            f"{arm}: Dice {result['dice']['mean']:.4f}, epsilon {result['epsilon']}, "
            f"{result['seconds']:.0f} s",
            flush=True,
        )
    _print_table(f"ablation, {slices} slices, eps {args.ablation_epsilon}", rows)
    return results


def clip(args: argparse.Namespace) -> dict[str, Any]:
    """Per-slice gradient norms of the public model on the public set: a clipping bound that
    costs the sites no privacy (``privacy.max_grad_norm``)."""
    from medsegdiff_core.checkpoint import load_checkpoint
    from medsegdiff_core.data.layouts import open_dataset
    from medsegdiff_core.privacy import per_sample_gradient_norms

    if args.initial_release is None:
        sys.exit("--part clip needs --initial-release: the public model")
    config = load_config(ROOT / args.experiment)
    loaded = load_checkpoint(args.initial_release / "model.json")
    public = open_dataset(
        args.work.resolve() / "data" / "public" / "train",
        "generic",
        config.data.classes,
        config.unet_spec().image_size,
        in_channels=config.data.image_channels,
    )
    torch.manual_seed(0)
    norms = per_sample_gradient_norms(
        loaded.model,
        loaded.diffusion.noise_schedule(),
        public,
        objective=config.diffusion.objective(),
    )
    quantiles = {q: float(torch.quantile(norms, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    cells = "  ".join(f"q{int(100 * q)} {v:.4g}" for q, v in quantiles.items())
    print(f"bench/privacy clip: {len(norms)} public slices, per-slice gradient norm {cells}")
    print(f"pass --public-clip {quantiles[0.5]:.3g} (the median) to --part ablation")
    return {"quantiles": quantiles, "slices": len(norms)}


def initial_release_overrides(args: argparse.Namespace) -> str:
    """The federated runs' starting release (``--initial-release``), as config overrides."""
    if args.initial_release is None:
        return ""
    if args.public_key is None:
        sys.exit("--initial-release needs --public-key: the key that must verify it")
    return (
        f" federation.initial_release={args.initial_release.resolve()}"
        f" federation.initial_release_public_key={args.public_key.resolve()}"
    )


# --- pretrain ---------------------------------------------------------------------------------


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Train a public model centrally on the public set, sign it, score it on the sites."""
    sys.path.insert(0, str(ROOT / "bench"))
    from federated import builtin_tests, score, train_central

    from medsegdiff_core.data.synthetic import PUBLIC_STYLE, write_public_fundus
    from medsegdiff_core.release import (
        generate_signing_key,
        load_private_key,
        passphrase_from_env,
        public_path,
        write_release,
    )

    config = load_config(ROOT / args.experiment)
    workdir = args.work.resolve()
    public = write_public_fundus(workdir / "data" / "public", args.public_cases)
    _, tests = builtin_tests(workdir, config, train_slices=args.train_slices_per_site[0])
    print(
        f"bench/privacy pretrain: {args.experiment}, {args.pretrain_steps} central steps on "
        f"{args.public_cases} public cases ({PUBLIC_STYLE.name})",
        flush=True,
    )
    start = time.monotonic()
    checkpoint = train_central(
        config, [public / "train"], args.pretrain_steps, workdir / "pretrain" / args.public_name
    )
    seconds = time.monotonic() - start
    key = workdir / "keys" / "public-signing.pem"
    if not key.exists():
        generate_signing_key(key, passphrase_from_env())
    card = {
        "summary": f"MedSegDiff ({config.model.preset} preset) trained centrally on the "
        "built-in public synthetic fundus set; no site's images",
        "training": {
            "steps": args.pretrain_steps,
            "public_cases": args.public_cases,
            "public_style": PUBLIC_STYLE.name,
            "batch_size": config.train.batch_size,
            "lr": config.train.lr,
        },
    }
    release = write_release(
        checkpoint,
        workdir / "releases",
        args.public_name,
        card,
        load_private_key(key, passphrase_from_env()),
    )
    dice = score(release / "model.json", tests, config)
    cells = "  ".join(f"{site} {value:.4f}" for site, value in dice.items())
    print(f"public model, before fine-tuning: Dice {cells}")
    print(f"signed {release}; pass --initial-release {release} --public-key {public_path(key)}")
    return {
        "release": str(release),
        "public_key": str(public_path(key)),
        "dice": dice,
        "train_seconds": seconds,
    }


# --- accounting -------------------------------------------------------------------------------


def accounting(args: argparse.Namespace) -> dict[str, Any]:
    """RDP vs PRV epsilon for one history per sample rate, and the noise each plans."""
    steps = args.rounds * args.local_steps
    delta = args.delta
    print(
        f"bench/privacy accounting: noise {args.noise}, {args.rounds} rounds x "
        f"{args.local_steps} steps = {steps} steps, delta {delta:g} (Opacus RDP vs PRV upper "
        "bound, eps_error 0.01)",
        flush=True,
    )
    print(f"{'q':>7} {'noise':>6} {'steps':>6} {'eps RDP':>9} {'eps PRV':>9} {'PRV/RDP':>8}")
    results: dict[str, Any] = {"history": [], "planning": []}
    for q in (float(x) for x in args.sample_rates.split(",")):
        history = [(args.noise, q, steps)]
        rdp = account(history, delta, "rdp").value
        start = time.perf_counter()
        try:
            prv: float | None = prv_epsilon(history, delta)
        except Exception as exc:  # what the site would do: fall back to RDP
            prv, note = None, f"  prv unavailable: {exc}"
        else:
            note = ""
        seconds = time.perf_counter() - start
        ratio = f"{prv / rdp:>8.3f}" if prv is not None else f"{'-':>8}"
        prv_cell = f"{prv:>9.4f}" if prv is not None else f"{'-':>9}"
        print(f"{q:>7.4g} {args.noise:>6.3g} {steps:>6} {rdp:>9.4f} {prv_cell} {ratio}{note}")
        results["history"].append(
            {"q": q, "noise": args.noise, "steps": steps, "rdp": rdp, "prv": prv, "prv_s": seconds}
        )
    print(f"\n{'q':>7} {'target':>7} {'noise RDP':>10} {'noise PRV':>10} {'eps PRV':>9}")
    for q in (float(x) for x in args.sample_rates.split(",")):
        for target in (float(e) for e in args.epsilons.split(",")):
            sigmas = {}
            for name in ("rdp", "prv"):
                privacy = parse_config(
                    {
                        "privacy": {
                            "enabled": True,
                            "target_epsilon": target,
                            "delta": delta,
                            "accountant": name,
                        }
                    }
                ).privacy
                plan = plan_privacy(
                    privacy,
                    num_examples=max(round(args.batch / q), 1),
                    batch_size=args.batch,
                    local_steps=args.local_steps,
                    rounds=args.rounds,
                )
                sigmas[name] = plan
            p = sigmas["prv"]
            spent = account([(p.noise_multiplier, p.sample_rate, steps)], delta, "prv")
            fallback = f"  ({p.accountant_fallback})" if p.accountant_fallback else ""
            print(
                f"{q:>7.4g} {target:>7.3g} {sigmas['rdp'].noise_multiplier:>10.4f} "
                f"{p.noise_multiplier:>10.4f} {spent.value:>9.4f}{fallback}"
            )
            results["planning"].append(
                {
                    "q": q,
                    "target_epsilon": target,
                    "noise_rdp": sigmas["rdp"].noise_multiplier,
                    "noise_prv": p.noise_multiplier,
                    "epsilon_prv": spent.value,
                    "fallback": p.accountant_fallback,
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        choices=["overhead", "utility", "ablation", "clip", "accounting", "pretrain", "all"],
        default="overhead",
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", default="vmap,hooks,functorch,ghost")
    parser.add_argument("--iters", type=int, default=2, help="timed steps per arm and repeat")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved passes over arms")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--experiment", default="configs/federated-tiny.yaml")
    # The federated benchmark's settings (bench/federated.py), so "no DP" repeats its FedAvg arm.
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--local-steps", type=int, default=16)
    parser.add_argument("--epsilons", default="8,3")
    parser.add_argument(
        "--train-slices-per-site",
        type=lambda value: [int(n) for n in value.split(",")],
        default=[40],
        help="training slices of each built-in site: utility takes a list, e.g. 40,400,2000",
    )
    parser.add_argument(
        "--dp-overrides", default="", help="the DP recipe (privacy.* keys) of every DP arm"
    )
    parser.add_argument("--arms", default="", help="ablation: arms to run (default all)")
    parser.add_argument("--ablation-epsilon", default="8")
    parser.add_argument("--public-clip", type=float, help="ablation: C from --part clip")
    parser.add_argument("--accountant", choices=["rdp", "prv"], default="rdp")
    parser.add_argument("--noise", type=float, default=1.0, help="accounting: noise multiplier")
    parser.add_argument("--sample-rates", default="0.2,0.016", help="accounting: q values")
    parser.add_argument("--delta", type=float, default=1e-5, help="accounting: delta")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-privacy")
    parser.add_argument(
        "--initial-release", type=Path, help="utility: start the federated runs from this release"
    )
    parser.add_argument("--public-key", type=Path, help="the key that must verify it")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="pretrain: central steps")
    parser.add_argument("--public-cases", type=int, default=200, help="pretrain: public cases")
    parser.add_argument("--public-name", default="fundus-public", help="pretrain: release name")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the")  # Opacus' RDP alphas
    results: dict[str, Any] = {}
    if args.part in ("overhead", "all"):
        results["overhead"] = overhead(args)
    if args.part in ("accounting", "all"):
        results["accounting"] = accounting(args)
    if args.part == "pretrain":
        results["pretrain"] = pretrain(args)
    if args.part in ("utility", "all"):
        results["utility"] = utility(args)
    if args.part == "ablation":
        results["ablation"] = ablation(args)
    if args.part == "clip":
        results["clip"] = clip(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
