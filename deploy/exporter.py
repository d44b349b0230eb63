"""Prometheus exporters: one per hospital (beside its SuperNode), one beside the SuperLink.

Usage::

    python -m deploy.exporter site --config /etc/fedmedsegdiff/hospital.toml
    python -m deploy.exporter server --runs-dir /var/lib/fedmedsegdiff/server/runs --port 9100

Neither the ClientApp nor the ServerApp is a long-lived process (Flower starts a ClientApp per
message and a ServerApp per run), so neither serves ``/metrics`` itself. They leave their
numbers on disk — the site's ``telemetry.json`` (:mod:`client.telemetry`) and the run's
``state.json`` (:mod:`server.telemetry`) — and these exporters read them on every scrape
(prometheus-client custom collectors: nothing is cached, a scrape always shows the files as
they are).

The site exporter also checks the hospital's data folder (``train/`` and ``val/``, with
:func:`medsegdiff_core.data.check.check_dataset`) when it starts and again whenever a file
in it changes, and logs every problem it finds: a broken case shows up in the metrics and the
log before the next round fails on it, while the SuperNode keeps serving. Only counts per
problem kind leave the site; the file names (hospital file names often hold record numbers)
stay in the local log.

Both bind 127.0.0.1 unless told otherwise, and serve https — optionally requiring a client
certificate — when given a certificate and key (prometheus-client's own TLS support).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from client import telemetry as site_telemetry
from medsegdiff_core.config import DataConfig
from medsegdiff_core.data.check import check_dataset, problem_kind
from medsegdiff_core.errors import ConfigError
from medsegdiff_core.records import PrivacyRecord, RecordError, SiteMetrics
from server import telemetry as server_telemetry

from .hospital_config import HospitalConfig, MetricsTls

LOG = logging.getLogger("fedmedsegdiff.exporter")
SPLITS = ("train", "val")
R = TypeVar("R")
CHECK_FAILED = "check_failed"  # the kind of a check that could not run (folder missing, ...)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


# --------------------------------------------------------------------------------------------
# Site: data-folder checks
# --------------------------------------------------------------------------------------------


@dataclass
class SplitCheck:
    cases: int = 0
    problems: list[str] = field(default_factory=list)  # for the local log only: they name files
    error: str = ""  # the check itself failed (e.g. folder missing)

    def kinds(self) -> dict[str, int]:
        """Problem kind -> count: what the metrics may carry."""
        counts: dict[str, int] = {}
        for kind in [problem_kind(p) for p in self.problems] + [CHECK_FAILED] * bool(self.error):
            counts[kind] = counts.get(kind, 0) + 1
        return counts


@dataclass
class DataStatus:
    checked_at: float = 0.0
    splits: dict[str, SplitCheck] = field(default_factory=dict)


def folder_signature(folder: Path) -> str:
    """Changes whenever a file under ``folder`` is added, removed, resized or rewritten."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            try:
                stat = path.stat()
            except OSError:
                continue
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check_data(data_path: Path, data: DataConfig) -> DataStatus:
    """Check the site's ``train/`` and ``val/`` as training would; every problem listed."""
    status = DataStatus(checked_at=time.time())
    for split in SPLITS:
        folder = data_path / split
        result = SplitCheck()
        try:
            report = check_dataset(
                folder,
                data.layout,
                data.classes,
                data.image_channels,
                require_masks=True,
                skip=data.skip_cases,
            )
            result.cases, result.problems = report.cases, list(report.problems)
        except Exception as exc:  # a config or IO problem: report it, keep serving
            result.error = f"{folder}: {type(exc).__name__}: {exc}"
        status.splits[split] = result
    return status


