"""How the server's numbers leave the ServerApp: the run's ``state.json``, read from outside.

The ServerApp already commits ``<workdir>/runs/<name>/state.json`` after every round (see
:mod:`server.run_store`): the completed round and, per round, the sites that trained, the
updates rejected and why, each site's metrics, the bytes of the updates and of the model, and
the round's wall time. A long-lived exporter beside the SuperLink (``deploy/exporter.py``)
reads it on each scrape with :func:`read_runs` and :func:`run_metrics`. The ServerApp needs no
hook and no extra process state: what Prometheus sees is exactly what a resumed run resumes
from, and it survives restarts of the SuperLink, the ServerApp and the exporter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


@dataclass
class RunSnapshot:
    """One run's committed state as found on disk."""

    name: str
    completed_round: int
    history: list[dict[str, Any]]
    updated: float  # state.json's modification time: when the last round was committed
    finished: bool = False  # the final model was written (the run is over)


@dataclass
class SiteFigures:
    """What the server knows of one site, from the rounds it took part in."""

    rounds_trained: int = 0
    updates_rejected: int = 0
    rounds_declined: int = 0
    examples: float | None = None
    train_loss: float | None = None
    dice: float | None = None
    epsilon: float | None = None


@dataclass
class RunMetrics:
    """A run's figures for Prometheus (None: not measured yet)."""

    name: str
    rounds_completed: int
    rounds_failed: int
    last_round_duration_s: float | None
    examples: float | None
    train_loss: float | None
    dice: float | None
    dice_per_class: dict[str, float]
    updates_rejected: int
    rounds_declined: int
    bytes_received: int
    bytes_sent: int
    sites_last_round: int
    last_success_time: float
    finished: bool = False
    sites: dict[str, SiteFigures] = field(default_factory=dict)


def read_runs(runs_dir: Path) -> list[RunSnapshot]:
    """Every run under ``runs_dir`` (``<workdir>/runs``) with a readable ``state.json``."""
    runs = []
    for path in sorted(Path(runs_dir).glob(f"*/{STATE_FILE}")):
        try:
            updated = path.stat().st_mtime
            saved = json.loads(path.read_text())
            runs.append(
                RunSnapshot(
                    path.parent.name,
                    int(saved["completed_round"]),
                    list(saved["history"]),
                    updated,
                    (path.parent / "final" / "model.json").exists(),
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced this instant, or not a run: the next scrape sees it
    return runs


def round_counts(history: list[dict[str, Any]]) -> dict[str, int]:
    """How the rounds of a run went: what ``state.json`` and the model card both state."""
    failed = sum(1 for r in history if r.get("failed"))
    return {
        "rounds": len(history),
        "rounds_succeeded": len(history) - failed,
        "rounds_failed": failed,
        "updates_rejected": sum(len(r.get("rejected", [])) for r in history),
        "updates_declined": sum(len(r.get("declined", [])) for r in history),
        "claims_capped": sum(len(r.get("capped_examples", [])) for r in history),
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def run_metrics(run: RunSnapshot) -> RunMetrics:
    """The figures of a run, from its history."""
    history = run.history
    counts = round_counts(history)
    last = history[-1] if history else {}
    last_train = next((r["train"] for r in reversed(history) if r.get("train")), {})
    last_eval = next((r["evaluate"] for r in reversed(history) if r.get("evaluate")), {})
    bytes_sent = 0
    for record in history:
        messaged = (
            len(record.get("sites_trained", []))
            + len(record.get("rejected", []))
            + len(record.get("declined", []))
        )
        evaluated = len(record.get("site_evaluate", {}))
        bytes_sent += int(record.get("model_bytes", 0)) * (messaged + evaluated)
    sites: dict[str, SiteFigures] = {}
    for record in history:
        for name in record.get("sites_trained", []):
            sites.setdefault(name, SiteFigures()).rounds_trained += 1
        for rejected in record.get("rejected", []):
            sites.setdefault(str(rejected.get("site")), SiteFigures()).updates_rejected += 1
        for declined in record.get("declined", []):
            sites.setdefault(str(declined.get("site")), SiteFigures()).rounds_declined += 1
        for name, metrics in record.get("site_train", {}).items():
            figures = sites.setdefault(name, SiteFigures())
            figures.examples = _number(metrics.get("num-examples"))
            figures.train_loss = _number(metrics.get("train-loss"))
        for name, metrics in record.get("site_evaluate", {}).items():
            sites.setdefault(name, SiteFigures()).dice = _number(metrics.get("dice"))
        for name, privacy in (record.get("privacy") or {}).items():
            if isinstance(privacy, dict) and privacy.get("enabled"):
                sites.setdefault(name, SiteFigures()).epsilon = _number(privacy.get("epsilon"))
    return RunMetrics(
        name=run.name,
        rounds_completed=run.completed_round,
        rounds_failed=counts["rounds_failed"],
        last_round_duration_s=_number(last.get("wall_s")),
        examples=_number(last_train.get("num-examples")),
        train_loss=_number(last_train.get("train-loss")),
        dice=_number(last_eval.get("dice")),
        dice_per_class={
            k.removeprefix("dice-"): float(v)
            for k, v in last_eval.items()
            if k.startswith("dice-") and _number(v) is not None
        },
        updates_rejected=counts["updates_rejected"],
        rounds_declined=counts["updates_declined"],
        bytes_received=sum(int(r.get("update_bytes", 0)) for r in history),
        bytes_sent=bytes_sent,
        sites_last_round=len(last.get("sites_trained", [])),
        last_success_time=run.updated,
        finished=run.finished,
        sites=sites,
    )
