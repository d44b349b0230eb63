"""A real federation on this machine: a SuperLink and one SuperNode per hospital, each a
separate long-lived process on 127.0.0.1, with TLS and SuperNode authentication, Prometheus
exporters beside them, training with ``flwr run`` — and everything stopped afterwards.

Usage (from the repository root)::

    python -m deploy.launch --root .work/federation --sites 3 \\
        --overrides "federation.rounds=3 federation.local_steps=10"

What it does, in the order a real deployment does it (``deploy/README.md``):

1. writes built-in synthetic data for each hospital (``<root>/data/site-<k>``, generic layout);
2. creates the CA, the SuperLink's TLS certificate and one key pair per hospital
   (:mod:`deploy.certs`);
3. starts ``flower-superlink`` with TLS and ``--enable-supernode-auth`` (its state in memory;
   ``database=True`` keeps it in a file, as the systemd unit does), and registers each
   hospital's public key (``flwr supernode register``);
4. starts each hospital's SuperNode and metrics exporter from its hospital config
   (``<root>/hospitals/<site>.toml``, :mod:`deploy.hospital`), and the server's exporter;
5. waits until every SuperNode is online, runs ``flwr run <app> federation --stream`` and
   waits for it; while it runs, any daemon that exits is restarted 5 s later (as systemd would);
6. stops every process it started, and every process those started (found by a marker in
   their environment, and signalled by pid).

The exporters serve ``/metrics`` over https and require a client certificate signed by the
federation's CA (Prometheus gets one: ``<root>/pki/prometheus.crt``). ``--insecure`` runs
without TLS anywhere and without node authentication (plaintext on loopback: for a quick check
only). :class:`Federation` is the same thing as a library, for tests and benches.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import toml_text
from .certs import Pki, create_pki
from .net import free_port

APP_ROOT = Path(__file__).resolve().parents[1]
MARKER = "FEDMEDSEGDIFF_DEPLOY"
FEDERATION = "federation"  # the connection name in the flwr CLI's config.toml
METRICS_CERT = "exporters"  # one certificate for every exporter: they all listen on 127.0.0.1


def marked_pids(tag: str, *, prefix: bool = False) -> list[int]:
    """PIDs of processes whose environment carries ``MARKER=tag`` (or, with ``prefix``,
    ``MARKER=tag...``): they, or an ancestor, were started with it — Flower's detached SuperExec
    and app processes included."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(item.startswith(needle) if prefix else item == needle for item in environ):
            found.append(int(entry.name))
    return found


def signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


@dataclass
class Hospital:
    """One hospital of the local federation."""

    name: str
    data_path: Path
    state_dir: Path
    config_path: Path
    runtime_port: int
    metrics_port: int


