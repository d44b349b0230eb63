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
from pathlib import Path

from medsegdiff_core.errors import ConfigError

from .hospital_config import HospitalConfig, MetricsTls

__all__ = ["HospitalConfig", "MetricsTls", "crash_grace_s", "main", "run_supernode"]


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
