"""Run this Flower app in Flower's local simulation runtime, and stop what that started.

``flwr run . local`` launches a detached ``flower-superlink --simulation`` (which spawns the
ServerApp and ClientApp processes) that outlives the command and keeps its ports. The demo and
the tests must leave nothing running, so this module gives the run its own ``FLWR_HOME`` and, when
the run ends, stops every process whose command line names that home.

Usage: ``python -m server.local_simulation --flwr-home DIR --sites 3 [--run-config K=V ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from deploy.toml_text import config_args, dumps

APP_ROOT = Path(__file__).resolve().parents[1]


def write_flower_config(
    flwr_home: Path, num_supernodes: int, *, side_by_side: bool = False
) -> None:
    """A Flower config whose default connection is a local simulation of N SuperNodes.

    By default Flower gives each simulated site 2 CPUs, so on a small machine the sites train
    one after another. ``side_by_side`` gives each site one CPU (one torch thread) and tells Ray
    there is a CPU per site, so all sites train at once, as separate hospitals would."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    options: dict[str, object] = {"num-supernodes": num_supernodes}
    if side_by_side:
        options["backend"] = {
            "client-resources": {"num-cpus": 1},
            "init-args": {"num-cpus": num_supernodes},
        }
    local = {"address": ":local:", "options": options}
    text = dumps({"superlink": {"default": "local", "local": local}})
    (flwr_home / "config.toml").write_text(text)


def run_config_argument(run_config: Mapping[str, object]) -> str:
    """``--run-config`` value for ``flwr run``: space-separated ``key=value`` in TOML syntax."""
    return config_args(run_config)


def processes_naming(text: str) -> list[int]:
    """PIDs of processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(p) for p in text.split()]
    return kids + [grandchild for kid in kids for grandchild in _children(kid)]


def stop_local_superlink(flwr_home: Path, *, grace_s: float = 5.0) -> int:
    """Stop the local SuperLink of this ``FLWR_HOME`` and everything under it; return how many
    processes were signalled."""
    roots = processes_naming(str(flwr_home))
    targets = sorted({p for root in roots for p in [root, *_children(root)]})
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in targets):
        time.sleep(0.1)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(targets)


def run_local(
    flwr_home: Path,
    *,
    num_supernodes: int,
    run_config: Mapping[str, object],
    timeout_s: float = 3600,
    extra_args: Sequence[str] = (),
    side_by_side: bool = False,
) -> int:
    """``flwr run . local --stream`` from the app root; always stops the SuperLink after."""
    flwr_home = Path(flwr_home).resolve()
    write_flower_config(flwr_home, num_supernodes, side_by_side=side_by_side)
    # The app's dependencies (torch among them) are installed in this environment already; by
    # default Flower would resolve and install them again into a fresh one for every run.
    env = dict(
        os.environ, FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1"
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = ["flwr", "run", ".", "local", "--stream", *extra_args]
    if run_config:
        command += ["--run-config", run_config_argument(run_config)]
    stop_local_superlink(flwr_home)  # a leftover from a crashed run would hold the ports
    try:
        return subprocess.run(command, cwd=APP_ROOT, env=env, timeout=timeout_s).returncode
    finally:
        stop_local_superlink(flwr_home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flwr-home", type=Path, default=APP_ROOT / ".flwr")
    parser.add_argument("--sites", type=int, default=3, help="simulated SuperNodes")
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run config entries (string values need no quotes)",
    )
    args = parser.parse_args()
    run_config = dict(item.split("=", 1) for item in args.run_config)
    sys.exit(run_local(args.flwr_home, num_supernodes=args.sites, run_config=run_config))


if __name__ == "__main__":
    main()
