"""Peak memory of ``medsegdiff predict`` over a folder of volumes: 5 cases against 50.

Writes ``--many`` synthetic BraTS-like cases (four modalities + seg, ``--shape`` voxels each)
and an untrained tiny checkpoint, then runs ``predict --layout brats`` (1 sampling step, an
ensemble of 1: the sampler is not what is measured) on the first ``--few`` cases and on all of
them, each in a fresh Python process that reports its own peak resident set size
(``resource.getrusage`` ``ru_maxrss``). Bounded memory means the ratio stays near 1 (goal
<= 1.3): the dataset holds one case at a time (``SliceDataset(lazy=True)``), and the writer
one case's slices.

Run: python bench/predict_memory.py [--few 5] [--many 50] [--shape 96 96 48]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peak_memory import cli_peak_mib  # noqa: E402


def _checkpoint(path: Path) -> Path:
    import torch

    from medsegdiff_core.checkpoint import save_checkpoint
    from medsegdiff_core.config import DiffusionConfig, InferenceConfig
    from medsegdiff_core.data.synthetic_brain import BRATS_CLASSES
    from medsegdiff_core.model import MedSegDiffUNet
    from medsegdiff_core.model.presets import resolve_spec

    torch.manual_seed(0)
    spec = resolve_spec("tiny", image_size=64, image_channels=4, mask_channels=3)
    return save_checkpoint(
        path,
        MedSegDiffUNet(spec),
        diffusion=DiffusionConfig(prediction="v"),
        classes=BRATS_CLASSES,
        inference=InferenceConfig(sampler="ddim", sampling_steps=1, ensemble=1, batch_size=16),
    )


def peak_mib(site: Path, checkpoint: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of a fresh ``medsegdiff predict`` over ``site``."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["--quiet", "predict", "--checkpoint", str(checkpoint), "--input", str(site)]
    args += ["--layout", "brats", "--out", str(out), "--device", "cpu"]
    return cli_peak_mib(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--few", type=int, default=5)
    parser.add_argument("--many", type=int, default=50)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 48])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    from medsegdiff_core.data.synthetic_brain import write_brats_cases

    work = args.work or Path(tempfile.mkdtemp(prefix="predict-memory-"))
    many = work / f"site-{args.many}"
    if not many.is_dir():
        write_brats_cases(many, args.many, shape=tuple(args.shape), seed=0)
    few = work / f"site-{args.few}"
    if not few.is_dir():
        few.mkdir(parents=True)
        for case in sorted(many.iterdir())[: args.few]:
            (few / case.name).symlink_to(case, target_is_directory=True)
    checkpoint = _checkpoint(work / "ckpt" / "model")
    small, small_s = peak_mib(few, checkpoint, work / "out-few")
    large, large_s = peak_mib(many, checkpoint, work / "out-many")
    shape = "x".join(map(str, args.shape))
    print(f"volumes {shape}, 4 modalities; tiny preset at 64 px, 1 DDIM step, ensemble 1")
    print(f"predict over {args.few:>3} cases: peak RSS {small:8.0f} MiB  ({small_s:.0f} s)")
    print(f"predict over {args.many:>3} cases: peak RSS {large:8.0f} MiB  ({large_s:.0f} s)")
    print(f"ratio {args.many} / {args.few} cases: {large / small:.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
