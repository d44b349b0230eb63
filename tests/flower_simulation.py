"""The real ClientApp and ServerApp in a Flower simulation, run as a child process by tests.

``run_simulation`` gives the apps an empty run config and fixed node configs, and Flower forbids
changing a context in place; the script hands each call a context with the test's run config
and, per partition, what that hospital's SuperNode would set in its node config. A partition in
``poisoned`` sends a broken update: NaN in round 1, another architecture's shapes later.
"""

from __future__ import annotations

import os
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

client = ClientApp()
server = ServerApp()


def context_for(context, node=False):
    extra = NODE_CONFIG.get(int(context.node_config["partition-id"]), {{}}) if node else {{}}
    return Context(context.run_id, context.node_id, dict(context.node_config) | extra,
                   context.state, dict(context.run_config) | RUN_CONFIG)


def poison(msg, reply):
    arrays = reply.content["arrays"].to_torch_state_dict()
    key = next(iter(arrays))
    if int(msg.content["config"]["server-round"]) == 1:
        arrays[key] = arrays[key] * float("nan")  # a diverged site
    else:
        arrays[key] = arrays[key][..., :1].clone()  # a site with another architecture
    reply.content["arrays"] = ArrayRecord(arrays)
    return reply


@client.train()
def train(msg, context):
    reply = client_app.train(msg, context_for(context, node=True))
    if context.node_config["partition-id"] in POISONED:
        return poison(msg, reply)
    return reply


@client.evaluate()
def evaluate(msg, context):
    return client_app.evaluate(msg, context_for(context, node=True))


@server.main()
def main(grid, context):
    server_app.main(grid, context_for(context))


BACKEND = {{"client_resources": {{"num_cpus": 1}}, "init_args": {{"num_cpus": 2}}}}
run_simulation(server, client, num_supernodes=3, backend_config=BACKEND)
"""


def write_simulation(
    script: Path,
    run_config: Mapping[str, Any],
    *,
    node_config: Mapping[int, Mapping[str, Any]] | None = None,
    poisoned: tuple[int, ...] = (),
) -> Path:
    """Write the simulation script for 3 simulated sites; returns its path."""
    script.write_text(
        TEMPLATE.format(
            run_config=dict(run_config),
            node_config={k: dict(v) for k, v in (node_config or {}).items()},
            poisoned=poisoned,
        )
    )
    return script


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
