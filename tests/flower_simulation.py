"""The real ClientApp and ServerApp in a Flower simulation, run as a child process by tests.

``run_simulation`` gives the apps an empty run config and fixed node configs, and Flower forbids
changing a context in place; the script hands each call (and the ClientApp's train mods, so
they see the same context) a context with the test's run config and, per partition, what that
hospital's SuperNode would set in its node config. A partition in ``poisoned`` sends a broken
update: NaN in round 1, another architecture's shapes later (``poison="scaled"``: its weights
times 1000); a partition in ``failing`` raises in the rounds listed (after the train mods, so
under secure aggregation it drops out after sending its key shares).

Test instruments, all off by default: ``server_runs`` runs the ServerApp once per entry, each
with the run config updated by it (several runs in one simulation); ``tap`` is a folder where
each site's trained weights are saved, before the train mods see them; ``received`` is a
folder where each site saves the global weights a train message brought it, before training;
``record`` is a file where the server's grid writes what every train reply it receives holds.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TEMPLATE = """
from flwr.app import ArrayRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from client import client_app
from server import server_app

RUN_CONFIG = {run_config!r}
NODE_CONFIG = {node_config!r}
POISONED = {poisoned!r}
POISON = {poison!r}
FAILING = {failing!r}
SERVER_RUNS = {server_runs!r}
TAP = {tap!r}
RECEIVED = {received!r}
RECORD = {record!r}

client = ClientApp()
server = ServerApp()


def context_for(context, node=False, extra_run=None):
    extra = NODE_CONFIG.get(int(context.node_config["partition-id"]), {{}}) if node else {{}}
    return Context(context.run_id, context.node_id, dict(context.node_config) | extra,
                   context.state, dict(context.run_config) | RUN_CONFIG | (extra_run or {{}}))


def poison(msg, reply):
    arrays = reply.content["arrays"].to_torch_state_dict()
    key = next(iter(arrays))
    if POISON == "scaled":
        arrays = {{k: v * 1000 if v.is_floating_point() else v for k, v in arrays.items()}}
    elif int(msg.content["config"]["server-round"]) == 1:
        arrays[key] = arrays[key] * float("nan")  # a diverged site
    else:
        arrays[key] = arrays[key][..., :1].clone()  # a site with another architecture
    reply.content["arrays"] = ArrayRecord(arrays)
    return reply


def with_test_context(msg, context, call_next):
    return call_next(msg, context_for(context, node=True))


@client.train(mods=[with_test_context, *getattr(client_app, "TRAIN_MODS", [])])
def train(msg, context):
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    if server_round in FAILING.get(partition, ()):
        raise RuntimeError(f"partition {{partition}} fails in round {{server_round}}")
    if RECEIVED:
        import numpy as np
        run = msg.content["config"]["run-uid"]
        arrays = {{k: v.numpy() for k, v in msg.content["arrays"].items()}}
        np.savez(f"{{RECEIVED}}/{{run}}-{{server_round}}-{{partition}}.npz", **arrays)
    reply = client_app.train(msg, context_for(context, node=True))
    if TAP:
        import numpy as np
        run = msg.content["config"]["run-uid"]
        arrays = {{k: v.numpy() for k, v in reply.content["arrays"].items()}}
        np.savez(f"{{TAP}}/{{run}}-{{server_round}}-{{partition}}.npz", **arrays)
    if partition in POISONED:
        return poison(msg, reply)
    return reply


@client.evaluate()
def evaluate(msg, context):
    return client_app.evaluate(msg, context_for(context, node=True))


class RecordingGrid:
    # The real grid; every train reply's records are also written to RECORD.

    def __init__(self, grid, run):
        self.grid, self.run_index = grid, run

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        import pickle
        from flwr.common import bytes_to_ndarray
        from flwr.common.secure_aggregation.secaggplus_constants import Key
        masked = Key.MASKED_PARAMETERS
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            if msg.metadata.message_type != "train" or not msg.has_content():
                continue
            entry = {{"run": self.run_index, "node": msg.metadata.src_node_id,
                      "group": msg.metadata.group_id, "arrays": {{}}, "configs": {{}}}}
            for name, record in msg.content.array_records.items():
                entry["arrays"][name] = {{k: v.numpy() for k, v in record.items()}}
            for name, record in msg.content.config_records.items():
                entry["configs"][name] = {{
                    k: [bytes_to_ndarray(b) for b in v] if k == masked else v
                    for k, v in record.items()
                    if not (isinstance(v, list) and v and isinstance(v[0], bytes))
                    or k == masked
                }}
            with open(RECORD, "ab") as out:
                pickle.dump(entry, out)
        return replies


@server.main()
def main(grid, context):
    for index, extra in enumerate(SERVER_RUNS):
        wrapped = RecordingGrid(grid, index) if RECORD else grid
        server_app.main(wrapped, context_for(context, extra_run=extra))


BACKEND = {{"client_resources": {{"num_cpus": 1}}, "init_args": {{"num_cpus": 2}}}}
run_simulation(server, client, num_supernodes={num_supernodes}, backend_config=BACKEND)
"""


def write_simulation(
    script: Path,
    run_config: Mapping[str, Any],
    *,
    node_config: Mapping[int, Mapping[str, Any]] | None = None,
    poisoned: tuple[int, ...] = (),
    poison: str = "nan-then-shape",
    failing: Mapping[int, tuple[int, ...]] | None = None,
    server_runs: list[Mapping[str, Any]] | None = None,
    tap: Path | None = None,
    received: Path | None = None,
    record: Path | None = None,
    num_supernodes: int = 3,
) -> Path:
    """Write the simulation script for ``num_supernodes`` simulated sites; returns its path."""
    script.write_text(
        TEMPLATE.format(
            run_config=dict(run_config),
            node_config={k: dict(v) for k, v in (node_config or {}).items()},
            poisoned=poisoned,
            poison=poison,
            failing={k: tuple(v) for k, v in (failing or {}).items()},
            server_runs=[dict(r) for r in (server_runs or [{}])],
            tap=str(tap) if tap else None,
            received=str(received) if received else None,
            record=str(record) if record else None,
            num_supernodes=num_supernodes,
        )
    )
    return script


def read_record(path: Path) -> list[dict[str, Any]]:
    """The entries a simulation's ``record`` file holds, in the order they were received."""
    entries = []
    with open(path, "rb") as source:
        while True:
            try:
                entries.append(pickle.load(source))
            except EOFError:
                return entries


def start_script(script: Path) -> subprocess.Popen:
    """Run a simulation script in its own process group (so a test can kill all of it)."""
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
