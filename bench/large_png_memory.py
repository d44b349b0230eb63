"""Peak memory of ``medsegdiff predict`` on one large PNG.

Writes one RGB PNG of ``--size`` x ``--size`` pixels (smooth noise, so it compresses like a
photo rather than to nothing) and an untrained tiny checkpoint, then runs ``predict`` on it in a
fresh Python process that reports its own peak resident set size (``resource.getrusage``
``ru_maxrss``). The same is done on a 64 x 64 image, whose peak is what importing torch and the
model costs; the difference is what the large image costs.

Run: python bench/large_png_memory.py [--size 8000] [--work /tmp/large-png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peak_memory import cli_peak_mib  # noqa: E402


def _write_png(path: Path, size: int) -> None:
    """A smooth random RGB image: upsampled coarse noise, written row band by row band."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    coarse.resize((size, size), Image.Resampling.BILINEAR).save(path, format="PNG")


def _checkpoint(path: Path) -> Path:
    import torch

    from medsegdiff_core.checkpoint import save_checkpoint
    from medsegdiff_core.config import DiffusionConfig, InferenceConfig
    from medsegdiff_core.data import FUNDUS_CLASSES
    from medsegdiff_core.model import MedSegDiffUNet
    from medsegdiff_core.model.presets import resolve_spec

    torch.manual_seed(0)
    spec = resolve_spec("tiny", image_size=32, image_channels=3, mask_channels=2)
    return save_checkpoint(
        path,
        MedSegDiffUNet(spec),
        diffusion=DiffusionConfig(prediction="v"),
        classes=FUNDUS_CLASSES,
        inference=InferenceConfig(sampling_steps=2, ensemble=1, batch_size=1),
    )


def peak_mib(work: Path, checkpoint: Path, size: int) -> float:
    """Peak RSS (MiB) of a fresh ``medsegdiff predict`` on one ``size`` x ``size`` PNG."""
    site = work / f"site-{size}"
    (site / "images").mkdir(parents=True, exist_ok=True)
    _write_png(site / "images" / "big.png", size)
    out = work / f"out-{size}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["--quiet", "predict", "--checkpoint", str(checkpoint), "--input", str(site)]
    args += ["--out", str(out), "--device", "cpu"]
    return cli_peak_mib(args)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8000, help="image side in pixels")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="large-png-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = _checkpoint(work / "model" / "tiny")
    baseline = peak_mib(work, checkpoint, 64)
    large = peak_mib(work, checkpoint, args.size)
    image_mib = args.size * args.size * 3 / 2**20
    print(
        json.dumps(
            {
                "size": f"{args.size}x{args.size}",
                "rgb_uint8_mib": round(image_mib, 1),
                "peak_rss_mib": round(large, 1),
                "baseline_64px_mib": round(baseline, 1),
                "image_cost_mib": round(large - baseline, 1),
                "image_cost_per_rgb_uint8": round((large - baseline) / image_mib, 2),
            }
        )
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
