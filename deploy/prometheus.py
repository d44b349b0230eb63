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
from pathlib import Path


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def scrape_config(targets: Mapping[str, str], *, interval_s: float = 5.0) -> str:
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
    from .launch import free_port

    folder = federation.root / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(scrape_config(federation.metrics_targets(), interval_s=interval_s))
    port = free_port()
    federation.start(
        "prometheus",
        prometheus_command(config, folder / "data", f"{federation.host}:{port}"),
    )
    base_url = f"http://{federation.host}:{port}"
    wait_ready(base_url)
    return base_url
