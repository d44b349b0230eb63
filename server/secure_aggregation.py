"""The server's side of secure aggregation: one training round through Flower's SecAgg+.

In flwr 1.42 ``SecAggPlusWorkflow`` is the fit step of the legacy ``DefaultWorkflow``: it runs
with a ``LegacyContext`` holding a legacy ``flwr.server.strategy`` strategy, whose
``configure_fit`` makes the round's fit instructions and whose ``aggregate_fit`` receives the
unmasked result. ``DefaultWorkflow``'s own loop always counts rounds from 1 and owns
initialisation and evaluation, so our round loop (checkpoints, resume, evaluation, release)
stays in ``server_app`` and calls the fit step for one round here, with the same context.

What the server sees (see also ``client/secure_update.py``): per site, masked integer vectors
(uniform modulo 2**32 without the other sites' masks) and its clear-text metrics, privacy and
``secure-update`` records; then only the example-weighted mean of the sites' clipped updates,
which it adds to the global weights after checking it (finite, L2 norm within the announced
bound plus the quantisation error). A round is halted before unmasking when fewer than
``max(2, federation.min_sites)`` sites contribute a real update: the sum of one update is that
update.

Quantisation error (per weight of the mean update; n sites in the sum, q =
``quantization_clip``, Q = ``quantization_range``, weights w_i of ``max_weight`` M): each site's
weighted value is rounded stochastically to one of Q levels in [-q, q] (error < 2q/Q) and its
weight to w_i/M within 1/(2Q), so the mean differs from the exact weighted mean of the clipped
updates by at most ``3 n q / (Q * (sum_i w_i / M - n / (2Q)))`` (:func:`quantization_error`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import ERROR, INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, log, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from medsegdiff_core.config import ExperimentConfig, FederationConfig

SECURE_RECORD = "secure-update"  # a site's reply: what it did with its update
MODULUS = 2**32
DEFAULT_MAX_WEIGHT = 1000


def max_weight(fed: FederationConfig) -> int:
    """The most examples a site may claim under secure aggregation."""
    return fed.max_weight or DEFAULT_MAX_WEIGHT


def parameters(fed: FederationConfig) -> dict[str, Any]:
    """The protocol's settings, as state.json and the model card state them."""
    return {
        "protocol": "SecAgg+ (Bell et al. 2020), Flower SecAggPlusWorkflow / secaggplus_mod",
        "num_shares": fed.num_shares,
        "reconstruction_threshold": fed.reconstruction_threshold,
        "update_clip_norm": fed.update_clip_norm,
        "quantization_clip": fed.quantization_clip,
        "quantization_range": fed.quantization_range,
        "modulus_range": MODULUS,
        "max_weight": max_weight(fed),
    }


def quantization_error(
    n: int, weights: list[int], *, clip: float, levels: int, max_weight: int
) -> float:
    """Bound on the error of one weight of the unmasked mean update (module docstring)."""
    total = sum(weights) / max_weight - n / (2 * levels)
    if total <= 0:
        return math.inf
    return 3 * n * clip / (levels * total)


@dataclass
class SecureRound:
    """What one SecAgg+ round gave the server."""

    sampled: int = 0
    replies: list[Message] = field(default_factory=list)  # the masked-vector stage's replies
    mean_update: list[np.ndarray] | None = None  # unmasked weighted mean; None: halted
    halted: str | None = None  # why the protocol stopped before unmasking
    bytes_received: int = 0  # every reply of the four stages
    bytes_sent: int = 0


class _RecordingGrid:
    """The grid the workflow talks through: keeps the masked-vector replies (with the sites'
    clear-text records) and counts the bytes of every stage."""

    def __init__(self, grid: Grid, outcome: SecureRound) -> None:
        self._grid = grid
        self._outcome = outcome

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self._outcome.bytes_sent += sum(_content_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._outcome.bytes_received += sum(_content_bytes(m) for m in replies)
        if any(
            m.has_content()
            and RECORD_KEY_CONFIGS in m.content.config_records
            and Key.MASKED_PARAMETERS in m.content[RECORD_KEY_CONFIGS]
            for m in replies
        ):
            self._outcome.replies = replies
        return replies


def _content_bytes(msg: Message) -> int:
    if not msg.has_content():
        return 0
    total = sum(r.count_bytes() for r in msg.content.array_records.values())
    for record in msg.content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total


class _RoundStrategy(LegacyFedAvg):
    """Flower's legacy FedAvg sampling, our round config, and the unmasked mean kept as is
    (every result carries it: averaging them again would only add rounding)."""

    def __init__(self, fed: FederationConfig) -> None:
        super().__init__(
            fraction_fit=fed.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=fed.min_sites,
            min_evaluate_clients=fed.min_sites,
            min_available_clients=fed.min_available_sites,
            accept_failures=True,
        )
        self.fit_config: dict[str, Any] = {}
        self.aggregated: Parameters | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        sampled = super().configure_fit(server_round, parameters, client_manager)
        return [(proxy, FitIns(ins.parameters, dict(self.fit_config))) for proxy, ins in sampled]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: Any
    ) -> tuple[Parameters | None, dict[str, Any]]:
        self.aggregated = results[0][1].parameters if results else None
        return self.aggregated, {}


