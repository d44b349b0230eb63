"""Soak: many sites, many rounds; does the server's memory stay flat, how long is each round?

Default: 20 simulated sites x 10 rounds of the tiny preset in Flower's simulation runtime
(``flwr run . local``: one SuperLink, the ServerApp, the ClientApps in Ray workers). While it runs
the resident memory (RSS, from /proc) of the server-side processes is sampled; at each round's
commit (``state.json``) the sample is kept. Reported: server RSS at round 1 and at the last
round (goal: growth < 10 %), and each round's wall time from the run's own history.

``--runtime deployment`` runs the same against real processes instead (``deploy.launch``: a TLS
SuperLink with SuperNode authentication and one SuperNode per site; every round then starts a
ClientApp process per site, so it is much slower).

Run: python bench/soak.py [--sites 20 --rounds 10] [--runtime simulation|deployment]
     [--json runs/bench-soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.local_simulation import (  # noqa: E402
    processes_naming,
    run_config_argument,
    stop_local_superlink,
    write_flower_config,
)

# Process names that make up "the server": the SuperLink, the process that runs the ServerApp
# (flwr-serverapp in deployment, flwr-simulation in simulation, which also drives Ray).
SERVER_PROCESSES = ("flower-superlink", "flwr-serverapp", "flwr-simulation")


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def completed(state_path: Path) -> int:
    try:
        return int(json.loads(state_path.read_text())["completed_round"])
    except (OSError, ValueError, KeyError):
        return 0


class Sampler(threading.Thread):
    """Samples the server processes' RSS; remembers the sample at each round's commit."""

    def __init__(self, find_pids, state_path: Path, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.find_pids, self.state_path, self.period_s = find_pids, state_path, period_s
        self.at_round: dict[int, dict[str, int]] = {}
        self.peak: dict[str, int] = {}
        self.done = threading.Event()

    def sample(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for pid in self.find_pids():
            line = cmdline(pid)
            name = next((n for n in SERVER_PROCESSES if n in line), None)
            if name is not None:
                found[name] = found.get(name, 0) + rss_bytes(pid)
        return found

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            current = self.sample()
            for name, value in current.items():
                self.peak[name] = max(self.peak.get(name, 0), value)
            round_now = completed(self.state_path)
            if round_now and round_now not in self.at_round and current:
                self.at_round[round_now] = current


def overrides(args: argparse.Namespace) -> str:
    return (
        f"name=soak federation.rounds={args.rounds} federation.simulated_sites={args.sites} "
        f"federation.min_sites={args.sites} federation.min_available_sites={args.sites} "
        f"federation.local_steps={args.local_steps} federation.evaluate_every={args.rounds} "
        "inference.sampling_steps=3 inference.ensemble=2"
    )


def run_simulation(args: argparse.Namespace, work: Path) -> tuple[Sampler, float]:
    flwr_home = work / "flwr-home"
    write_flower_config(flwr_home, args.sites)
    env = dict(
        os.environ, FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1"
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run_config = {"workdir": str(work / "workdir"), "overrides": overrides(args)}
    command = ["flwr", "run", ".", "local", "--stream", "--run-config"]
    command.append(run_config_argument(run_config))
    state_path = work / "workdir" / "runs" / "soak" / "state.json"
    mine = str(flwr_home)

    def find_pids() -> list[int]:
        roots = processes_naming(mine)
        return sorted({p for root in roots for p in [root, *_descendants(root)]})

    sampler = Sampler(find_pids, state_path)
    sampler.start()
    start = time.monotonic()
    try:
        with open(work / "flwr-run.log", "w") as log:
            code = subprocess.run(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=7200
            ).returncode
    finally:
        sampler.done.set()
        stop_local_superlink(flwr_home)
    if code != 0:
        sys.exit(f"flwr run failed ({code}); see {work / 'flwr-run.log'}")
    return sampler, time.monotonic() - start


def run_deployment(args: argparse.Namespace, work: Path) -> tuple[Sampler, float]:
    from deploy.launch import Federation, marked_pids_prefix

    federation = Federation(
        work / "federation", sites=args.sites, cases={"train": 16, "val": 4}, image_size=32
    )
    state_path = federation.server_workdir / "runs" / "soak" / "state.json"
    with federation:
        federation.up(exporters=False)
        sampler = Sampler(lambda: marked_pids_prefix(federation.tag), state_path)
        sampler.start()
        start = time.monotonic()
        code = federation.run({"overrides": overrides(args)}, timeout_s=7200)
        sampler.done.set()
        elapsed = time.monotonic() - start
    if code != 0:
        sys.exit(f"flwr run failed ({code}); see {federation.logs}")
    return sampler, elapsed


def _descendants(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(p) for p in text.split()]
    return kids + [g for kid in kids for g in _descendants(kid)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--runtime", choices=["simulation", "deployment"], default="simulation")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument("--keep", type=Path, default=None, help="work folder (default: a temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        runner = run_simulation if args.runtime == "simulation" else run_deployment
        sampler, elapsed = runner(args, work)
        state_dir = (
            work / "workdir" if args.runtime == "simulation" else work / "federation/server/work"
        )
        history = json.loads((state_dir / "runs" / "soak" / "state.json").read_text())["history"]

    rounds = sorted(sampler.at_round)
    first, last = rounds[0], rounds[-1]
    total = {r: sum(sampler.at_round[r].values()) for r in rounds}
    growth = (total[last] - total[first]) / total[first]
    figures = {
        "runtime": args.runtime,
        "sites": args.sites,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "wall_s": round(elapsed, 1),
        "server_rss_mb_by_round": {
            r: {k: round(v / 2**20, 1) for k, v in sampler.at_round[r].items()} for r in rounds
        },
        "server_rss_mb_first": round(total[first] / 2**20, 1),
        "server_rss_mb_last": round(total[last] / 2**20, 1),
        "server_rss_growth": round(growth, 4),
        "server_rss_peak_mb": {k: round(v / 2**20, 1) for k, v in sampler.peak.items()},
        "round_wall_s": [round(r["wall_s"], 1) for r in history],
        "sites_per_round": [len(r["sites_trained"]) for r in history],
    }
    print(f"{args.sites} sites x {args.rounds} rounds ({args.runtime}), {elapsed:.0f} s")
    print(
        f"server RSS: round {first} {figures['server_rss_mb_first']} MB, round {last} "
        f"{figures['server_rss_mb_last']} MB, growth {100 * growth:+.1f} % (goal < 10 %)"
    )
    for r in rounds:
        parts = ", ".join(f"{k} {v} MB" for k, v in figures["server_rss_mb_by_round"][r].items())
        print(f"  round {r:2d}: {parts}")
    print("round wall time (s):", figures["round_wall_s"])
    print("sites per round:", figures["sites_per_round"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
