"""One hospital's deployment config (a TOML file) and the two daemons it runs.

``deploy/hospital.example.toml`` documents every key. From that one file::

    python -m deploy.hospital supernode --config /etc/fedmedsegdiff/hospital.toml
    python -m deploy.hospital exporter  --config /etc/fedmedsegdiff/hospital.toml
    python -m deploy.hospital show      --config /etc/fedmedsegdiff/hospital.toml

``supernode`` runs ``flower-supernode`` (TLS to the SuperLink, this site's authentication key,
and the node config the ClientApp reads: ``data-path``, ``site-name``, ``state-dir`` and the
site's own ``privacy.*`` settings), waiting first after an unclean stop (:func:`run_supernode`);
``exporter`` serves the site's Prometheus metrics (:mod:`deploy.exporter`); ``show`` prints the
SuperNode command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from medsegdiff_core.config import DataConfig, PrivacyConfig
from medsegdiff_core.errors import ConfigError

_TOP_KEYS = {"site-name", "data-path", "state-dir", "superlink", "data", "privacy", "metrics"}
_SUPERLINK_KEYS = {"address", "root-certificates", "auth-key", "insecure", "max-wait-time"}
_DATA_KEYS = {"layout", "classes", "image-channels", "skip-cases"}
_METRICS_KEYS = {"host", "port", "check-interval-s", "tls-cert", "tls-key", "client-ca"}


def _toml_scalar(value: Any) -> str:
    """A node-config value as ``flwr`` parses it (TOML: quoted strings, bare numbers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if '"' in text:
        raise ConfigError(f"node config value {text!r}: double quotes are not supported")
    return f'"{text}"'


def _unknown(section: str, found: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(found) - allowed)
    if extra:
        raise ConfigError(f"{section}: unknown key(s) {', '.join(extra)}")


@dataclass(frozen=True)
class MetricsTls:
    """https for ``/metrics``: the exporter's certificate and key, and with ``client_ca`` a
    client certificate signed by it is required of every scraper."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    source: str = "metrics"  # where the settings came from, for error messages

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError(f"{self.source}: tls-cert and tls-key go together (one is missing)")
        if self.client_ca is not None and self.cert is None:
            raise ConfigError(f"{self.source}: client-ca needs tls-cert and tls-key (https)")

    def check_files(self) -> None:
        """ConfigError naming the setting unless its file is there: prometheus-client would
        only fail with a bare OSError. Checked by the exporter, not at load, so that a missing
        metrics certificate never stops the SuperNode."""
        for name, path in (
            ("tls-cert", self.cert),
            ("tls-key", self.key),
            ("client-ca", self.client_ca),
        ):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{self.source}: {name} {path} is not a readable file")

    def server_kwargs(self) -> dict[str, object]:
        if self.cert is None:
            return {}
        kwargs: dict[str, object] = {"certfile": str(self.cert), "keyfile": str(self.key)}
        if self.client_ca is not None:
            kwargs |= {"client_cafile": str(self.client_ca), "client_auth_required": True}
        return kwargs


@dataclass
class HospitalConfig:
    """What a hospital's SuperNode and metrics exporter need (see hospital.example.toml)."""

    site_name: str
    data_path: Path
    state_dir: Path
    superlink: str
    root_certificates: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    max_wait_time: float | None = None
    data: DataConfig = field(default_factory=DataConfig)
    privacy: dict[str, Any] = field(default_factory=dict)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9101
    check_interval_s: float = 60.0
    metrics_tls: MetricsTls = field(default_factory=MetricsTls)

    @classmethod
    def load(cls, path: Path) -> HospitalConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], *, source: str = "hospital config"
    ) -> HospitalConfig:
        _unknown(source, raw, _TOP_KEYS)
        link = dict(raw.get("superlink", {}))
        data = dict(raw.get("data", {}))
        metrics = dict(raw.get("metrics", {}))
        _unknown(f"{source}: [superlink]", link, _SUPERLINK_KEYS)
        _unknown(f"{source}: [data]", data, _DATA_KEYS)
        _unknown(f"{source}: [metrics]", metrics, _METRICS_KEYS)
        for key in ("site-name", "data-path", "state-dir"):
            if key not in raw:
                raise ConfigError(f"{source}: {key} is required")
        if "address" not in link:
            raise ConfigError(f"{source}: [superlink] address is required")
        insecure = bool(link.get("insecure", False))
        if not insecure and ("root-certificates" not in link or "auth-key" not in link):
            raise ConfigError(
                f"{source}: [superlink] needs root-certificates and auth-key "
                "(or insecure = true, for a test on one machine only)"
            )
        try:
            data_config = DataConfig(**{k.replace("-", "_"): v for k, v in data.items()})
        except ValueError as exc:
            raise ConfigError(f"{source}: [data]: {exc}") from None
        privacy = dict(raw.get("privacy", {}))
        _unknown(f"{source}: [privacy]", privacy, set(PrivacyConfig.model_fields))
        optional = {k: Path(link[k]) for k in ("root-certificates", "auth-key") if k in link}
        tls_files = {
            k: Path(metrics[k]) for k in ("tls-cert", "tls-key", "client-ca") if k in metrics
        }
        metrics_tls = MetricsTls(
            tls_files.get("tls-cert"),
            tls_files.get("tls-key"),
            tls_files.get("client-ca"),
            source=f"{source}: [metrics]",
        )
        return cls(
            site_name=str(raw["site-name"]),
            data_path=Path(raw["data-path"]),
            state_dir=Path(raw["state-dir"]),
            superlink=str(link["address"]),
            root_certificates=optional.get("root-certificates"),
            auth_key=optional.get("auth-key"),
            insecure=insecure,
            max_wait_time=link.get("max-wait-time"),
            data=data_config,
            privacy=privacy,
            metrics_host=str(metrics.get("host", "127.0.0.1")),
            metrics_port=int(metrics.get("port", 9101)),
            check_interval_s=float(metrics.get("check-interval-s", 60.0)),
            metrics_tls=metrics_tls,
        )

    def node_config(self) -> str:
        """The ``--node-config`` value: what the ClientApp reads from ``context.node_config``."""
        items: dict[str, Any] = {
            "data-path": str(self.data_path),
            "site-name": self.site_name,
            "state-dir": str(self.state_dir),
        }
        items |= {f"privacy.{k}": v for k, v in self.privacy.items()}
        return " ".join(f"{k}={_toml_scalar(v)}" for k, v in items.items())

    def supernode_command(self, *, runtime_port: int | None = None) -> list[str]:
        """``flower-supernode`` with this hospital's flags.

        ``runtime_port`` is the SuperNode's local Runtime API port (Flower's default 9094);
        several SuperNodes on one machine need one each."""
        command = ["flower-supernode", "--superlink", self.superlink]
        if self.insecure:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.root_certificates)]
            command += ["--auth-supernode-private-key", str(self.auth_key)]
        if self.max_wait_time is not None:
            command += ["--max-wait-time", str(self.max_wait_time)]
        if runtime_port is not None:
            command += ["--port", str(runtime_port)]
        return [*command, "--node-config", self.node_config()]

    def exporter_command(self, config_path: Path) -> list[str]:
        return [sys.executable, "-m", "deploy.exporter", "site", "--config", str(config_path)]