class DataWatcher:
    """Re-checks the data folder in the background whenever its contents change."""

    def __init__(self, data_path: Path, data: DataConfig, interval_s: float) -> None:
        self.data_path, self.data, self.interval_s = Path(data_path), data, interval_s
        self.status = DataStatus()
        self._signature = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="data-check", daemon=True)

    def start(self) -> DataWatcher:
        """Check now and then on changes, in the background (a big folder takes a while; the
        exporter serves meanwhile, without data metrics until the first check is done)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        signature = folder_signature(self.data_path)
        if signature == self._signature:
            return
        self._signature = signature
        status = check_data(self.data_path, self.data)
        for split, result in status.splits.items():
            if result.error:
                LOG.error("data check %s: %s", split, result.error)
            for problem in result.problems:
                LOG.error("data problem (%s, %s): %s", split, problem_kind(problem), problem)
            if not result.error and not result.problems:
                LOG.info("data check %s: %d cases, no problem", split, result.cases)
        self.status = status

    def _loop(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # keep watching; the next change is checked again
                LOG.exception("data check failed")
            if self._stop.wait(self.interval_s):
                return


def _recorded(parse: Callable[[Any], R], data: object, empty: R) -> R:
    """A record from the site's telemetry file; ``empty`` when there is none or it is not one
    (a file from another version: logged, the scrape goes on)."""
    if not data:
        return empty
    try:
        return parse(data)
    except RecordError as exc:
        LOG.warning("telemetry: %s", exc)
        return empty


# --------------------------------------------------------------------------------------------
# Site collector
# --------------------------------------------------------------------------------------------


class SiteCollector(Collector):
    """``fedmedsegdiff_site_*``: a hospital's rounds, model quality, privacy, data and bytes."""

    def __init__(self, site: str, state_dir: Path, watcher: DataWatcher | None) -> None:
        self.site, self.state_dir, self.watcher = site, Path(state_dir), watcher

    def collect(self) -> Iterator[Metric]:
        data = site_telemetry.load(self.state_dir)
        train, evaluate = data["train"], data["evaluate"]
        s = [self.site]

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
            if value is not None:
                family = _gauge(f"fedmedsegdiff_site_{name}", doc, ["site"])
                family.add_metric(s, float(value))
                yield family

        def counter(name: str, doc: str, value: float) -> Metric:
            family = _counter(f"fedmedsegdiff_site_{name}", doc, ["site"])
            family.add_metric(s, float(value))
            return family

        train_metrics = _recorded(SiteMetrics.from_dict, train.get("metrics"), SiteMetrics())
        eval_metrics = _recorded(SiteMetrics.from_dict, evaluate.get("metrics"), SiteMetrics())
        yield counter("rounds_completed", "training rounds this site completed", train["completed"])
        yield counter(
            "evaluations_completed", "federated evaluations completed", evaluate["completed"]
        )
        failures = _counter(
            "fedmedsegdiff_site_round_failures",
            "handler runs that raised (the server got an error reply: update rejected)",
            ["site", "kind"],
        )
        failures.add_metric([self.site, "train"], train["failed"])
        failures.add_metric([self.site, "evaluate"], evaluate["failed"])
        yield failures
        yield counter(
            "rounds_declined",
            "rounds declined because the privacy budget was spent",
            train.get("declined", 0),
        )
        sent = _counter("fedmedsegdiff_site_bytes_sent", "array bytes sent to the server", ["site"])
        sent.add_metric(s, train["bytes_sent"] + evaluate["bytes_sent"])
        yield sent
        received = _counter(
            "fedmedsegdiff_site_bytes_received", "array bytes received from the server", ["site"]
        )
        received.add_metric(s, train["bytes_received"] + evaluate["bytes_received"])
        yield received
        yield from gauge(
            "last_round", "server round of the last completed training", train.get("last_round")
        )
        yield from gauge(
            "last_round_duration_seconds",
            "wall time of the last training handler",
            train.get("last_duration_s"),
        )
        yield from gauge(
            "last_success_timestamp_seconds",
            "unix time of the last completed training round",
            train.get("last_success_time"),
        )
        yield from gauge(
            "local_examples", "training examples (slices) used", train_metrics.num_examples
        )
        yield from gauge(
            "training_loss", "mean training loss of the last round", train_metrics.train_loss
        )
        yield from gauge("validation_examples", "validation examples", eval_metrics.num_examples)
        yield from gauge(
            "validation_dice", "mean Dice on the site's val/ (last evaluation)", eval_metrics.dice
        )
        per_class = _gauge(
            "fedmedsegdiff_site_validation_class_dice", "Dice per class on val/", ["site", "class"]
        )
        for name, value in eval_metrics.class_dice.items():
            per_class.add_metric([self.site, name], float(value))
        yield per_class
        privacy = _recorded(PrivacyRecord.from_config, data.get("privacy"), PrivacyRecord())
        yield from gauge(
            "dp_enabled", "1 when the site trains with DP-SGD", 1.0 if privacy.enabled else 0.0
        )
        if privacy.enabled:
            yield from gauge("epsilon_spent", "DP epsilon spent over all rounds", privacy.epsilon)
            yield from gauge(
                "epsilon_budget", "the site's DP budget (target epsilon)", privacy.target_epsilon
            )
            yield from gauge("dp_delta", "DP delta at which epsilon is stated", privacy.delta)
        error = data.get("last_error") or {}
        yield from gauge(
            "last_error_timestamp_seconds",
            "unix time of the last handler failure",
            error.get("time"),
        )
        if self.watcher is not None:
            yield from self._data_metrics()

    def _data_metrics(self) -> Iterator[Metric]:
        status = self.watcher.status
        if not status.checked_at:
            return  # the first check is still running
        problems = _gauge(
            "fedmedsegdiff_site_data_problems",
            "problems found in the data folder",
            ["site", "split"],
        )
        cases = _gauge(
            "fedmedsegdiff_site_data_cases", "cases found in the data folder", ["site", "split"]
        )
        by_kind = _gauge(
            "fedmedsegdiff_site_data_problem_kinds",
            "problems found in the data folder, per kind (the files are named in the local log)",
            ["site", "split", "kind"],
        )
        for split, result in status.splits.items():
            kinds = result.kinds()
            problems.add_metric([self.site, split], sum(kinds.values()))
            cases.add_metric([self.site, split], result.cases)
            for kind, count in sorted(kinds.items()):
                by_kind.add_metric([self.site, split, kind], count)
        yield problems
        yield cases
        yield by_kind
        ok = all(not r.problems and not r.error for r in status.splits.values())
        yield from self._single(
            "data_ok", "1 when the data folder has no problem", 1.0 if ok else 0.0
        )
        yield from self._single(
            "data_check_timestamp_seconds", "unix time of the last data check", status.checked_at
        )

    def _single(self, name: str, doc: str, value: float) -> Iterator[Metric]:
        family = _gauge(f"fedmedsegdiff_site_{name}", doc, ["site"])
        family.add_metric([self.site], value)
        yield family


