"""Speed of our MedSegDiff against the peer implementation, side by side in one process.

The peer is lucidrains' ``med-seg-diff-pytorch==0.3.3`` (``Unet`` + ``MedSegDiff``), installed
for the benchmark only::

    pip install --no-deps -r bench/requirements-peer.txt

Both models get the same base width (the peer's ``dim``), image size, batch, mask channels and
image channels; everything else is each project's own default. Three things are measured, each
as the median of ``--iters`` timed iterations after ``--warmup`` untimed ones, with the two
models alternating (and alternating which goes first) so that background load hits both:

1. ``train_step``: forward + backward + AdamW step on one batch.
2. ``denoise_step``: one reverse step of a ``--ensemble``-member ensemble for one image. Peer:
   its ``Unet`` called once per member at batch 1, as its sampler runs members, re-encoding the
   image every call. Ours: one ``denoise`` call at batch ``--ensemble`` on features from
   ``encode_image`` computed once beforehand.
3. ``ensemble``: a whole ensemble for one image. Peer: its default sampler (DDPM over all of its
   ``num_timesteps``, members one by one), by default *extrapolated* from ``--peer-steps`` timed
   steps of its real loop (``MedSegDiff.p_sample``); ``--full-peer`` runs it all. Ours: the fast
   path, ``sample_members`` with the shipped sampler (``InferenceConfig``'s defaults; ``--sampler``
   and ``--sampling-steps`` change it), members batched, always timed in full.

``--match-params`` widens our network (its base width, in steps of 8) until its parameter count
is within 10 % of the peer's, so that no ratio comes from a smaller network; the default matches
the base width only (at width 32 ours has about a third of the peer's parameters).

Inference (2 and 3) runs each side's default precision: the peer float32; ours bf16 autocast
where the product uses it (a CPU with native bf16, see ``autocast_dtype``), else float32.
``--fp32`` runs ours in float32 too. Training (1) is float32 on both sides.

Run ``python bench/peer_speed.py --help`` for the options; ``bench/README.md`` explains the output.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without ``pip install -e .``
    sys.path.insert(0, str(ROOT))

from medsegdiff_core.config import DiffusionConfig, InferenceConfig  # noqa: E402
from medsegdiff_core.diffusion import NoiseSchedule  # noqa: E402
from medsegdiff_core.ensemble import sample_members  # noqa: E402
from medsegdiff_core.model import MedSegDiffUNet, resolve_spec  # noqa: E402
from medsegdiff_core.training import autocast_dtype, batch_loss, make_optimizer  # noqa: E402

PEER_PACKAGE = "med-seg-diff-pytorch==0.3.3"
PEER_MODULE = "med_seg_diff_pytorch.med_seg_diff_pytorch"
REQUIREMENTS = Path(__file__).resolve().with_name("requirements-peer.txt")
EXIT_NO_PEER = 2
LR = 2e-4  # the same AdamW settings for both models; they do not affect speed
WEIGHT_DECAY = 0.0


def load_peer() -> ModuleType:
    """Import the peer's model module, or exit with status 2 and install instructions.

    Only the model module is imported: the package's ``dataset.py`` (torchvision, pandas) and the
    upstream repository's training driver (accelerate, wandb, lion-pytorch) are not on this code
    path, so no stub modules are needed.
    """
    try:
        return importlib.import_module(PEER_MODULE)
    except ImportError as exc:
        try:
            requirements = os.path.relpath(REQUIREMENTS)
        except ValueError:  # another drive on Windows
            requirements = str(REQUIREMENTS)
        print(
            f"peer_speed: cannot import the peer implementation {PEER_PACKAGE} ({exc}).\n"
            "Install it into this virtualenv, for the benchmark only, with\n"
            f"    pip install --no-deps -r {requirements}\n"
            "(--no-deps on purpose: its declared torchvision, accelerate and wandb are not used\n"
            "by its model module, and torchvision from PyPI does not import beside this torch "
            "build.)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_NO_PEER) from None


@dataclass
class Timing:
    """Seconds of each timed iteration of one side of one measurement."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(
    peer: Callable[[], object],
    ours: Callable[[], object],
    iters: int,
    warmup: int,
) -> tuple[Timing, Timing]:
    """Time ``peer`` and ``ours`` alternately, swapping which runs first every iteration."""
    peer_t, ours_t = Timing(), Timing()
    for i in range(warmup + iters):
        order = [(peer, peer_t), (ours, ours_t)]
        if i % 2:
            order.reverse()
        for fn, timing in order:
            seconds = timed(fn)
            if i >= warmup:
                timing.samples.append(seconds)
    return peer_t, ours_t


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def build_peer(peer: ModuleType, args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """The peer's ``Unet`` and its ``MedSegDiff`` wrapper at the matched config, defaults else."""
    unet = peer.Unet(
        dim=args.width,
        image_size=args.size,
        mask_channels=args.mask_channels,
        input_img_channels=args.image_channels,
    )
    return unet, peer.MedSegDiff(unet)


def build_ours(
    args: argparse.Namespace, width: int | None = None
) -> tuple[MedSegDiffUNet, NoiseSchedule]:
    """Our UNet (preset ``--preset`` at the matched config) and the default training schedule."""
    spec = resolve_spec(
        args.preset,
        base_channels=width or args.width,
        image_size=args.size,
        image_channels=args.image_channels,
        mask_channels=args.mask_channels,
    )
    diffusion = DiffusionConfig()
    return MedSegDiffUNet(spec), diffusion.noise_schedule()


def width_matching(args: argparse.Namespace, target: int) -> int:
    """Our smallest base width (a multiple of 8, at least ``--width``) whose parameter count is
    within 10 % of ``target``, or the closest one tried below 4x the width."""
    best, best_gap = args.width, float("inf")
    for width in range(args.width, 4 * args.width + 1, 8):
        gap = abs(count_parameters(build_ours(args, width)[0]) - target) / target
        if gap <= 0.10:
            return width
        if gap < best_gap:
            best, best_gap = width, gap
    return best


def bench_train(
    peer_diffusion: nn.Module,
    model: MedSegDiffUNet,
    schedule: NoiseSchedule,
    args: argparse.Namespace,
) -> tuple[Timing, Timing]:
    """Forward + backward + AdamW step at batch ``--batch`` (masks in {0, 1} for both)."""
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.image_channels, args.size, args.size)
    image = torch.randn(shape, generator=gen)
    mask_shape = (args.batch, args.mask_channels, args.size, args.size)
    mask = (torch.rand(mask_shape, generator=gen) > 0.5).float()
    peer_opt = torch.optim.AdamW(peer_diffusion.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ours_opt = make_optimizer(model, LR, WEIGHT_DECAY)
    peer_diffusion.train()
    model.train()

    def peer_step() -> None:
        loss = peer_diffusion(mask, image)  # its default objective (pred_noise), returns the loss
        peer_opt.zero_grad(set_to_none=True)
        loss.backward()
        peer_opt.step()
        _check_finite(loss, "peer")

    def ours_step() -> None:
        loss = batch_loss(model, schedule, {"image": image, "mask": mask})["loss"]
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()
        _check_finite(loss, "ours")

    return alternate(peer_step, ours_step, args.iters, args.warmup)


def _check_finite(loss: Tensor, side: str) -> None:
    value = float(loss.detach())
    if value != value or abs(value) == float("inf"):
        raise FloatingPointError(f"{side} training loss is {value}")


@torch.no_grad()
def bench_denoise(
    peer_unet: nn.Module,
    model: MedSegDiffUNet,
    num_timesteps: int,
    args: argparse.Namespace,
) -> tuple[Timing, Timing, Timing]:
    """One reverse step of a K-member ensemble for one image; also times our ``encode_image``."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    k, m, s = args.ensemble, args.mask_channels, args.size
    image = torch.randn((1, args.image_channels, s, s), generator=gen)
    members = torch.randn((k, m, s, s), generator=gen)
    t = num_timesteps - 1
    peer_unet.eval()
    model.eval()
    features = model.encode_image(image)  # cached: computed once per image, outside the loop
    peer_time = torch.full((1,), t, dtype=torch.long)
    ours_time = torch.full((k,), t, dtype=torch.long)

    def peer_step() -> None:
        for j in range(k):  # members one by one, the image re-encoded inside every call
            peer_unet(members[j : j + 1], peer_time, image)

    def ours_step() -> None:
        with torch.autocast("cpu", dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
            model.denoise(members, ours_time, features)

    peer_t, ours_t = alternate(peer_step, ours_step, args.iters, args.warmup)
    encode_t = Timing([timed(lambda: model.encode_image(image)) for _ in range(args.iters)])
    return peer_t, ours_t, encode_t


@dataclass
class EnsembleResult:
    """Timings of a whole ensemble for one image."""

    ours: Timing
    peer_seconds: float  # measured (``--full-peer``) or extrapolated
    peer_extrapolated: bool
    peer_step: Timing | None  # seconds per peer sampling step of one member, if extrapolated
    peer_timed_steps: int
    peer_total_steps: int  # steps of the peer's full default run: num_timesteps * ensemble


@torch.no_grad()
def bench_ensemble(
    peer_diffusion: Any,
    model: MedSegDiffUNet,
    schedule: NoiseSchedule,
    args: argparse.Namespace,
) -> EnsembleResult:
    """Whole-ensemble inference for one image: peer's default sampler vs our fast path."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    s = args.size
    image = torch.randn((1, args.image_channels, s, s), generator=gen)
    cfg = InferenceConfig(
        sampler=args.sampler,
        sampling_steps=args.sampling_steps,
        eta=args.eta,
        ensemble=args.ensemble,
    )
    peer_diffusion.eval()
    num_timesteps = int(peer_diffusion.num_timesteps)
    total_steps = num_timesteps * args.ensemble

    def ours_run() -> None:
        sample_members(model, schedule, image, cfg, generator=gen, amp_dtype=args.amp_dtype)

    if args.full_peer:
        ours_t = Timing()
        peer_seconds = 0.0
        for _ in range(args.warmup):
            ours_run()
        for member in range(args.ensemble):  # alternate: ours, peer member, ours, ...
            ours_t.samples.append(timed(ours_run))
            print(f"  peer member {member + 1}/{args.ensemble}: {num_timesteps} DDPM steps ...")
            peer_seconds += timed(lambda: peer_diffusion.sample(image))
        ours_t.samples.append(timed(ours_run))
        return EnsembleResult(ours_t, peer_seconds, False, None, total_steps, total_steps)

    # The peer's own loop (p_sample_loop) body, continued across rounds as one member's chain,
    # so its per-step overhead (schedule lookups, noise, clipping) is included.
    shape = (1, args.mask_channels, s, s)
    state: dict[str, Any] = {"x": torch.randn(shape, generator=gen), "t": num_timesteps - 1}

    def peer_chunk(steps: int) -> None:
        x_start = None
        for _ in range(steps):
            if state["t"] < 0:  # a chain ran out (only with tiny --peer-steps); start anew
                state["x"], state["t"] = torch.randn(shape, generator=gen), num_timesteps - 1
            self_cond = x_start if peer_diffusion.self_condition else None
            state["x"], x_start = peer_diffusion.p_sample(state["x"], state["t"], image, self_cond)
            state["t"] -= 1

    peer_t, ours_t = alternate(
        lambda: peer_chunk(args.peer_steps), ours_run, args.ensemble_rounds, args.warmup
    )
    per_step = Timing([seconds / args.peer_steps for seconds in peer_t.samples])
    return EnsembleResult(
        ours_t,
        per_step.median * total_steps,
        True,
        per_step,
        args.peer_steps * args.ensemble_rounds,
        total_steps,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time our MedSegDiff against med-seg-diff-pytorch==0.3.3 at a matched config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--width", type=int, default=32, help="base channels (the peer's dim)")
    p.add_argument("--size", type=int, default=64, help="image side in px (multiple of 8)")
    p.add_argument("--batch", type=int, default=8, help="training batch size")
    p.add_argument("--mask-channels", type=int, default=1)
    p.add_argument("--image-channels", type=int, default=3)
    p.add_argument("--preset", default="small", help="our architecture preset")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    p.add_argument("--ensemble", type=int, default=5, help="ensemble members per image")
    shipped = InferenceConfig()
    p.add_argument("--sampler", default=shipped.sampler, choices=["ddpm", "ddim", "dpm++"])
    p.add_argument("--sampling-steps", type=int, default=shipped.sampling_steps)
    p.add_argument("--eta", type=float, default=shipped.eta, help="DDIM eta")
    p.add_argument(
        "--match-params",
        action="store_true",
        help="widen ours until its parameter count is within 10%% of the peer's",
    )
    p.add_argument("--peer-steps", type=int, default=20, help="peer sampling steps timed per round")
    p.add_argument(
        "--ensemble-rounds",
        type=int,
        default=3,
        help="alternating rounds (ours: one whole ensemble; peer: --peer-steps steps)",
    )
    p.add_argument(
        "--full-peer",
        action="store_true",
        help="run the peer's whole default sampling (about an hour on a laptop-class CPU)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fp32", action="store_true", help="our inference in float32 even where bf16 is default"
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write all figures")
    args = p.parse_args(argv)
    default = autocast_dtype(torch.device("cpu"), True, inference=True)
    args.amp_dtype = None if args.fp32 else default
    for name in ("width", "size", "batch", "mask_channels", "image_channels", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("ensemble", "sampling_steps", "peer_steps", "ensemble_rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.size % 8:
        p.error("--size must be a multiple of 8 (both UNets downsample 3 times)")
    return args


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peer = load_peer()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    peer_unet, peer_diffusion = build_peer(peer, args)
    peer_params = count_parameters(peer_unet)
    width = width_matching(args, peer_params) if args.match_params else args.width
    model, schedule = build_ours(args, width)
    ours_params = count_parameters(model)
    k = args.ensemble

    print("peer_speed: our MedSegDiff vs med-seg-diff-pytorch 0.3.3 (same process, alternating)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_model()}")
    print(
        f"config: width {args.width}, {args.size}x{args.size} px, batch {args.batch}, "
        f"{args.mask_channels} mask ch, {args.image_channels} image ch; "
        f"median of {args.iters} iterations after {args.warmup} warm-up"
    )
    print(
        f"parameters: peer {peer_params:,}  ours {ours_params:,} (preset {args.preset!r}, "
        f"width {width}{', widened to match the parameters' if args.match_params else ''}; "
        f"ours/peer {ours_params / peer_params:.2f})"
    )
    precision = "bfloat16 autocast" if args.amp_dtype is not None else "float32"
    print(f"inference precision: peer float32, ours {precision}")

    started = time.perf_counter()
    train_peer, train_ours = bench_train(peer_diffusion, model, schedule, args)
    b = args.batch
    print(
        f"[1] train step, batch {b}: peer {ms(train_peer.median)} ({ms(train_peer.median / b)}"
        f"/item)  ours {ms(train_ours.median)} ({ms(train_ours.median / b)}/item)"
    )

    den_peer, den_ours, encode = bench_denoise(
        peer_unet, model, int(peer_diffusion.num_timesteps), args
    )
    print(
        f"[2] denoise step, {k} members of 1 image: peer {ms(den_peer.median)} "
        f"({ms(den_peer.median / k)}/member, {k} calls at batch 1)  ours {ms(den_ours.median)} "
        f"({ms(den_ours.median / k)}/member, 1 call at batch {k}; encode_image once per image: "
        f"{ms(encode.median)})"
    )

    ens = bench_ensemble(peer_diffusion, model, schedule, args)
    steps_each = ens.peer_total_steps // k
    if ens.peer_extrapolated:
        assert ens.peer_step is not None
        how = (
            f"EXTRAPOLATED linearly from {ens.peer_timed_steps} timed steps "
            f"({args.ensemble_rounds} rounds x {args.peer_steps}; median "
            f"{ms(ens.peer_step.median)}/step) to {steps_each} steps x {k} members"
        )
    else:
        how = f"measured in full: {steps_each} steps x {k} members"
    print(
        f"[3] ensemble of {k}, 1 image: peer default DDPM {ens.peer_seconds:.1f} s ({how})  "
        f"ours {args.sampling_steps}-step {args.sampler} batched {ms(ens.ours.median)} "
        f"({ms(ens.ours.median / k)}/member)"
    )
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")

    ratios = {
        "train_step_ratio": train_peer.median / train_ours.median,
        "denoise_step_ratio": den_peer.median / den_ours.median,
        "ensemble_ratio": ens.peer_seconds / ens.ours.median,
    }
    print(f"train_step_ratio (peer/ours): {ratios['train_step_ratio']:.2f}")
    print(f"denoise_step_ratio (peer/ours): {ratios['denoise_step_ratio']:.2f}")
    print(f"ensemble_ratio (peer default / ours fast): {ratios['ensemble_ratio']:.1f}")
    # Issue 14's goals: at the matched width, ensemble >= 2500; at matched parameters, train
    # step >= 1.5 and ensemble >= 1000.
    if args.match_params:
        goals = {"train_step_ratio": 1.5, "ensemble_ratio": 1000.0}
    else:
        goals = {"train_step_ratio": 1.5, "denoise_step_ratio": 2.0, "ensemble_ratio": 2500.0}
    verdict = ", ".join(
        f"{name} >= {goal:g} {'met' if ratios[name] >= goal else 'NOT met'}"
        for name, goal in goals.items()
    )
    print(f"goals: {verdict}")

    if args.json is not None:
        report = {
            "config": {
                k_: (str(v) if isinstance(v, Path | torch.dtype) else v)
                for k_, v in vars(args).items()
            },
            "environment": {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu": cpu_model(),
                "python": platform.python_version(),
                "peer": PEER_PACKAGE,
                "stubbed_modules": [],
            },
            "parameters": {"peer": peer_params, "ours": ours_params, "ours_width": width},
            "train_step_s": {"peer": asdict(train_peer), "ours": asdict(train_ours)},
            "denoise_step_s": {
                "peer": asdict(den_peer),
                "ours": asdict(den_ours),
                "ours_encode_image": asdict(encode),
            },
            "ensemble_s": {
                "peer": ens.peer_seconds,
                "peer_extrapolated": ens.peer_extrapolated,
                "peer_step": asdict(ens.peer_step) if ens.peer_step else None,
                "peer_timed_steps": ens.peer_timed_steps,
                "peer_total_steps": ens.peer_total_steps,
                "ours": asdict(ens.ours),
            },
            "medians_s": {
                "train_step": {"peer": train_peer.median, "ours": train_ours.median},
                "denoise_step": {"peer": den_peer.median, "ours": den_ours.median},
                "ensemble": {"peer": ens.peer_seconds, "ours": ens.ours.median},
            },
            "ratios": ratios,
            "goals": goals,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
