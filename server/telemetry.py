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

from medsegdiff_core.records import RoundRecord, SiteMetrics, history_from_json, round_counts

STATE_FILE = "state.json"


@dataclass
class RunSnapshot:
    """One run's committed state as found on disk."""

    name: str
    completed_round: int
    history: list[RoundRecord]
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
                    history_from_json(saved["history"], source=str(path)),
                    updated,
                    (path.parent / "final" / "model.json").exists(),
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced this instant, or not a run: the next scrape sees it
    return runs


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def run_metrics(run: RunSnapshot) -> RunMetrics:
    """The figures of a run, from its history."""
    history = run.history
    counts = round_counts(history)
    last = history[-1] if history else None
    last_train = next((r.train for r in reversed(history) if r.train), SiteMetrics())
    last_eval = next((r.evaluate for r in reversed(history) if r.evaluate), SiteMetrics())
    bytes_sent = 0
    for record in history:
        messaged = len(record.sites_trained) + len(record.rejected) + len(record.declined)
        evaluated = len(record.site_evaluate or {})
        bytes_sent += record.model_bytes * (messaged + evaluated)
    sites: dict[str, SiteFigures] = {}
    for record in history:
        for name in record.sites_trained:
            sites.setdefault(name, SiteFigures()).rounds_trained += 1
        for rejected in record.rejected:
            sites.setdefault(rejected.site, SiteFigures()).updates_rejected += 1
        for declined in record.declined:
            sites.setdefault(declined.site, SiteFigures()).rounds_declined += 1
        for name, metrics in record.site_train.items():
            figures = sites.setdefault(name, SiteFigures())
            figures.examples = _number(metrics.num_examples)
            figures.train_loss = _number(metrics.train_loss)
        for name, metrics in (record.site_evaluate or {}).items():
            sites.setdefault(name, SiteFigures()).dice = _number(metrics.dice)
        for name, privacy in record.privacy.items():
            if privacy.enabled:
                sites.setdefault(name, SiteFigures()).epsilon = _number(privacy.epsilon)
    return RunMetrics(
        name=run.name,
        rounds_completed=run.completed_round,
        rounds_failed=counts.rounds_failed,
        last_round_duration_s=_number(last.wall_s) if last else None,
        examples=_number(last_train.num_examples),
        train_loss=_number(last_train.train_loss),
        dice=_number(last_eval.dice),
        dice_per_class={
            name: float(value)
            for name, value in last_eval.class_dice.items()
            if _number(value) is not None
        },
        updates_rejected=counts.updates_rejected,
        rounds_declined=counts.updates_declined,
        bytes_received=sum(r.update_bytes for r in history),
        bytes_sent=bytes_sent,
        sites_last_round=len(last.sites_trained) if last else 0,
        last_success_time=run.updated,
        finished=run.finished,
        sites=sites,
    )