class Federation:
    """A SuperLink, N hospitals and their exporters as real processes under ``root``.

    Use as a context manager: leaving it stops every process it started."""

    def __init__(
        self,
        root: Path,
        *,
        sites: int | Sequence[str] = 3,
        tls: bool = True,
        app: Path = APP_ROOT,
        cases: Mapping[str, int] | None = None,
        image_size: int = 64,
        privacy: Mapping[str, object] | None = None,
        check_interval_s: float = 5.0,
        database: bool = False,
        metrics_tls: bool | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if isinstance(sites, int):
            letters = sites <= 26
            names = [
                f"site-{chr(ord('a') + k)}" if letters else f"site-{k:03d}" for k in range(sites)
            ]
        else:
            names = list(sites)
        self.tls = tls
        # https with client certificates for /metrics, as for the SuperLink (unless told apart)
        self.metrics_tls = tls if metrics_tls is None else metrics_tls
        self.app = Path(app).resolve()
        self.cases = dict(cases or {"train": 16, "val": 4, "test": 4})
        self.image_size = image_size
        self.privacy = dict(privacy or {})
        self.check_interval_s = check_interval_s
        self.database = database
        self.tag = uuid.uuid4().hex[:12]
        self.pki = Pki(self.root / "pki")
        self.host = "127.0.0.1"
        self.superlink_port = free_port()
        self.server_metrics_port = free_port()
        self.server_workdir = self.root / "server" / "work"
        self.cli_home = self.root / "flwr-cli"
        self.logs = self.root / "logs"
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: list[tuple[float, str]] = []  # (unix time, daemon) of each restart
        self._supervised: dict[str, tuple[Callable[[], object], float]] = {}
        self._exited_at: dict[str, float] = {}
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.hospitals = {
            name: Hospital(
                name,
                self.root / "data" / f"site-{k}",
                self.root / "state" / name,
                self.root / "hospitals" / f"{name}.toml",
                free_port(),
                free_port(),
            )
            for k, name in enumerate(names)
        }

    # -- set-up -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Data, keys, hospital configs and the flwr CLI's connection: everything on disk."""
        from medsegdiff_core.data.synthetic import write_fundus_sites

        done = self.root / "data" / ".complete"
        if not done.exists():
            write_fundus_sites(
                self.root / "data",
                num_sites=len(self.hospitals),
                cases=self.cases,
                size=self.image_size,
            )
            done.touch()
        create_pki(
            self.pki.root,
            hosts=["127.0.0.1", "localhost"],
            sites=list(self.hospitals),
            metrics={METRICS_CERT: ["127.0.0.1", "localhost"]} if self.metrics_tls else None,
            scraper=self.metrics_tls,
        )
        for hospital in self.hospitals.values():
            self.write_hospital_config(hospital)
        self.write_cli_config()
        self.logs.mkdir(parents=True, exist_ok=True)

    def write_hospital_config(
        self,
        hospital: Hospital,
        *,
        auth_key: Path | None = None,
        path: Path | None = None,
        state_dir: Path | None = None,
        insecure: bool | None = None,
        max_wait_time: float | None = None,
    ) -> Path:
        """The hospital's TOML (the format of ``deploy/hospital.example.toml``); the keyword
        arguments make variants (another key, plaintext) for tests of refusals. Every SuperNode
        needs a state dir of its own."""
        tls = self.tls if insecure is None else not insecure
        superlink: dict[str, object] = {"address": f"{self.host}:{self.superlink_port}"}
        if tls:
            superlink["root-certificates"] = self.pki.ca_cert
            superlink["auth-key"] = auth_key or self.pki.node_key(hospital.name)
        else:
            superlink["insecure"] = True
        superlink["max-wait-time"] = max_wait_time
        metrics: dict[str, object] = {
            "host": self.host,
            "port": hospital.metrics_port,
            "check-interval-s": self.check_interval_s,
        }
        if self.metrics_tls:
            metrics["tls-cert"] = self.pki.metrics_cert(METRICS_CERT)
            metrics["tls-key"] = self.pki.metrics_key(METRICS_CERT)
            metrics["client-ca"] = self.pki.ca_cert
        document: dict[str, object] = {
            "site-name": hospital.name,
            "data-path": hospital.data_path,
            "state-dir": state_dir or hospital.state_dir,
            "superlink": superlink,
            "metrics": metrics,
        }
        if self.privacy:
            document["privacy"] = dict(self.privacy)
        path = path or hospital.config_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(toml_text.dumps(document))
        return path

    def write_cli_config(self) -> None:
        """``FLWR_HOME/config.toml`` for ``flwr``: the SuperLink's address and the CA."""
        self.cli_home.mkdir(parents=True, exist_ok=True)
        connection: dict[str, object] = {"address": f"{self.host}:{self.superlink_port}"}
        if self.tls:
            connection["root-certificates"] = self.pki.ca_cert
        else:
            connection["insecure"] = True
        document = {"superlink": {"default": FEDERATION, FEDERATION: connection}}
        (self.cli_home / "config.toml").write_text(toml_text.dumps(document))

    # -- processes ----------------------------------------------------------------------------

    def env(self, name: str, flwr_home: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env[MARKER] = f"{self.tag}/{name}"
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        if flwr_home is not None:
            flwr_home.mkdir(parents=True, exist_ok=True)
            env["FLWR_HOME"] = str(flwr_home)
        return env

    def start(
        self, name: str, command: Sequence[str], *, flwr_home: Path | None = None
    ) -> subprocess.Popen:
        """Start one daemon (its own session, output appended to ``logs/<name>.log``)."""
        if name in self.processes and self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        log.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            list(command),
            cwd=APP_ROOT,
            env=self.env(name, flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = process
        return process

    def pids(self, name: str) -> list[int]:
        """The daemon ``name`` and everything it started."""
        return [p for p in marked_pids(f"{self.tag}/{name}") if _alive(p)]

    def kill(self, name: str, sig: int = signal.SIGKILL, *, grace_s: float = 10.0) -> None:
        """Signal ``name`` and all its descendants; SIGKILL whatever outlives ``grace_s``."""
        targets = self.pids(name)
        signal_pids(targets, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in targets):
            time.sleep(0.1)
        signal_pids([p for p in targets if _alive(p)], signal.SIGKILL)
        if name in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.processes[name].wait(timeout=5)

    def supervise(self, name: str, start: Callable[[], object], *, delay_s: float = 5.0) -> None:
        """Restart ``name`` with ``start()`` whenever it exits, ``delay_s`` later: what the
        units in ``deploy/systemd`` do (``Restart=always``, ``RestartSec=5``). A SuperNode
        that was killed waits by itself before it rejoins (``deploy.hospital.run_supernode``)."""
        self._supervised[name] = (start, delay_s)
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._watch, name="supervisor", daemon=True)
            self._supervisor.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for name, (start, delay_s) in list(self._supervised.items()):
                process = self.processes.get(name)
                if process is None or process.poll() is None:
                    continue
                exited = self._exited_at.setdefault(name, time.monotonic())
                if time.monotonic() - exited < delay_s or self._stopping.is_set():
                    continue
                del self._exited_at[name]
                try:
                    start()
                    self.restarts.append((time.time(), name))
                except Exception as exc:  # try again after the next delay
                    with open(self.logs / "supervisor.log", "a") as log:
                        log.write(f"{time.strftime('%H:%M:%S')} restarting {name}: {exc}\n")

    def stop(self) -> None:
        """Stop everything this federation started (SuperNodes first, the SuperLink last)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=120)
        order = sorted(self.processes, key=lambda n: (n == "superlink", n))
        for name in order:
            self.kill(name, signal.SIGTERM, grace_s=5.0)
        signal_pids([p for p in marked_pids_prefix(self.tag) if _alive(p)], signal.SIGKILL)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the SuperLink ------------------------------------------------------------------------

    def superlink_command(self) -> list[str]:
        command = [
            "flower-superlink",
            "--host",
            self.host,
            "--port",
            str(self.superlink_port),
            "--disable-runtime-dependency-installation",
        ]
        if self.database:
            command += ["--database", str(self.root / "server" / "superlink.db")]
        if self.tls:
            command += [
                "--ssl-ca-certfile",
                str(self.pki.ca_cert),
                "--ssl-certfile",
                str(self.pki.server_cert),
                "--ssl-keyfile",
                str(self.pki.server_key),
                "--enable-supernode-auth",
            ]
        else:
            command.append("--insecure")
        return command

    def start_superlink(self, *, timeout_s: float = 60.0) -> None:
        (self.root / "server").mkdir(parents=True, exist_ok=True)
        self.start(
            "superlink", self.superlink_command(), flwr_home=self.root / "server" / "flwr-home"
        )
        wait_port(self.host, self.superlink_port, timeout_s)

    def flwr(
        self, *args: str, timeout_s: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI against this federation's SuperLink."""
        result = subprocess.run(
            ["flwr", *args],
            cwd=APP_ROOT,
            env=self.env("flwr-cli", self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def register(self, site: str, *, public_key: Path | None = None, retries: int = 20) -> None:
        """``flwr supernode register`` the hospital's public key (already registered is fine:
        the SuperLink keeps registrations in its database across restarts)."""
        key = public_key or self.pki.node_public_key(site)
        for attempt in range(retries):
            result = self.flwr("supernode", "register", str(key), FEDERATION, check=False)
            text = result.stdout + result.stderr
            if result.returncode == 0 or "already" in text.lower():
                return
            if attempt == retries - 1:
                raise RuntimeError(f"registering {site} failed: {text}")
            time.sleep(1.0)

    def supernodes(self) -> list[dict]:
        """``flwr supernode list`` as JSON rows."""
        import json

        result = self.flwr("supernode", "list", FEDERATION, "--format", "json")
        return list(json.loads(result.stdout).get("nodes", []))

    def wait_online(self, count: int | None = None, *, timeout_s: float = 300.0) -> None:
        """Until ``count`` SuperNodes (default: every hospital) are online. Start ``flwr run``
        after this: Flower's FedAvg sizes a round's sample from the nodes connected when the
        round is configured, even if it then waits for more."""
        count = len(self.hospitals) if count is None else count
        deadline = time.monotonic() + timeout_s
        online = 0
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, ValueError):
                online = sum(node.get("status") == "online" for node in self.supernodes())
                if online >= count:
                    return
            time.sleep(2.0)
        raise TimeoutError(f"{online} of {count} SuperNodes online after {timeout_s:.0f} s")

    # -- hospitals ----------------------------------------------------------------------------

    def start_supernode(
        self, site: str, *, config_path: Path | None = None, name: str | None = None
    ) -> subprocess.Popen:
        """The hospital's SuperNode as its systemd unit runs it (``deploy.hospital supernode``);
        ``config_path`` and ``name`` start a variant (another key, plaintext) beside it."""
        from .hospital_config import HospitalConfig

        hospital = self.hospitals[site]
        config_path = config_path or hospital.config_path
        state_dir = HospitalConfig.load(config_path).state_dir
        runtime_port = hospital.runtime_port if name is None else free_port()
        command = [
            sys.executable,
            "-m",
            "deploy.hospital",
            "supernode",
            "--config",
            str(config_path),
            "--runtime-port",
            str(runtime_port),
        ]
        return self.start(name or f"supernode-{site}", command, flwr_home=state_dir / "flwr-home")

    def start_site_exporter(self, site: str) -> None:
        hospital = self.hospitals[site]
        self.start(
            f"exporter-{site}",
            [
                sys.executable,
                "-m",
                "deploy.exporter",
                "site",
                "--config",
                str(hospital.config_path),
            ],
        )

    def start_server_exporter(self) -> None:
        self.start(
            "exporter-server",
            [
                sys.executable,
                "-m",
                "deploy.exporter",
                "server",
                "--runs-dir",
                str(self.server_workdir / "runs"),
                "--host",
                self.host,
                "--port",
                str(self.server_metrics_port),
                *self.server_exporter_tls_args(),
            ],
        )

    def server_exporter_tls_args(self) -> list[str]:
        if not self.metrics_tls:
            return []
        return [
            "--tls-cert",
            str(self.pki.metrics_cert(METRICS_CERT)),
            "--tls-key",
            str(self.pki.metrics_key(METRICS_CERT)),
            "--client-ca",
            str(self.pki.ca_cert),
        ]

    @property
    def metrics_scheme(self) -> str:
        return "https" if self.metrics_tls else "http"

    def metrics_targets(self) -> dict[str, str]:
        """Job name -> ``host:port`` of every exporter (for a Prometheus scrape config)."""
        targets = {"server": f"{self.host}:{self.server_metrics_port}"}
        for hospital in self.hospitals.values():
            targets[hospital.name] = f"{self.host}:{hospital.metrics_port}"
        return targets

    def restart_superlink(self) -> None:
        """Start the SuperLink again and register every hospital's key again (its state is in
        memory unless ``database``; registering a known key again is harmless)."""
        self.start_superlink()
        if self.tls:
            for site in self.hospitals:
                self.register(site)

    def up(self, *, exporters: bool = True, supervise: bool = True) -> None:
        """Prepare, start the SuperLink, register and start every hospital (and exporters);
        with ``supervise``, restart any of them that exits, as systemd would."""
        self.prepare()
        self.start_superlink()
        if supervise:
            self.supervise("superlink", self.restart_superlink)
        for site in self.hospitals:
            if self.tls:
                self.register(site)
            self.start_supernode(site)
            if supervise:
                self.supervise(f"supernode-{site}", functools.partial(self.start_supernode, site))
            if exporters:
                self.start_site_exporter(site)
        if exporters:
            self.start_server_exporter()

    def app_pids(self, name: str, app: str = "flwr-clientapp") -> list[int]:
        """PIDs of the app processes (``flwr-clientapp`` / ``flwr-serverapp``) under ``name``."""
        found = []
        for pid in self.pids(name):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if app.encode() in cmdline:
                found.append(pid)
        return found

    # -- training -----------------------------------------------------------------------------

    def run_command(self, run_config: Mapping[str, object]) -> list[str]:
        config = {"workdir": str(self.server_workdir), **run_config}
        return [
            "flwr",
            "run",
            str(self.app),
            FEDERATION,
            "--stream",
            "--run-config",
            toml_text.config_args(config),
        ]

    def start_run(
        self, run_config: Mapping[str, object], *, name: str = "flwr-run"
    ) -> subprocess.Popen:
        """``flwr run`` in the background (its output in ``logs/<name>.log``)."""
        return self.start(name, self.run_command(run_config), flwr_home=self.cli_home)

    def run(
        self, run_config: Mapping[str, object], *, timeout_s: float = 1800.0, name: str = "flwr-run"
    ) -> int:
        """``flwr run`` until the run ends; its exit code."""
        process = self.start_run(run_config, name=name)
        try:
            return process.wait(timeout=timeout_s)
        finally:
            if process.poll() is None:
                self.kill(name)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def marked_pids_prefix(tag: str) -> list[int]:
    """PIDs of every process of the federation ``tag`` (``MARKER=tag/<daemon>``)."""
    return marked_pids(f"{tag}/", prefix=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=APP_ROOT / ".work" / "federation")
    parser.add_argument("--sites", type=int, default=3, help="hospitals")
    parser.add_argument("--app", type=Path, default=APP_ROOT, help="the Flower app to run")
    parser.add_argument("--experiment", default="configs/federated-tiny.yaml")
    parser.add_argument(
        "--overrides",
        default="federation.local_steps=10 inference.sampling_steps=5 inference.ensemble=2",
        help="experiment overrides, 'key=value key=value'",
    )
    parser.add_argument(
        "--site-privacy",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="each hospital's [privacy] setting, e.g. enabled=true target_epsilon=8 (repeatable)",
    )
    parser.add_argument("--insecure", action="store_true", help="plaintext, no node authentication")
    parser.add_argument(
        "--prometheus",
        action="store_true",
        help="also run Prometheus (Debian's `prometheus`) and print what it scraped",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    parser.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="seconds to keep everything running after training (to look at /metrics)",
    )
    args = parser.parse_args(argv)
    import yaml

    privacy = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.site_privacy)}
    federation = Federation(
        args.root, sites=args.sites, tls=not args.insecure, app=args.app, privacy=privacy
    )
    with federation:
        federation.up()
        security = "TLS, node authentication" if federation.tls else "PLAINTEXT"
        print(f"SuperLink {federation.host}:{federation.superlink_port} ({security})", flush=True)
        for job, target in federation.metrics_targets().items():
            print(f"metrics {job}: {federation.metrics_scheme}://{target}/metrics")
        prometheus = None
        if args.prometheus:
            from .prometheus import start_prometheus

            prometheus = start_prometheus(federation)
            print(f"Prometheus: {prometheus}")
        print(f"logs: {federation.logs}", flush=True)
        federation.wait_online()
        # Every hospital takes part from round 1 on (later overrides win).
        overrides = f"federation.min_available_sites={args.sites} {args.overrides}"
        code = federation.run(
            {"experiment": args.experiment, "overrides": overrides}, timeout_s=args.timeout
        )
        print(federation.log("flwr-run")[-3000:])
        if prometheus is not None:
            from .prometheus import scraped_report, targets_report, wait_scraped_after

            # The final values: every target scraped once more after the run ended.
            wait_scraped_after(prometheus, time.time())
            report = scraped_report(prometheus)
            for target in targets_report(prometheus):
                print(f"  target {target}")
            (federation.root / "prometheus-scraped.json").write_text(json.dumps(report, indent=1))
            print(f"Prometheus scraped ({federation.root / 'prometheus-scraped.json'}):")
            for series, value in report.items():
                print(f"  {series} {value:g}")
        if args.hold > 0:
            time.sleep(args.hold)
    sys.exit(code)


if __name__ == "__main__":
    main()
