"""How a hospital's numbers leave the ClientApp: a small JSON file in the site's ``state_dir``.

Flower runs the ClientApp in a fresh process for every message, so nothing in it lives long
enough to serve ``/metrics``, and a Prometheus push gateway would be one more service for a
hospital to run. Instead each handler, as it finishes, folds its numbers into
``<state_dir>/telemetry.json`` — under a file lock, written atomically (temp file + rename) — and
the site's long-lived exporter (``deploy/exporter.py``, beside the SuperNode) reads that file on
every scrape. The file holds totals (rounds, failures, bytes), so the counters survive restarts
of the SuperNode and of the exporter. It never holds images; the last error's message (which
may name a file) stays in it, at the site — the exporter exports only that error's time.

One decorator per handler does it::

    @app.train()
    @telemetry.observed
    def train(msg: Message, context: Context) -> Message: ...

Telemetry never fails a round: any error while recording is logged and dropped.
"""

from __future__ import annotations

import fcntl
import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common import log

from medsegdiff_core.checkpoint import atomic_write_bytes
from medsegdiff_core.records import PrivacyRecord, SiteMetrics

TELEMETRY_FILE = "telemetry.json"
FORMAT = "fedmedsegdiff-site-telemetry"
VERSION = 1

Handler = Callable[[Message, Context], Message]


def telemetry_path(state_dir: Path) -> Path:
    return Path(state_dir) / TELEMETRY_FILE


def empty() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "site": "",
        "train": {"completed": 0, "failed": 0, "declined": 0, "bytes_sent": 0, "bytes_received": 0},
        "evaluate": {"completed": 0, "failed": 0, "bytes_sent": 0, "bytes_received": 0},
        "privacy": {},
        "last_error": None,
    }


def load(state_dir: Path) -> dict[str, Any]:
    """The site's telemetry (an empty record if none was written yet, or it is unreadable)."""
    try:
        data = json.loads(telemetry_path(state_dir).read_text())
    except (OSError, ValueError):
        return empty()
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return empty()
    merged = empty()
    for key, value in data.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] |= value
        else:
            merged[key] = value
    return merged


@contextmanager
def _updating(state_dir: Path) -> Iterator[dict[str, Any]]:
    """Read-modify-write of the telemetry file; two ClientApps of one site never interleave."""
    path = telemetry_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = load(state_dir)
            yield data
            atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _kind(msg: Message) -> str:
    return "evaluate" if msg.metadata.message_type.split(".")[0] == "evaluate" else "train"


def _round(msg: Message) -> int:
    try:
        return int(msg.content["config"].get("server-round", 0))
    except (KeyError, TypeError, ValueError):
        return 0


def _array_bytes(msg: Message) -> int:
    if msg.has_error():
        return 0
    return sum(record.count_bytes() for record in msg.content.array_records.values())


def record_reply(
    state_dir: Path,
    site: str,
    msg: Message,
    reply: Message,
    seconds: float,
    *,
    now: float | None = None,
) -> None:
    """Fold one handler's reply into the site's telemetry."""
    kind = _kind(msg)
    metrics = (
        SiteMetrics.from_dict(reply.content["metrics"])
        if not reply.has_error() and "metrics" in reply.content.metric_records
        else SiteMetrics()
    )
    privacy = (
        PrivacyRecord.from_config(reply.content["privacy"])
        if not reply.has_error() and "privacy" in reply.content.config_records
        else None
    )
    with _updating(state_dir) as data:
        data["site"] = site
        part = data[kind]
        part["bytes_received"] += _array_bytes(msg)
        part["bytes_sent"] += _array_bytes(reply)
        if privacy is not None and privacy.declined:
            part["declined"] = part.get("declined", 0) + 1
            data["privacy"] = privacy.to_config()
            return
        part["completed"] += 1
        part["last_round"] = _round(msg)
        part["last_success_time"] = time.time() if now is None else now
        part["last_duration_s"] = seconds
        part["metrics"] = metrics.to_dict()
        if privacy is not None:
            data["privacy"] = privacy.to_config()


def record_failure(
    state_dir: Path, site: str, msg: Message, error: BaseException, seconds: float
) -> None:
    """A handler that raised: count it and keep its message (the round replies with an error)."""
    kind = _kind(msg)
    with _updating(state_dir) as data:
        data["site"] = site
        data[kind]["failed"] += 1
        data[kind]["bytes_received"] += _array_bytes(msg)
        data["last_error"] = {
            "time": time.time(),
            "kind": kind,
            "round": _round(msg),
            "seconds": seconds,
            "message": f"{type(error).__name__}: {error}"[:2000],
        }


def _site_of(context: Context) -> tuple[Path, str]:
    from .site import Site

    site = Site.from_context(context)
    return site.state_dir, site.name


def observed(handler: Handler) -> Handler:
    """Wrap a ClientApp handler so that its reply, or its failure, reaches the telemetry file."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        start = time.monotonic()
        try:
            reply = handler(msg, context)
        except Exception as exc:
            _safely(record_failure, context, msg, exc, time.monotonic() - start)
            raise
        _safely(record_reply, context, msg, reply, time.monotonic() - start)
        return reply

    return wrapper


def _safely(record: Callable[..., None], context: Context, msg: Message, *args: Any) -> None:
    try:
        state_dir, site = _site_of(context)
        record(state_dir, site, msg, *args)
    except Exception as exc:  # telemetry must never fail a round
        log(WARNING, "telemetry not recorded: %s: %s", type(exc).__name__, exc)
