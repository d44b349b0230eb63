"""Training start-up: checking and opening a site folder, before and after it was done once.

Before, ``open_checked`` ran the whole-folder check (``require_clean``, which decodes every
file) and then opened the dataset (decoding every file again). Now opening the dataset is the
check for a clean folder, and the full check runs only when a case fails. Both paths are timed
side by side in this process on the same folders, alternating, median of ``--repeats``:

- a 2-D fundus site of ``--images`` synthetic images at ``--size`` px (generic layout);
- a BraTS-like site of ``--cases`` volumes (brats layout).

Run: python bench/startup.py [--images 200] [--size 256] [--cases 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsegdiff_core.config import parse_config  # noqa: E402
from medsegdiff_core.data.check import require_clean  # noqa: E402
from medsegdiff_core.data.layouts import open_dataset  # noqa: E402
from medsegdiff_core.training import open_checked  # noqa: E402


def checked_twice(config, folder: Path):
    """The old start-up: the full check, then the dataset."""
    data = config.data
    require_clean(folder, data.layout, data.classes, data.image_channels, skip=data.skip_cases)
    return open_dataset(
        folder,
        data.layout,
        data.classes,
        config.unet_spec().image_size,
        in_channels=data.image_channels,
        skip_empty=data.skip_empty_slices,
        skip=data.skip_cases,
    )


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from medsegdiff_core.data.synthetic import write_fundus_sites
    from medsegdiff_core.data.synthetic_brain import write_brats_cases

    work = Path(tempfile.mkdtemp(prefix="startup-"))
    fundus = write_fundus_sites(
        work / "fundus",
        num_sites=1,
        cases={"train": args.images, "val": 1, "test": 1},
        size=args.size,
        progress=False,
    )[0]
    write_brats_cases(work / "brats", args.cases, seed=0)
    sites = {
        f"fundus {args.images} x {args.size} px": (
            parse_config(
                {
                    "data": {"classes": {"disc": [1, 2], "cup": [2]}, "image_channels": 3},
                    "model": {"preset": "tiny", "image_size": 64},
                }
            ),
            fundus / "train",
        ),
        f"brats {args.cases} x 64x64x24": (
            parse_config(
                {
                    "data": {
                        "layout": "brats",
                        "classes": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]},
                        "image_channels": 4,
                    },
                    "model": {"preset": "tiny", "image_size": 64},
                }
            ),
            work / "brats",
        ),
    }
    print(f"{'site':<28} {'check + open (s)':>17} {'open once (s)':>14} {'ratio':>6}")
    for name, (config, folder) in sites.items():
        before, after = [], []
        for _ in range(args.repeats):
            before.append(timed(checked_twice, config, folder))
            after.append(timed(lambda c, f: open_checked(c, f, train=True), config, folder))
        b, a = statistics.median(before), statistics.median(after)
        print(f"{name:<28} {b:>17.2f} {a:>14.2f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()