class _ScreenedSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ that stops before unmasking when too few sites sent a real (weighted) update."""

    def __init__(self, *args: Any, min_contributors: int, outcome: SecureRound, **kw: Any):
        super().__init__(*args, **kw)
        self.min_contributors = min_contributors
        self.outcome = outcome

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        if not super().collect_masked_vectors_stage(grid, context, state):
            self.outcome.halted = "too few sites stayed for SecAgg+ to unmask the sum"
            return False
        contributors = sum(1 for _, res in state.legacy_results if res.num_examples > 0)
        if contributors < self.min_contributors:
            self.outcome.halted = (
                f"{contributors} sites sent a weighted update, fewer than "
                f"{self.min_contributors}: the sum is not unmasked"
            )
            return False
        return True

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        done = super().unmask_stage(grid, context, state)
        if not done and self.outcome.halted is None:
            self.outcome.halted = "not enough key shares to unmask the sum"
        return done


class SecureAggregation:
    """Runs each training round of a run through SecAgg+ (see the module docstring)."""

    def __init__(self, config: ExperimentConfig, context: Context) -> None:
        self.fed = config.federation
        self.strategy = _RoundStrategy(self.fed)
        self.client_manager = SimpleClientManager()
        self._proxies: dict[int, GridClientProxy] = {}
        own = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=dict(context.node_config),
            state=RecordDict(),
            run_config=dict(context.run_config),
        )
        self.context = LegacyContext(
            own,
            config=ServerConfig(num_rounds=self.fed.rounds),
            strategy=self.strategy,
            client_manager=self.client_manager,
        )

    def _sync_nodes(self, grid: Grid) -> None:
        connected = set(grid.get_node_ids())
        for node_id in set(self._proxies) - connected:
            self.client_manager.unregister(self._proxies.pop(node_id))
        for node_id in connected - set(self._proxies):
            proxy = GridClientProxy(node_id=node_id, grid=grid, run_id=grid.run.run_id)
            if self.client_manager.register(proxy):
                self._proxies[node_id] = proxy

    def round_config(self, server_round: int, run_uid: str) -> dict[str, Any]:
        fed = self.fed
        config: dict[str, Any] = {
            "server-round": server_round,
            "run-uid": run_uid,
            "update-clip-norm": fed.update_clip_norm,
            "quantization-clip": fed.quantization_clip,
            "max-weight": max_weight(fed),
        }
        if fed.strategy == "fedprox":
            config["proximal-mu"] = fed.proximal_mu
        return config

    def train(
        self, server_round: int, grid: Grid, arrays: ArrayRecord, run_uid: str
    ) -> SecureRound:
        """One training round: sample, run the four SecAgg+ stages, unmask the mean update."""
        fed = self.fed
        outcome = SecureRound()
        self._sync_nodes(grid)
        available = self.client_manager.num_available()
        if available < fed.min_available_sites:
            outcome.halted = (
                f"{available} sites connected, fewer than federation.min_available_sites="
                f"{fed.min_available_sites}"
            )
            return outcome
        sampled = self.strategy.num_fit_clients(available)[0]
        if sampled * fed.quantization_range >= MODULUS:
            outcome.halted = (
                f"{sampled} sites x federation.quantization_range={fed.quantization_range} "
                "would overflow the 2**32 modulus"
            )
            return outcome
        outcome.sampled = sampled
        self.strategy.fit_config = self.round_config(server_round, run_uid)
        self.strategy.aggregated = None
        state = self.context.state
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        state.array_records[MAIN_PARAMS_RECORD] = arrays
        workflow = _ScreenedSecAggPlus(
            fed.num_shares,
            fed.reconstruction_threshold,
            max_weight=float(max_weight(fed)),
            clipping_range=fed.quantization_clip,
            quantization_range=fed.quantization_range,
            modulus_range=MODULUS,
            timeout=fed.round_timeout_s,
            min_contributors=max(2, fed.min_sites),
            outcome=outcome,
        )
        log(INFO, "round %d: secure aggregation (SecAgg+) of %d sites", server_round, sampled)
        workflow(_RecordingGrid(grid, outcome), self.context)  # type: ignore[arg-type]
        del state.array_records[MAIN_PARAMS_RECORD]
        if outcome.halted is None and self.strategy.aggregated is None:
            outcome.halted = "SecAgg+ returned no aggregate"
        if outcome.halted is None:
            outcome.mean_update = parameters_to_ndarrays(self.strategy.aggregated)
        else:
            log(ERROR, "round %d: secure aggregation halted: %s", server_round, outcome.halted)
        return outcome


def check_aggregate(
    mean_update: list[np.ndarray], global_arrays: ArrayRecord, bound: float
) -> tuple[float, str | None]:
    """The mean update's L2 norm, and why it is refused (None: it is accepted)."""
    if len(mean_update) != len(global_arrays):
        return math.nan, f"{len(mean_update)} arrays, the global model has {len(global_arrays)}"
    for (key, base), update in zip(global_arrays.items(), mean_update, strict=True):
        if tuple(update.shape) != tuple(base.shape):
            return math.nan, f"{key}: shape {tuple(update.shape)} != {tuple(base.shape)}"
        if not np.isfinite(update).all():
            return math.nan, f"{key}: the aggregate contains NaN or Inf"
    norm = math.sqrt(sum(float(np.dot(u.ravel(), u.ravel())) for u in mean_update))
    if norm > bound:
        return norm, f"the aggregate update's norm {norm:.4g} is over the bound {bound:.4g}"
    return norm, None


