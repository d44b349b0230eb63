"""Round time and bytes per round with and without secure aggregation (SecAgg+), side by side.

For each number of simulated sites one Flower simulation runs the ServerApp twice on the same
seeds and built-in sites (tiny preset, 32 px, no federated evaluation): plain FedAvg, then
``federation.secure_aggregation=true``. From each run's ``state.json``: the median training
wall time of a round (``train_wall_s``: sampling, the sites' training, the protocol's four
stages, unmasking, checks) and the bytes the server received and sent per round (plain: the
sites' weights and the global model to each; SecAgg+: every message of the four stages).

Run: python bench/secagg.py [--sites 3,10] [--rounds 3] [--local-steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from flower_simulation import start_script, write_simulation  # noqa: E402


def overrides(sites: int, rounds: int, local_steps: int) -> str:
    return (
        f"federation.rounds={rounds} federation.local_steps={local_steps} "
        f"federation.simulated_sites={sites} federation.min_available_sites={sites} "
        "federation.fraction_evaluate=0"
    )


def secure(sites: int) -> str:
    shares, threshold = (3, 2) if sites < 5 else (5, 3)
    return (
        " name=federated-tiny-secagg federation.release_name=fundus-tiny-secagg"
        f" federation.secure_aggregation=true federation.num_shares={shares}"
        f" federation.reconstruction_threshold={threshold} federation.max_weight=50"
    )


def summary(state: dict) -> dict:
    history = state["history"]
    wall = statistics.median(r["train_wall_s"] for r in history)
    if history[0].get("secure_aggregation"):
        received = statistics.median(r["secure_aggregation"]["bytes_received"] for r in history)
        sent = statistics.median(r["secure_aggregation"]["bytes_sent"] for r in history)
    else:
        received = statistics.median(r["update_bytes"] for r in history)
        sent = statistics.median(r["model_bytes"] * len(r["sites_trained"]) for r in history)
    return {"round_s": wall, "received_mb": received / 1e6, "sent_mb": sent / 1e6}


def run(sites: int, rounds: int, local_steps: int, folder: Path) -> dict[str, dict]:
    base = overrides(sites, rounds, local_steps)
    workdir = folder / f"{sites}-sites"
    script = write_simulation(
        folder / f"sim-{sites}.py",
        {"workdir": str(workdir), "overrides": base},
        server_runs=[{}, {"overrides": base + secure(sites)}],
        num_supernodes=sites,
    )
    start = time.monotonic()
    output, _ = start_script(script).communicate(timeout=3600)
    if "released" not in output:
        raise SystemExit(output[-3000:])
    print(f"{sites} sites: simulation took {time.monotonic() - start:.0f} s", file=sys.stderr)
    result = {}
    for name in ("federated-tiny", "federated-tiny-secagg"):
        state = json.loads((workdir / "runs" / name / "state.json").read_text())
        result[name] = summary(state)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="3,10")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sites in (int(s) for s in args.sites.split(",")):
            result = run(sites, args.rounds, args.local_steps, Path(tmp))
            plain, sa = result["federated-tiny"], result["federated-tiny-secagg"]
            rows.append((sites, plain, sa))
    print(
        f"{'sites':>5} | {'round s plain':>13} {'SecAgg+':>8} {'ratio':>6} | "
        f"{'MB in plain':>11} {'SecAgg+':>8} {'ratio':>6} | {'MB out plain':>12} {'SecAgg+':>8}"
    )
    for sites, plain, sa in rows:
        print(
            f"{sites:>5} | {plain['round_s']:>13.2f} {sa['round_s']:>8.2f} "
            f"{sa['round_s'] / plain['round_s']:>6.2f} | {plain['received_mb']:>11.2f} "
            f"{sa['received_mb']:>8.2f} {sa['received_mb'] / plain['received_mb']:>6.2f} | "
            f"{plain['sent_mb']:>12.2f} {sa['sent_mb']:>8.2f}"
        )


if __name__ == "__main__":
    main()
