"""A site's optimizer state (AdamW's step counts and moments), kept between rounds on disk.

Flower builds the ClientApp anew for every round, so without this each round's AdamW would start
from zero moments and re-run its bias-corrected warm-up on the site's first steps. The state is
the site's own: it never leaves the site (only weights are sent), and under DP it is computed from
the clipped, noised gradients only, so keeping it costs no privacy.

Files: ``<state_dir>/optimizer/<run uid>/round-NNNN.safetensors``. The server names its run with
a uid that survives a server restart, so a resumed run reads exactly the state an uninterrupted
run would have (the newest round before the current one), and a new run never inherits an old
run's moments. A missing or unusable file is not an error: the round starts with fresh moments.
"""

from __future__ import annotations

import re
import shutil
from logging import WARNING
from pathlib import Path

import torch
from flwr.common import log

from medsegdiff_core.checkpoint import (
    load_optimizer_tensors,
    load_tensors,
    optimizer_tensors,
    save_tensors,
)
from medsegdiff_core.errors import CheckpointError

_ROUND_FILE = re.compile(r"round-(\d{4,})\.safetensors")
_UID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _run_folder(state_dir: Path, run_uid: str) -> Path:
    if not _UID.fullmatch(run_uid):  # it names a folder: never let it walk out of state_dir
        raise ValueError(f"run uid {run_uid!r} is not a plain name")
    return state_dir / "optimizer" / run_uid


def _rounds(folder: Path) -> dict[int, Path]:
    found = (_ROUND_FILE.fullmatch(p.name) for p in folder.glob("round-*.safetensors"))
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


def restore(
    optimizer: torch.optim.Optimizer, state_dir: Path, run_uid: str, server_round: int
) -> int | None:
    """Load the newest state saved before ``server_round``; return its round (None: fresh)."""
    earlier = {
        r: p for r, p in _rounds(_run_folder(state_dir, run_uid)).items() if r < server_round
    }
    if not earlier:
        return None
    saved_round = max(earlier)
    path = earlier[saved_round]
    try:
        load_optimizer_tensors(optimizer, load_tensors(path), source=path)
    except CheckpointError as exc:
        log(WARNING, "optimizer state not used, this round starts afresh: %s", exc)
        return None
    return saved_round


def save(
    optimizer: torch.optim.Optimizer, state_dir: Path, run_uid: str, server_round: int
) -> None:
    """Save the state after ``server_round``; drop older rounds and other runs' folders.

    The previous round's file stays too: if the server crashes before it commits this round, the
    round is redone and must start from the previous round's state."""
    folder = _run_folder(state_dir, run_uid)
    save_tensors(folder / f"round-{server_round:04d}.safetensors", optimizer_tensors(optimizer))
    for saved_round, path in _rounds(folder).items():
        if saved_round < server_round - 1:
            path.unlink(missing_ok=True)
    for other in folder.parent.iterdir():
        if other != folder and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
