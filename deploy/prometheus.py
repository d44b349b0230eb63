"""A throw-away Prometheus server for the local federation: scrape config, start, query.

``deploy/prometheus/prometheus.yml`` is the config for a real deployment; this module writes an
equivalent one for the exporters of a :class:`~deploy.launch.Federation` (free ports on
127.0.0.1), starts Debian's ``prometheus`` binary with its storage in a temporary folder, and
reads values back through the HTTP API (``/api/v1/query``).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .net import free_port


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


@dataclass(frozen=True)
class ScrapeTls:
    """How Prometheus scrapes exporters over https: the CA that signed their certificates and
    its own client certificate (exporters with ``client-ca`` refuse scrapers without one)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def yaml_lines(self, indent: str) -> list[str]:
        lines = [f"{indent}scheme: https", f"{indent}tls_config:"]
        lines.append(f"{indent}  ca_file: {json.dumps(str(self.ca_file))}")
        if self.cert_file is not None:
            lines.append(f"{indent}  cert_file: {json.dumps(str(self.cert_file))}")
            lines.append(f"{indent}  key_file: {json.dumps(str(self.key_file))}")
        return lines


def scrape_config(
    targets: Mapping[str, str], *, interval_s: float = 5.0, tls: ScrapeTls | None = None
) -> str:
    """Prometheus YAML: one job per exporter (``fedmedsegdiff-server``, ``fedmedsegdiff-<site>``),
    so the ``job`` label names the daemon; the metrics carry ``site`` / ``run`` themselves."""
    lines = [
        "global:",
        f"  scrape_interval: {interval_s:g}s",
        f"  scrape_timeout: {min(interval_s, 10):g}s",
        "scrape_configs:",
    ]
    for name, target in targets.items():
        lines += [
            f"  - job_name: fedmedsegdiff-{name}",
            *(tls.yaml_lines("    ") if tls else []),
            "    static_configs:",
            f"      - targets: ['{target}']",
        ]
    return "\n".join(lines) + "\n"


def prometheus_command(config: Path, storage: Path, listen: str) -> list[str]:
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (apt-get install prometheus)")
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={storage}",
        f"--web.listen-address={listen}",
        "--storage.tsdb.retention.time=1d",
    ]


def query(base_url: str, expr: str, *, timeout_s: float = 10.0) -> list[dict]:
    """``/api/v1/query`` results: ``[{"metric": {labels}, "value": [time, "value"]}, ...]``."""
    url = f"{base_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"query {expr!r}: {body}")
    return list(body["data"]["result"])


def wait_ready(base_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus at {base_url} not ready after {timeout_s:.0f} s")


def wait_for(
    base_url: str, expr: str, predicate, *, timeout_s: float = 60.0, interval_s: float = 1.0
) -> list[dict]:
    """Query until ``predicate(results)`` holds; the last results (TimeoutError otherwise)."""
    deadline = time.monotonic() + timeout_s
    results: list[dict] = []
    while True:
        try:
            results = query(base_url, expr)
            if predicate(results):
                return results
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{expr}: {results}")
        time.sleep(interval_s)


def targets(base_url: str, *, timeout_s: float = 10.0) -> list[dict]:
    """``/api/v1/targets``: the active targets (``scrapeUrl``, ``health``, ``lastError``, ...)."""
    with urllib.request.urlopen(f"{base_url}/api/v1/targets", timeout=timeout_s) as response:
        return list(json.loads(response.read())["data"]["activeTargets"])


def targets_report(base_url: str) -> list[str]:
    """One line per target: job, URL, health (and the last error, if any)."""
    lines = []
    for target in sorted(targets(base_url), key=lambda t: t["labels"].get("job", "")):
        line = f"{target['labels'].get('job', '')} {target['scrapeUrl']} {target['health']}"
        lines.append(line + (f" ({target['lastError']})" if target.get("lastError") else ""))
    return lines


def wait_scraped_after(base_url: str, since: float, *, timeout_s: float = 60.0) -> None:
    """Until every target has answered a scrape made after unix time ``since``."""
    expected = len(targets(base_url))

    def fresh(results: list[dict]) -> bool:
        if len(results) != expected or not all(float(r["value"][1]) > since for r in results):
            return False
        return all(v == 1 for v in values(query(base_url, "up"), "job").values())

    # timestamp() of a bare selector is the time of the scrape behind each sample (of anything
    # else, e.g. `up == 1`, it is only the query's own time).
    wait_for(base_url, "timestamp(up)", fresh, timeout_s=timeout_s, interval_s=0.5)


def values(results: list[dict], label: str) -> dict[str, float]:
    """``label value -> sample value`` of query results."""
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in results}


def scraped_report(base_url: str) -> dict[str, float]:
    """Every ``fedmedsegdiff_*`` series Prometheus holds now: ``name{labels}`` -> value."""
    report = {}
    for result in query(base_url, '{__name__=~"fedmedsegdiff_.+"}'):
        labels = dict(result["metric"])
        name = labels.pop("__name__")
        labels.pop("instance", None)
        labels.pop("job", None)
        text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        report[f"{name}{{{text}}}"] = float(result["value"][1])
    return dict(sorted(report.items()))


def start_prometheus(federation, *, interval_s: float = 2.0) -> str:
    """Start Prometheus scraping every exporter of ``federation`` (a daemon of it, stopped with
    it); its base URL."""
    folder = federation.root / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    tls = None
    if federation.metrics_tls:
        pki = federation.pki
        tls = ScrapeTls(pki.ca_cert, pki.scraper_cert, pki.scraper_key)
    config.write_text(scrape_config(federation.metrics_targets(), interval_s=interval_s, tls=tls))
    port = free_port()
    federation.start(
        "prometheus",
        prometheus_command(config, folder / "data", f"{federation.host}:{port}"),
    )
    base_url = f"http://{federation.host}:{port}"
    wait_ready(base_url)
    return base_url