def crash_grace_s() -> float:
    """How long the SuperLink counts a SuperNode online after its last heartbeat, plus a margin.

    Flower (1.42) refuses a second session for a key it counts online, and fails the messages
    of an unfinished round only for a node it counts *offline* — so a SuperNode restarted at
    once after a crash is refused, and one restarted just as it went offline can hide the lost
    message from the ServerApp (the round then waits for ``federation.round_timeout_s``).
    """
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    return HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 15.0


def run_supernode(
    config: HospitalConfig, command: Sequence[str], env: Mapping[str, str], *, beat_s: float = 5.0
) -> int:
    """Run the SuperNode as a child and return its exit status; after an unclean stop, wait
    first until the SuperLink has counted the site's previous session offline.

    ``<state-dir>/supernode.alive`` is touched every ``beat_s`` while the SuperNode runs and
    removed when it exits cleanly (it then said goodbye to the SuperLink). Found at start-up,
    it means the previous run was killed (SIGKILL, power loss, OOM): the restart waits until
    ``crash_grace_s()`` after its last touch. Whatever restarts the daemon (systemd, Docker,
    the launcher) gets this behaviour without a restart delay of its own.
    """
    config.state_dir.mkdir(parents=True, exist_ok=True)
    alive = config.state_dir / "supernode.alive"
    if alive.exists():
        wait = alive.stat().st_mtime + crash_grace_s() - time.time()
        if wait > 0:
            print(
                f"{config.site_name}: the previous SuperNode stopped without leaving the "
                f"federation; waiting {wait:.0f} s until the SuperLink counts it offline",
                flush=True,
            )
            time.sleep(wait)
    alive.touch()
    child = subprocess.Popen(list(command), env=dict(env))

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            code = child.wait(timeout=beat_s)
            break
        except subprocess.TimeoutExpired:
            alive.touch()
    if code == 0:
        alive.unlink(missing_ok=True)
    return code


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["supernode", "exporter", "show"])
    parser.add_argument("--config", type=Path, required=True, help="the hospital's TOML file")
    parser.add_argument(
        "--runtime-port",
        type=int,
        default=None,
        help="SuperNode's local Runtime API port (default Flower's 9094)",
    )
    args = parser.parse_args(argv)
    try:
        config = HospitalConfig.load(args.config)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    if args.action == "exporter":
        from .exporter import serve_site

        try:
            serve_site(config)
        except ConfigError as exc:
            parser.exit(2, f"error: {exc}\n")
        return
    command = config.supernode_command(runtime_port=args.runtime_port)
    if args.action == "show":
        print(shlex.join(command))
        return
    # flower-supernode, and the flower-superexec it starts, live next to this interpreter.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    binary = shutil.which(command[0], path=env["PATH"])
    if binary is None:
        parser.exit(2, "error: flower-supernode not found (install the project first)\n")
    sys.exit(run_supernode(config, [binary, *command[1:]], env))


if __name__ == "__main__":
    main()
