"""Real labelled scans for tests and a small real-data check: pyradiomics 3.0.1's NRRD cases.

The pyradiomics source distribution (BSD-3-Clause, on PyPI) ships five real 3-D scans with
hand-drawn lesion masks: ``brain1``, ``brain2`` (brain MRI, tumour), ``breast1`` (breast MRI
crop), ``lung1``, ``lung2`` (chest CT, nodule); label 1 = lesion. The data folder states no
provenance, so the files are fetched into a local cache by :func:`fetch_real_data` (``pip
download`` of the sdist, the registry's ordinary client) and never committed.

The cache holds them in the ``volumes`` layout::

    CACHE/pyradiomics-3.0.1/images/<case>.nrrd
    CACHE/pyradiomics-3.0.1/masks/<case>.nrrd

Command line: ``medsegdiff data fetch-samples [--cache DIR] [--sdist FILE]`` fetches them (an
explicit step, pinned to pyradiomics 3.0.1: nothing else in the package downloads anything)
and prints the folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import DataError

__all__ = [
    "PYRADIOMICS_CASES",
    "default_cache_dir",
    "fetch_real_data",
    "find_real_data",
]

PYRADIOMICS_VERSION = "3.0.1"
PYRADIOMICS_CASES: tuple[str, ...] = ("brain1", "brain2", "breast1", "lung1", "lung2")
"""The real cases, in the sdist's ``data/<case>_{image,label}.nrrd``."""

_MEMBER = re.compile(r"^[^/]+/data/(" + "|".join(PYRADIOMICS_CASES) + r")_(image|label)\.nrrd$")


def default_cache_dir() -> Path:
    """``$FEDMEDSEGDIFF_REAL_DATA``, else ``~/.cache/fedmedsegdiff/real-data``."""
    configured = os.environ.get("FEDMEDSEGDIFF_REAL_DATA")
    return Path(configured) if configured else Path.home() / ".cache/fedmedsegdiff/real-data"


def _target(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"pyradiomics-{PYRADIOMICS_VERSION}"


def find_real_data(cache_dir: Path | None = None) -> Path | None:
    """The cached ``volumes``-layout folder if all cases are there, else None."""
    target = _target(cache_dir or default_cache_dir())
    complete = all(
        (target / sub / f"{case}.nrrd").is_file()
        for case in PYRADIOMICS_CASES
        for sub in ("images", "masks")
    )
    return target if complete else None


def _download_sdist(into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
        "--timeout",
        "20",
        "--retries",
        "1",
        f"pyradiomics=={PYRADIOMICS_VERSION}",
        "-d",
        str(into),
    ]
    # pip may print non-ASCII (progress bars) where the locale is plain ASCII, as in CI
    result = subprocess.run(
        command, capture_output=True, encoding="utf-8", errors="replace", timeout=900
    )
    sdists = sorted(into.glob(f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz"))
    if result.returncode != 0 or not sdists:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with {result.returncode}"
        raise DataError(f"{into}: could not download pyradiomics {PYRADIOMICS_VERSION} ({reason})")
    return sdists[0]


def fetch_real_data(cache_dir: Path | None = None, *, sdist: Path | None = None) -> Path:
    """Make sure the real cases are cached; returns their ``volumes``-layout folder.

    Args:
        cache_dir: Cache folder (default :func:`default_cache_dir`); created if needed.
        sdist: An already downloaded ``pyradiomics-3.0.1.tar.gz`` to extract instead of running
            ``pip download`` (needs network access to PyPI, ~35 MB).

    Raises:
        DataError: The download failed or the archive lacks a case.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    found = find_real_data(cache_dir)
    if found is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        archive = Path(sdist) if sdist is not None else _download_sdist(Path(scratch))
        staging = Path(scratch) / "staging"
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    match = _MEMBER.match(member.name)
                    if not match or not member.isfile():
                        continue
                    case, kind = match.groups()
                    out = staging / ("images" if kind == "image" else "masks") / f"{case}.nrrd"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:
                        continue
                    with source, out.open("wb") as sink:
                        shutil.copyfileobj(source, sink)
        except (OSError, tarfile.TarError, EOFError) as error:
            raise DataError(f"{archive}: cannot read the pyradiomics archive ({error})") from None
        (staging / "README.txt").write_text(
            f"Real NRRD cases from the pyradiomics {PYRADIOMICS_VERSION} sdist (BSD-3-Clause;\n"
            "data provenance not stated). Label 1 = lesion. Do not commit or redistribute.\n"
        )
        target = _target(cache_dir)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    found = find_real_data(cache_dir)
    if found is None:
        raise DataError(f"{archive}: archive lacks some of {', '.join(PYRADIOMICS_CASES)}")
    return found