# --------------------------------------------------------------------------------------------
# Server collector
# --------------------------------------------------------------------------------------------


class ServerCollector(Collector):
    """``fedmedsegdiff_server_*``: every run under ``runs_dir``, labelled ``run``."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)

    def collect(self) -> Iterator[Metric]:
        runs = [server_telemetry.run_metrics(r) for r in server_telemetry.read_runs(self.runs_dir)]
        families: dict[str, Metric] = {}

        def add(
            kind: str, name: str, doc: str, labels: Sequence[str], values: list[str], v
        ) -> None:
            if v is None:
                return
            full = f"fedmedsegdiff_server_{name}"
            if full not in families:
                make = _counter if kind == "counter" else _gauge
                families[full] = make(full, doc, ["run", *labels])
            families[full].add_metric(values, float(v))

        for m in runs:
            r = [m.name]
            add(
                "counter",
                "rounds_completed",
                "rounds committed to state.json",
                [],
                r,
                m.rounds_completed,
            )
            add(
                "counter",
                "rounds_failed",
                "rounds with fewer usable updates than min_sites",
                [],
                r,
                m.rounds_failed,
            )
            add(
                "gauge",
                "last_round_duration_seconds",
                "wall time of the last round",
                [],
                r,
                m.last_round_duration_s,
            )
            add(
                "gauge",
                "examples",
                "training examples behind the last aggregate",
                [],
                r,
                m.examples,
            )
            add(
                "gauge",
                "training_loss",
                "example-weighted training loss, last round",
                [],
                r,
                m.train_loss,
            )
            add(
                "gauge",
                "validation_dice",
                "example-weighted validation Dice, last evaluation",
                [],
                r,
                m.dice,
            )
            for cls, value in m.dice_per_class.items():
                add(
                    "gauge",
                    "validation_class_dice",
                    "validation Dice per class",
                    ["class"],
                    [m.name, cls],
                    value,
                )
            add(
                "counter",
                "updates_rejected",
                "site updates rejected by screening",
                [],
                r,
                m.updates_rejected,
            )
            add(
                "counter",
                "rounds_declined",
                "site rounds declined (privacy budget)",
                [],
                r,
                m.rounds_declined,
            )
            add(
                "counter",
                "bytes_received",
                "update bytes received from sites",
                [],
                r,
                m.bytes_received,
            )
            add(
                "counter",
                "bytes_sent",
                "model bytes sent to sites (train + evaluate)",
                [],
                r,
                m.bytes_sent,
            )
            add(
                "gauge",
                "sites_last_round",
                "sites whose update made the last round",
                [],
                r,
                m.sites_last_round,
            )
            add(
                "gauge",
                "last_success_timestamp_seconds",
                "unix time the last round was committed",
                [],
                r,
                m.last_success_time,
            )
            add(
                "gauge",
                "run_finished",
                "1 once the run wrote its final model",
                [],
                r,
                float(m.finished),
            )
            for site, f in sorted(m.sites.items()):
                v = [m.name, site]
                add(
                    "counter",
                    "site_rounds_trained",
                    "rounds a site's update was used",
                    ["site"],
                    v,
                    f.rounds_trained,
                )
                add(
                    "counter",
                    "site_updates_rejected",
                    "a site's updates rejected",
                    ["site"],
                    v,
                    f.updates_rejected,
                )
                add("gauge", "site_examples", "a site's training examples", ["site"], v, f.examples)
                add(
                    "gauge",
                    "site_training_loss",
                    "a site's last training loss",
                    ["site"],
                    v,
                    f.train_loss,
                )
                add(
                    "gauge",
                    "site_validation_dice",
                    "a site's last validation Dice",
                    ["site"],
                    v,
                    f.dice,
                )
                add(
                    "gauge",
                    "site_epsilon_spent",
                    "a site's reported DP epsilon",
                    ["site"],
                    v,
                    f.epsilon,
                )
        yield from families.values()


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _serve_forever(host: str, port: int, what: str, tls: MetricsTls) -> None:
    tls.check_files()
    server, thread = start_http_server(port, addr=host, **tls.server_kwargs())
    scheme = "https" if tls.cert else "http"
    clients = " (client certificate required)" if tls.client_ca else ""
    LOG.info("serving %s metrics on %s://%s:%d/metrics%s", what, scheme, host, port, clients)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)


def serve_site(config: HospitalConfig) -> None:
    """Serve a hospital's metrics until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    watcher = DataWatcher(config.data_path, config.data, config.check_interval_s).start()
    REGISTRY.register(SiteCollector(config.site_name, config.state_dir, watcher))
    _serve_forever(
        config.metrics_host, config.metrics_port, f"site {config.site_name}", config.metrics_tls
    )
    watcher.stop()


def serve_server(runs_dir: Path, host: str, port: int, tls: MetricsTls | None = None) -> None:
    """Serve the server's metrics (every run under ``runs_dir``) until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    REGISTRY.register(ServerCollector(runs_dir))
    _serve_forever(host, port, f"server ({runs_dir})", tls or MetricsTls())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    site = sub.add_parser("site", help="a hospital's exporter")
    site.add_argument("--config", type=Path, required=True, help="the hospital's TOML file")
    server = sub.add_parser("server", help="the coordinating site's exporter")
    server.add_argument("--runs-dir", type=Path, required=True, help="<workdir>/runs")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=9100)
    server.add_argument("--tls-cert", type=Path, help="serve https with this certificate")
    server.add_argument("--tls-key", type=Path, help="the certificate's private key")
    server.add_argument(
        "--client-ca", type=Path, help="require scrapers' client certificates signed by this CA"
    )
    args = parser.parse_args(argv)
    try:
        if args.role == "site":
            serve_site(HospitalConfig.load(args.config))
        else:
            tls = MetricsTls(args.tls_cert, args.tls_key, args.client_ca, source="exporter server")
            serve_server(args.runs_dir, args.host, args.port, tls)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
