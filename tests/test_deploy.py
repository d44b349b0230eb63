"""The deployment kit (``deploy/``), first in pieces, then as a real federation.

The real federation is one SuperLink (TLS, SuperNode authentication) and four hospital SuperNodes
on 127.0.0.1, each a separate long-lived process restarted when it exits (as systemd would), with
a metrics exporter per daemon (https, client certificates) and a real Prometheus scraping them.
``site-d``'s training folder has a broken image. The tests of this module share it; each makes
the runs it checks, so any one of them can run alone (``-k``), and each one's waits come out of
its own time limit (:class:`Deadline`):

* a SuperNode with an unregistered key, and one speaking plaintext, are refused;
* ``flwr run`` for 3 rounds; ``site-c``'s SuperNode is killed (SIGKILL) as round 2 reaches it:
  round 2 completes with the others, ``site-c`` is restarted, rejoins and trains again in round
  3 (the ServerApp waits for ``min_available_sites`` before it samples); then, on that run,
  ``site-d`` reported its broken file (counts in its metrics, the name in its log only) and
  kept serving (it evaluates), and Prometheus scraped the server's and every site's metrics over
  https (the sites' per-round numbers once ``client/client_app.py`` decorates its handlers with
  ``telemetry.observed``);
* the SuperLink, with its ServerApp, is killed mid-run: after its restart ``flwr run`` resumes
  from the last committed round.

Each round starts a ClientApp process per site, so this costs minutes: the rounds are few and
short (tiny preset, 4 local steps, one federated evaluation per run).
``FEDMEDSEGDIFF_DEPLOY_TEST_APP=/path/to/checkout`` runs the federation with another copy of the
app (the ClientApp and ServerApp come from the FAB that ``flwr run`` builds from it).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from prometheus_client import CollectorRegistry, generate_latest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # deploy/ is run from the checkout, not installed

from client import telemetry  # noqa: E402
from deploy.certs import create_pki  # noqa: E402
from deploy.exporter import DataWatcher, ServerCollector, SiteCollector  # noqa: E402
from deploy.hospital import HospitalConfig  # noqa: E402
from deploy.launch import Federation, marked_pids_prefix  # noqa: E402
from deploy.prometheus import (  # noqa: E402
    prometheus_binary,
    query,
    start_prometheus,
    targets,
    targets_report,
    values,
    wait_for,
)
from medsegdiff_core.data.synthetic import write_fundus_sites  # noqa: E402
from medsegdiff_core.errors import ConfigError  # noqa: E402

APP = Path(os.environ.get("FEDMEDSEGDIFF_DEPLOY_TEST_APP") or ROOT)
# The ClientApp writes telemetry.json once client_app.py decorates its handlers.
CLIENT_HOOKED = "telemetry.observed" in (APP / "client" / "client_app.py").read_text()
OVERRIDES = (
    "federation.local_steps=4 federation.min_sites=2 federation.min_available_sites=4 "
    "federation.evaluate_every=100 federation.round_timeout_s=900 "
    "inference.sampling_steps=3 inference.ensemble=2"
)
BROKEN = "case-0003.png"


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value from the Prometheus text format."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def scrape(collector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return parse_metrics(generate_latest(registry).decode())


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def test_certs_make_a_chain_and_flower_node_keys(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    pki = create_pki(tmp_path / "pki", hosts=["127.0.0.1", "localhost"], sites=["site-a"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private in (pki.ca_key, pki.server_key, pki.node_key("site-a")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    key = load_ssh_private_key(pki.node_key("site-a").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(
        pki.node_public_key("site-a")
    )  # what `flwr supernode register` reads

    # Again, with one more site: existing keys are kept, the new one is added.
    before = pki.ca_key.read_bytes(), pki.node_key("site-a").read_bytes()
    create_pki(tmp_path / "pki", hosts=["127.0.0.1"], sites=["site-a", "site-b"])
    assert (pki.ca_key.read_bytes(), pki.node_key("site-a").read_bytes()) == before
    assert pki.node_public_key("site-b").is_file()


def test_hospital_config_gives_flower_the_node_config(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    example = HospitalConfig.load(ROOT / "deploy" / "hospital.example.toml")
    assert example.metrics_port == 9101 and example.data.layout == "generic"
    path = tmp_path / "hospital.toml"
    path.write_text(
        'site-name = "site-a"\ndata-path = "/data/site a"\nstate-dir = "/var/lib/f/site-a"\n'
        '[superlink]\naddress = "fl.example.org:9092"\nroot-certificates = "/pki/ca.crt"\n'
        'auth-key = "/pki/site-a"\n[privacy]\nenabled = true\ntarget_epsilon = 8.0\n'
    )
    config = HospitalConfig.load(path)
    command = config.supernode_command(runtime_port=9200)
    assert command[:3] == ["flower-supernode", "--superlink", "fl.example.org:9092"]
    assert "--insecure" not in command and "--port" in command
    assert parse_config_args([command[-1]]) == {
        "data-path": "/data/site a",
        "site-name": "site-a",
        "state-dir": "/var/lib/f/site-a",
        "privacy.enabled": True,
        "privacy.target_epsilon": 8.0,
    }
    good = path.read_text()
    no_key = good.replace('auth-key = "/pki/site-a"\n', "")
    path.write_text(no_key)
    with pytest.raises(ConfigError, match="auth-key"):
        HospitalConfig.load(path)
    path.write_text(no_key + "[metrics]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        HospitalConfig.load(path)
    path.write_text(good.replace("target_epsilon", "target_epsilom"))
    with pytest.raises(ConfigError, match="target_epsilom"):
        HospitalConfig.load(path)
    path.write_text(good + '[metrics]\ntls-cert = "/pki/m.crt"\n')
    with pytest.raises(ConfigError, match=r"\[metrics\]: tls-cert and tls-key"):
        HospitalConfig.load(path)
    path.write_text(good + '[metrics]\nclient-ca = "/pki/ca.crt"\n')
    with pytest.raises(ConfigError, match="client-ca needs tls-cert"):
        HospitalConfig.load(path)


def test_hospital_config_errors_are_one_line_naming_the_key(tmp_path: Path) -> None:
    """An unknown key, a wrong-typed value or a value out of range: one line naming the file
    and the key as the file spells it (checked with pydantic, deploy/hospital_config.py)."""
    path = tmp_path / "hospital.toml"
    good = (
        'site-name = "site-a"\ndata-path = "/data/a"\nstate-dir = "/var/lib/f/a"\n'
        '[superlink]\naddress = "127.0.0.1:9092"\ninsecure = true\n'
    )
    cases = {
        good + "[metrics]\nprot = 9101\n": "metrics.prot: unknown key",
        good + '[metrics]\nport = "9101"\n': "metrics.port: Input should be a valid integer",
        good + "[metrics]\nport = 70000\n": "metrics.port: Input should be less than",
        "colour = 1\n" + good: "colour: unknown key",
        good.replace("insecure = true", 'insecure = "yes"'): "superlink.insecure: Input should",
        good + '[data]\nimage-channels = "3"\n': "data.image-channels: Input should",
        good + "[data]\nclasses = { disc = [0] }\n": "data.classes: class 'disc'",
        good + "[privacy]\ntarget_epsilon = -1\n": "privacy.target_epsilon: Input should be",
        good.replace('site-name = "site-a"\n', ""): "site-name: Field required",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            HospitalConfig.load(path)
        assert str(caught.value).startswith(f"{path}: {message}"), (text, str(caught.value))
        assert "\n" not in str(caught.value)
    path.write_text(good + "[metrics]\nport = 9200\ncheck-interval-s = 5\n")
    config = HospitalConfig.load(path)
    assert (config.metrics_port, config.check_interval_s, config.insecure) == (9200, 5.0, True)


def test_one_toml_writer_round_trips(tmp_path: Path) -> None:
    """deploy/toml_text.py writes the hospital TOML, the flwr CLI config and Flower's
    ``key=value`` arguments; what it writes reads back as it was given."""
    import tomllib
    from flwr.common.config import parse_config_args

    from deploy.toml_text import config_args, dumps
    from server.local_simulation import run_config_argument

    document = {
        "site-name": "site a",
        "data-path": Path('/data/C:\\odd "dir"'),
        "skipped": None,
        "superlink": {"address": "h:1", "insecure": True, "max-wait-time": 1.5},
        "data": {"classes": {"disc": [1, 2], "cup": [2]}, "skip-cases": []},
        "privacy": {"enabled": True, "target_epsilon": 8.0},
        "superlink.x": {"nested": {"deeper": {"n": 3}}},
    }
    text = dumps(document)
    expected = {k: v for k, v in document.items() if v is not None}
    expected["data-path"] = str(document["data-path"])
    assert tomllib.loads(text) == expected
    path = tmp_path / "hospital.toml"
    hospital = {k: expected[k] for k in ("site-name", "data-path", "superlink", "data")}
    path.write_text(dumps({**hospital, "state-dir": "/s"}))
    assert HospitalConfig.load(path).data_path == Path(str(document["data-path"]))
    items = {"a": "x y", "b": 'say "hi"', "c": "C:\\x", "d": 3, "e": 0.25, "f": False}
    assert parse_config_args([config_args(items)]) == items
    assert run_config_argument(items) == config_args(items)
    with pytest.raises(ConfigError, match="both"):
        config_args({"a": 'it\'s "x"'})


def test_deploy_imports_flow_one_way() -> None:
    """No import circle among deploy/*.py, counting imports inside functions: each module may
    import only modules below it (e.g. hospital -> exporter -> hospital_config)."""
    import ast

    modules = {path.stem: path for path in (ROOT / "deploy").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative to the deploy package
                    base = "deploy" + (f".{base}" if base else "")
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] == "deploy" and len(parts) > 1 and parts[1] in modules:
                    found.add(parts[1])
        graph[name] = found - {name}
    assert graph["exporter"] and graph["launch"], graph  # the walk sees the imports

    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            raise AssertionError(f"import circle in deploy/: {' -> '.join(cycle)}")
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_exporters_bind_loopback_by_default() -> None:
    """What ships binds /metrics to 127.0.0.1 (or publishes it there): the metrics of a hospital
    are for its coordinator's Prometheus, over the VPN and TLS once configured, not for anyone."""
    import yaml

    deploy = ROOT / "deploy"
    assert HospitalConfig.load(deploy / "hospital.example.toml").metrics_host == "127.0.0.1"
    for unit in (deploy / "systemd").glob("*exporter*.service"):
        assert "0.0.0.0" not in unit.read_text(), unit
    compose = yaml.safe_load((deploy / "compose" / "compose.yaml").read_text())
    for name in ("server-exporter", "exporter-site-a"):
        ports = compose["services"][name].get("ports", [])
        assert ports and all(str(port).startswith("127.0.0.1:") for port in ports), (name, ports)
    for name, service in compose["services"].items():
        if name != "superlink":  # the one port hospitals must reach
            assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))


def _message(kind: str, server_round: int, arrays: ArrayRecord | None) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    if arrays is not None:
        content["arrays"] = arrays
    metadata = Metadata(1, "m1", 0, 7, "", "", time.time(), 600.0, kind)
    return Message(content=content, metadata=metadata)


def site_metrics_sample(tmp_path: Path) -> tuple[dict[str, float], Path, int]:
    """A site exporter's scrape after one training round, one evaluation, one failure, with a
    broken image in its data folder."""
    import numpy as np

    (site,) = write_fundus_sites(
        tmp_path / "data", num_sites=1, cases={"train": 3, "val": 2}, size=32
    )
    state = tmp_path / "state"
    arrays = ArrayRecord([np.ones((10, 10), dtype=np.float32)])
    size = arrays.count_bytes()
    train = _message("train", 2, arrays)
    reply = Message(
        RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": 3, "train-loss": 0.25}),
                "privacy": ConfigRecord({"enabled": True, "epsilon": 1.5, "target-epsilon": 8.0}),
            }
        ),
        reply_to=train,
    )
    telemetry.record_reply(state, "site-a", train, reply, 4.0, now=1000.0)
    evaluate = _message("evaluate", 2, arrays)
    telemetry.record_reply(
        state,
        "site-a",
        evaluate,
        Message(
            RecordDict({"metrics": MetricRecord({"dice": 0.7, "dice-cup": 0.5})}), reply_to=evaluate
        ),
        1.0,
    )
    telemetry.record_failure(state, "site-a", _message("train", 3, arrays), OSError("disk"), 0.5)

    (site / "train" / "images" / "case-0001.png").write_bytes(b"broken")
    from PIL import Image

    mask = site / "train" / "masks" / "case-0002.png"
    Image.open(mask).resize((30, 30)).save(mask)  # a mask whose size is not its image's
    watcher = DataWatcher(
        site, HospitalConfig.load(ROOT / "deploy" / "hospital.example.toml").data, 60
    )
    watcher.poll()
    return scrape(SiteCollector("site-a", state, watcher)), state, size


def test_site_telemetry_and_exporter(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR", logger="fedmedsegdiff.exporter"):
        m, state, size = site_metrics_sample(tmp_path)
    s = '{site="site-a"}'
    assert m[f"fedmedsegdiff_site_rounds_completed_total{s}"] == 1
    assert m['fedmedsegdiff_site_round_failures_total{kind="train",site="site-a"}'] == 1
    assert m[f"fedmedsegdiff_site_bytes_received_total{s}"] == 3 * size  # 3 messages with weights
    assert m[f"fedmedsegdiff_site_bytes_sent_total{s}"] == size
    assert m[f"fedmedsegdiff_site_training_loss{s}"] == 0.25
    assert m[f"fedmedsegdiff_site_local_examples{s}"] == 3
    assert m[f"fedmedsegdiff_site_last_round{s}"] == 2
    assert m[f"fedmedsegdiff_site_last_round_duration_seconds{s}"] == 4.0
    assert m[f"fedmedsegdiff_site_last_success_timestamp_seconds{s}"] == 1000.0
    assert m[f"fedmedsegdiff_site_validation_dice{s}"] == 0.7
    assert m['fedmedsegdiff_site_validation_class_dice{class="cup",site="site-a"}'] == 0.5
    assert m[f"fedmedsegdiff_site_epsilon_spent{s}"] == 1.5
    assert m['fedmedsegdiff_site_data_problems{site="site-a",split="train"}'] == 2
    assert m['fedmedsegdiff_site_data_problems{site="site-a",split="val"}'] == 0
    assert m['fedmedsegdiff_site_data_cases{site="site-a",split="val"}'] == 2
    assert m[f"fedmedsegdiff_site_data_ok{s}"] == 0
    kinds = 'fedmedsegdiff_site_data_problem_kinds{{kind="{}",site="site-a",split="train"}}'
    assert m[kinds.format("unreadable")] == 1
    assert m[kinds.format("shape_mismatch")] == 1
    # Counts per kind leave the site; the names (they can hold record numbers) only in its log.
    leaked = [key for key in m if "case-000" in key or str(tmp_path) in key]
    assert not leaked, leaked
    logged = caplog.text
    assert "case-0001.png" in logged and "case-0002.png" in logged
    assert telemetry.load(state)["last_error"]["message"] == "OSError: disk"


def _get(url: str, context=None) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return response.read().decode()


def test_exporters_serve_https_with_client_certificates(tmp_path: Path) -> None:
    """Both exporters, as real processes, with TLS from their own settings: a scraper with the
    CA's client certificate gets the metrics; no certificate, or plain http, gets nothing."""
    import ssl
    import urllib.error

    from deploy.launch import free_port

    pki = create_pki(
        tmp_path / "pki",
        hosts=["127.0.0.1"],
        sites=[],
        metrics={"exporter": ["127.0.0.1", "localhost"]},
        scraper=True,
    )
    cert = x509.load_pem_x509_certificate(pki.scraper_cert.read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage
    (site,) = write_fundus_sites(
        tmp_path / "data", num_sites=1, cases={"train": 2, "val": 1}, size=32
    )
    site_port, server_port = free_port(), free_port()
    tls = (
        f'tls-cert = "{pki.metrics_cert("exporter")}"\ntls-key = "{pki.metrics_key("exporter")}"\n'
        f'client-ca = "{pki.ca_cert}"\n'
    )
    config = tmp_path / "site.toml"
    base = (
        f'site-name = "site-a"\ndata-path = "{site}"\nstate-dir = "{tmp_path / "state"}"\n'
        '[superlink]\naddress = "127.0.0.1:1"\ninsecure = true\n'
        f"[metrics]\nport = {site_port}\ncheck-interval-s = 1\n"
    )
    config.write_text(base + tls)
    logs = {name: tmp_path / f"{name}.log" for name in ("site", "server")}
    commands = {
        "site": [sys.executable, "-m", "deploy.hospital", "exporter", "--config", str(config)],
        "server": [
            sys.executable, "-m", "deploy.exporter", "server", "--runs-dir", str(tmp_path / "runs"),
            "--port", str(server_port), "--tls-cert", str(pki.metrics_cert("exporter")),
            "--tls-key", str(pki.metrics_key("exporter")), "--client-ca", str(pki.ca_cert),
        ],
    }  # fmt: skip
    processes = {}
    try:
        for name, command in commands.items():
            with open(logs[name], "wb") as log:
                processes[name] = subprocess.Popen(
                    command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                )
        for name, port in (("site", site_port), ("server", server_port)):
            line = wait_until(
                lambda name=name: (
                    "serving" in logs[name].read_text() or processes[name].poll() is not None
                ),
                120,
                f"{name} exporter serving",
            )
            text = logs[name].read_text()
            assert line and f"https://127.0.0.1:{port}/metrics" in text, text
            assert "client certificate required" in text, text
            scraper = ssl.create_default_context(cafile=str(pki.ca_cert))
            scraper.load_cert_chain(str(pki.scraper_cert), str(pki.scraper_key))
            url = f"https://127.0.0.1:{port}/metrics"
            # The site's data metrics come once its first data check is done.
            want = "fedmedsegdiff_site_data_ok" if name == "site" else "python_info"
            wait_until(lambda u=url, w=want, c=scraper: w in _get(u, c), 60, f"{name}'s metrics")
            anonymous = ssl.create_default_context(cafile=str(pki.ca_cert))
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                _get(f"https://127.0.0.1:{port}/metrics", anonymous)
            with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)

    # A TLS file that is not there: a one-line error naming the setting, not a traceback.
    config.write_text(base + tls.replace(str(pki.metrics_key("exporter")), str(tmp_path / "nokey")))
    result = subprocess.run(commands["site"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {config}: [metrics]: tls-key {tmp_path / 'nokey'} is not a readable file"
    ], result.stderr


def server_metrics_sample(tmp_path: Path) -> dict[str, float]:
    """The server exporter's scrape of a one-round run."""
    run = tmp_path / "runs" / "exp"
    run.mkdir(parents=True)
    history = [
        {
            "round": 1,
            "sites_trained": ["site-a", "site-b"],
            "rejected": [{"site": "node-9", "reason": "client error: unavailable"}],
            "train": {"train-loss": 0.5, "num-examples": 80},
            "evaluate": {"dice": 0.6, "dice-disc": 0.8},
            "site_train": {"site-a": {"num-examples": 40, "train-loss": 0.4}},
            "site_evaluate": {"site-a": {"dice": 0.65}, "site-b": {"dice": 0.55}},
            "privacy": {"site-a": {"enabled": True, "epsilon": 2.0}},
            "update_bytes": 2000,
            "model_bytes": 1000,
            "wall_s": 12.5,
        }
    ]
    (run / "state.json").write_text(json.dumps({"completed_round": 1, "history": history}))
    return scrape(ServerCollector(tmp_path / "runs"))


def test_server_exporter_reads_the_run_state(tmp_path: Path) -> None:
    m = server_metrics_sample(tmp_path)
    r = '{run="exp"}'
    assert m[f"fedmedsegdiff_server_rounds_completed_total{r}"] == 1
    assert m[f"fedmedsegdiff_server_last_round_duration_seconds{r}"] == 12.5
    assert m[f"fedmedsegdiff_server_training_loss{r}"] == 0.5
    assert m[f"fedmedsegdiff_server_examples{r}"] == 80
    assert m[f"fedmedsegdiff_server_validation_dice{r}"] == 0.6
    assert m[f"fedmedsegdiff_server_updates_rejected_total{r}"] == 1
    assert m[f"fedmedsegdiff_server_bytes_received_total{r}"] == 2000
    assert m[f"fedmedsegdiff_server_bytes_sent_total{r}"] == 1000 * (3 + 2)
    assert m['fedmedsegdiff_server_site_epsilon_spent{run="exp",site="site-a"}'] == 2.0
    assert m['fedmedsegdiff_server_site_updates_rejected_total{run="exp",site="node-9"}'] == 1


def test_dashboard_and_alerts_use_exported_metrics(tmp_path: Path) -> None:
    import re

    import yaml

    exported = {
        key.split("{")[0]
        for key in [*site_metrics_sample(tmp_path / "site")[0], *server_metrics_sample(tmp_path)]
    }
    dashboard = (ROOT / "deploy" / "grafana" / "fedmedsegdiff-dashboard.json").read_text()
    json.loads(dashboard)
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    yaml.safe_load(alerts)
    used = set(re.findall(r"fedmedsegdiff_[a-z_]+", dashboard + alerts))
    assert used and used <= exported, sorted(used - exported)


# --------------------------------------------------------------------------------------------
# A real federation
# --------------------------------------------------------------------------------------------

FIGURES: dict[str, object] = {}
# The federation's set-up runs inside the first test that asks for it, on that test's clock.
SETUP: dict[str, float] = {}


class Deadline:
    """What is left of a test's own time limit, for its waits: a slow machine then meets a
    TimeoutError naming what it waited for, not pytest-timeout's kill; ``margin_s`` is kept for
    the federation's teardown."""

    def __init__(self, limit_s: float, spent_s: float, margin_s: float = 90.0) -> None:
        self.end = time.monotonic() - spent_s + limit_s - margin_s

    def left(self, at_most: float | None = None) -> float:
        left = max(self.end - time.monotonic(), 1.0)
        return left if at_most is None else min(left, at_most)


@pytest.fixture
def deadline(request: pytest.FixtureRequest) -> Deadline:
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker else request.config.getini("timeout"))
    spent = SETUP.pop("federation_s", 0.0) if "federation" in request.fixturenames else 0.0
    return Deadline(limit, spent)


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(poll_s)
    raise TimeoutError(f"{what} after {timeout_s:.0f} s")


def completed(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "state.json").read_text())["completed_round"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    started = time.monotonic()
    root = tmp_path_factory.mktemp("federation")
    fed = Federation(
        root,
        sites=["site-a", "site-b", "site-c", "site-d"],
        app=APP,
        cases={"train": 8, "val": 2},
        image_size=32,
        check_interval_s=1.0,
    )
    try:
        fed.prepare()
        (fed.hospitals["site-d"].data_path / "train" / "images" / BROKEN).write_bytes(b"not a png")
        fed.up()
        fed.wait_online()
        fed.prometheus = start_prometheus(fed, interval_s=1.0) if prometheus_binary() else None
        SETUP["federation_s"] = time.monotonic() - started
        yield fed
    finally:
        fed.stop()
        left = marked_pids_prefix(fed.tag)
        (root / "figures.json").write_text(json.dumps(FIGURES, indent=1))
        print("deploy figures:", json.dumps(FIGURES))
    assert not left, f"processes left running: {left}"


# The federation's set-up (up to 300 s for the SuperNodes to come online) runs in this test.
@pytest.mark.timeout(900)
def test_unregistered_key_and_plaintext_supernodes_refused(
    federation: Federation, deadline: Deadline
) -> None:
    other = create_pki(federation.root / "other-pki", hosts=["127.0.0.1"], sites=["intruder"])
    site = federation.hospitals["site-a"]
    intruder = federation.write_hospital_config(
        site,
        auth_key=other.node_key("intruder"),
        path=federation.root / "intruder.toml",
        state_dir=federation.root / "state" / "intruder",
    )
    plaintext = federation.write_hospital_config(
        site,
        insecure=True,
        max_wait_time=8,
        path=federation.root / "plaintext.toml",
        state_dir=federation.root / "state" / "plaintext",
    )
    start = time.monotonic()
    refused = {
        "intruder": federation.start_supernode("site-a", config_path=intruder, name="intruder"),
        "plaintext": federation.start_supernode("site-a", config_path=plaintext, name="plaintext"),
    }
    for name, process in refused.items():
        assert process.wait(timeout=deadline.left(120)) != 0, federation.log(name)
        FIGURES[f"{name}_refused_after_s"] = round(time.monotonic() - start, 1)
    assert "Failed to activate SuperNode" in federation.log("intruder")
    assert "No SuperNode found with the given public key" in federation.log("superlink")
    assert "SuperNode ID" not in federation.log("plaintext")  # never got in
    nodes = federation.supernodes()
    assert len(nodes) == 4, nodes  # only the registered keys


# Three rounds, two of them waiting out Flower's heartbeat timeout and the restart grace, then
# what Prometheus and site-d made of the same run: one run, one time limit for all of it.
@pytest.mark.timeout(1800)
def test_supernode_killed_mid_round_rejoins_next_round(
    federation: Federation, deadline: Deadline
) -> None:
    run_dir = federation.server_workdir / "runs" / "deploy-kill"
    overrides = f"name=deploy-kill federation.rounds=3 {OVERRIDES}"
    started = time.monotonic()
    run = federation.start_run({"overrides": overrides}, name="run-kill")
    wait_until(
        lambda: completed(run_dir) >= 1 or run.poll() is not None, deadline.left(), "round 1"
    )
    assert completed(run_dir) >= 1, federation.log("run-kill")[-3000:]
    FIGURES["round_1_s"] = round(time.monotonic() - started, 1)

    # Round 2 reaches site-c: its SuperNode starts a ClientApp for it. Kill the SuperNode and all
    # under it at once, before it can reply.
    log = federation.logs / "supernode-site-c.log"
    wait_until(
        lambda: (
            log.read_text().count("Start `flwr-clientapp` process") >= 2
            and federation.app_pids("supernode-site-c")
        ),
        deadline.left(),
        "site-c's round-2 ClientApp",
        poll_s=0.05,
    )
    assert completed(run_dir) == 1
    killed = time.monotonic()
    federation.kill("supernode-site-c")  # SIGKILL; the supervisor restarts it, like systemd
    wait_until(lambda: completed(run_dir) >= 2, deadline.left(), "round 2 without site-c")
    FIGURES["round_2_done_after_kill_s"] = round(time.monotonic() - killed, 1)
    # The restarted SuperNode waits until the SuperLink counts its lost session offline.
    wait_until(
        lambda: log.read_text().count("SuperNode ID:") >= 2, deadline.left(), "site-c rejoining"
    )
    FIGURES["site_c_rejoined_after_kill_s"] = round(time.monotonic() - killed, 1)
    assert "stopped without leaving the federation" in log.read_text()
    assert run.wait(timeout=deadline.left()) == 0, federation.log("run-kill")[-3000:]

    history = json.loads((run_dir / "state.json").read_text())["history"]
    assert [r["round"] for r in history] == [1, 2, 3]  # no round lost
    trained = [r["sites_trained"] for r in history]
    assert trained[0] == ["site-a", "site-b", "site-c"]
    assert trained[1] == ["site-a", "site-b"]  # round 2 went on without the killed site
    # Round 2 ends when the SuperLink counts site-c offline, before its restart is let in; the
    # ServerApp then waits for min_available_sites=4 before sampling round 3 (Flower's FedAvg
    # alone would size the sample from the 3 nodes connected), so site-c trains again in it.
    assert trained[2] == ["site-a", "site-b", "site-c"]
    assert not any(r.get("failed") for r in history)
    FIGURES["rounds_lost"] = 0

    check_site_with_bad_data(federation, history)
    if federation.prometheus is None:
        pytest.skip("prometheus is not installed (CI installs it: apt-get install prometheus)")
    check_prometheus_scraped(federation, history, deadline)


def check_site_with_bad_data(federation: Federation, history: list[dict]) -> None:
    """site-d (a broken image in train/) in the run: reported, rejected, and still serving."""
    # Whenever site-d was asked to train (every round: all 4 nodes are sampled), its
    # training failed with the broken file named, and the round went on without it.
    broken = [
        record["round"]
        for record in history
        if any(BROKEN in r["reason"] for r in record["rejected"])
    ]
    assert broken == [r["round"] for r in history], broken
    assert not any("site-d" in record["sites_trained"] for record in history)
    assert "site-d" in history[-1]["site_evaluate"]  # it still answers: evaluation on val/
    assert not [t for t, name in federation.restarts if name == "supernode-site-d"]
    assert federation.processes["supernode-site-d"].poll() is None
    log = federation.log("exporter-site-d")
    assert "data problem (train, unreadable)" in log and BROKEN in log


def check_prometheus_scraped(
    federation: Federation, history: list[dict], deadline: Deadline
) -> None:
    """The real Prometheus scraped every exporter over https, with its client certificate, and
    holds the run's numbers — and no file name of site-d's broken case."""
    url = federation.prometheus
    rounds = wait_for(
        url,
        'fedmedsegdiff_server_rounds_completed_total{run="deploy-kill"}',
        lambda r: r and float(r[0]["value"][1]) == len(history),
        timeout_s=deadline.left(120),
    )
    assert rounds
    up = values(query(url, "up"), "job")
    assert up == {f"fedmedsegdiff-{job}": 1.0 for job in federation.metrics_targets()}
    scraped_urls = sorted(t["scrapeUrl"] for t in targets(url))
    assert scraped_urls and all(u.startswith("https://") for u in scraped_urls), scraped_urls
    FIGURES["prometheus_targets"] = targets_report(url)
    scraped = {
        "server_rounds_completed": len(history),
        "server_validation_dice": values(
            query(url, 'fedmedsegdiff_server_validation_dice{run="deploy-kill"}'), "run"
        ),
        "server_updates_rejected": values(
            query(url, 'fedmedsegdiff_server_updates_rejected_total{run="deploy-kill"}'), "run"
        ),
        "server_last_round_duration_s": values(
            query(url, 'fedmedsegdiff_server_last_round_duration_seconds{run="deploy-kill"}'), "run"
        ),
        "site_data_cases_train": values(
            query(url, 'fedmedsegdiff_site_data_cases{split="train"}'), "site"
        ),
        "site_data_problems_train": values(
            query(url, 'fedmedsegdiff_site_data_problems{split="train"}'), "site"
        ),
        "site_data_problem_kinds": values(
            query(url, "fedmedsegdiff_site_data_problem_kinds"), "kind"
        ),
    }
    assert 0.0 <= scraped["server_validation_dice"]["deploy-kill"] <= 1.0
    broken = sum(BROKEN in r["reason"] for record in history for r in record["rejected"])
    # site-d whenever it was asked to train (broken data), site-c once (killed)
    assert scraped["server_updates_rejected"]["deploy-kill"] == broken + 1
    assert scraped["site_data_cases_train"] == {f"site-{k}": 8.0 for k in "abcd"}
    assert scraped["site_data_problems_train"] == {
        "site-a": 0.0,
        "site-b": 0.0,
        "site-c": 0.0,
        "site-d": 1.0,
    }
    assert scraped["site_data_problem_kinds"] == {"unreadable": 1.0}
    site_d = query(url, '{site="site-d"}')
    assert site_d and not [r for r in site_d if BROKEN in json.dumps(r["metric"])]
    if CLIENT_HOOKED:
        expected = {
            site: float(sum(site in r["sites_trained"] for r in history))
            for site in federation.hospitals
        }
        done = values(
            wait_for(
                url,
                "fedmedsegdiff_site_rounds_completed_total",
                lambda r: values(r, "site") == expected,
                timeout_s=deadline.left(120),
            ),
            "site",
        )
        failures = values(
            query(url, 'fedmedsegdiff_site_round_failures_total{kind="train"}'), "site"
        )
        assert failures["site-d"] == broken
        scraped["site_rounds_completed"] = done
        scraped["site_training_loss"] = values(
            query(url, "fedmedsegdiff_site_training_loss"), "site"
        )
        scraped["site_validation_dice"] = values(
            query(url, "fedmedsegdiff_site_validation_dice"), "site"
        )
        scraped["site_bytes_sent"] = values(
            query(url, "fedmedsegdiff_site_bytes_sent_total"), "site"
        )
    FIGURES["prometheus"] = scraped


# Two rounds, a restart of the SuperLink and the SuperNodes' reconnection.
@pytest.mark.timeout(1200)
def test_superlink_killed_mid_run_resumes_from_checkpoint(
    federation: Federation, deadline: Deadline
) -> None:
    run_dir = federation.server_workdir / "runs" / "deploy-resume"
    overrides = f"name=deploy-resume federation.rounds=2 {OVERRIDES}"
    first = federation.start_run({"overrides": overrides}, name="run-resume-1")
    wait_until(
        lambda: completed(run_dir) >= 1 or first.poll() is not None, deadline.left(), "round 1"
    )
    assert completed(run_dir) == 1, federation.log("run-resume-1")[-3000:]
    killed = time.monotonic()
    serverapps = federation.app_pids("superlink", "flwr-serverapp")
    assert serverapps, "no ServerApp process under the SuperLink"
    federation.kill("superlink")  # SuperLink, SuperExec and ServerApp, SIGKILL
    try:
        first.wait(timeout=deadline.left(60))
    except subprocess.TimeoutExpired:  # still waiting for a SuperLink that is gone
        federation.kill("run-resume-1")
    assert completed(run_dir) == 1
    restarted_after = wait_until(
        lambda: [t for t, name in federation.restarts if name == "superlink"],
        deadline.left(120),
        "restart",
    )
    assert restarted_after
    FIGURES["superlink_back_after_kill_s"] = round(time.monotonic() - killed, 1)
    # The SuperNodes reconnect (restarted if they gave up).
    federation.wait_online(timeout_s=deadline.left(300))
    FIGURES["all_supernodes_back_after_kill_s"] = round(time.monotonic() - killed, 1)
    second = federation.start_run({"overrides": overrides}, name="run-resume-2")
    assert second.wait(timeout=deadline.left()) == 0, federation.log("run-resume-2")[-3000:]
    FIGURES["superlink_kill_to_round_2_committed_s"] = round(time.monotonic() - killed, 1)
    assert "resuming deploy-resume after round 1" in federation.log("run-resume-2")
    history = json.loads((run_dir / "state.json").read_text())["history"]
    assert [r["round"] for r in history] == [1, 2]
    assert history[1]["sites_trained"] == ["site-a", "site-b", "site-c"]
