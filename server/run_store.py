"""A federated run on disk: a checkpoint after every round, so a crashed server resumes.

Layout of ``<workdir>/runs/<experiment name>/``::

    round-0003.{safetensors,json}   the global model after round 3, a full checkpoint (the
                             last ``keep`` rounds are kept; any can be released on demand)
    momentum-0003.safetensors   the server's momentum after round 3 (when it uses momentum)
    state.json               completed round, metric history, config digest, the release
                             round 1 started from (if any) — the commit point
    training-history.png     train loss, validation Dice (and DP epsilon) per round and site,
                             redrawn after every committed round (:mod:`medsegdiff_core.plots`)
    final/model.{safetensors,json}   the final model as a checkpoint, when the run is done

``state.json`` is written last and atomically, so after a crash it always names a round whose
weights are complete on disk. A restarted server with the same experiment config continues at
the next round; since each site seeds its round from (seed, round, site), the resumed run gives
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import log

from medsegdiff_core.checkpoint import (
    atomic_write_bytes,
    load_tensors,
    save_experiment_checkpoint,
    save_tensors,
)
from medsegdiff_core.config import ExperimentConfig
from medsegdiff_core.errors import CheckpointError
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.plots import training_history_plot
from medsegdiff_core.records import (
    RecordError,
    RoundRecord,
    history_from_json,
    history_to_json,
    round_counts,
)
from medsegdiff_core.release import TRAINING_HISTORY

from .secure_aggregation import parameters

# Settings that may change between a crash and the restart without changing the run. The
# starting release is named by paths (which may move); what it was is recorded in state.json
# (``initial_release``) and checked on resume by the server instead.
_RESUMABLE_FIELDS = {
    "federation": {"rounds", "round_timeout_s", "initial_release", "initial_release_public_key"}
}
# Settings added after runs began to be digested: left out of the digest while they are at
# their defaults, so that runs begun before they existed still resume.
_ADDED_FIELDS = {
    "federation": {
        "max_weight",
        "secure_aggregation",
        "num_shares",
        "reconstruction_threshold",
        "update_clip_norm",
        "quantization_clip",
        "quantization_range",
        "simulated_train_slices",
    },
    "inference": {"eta"},
    "privacy": {
        "accountant",
        "expected_batch_size",
        "local_steps",
        "lr",
        "augmentation_multiplicity",
        "trainable",
        "iterate_averaging",
    },
}


def config_digest(config: ExperimentConfig) -> str:
    """sha256 of everything in the config that determines the trained weights."""
    data = config.model_dump(mode="json", exclude=_RESUMABLE_FIELDS)
    for section, keys in _ADDED_FIELDS.items():
        defaults = type(getattr(config, section))().model_dump(mode="json")
        for key in keys:
            if data[section].get(key) == defaults[key]:
                data[section].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def secure_aggregation_settings(config: ExperimentConfig) -> dict[str, Any] | None:
    """What state.json and the model card say about secure aggregation (None: off)."""
    if not config.federation.secure_aggregation:
        return None
    return parameters(config.federation)


def registered_examples(history: list[RoundRecord]) -> dict[str, int]:
    """Each site's first accepted num-examples of the run: the most it may claim later."""
    registered: dict[str, int] = {}
    for record in history:
        for site, metrics in record.site_train.items():
            registered.setdefault(site, metrics.num_examples or 0)
    return registered


@dataclass
class RunState:
    completed_round: int = 0
    history: list[RoundRecord] = field(default_factory=list)
    # Names this run for the sites (their kept optimizer state) across server restarts.
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The server's momentum after ``completed_round`` (empty without momentum).
    velocity: dict[str, torch.Tensor] = field(default_factory=dict)
    # The signed release round 1 started from (name, version, manifest_sha256, signing_key,
    # path); None: a random initialisation (and every run begun before this was recorded).
    initial_release: dict[str, Any] | None = None


class RunStore:
    """Checkpoints and metric history of one federated run."""

    def __init__(self, directory: Path, config: ExperimentConfig, *, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.config = config
        self.digest = config_digest(config)
        self.keep = keep

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    @property
    def training_history_path(self) -> Path:
        return self.directory / TRAINING_HISTORY

    def weights_path(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round:04d}.safetensors"

    def momentum_path(self, server_round: int) -> Path:
        return self.directory / f"momentum-{server_round:04d}.safetensors"

    def load(self) -> tuple[RunState, dict[str, torch.Tensor] | None]:
        """The last completed round and its weights, or a fresh state if nothing was saved."""
        if not self.state_path.exists():
            return RunState(), None
        try:
            saved = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.state_path}: not valid JSON ({exc})") from None
        if saved.get("config_digest") != self.digest:
            raise CheckpointError(
                f"{self.state_path}: this run directory holds a run of a different experiment "
                "config; give the experiment another name or move the directory away"
            )
        try:
            history = history_from_json(saved["history"], source=str(self.state_path))
        except RecordError as exc:
            raise CheckpointError(str(exc)) from None
        state = RunState(saved["completed_round"], history)
        state.uid = saved.get("uid") or state.uid
        state.initial_release = saved.get("initial_release")
        if self.momentum_path(state.completed_round).exists():
            state.velocity = load_tensors(self.momentum_path(state.completed_round))
        weights = load_tensors(self.weights_path(state.completed_round))
        return state, weights

    def save_round(
        self,
        state: RunState,
        model: MedSegDiffUNet,
        record: RoundRecord | Mapping[str, Any],
        velocity: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Persist the model (and the server momentum) after ``record.round``, then commit
        the state."""
        record = RoundRecord.parse(record)
        server_round = record.round
        if velocity:
            save_tensors(self.momentum_path(server_round), velocity)
            state.velocity = velocity
        save_experiment_checkpoint(
            self.weights_path(server_round), model, self.config, round=server_round
        )
        state.completed_round = server_round
        state.history.append(record)
        payload = {
            "config_digest": self.digest,
            "completed_round": state.completed_round,
            "uid": state.uid,
            "counts": round_counts(state.history).to_json(),
            "history": history_to_json(state.history),
        }
        if (secure := secure_aggregation_settings(self.config)) is not None:
            payload["secure_aggregation"] = secure
        if state.initial_release is not None:
            payload["initial_release"] = state.initial_release
        atomic_write_bytes(self.state_path, json.dumps(payload, indent=2).encode())
        self.write_training_history(state.history)
        for old in sorted(self.directory.glob("round-*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        for old in sorted(self.directory.glob("momentum-*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)

    def write_training_history(self, history: list[RoundRecord]) -> Path | None:
        """Redraw ``training-history.png`` from ``history``; None if that failed.

        The plot is a by-product: a failure (bad values, a full disk) logs one warning and the
        run goes on. A plot that could not be redrawn is removed, so the run folder (and the
        release made from it) never holds one that is rounds behind ``state.json``.
        """
        path = self.training_history_path
        try:
            return training_history_plot(history, path)
        except Exception as exc:  # the round is committed already; nothing here may undo it
            log(
                WARNING,
                "%s not written (%s: %s); the run goes on without it",
                path,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