def apply_update(global_arrays: ArrayRecord, mean_update: list[np.ndarray]) -> ArrayRecord:
    """Global weights plus the mean update, in the global weights' dtypes (integer buffers
    are kept as they are)."""
    result = {}
    for (key, base), update in zip(global_arrays.items(), mean_update, strict=True):
        value = base.numpy()
        if np.issubdtype(value.dtype, np.floating):
            value = (value.astype(np.float64) + update).astype(value.dtype)
        result[key] = Array(np.asarray(value))
    return ArrayRecord(result)


def site_report(msg: Message) -> dict[str, Any] | None:
    """A site's ``secure-update`` record (None when it sent none)."""
    if msg.has_error() or SECURE_RECORD not in msg.content.config_records:
        return None
    return dict(msg.content[SECURE_RECORD])


__all__ = [
    "SecureAggregation",
    "SecureRound",
    "apply_update",
    "check_aggregate",
    "max_weight",
    "parameters",
    "quantization_error",
    "site_report",
]


def screen_secure(
    replies: list[Message], site_name: Any
) -> tuple[list[Message], list[tuple[str, str]], list[tuple[str, int, int]], list[str]]:
    """Sort the masked-vector replies: accepted (a weighted update), rejected (site, reason:
    refused by the site's own check, or dropped out), capped claims (site, claimed, used) and
    the sites that clipped. Declined rounds are left to the caller (privacy records)."""
    accepted, rejected, capped, clipped = [], [], [], []
    for msg in replies:
        site = site_name(msg)
        if msg.has_error():
            rejected.append((site, f"dropped out of the round: {msg.error.reason}"))
            continue
        report = site_report(msg)
        if report is None or "metrics" not in msg.content.metric_records:
            rejected.append((site, "reply lacks the secure-update or metrics record"))
            continue
        if report.get("status") == "declined":
            continue
        if report.get("status") != "ok" or int(report.get("weight", 0)) <= 0:
            reason = str(report.get("reason") or "no weight")
            rejected.append((site, f"refused by the site's own check: {reason}"))
            continue
        accepted.append(msg)
        if int(report["claimed"]) > int(report["weight"]):
            capped.append((site, int(report["claimed"]), int(report["weight"])))
        if report.get("clipped"):
            clipped.append(site)
    accepted.sort(key=site_name)
    return accepted, rejected, capped, sorted(clipped)
