"""Peak resident memory of one ``medsegdiff`` command, run in a fresh Python process.

The child runs the CLI and reports its own ``resource.getrusage`` ``ru_maxrss`` (KiB on
Linux), so nothing of the parent (data generation, earlier runs) is counted.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import resource, sys
from medsegdiff_core.cli import main
code = main(sys.argv[1:])
print("PEAK_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, code)
"""


def cli_peak_mib(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``medsegdiff ARGS`` in a fresh process."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    line = next((x for x in result.stdout.splitlines() if x.startswith("PEAK_MIB")), None)
    if result.returncode != 0 or line is None or line.split()[2] != "0":
        raise SystemExit(f"medsegdiff {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return float(line.split()[1]), seconds
