"""The Flower ServerApp: federated rounds with FedAvg or FedProx, a checkpoint every round,
resume after a crash, and a signed model release at the end.

The round loop is ours (so that it can start at any round and screen updates); configuring and
averaging are Flower's own strategies.
"""

from __future__ import annotations

import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from medsegdiff_core.checkpoint import save_checkpoint
from medsegdiff_core.config import ExperimentConfig, config_from_run_config, resolve_workdir
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.release import (
    generate_signing_key,
    load_private_key,
    public_path,
    write_release,
)
from medsegdiff_core.training import seed_everything

from .run_store import RunState, RunStore
from .validation import screen_updates, site_name

APP_ROOT = Path(__file__).resolve().parents[1]

app = ServerApp()


def make_strategy(config: ExperimentConfig) -> FedAvg:
    """Flower's FedAvg or FedProx, example-weighted, with the configured site minimums."""
    fed = config.federation
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": fed.min_sites,
        "min_evaluate_nodes": min(fed.min_sites, fed.min_available_sites),
        "min_available_nodes": fed.min_available_sites,
    }
    if fed.strategy == "fedprox":
        return FedProx(proximal_mu=fed.proximal_mu, **common)
    return FedAvg(**common)


def initial_weights(config: ExperimentConfig) -> ArrayRecord:
    seed_everything(config.train.seed)
    return ArrayRecord(MedSegDiffUNet(config.unet_spec()).state_dict())


def _site_metrics(replies: list[Message]) -> dict[str, dict[str, Any]]:
    return {site_name(m): dict(m.content["metrics"]) for m in replies if not m.has_error()}


def run_round(
    server_round: int,
    grid: Grid,
    strategy: FedAvg,
    arrays: ArrayRecord,
    config: ExperimentConfig,
) -> tuple[ArrayRecord, dict[str, Any]]:
    """Train on the sites, screen and average their updates, evaluate; return new weights and
    the round's record for the history."""
    fed = config.federation
    start = time.monotonic()
    replies = list(
        grid.send_and_receive(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid),
            timeout=fed.round_timeout_s,
        )
    )
    screening = screen_updates(replies, arrays, norm_factor=fed.norm_outlier_factor)
    for site, reason in screening.rejected:
        log(WARNING, "round %d: update from %s rejected: %s", server_round, site, reason)
    record: dict[str, Any] = {
        "round": server_round,
        "sites_trained": sorted(site_name(m) for m in screening.accepted),
        "rejected": [{"site": s, "reason": r} for s, r in screening.rejected],
        "train": {},
        "evaluate": {},
    }
    if len(screening.accepted) < fed.min_sites:
        log(
            ERROR,
            "round %d: %d usable updates, fewer than federation.min_sites=%d; global model kept",
            server_round,
            len(screening.accepted),
            fed.min_sites,
        )
        record["failed"] = True
    else:
        new_arrays, train_metrics = strategy.aggregate_train(server_round, screening.accepted)
        arrays = new_arrays if new_arrays is not None else arrays
        # Flower's weighted average drops the weighting key; the total is worth keeping.
        record["train"] = dict(train_metrics or {}) | {
            "num-examples": sum(
                int(m.content["metrics"]["num-examples"]) for m in screening.accepted
            )
        }
    train_wall = time.monotonic() - start
    site_train = _site_metrics(screening.accepted)
    slowest = max((m.get("train-seconds", 0.0) for m in site_train.values()), default=0.0)
    record["site_train"] = site_train
    record["train_wall_s"] = train_wall
    record["round_overhead"] = train_wall / slowest if slowest > 0 else None
    record["update_bytes"] = sum(m.content["arrays"].count_bytes() for m in screening.accepted)
    record["model_bytes"] = arrays.count_bytes()

    if fed.fraction_evaluate > 0 and (
        server_round % fed.evaluate_every == 0 or server_round == fed.rounds
    ):
        replies = list(
            grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                timeout=fed.round_timeout_s,
            )
        )
        replies.sort(key=site_name)
        evaluated = strategy.aggregate_evaluate(server_round, replies)
        record["evaluate"] = dict(evaluated or {})
        record["site_evaluate"] = _site_metrics(replies)
    record["wall_s"] = time.monotonic() - start
    return arrays, record


def model_from(arrays: ArrayRecord, config: ExperimentConfig) -> MedSegDiffUNet:
    model = MedSegDiffUNet(config.unet_spec())
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def publish_release(
    config: ExperimentConfig, store: RunStore, state: RunState, arrays: ArrayRecord, workdir: Path
) -> Path:
    """Save the final model as a checkpoint and package it as a signed, versioned release."""
    model = model_from(arrays, config)
    checkpoint = save_checkpoint(
        store.directory / "final" / "model",
        model,
        diffusion=config.diffusion,
        classes=config.data.classes,
        inference=config.inference,
        metadata={
            "experiment": config.name,
            "preset": config.model.preset,
            "rounds": state.completed_round,
        },
    )
    key_path = workdir / "keys" / "release-signing.pem"
    if not key_path.exists():
        generate_signing_key(key_path)
        log(
            INFO,
            "created release signing key %s (give hospitals %s)",
            key_path,
            public_path(key_path),
        )
    return write_release(
        checkpoint,
        workdir / "releases",
        config.federation.release_name,
        model_card(config, state, model),
        load_private_key(key_path),
    )


def model_card(config: ExperimentConfig, state: RunState, model: MedSegDiffUNet) -> dict:
    """What a hospital should know before running the model."""
    last_eval = next((r for r in reversed(state.history) if r.get("evaluate")), {})
    sites: dict[str, int] = {}
    for record in state.history:
        for site, metrics in record.get("site_train", {}).items():
            sites[site] = int(metrics.get("num-examples", 0))
    fed = config.federation
    return {
        "summary": (
            f"MedSegDiff ({config.model.preset} preset) trained with Flower across "
            f"{len(sites)} sites; no images left any site."
        ),
        "model": {
            "preset": config.model.preset,
            "image_size": model.spec.image_size,
            "image_channels": model.spec.image_channels,
            "classes": config.data.classes,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "training": {
            "strategy": fed.strategy,
            "proximal_mu": fed.proximal_mu if fed.strategy == "fedprox" else None,
            "rounds": state.completed_round,
            "local_steps": fed.local_steps,
            "batch_size": config.train.batch_size,
            "lr": config.train.lr,
            "diffusion": config.diffusion.model_dump(),
        },
        "data_sites": [{"site": s, "train_examples": n} for s, n in sorted(sites.items())],
        "evaluation": {
            "round": last_eval.get("round"),
            "sampler": config.inference.sampler,
            "sampling_steps": config.inference.sampling_steps,
            "ensemble": config.inference.ensemble,
            "fusion": config.inference.fusion,
            "global": last_eval.get("evaluate", {}),
            "per_site": last_eval.get("site_evaluate", {}),
        },
        "privacy": {"differential_privacy": "off"},
        "rejected_updates": sum(len(r.get("rejected", [])) for r in state.history),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(context.run_config, APP_ROOT)
    workdir = resolve_workdir(context.run_config.get("workdir") or None)
    store = RunStore(workdir / "runs" / config.name, config)
    state, weights = store.load()
    arrays = ArrayRecord(weights) if weights is not None else initial_weights(config)
    if state.completed_round:
        log(
            INFO,
            "resuming %s after round %d from %s",
            config.name,
            state.completed_round,
            store.directory,
        )
    strategy = make_strategy(config)
    for server_round in range(state.completed_round + 1, config.federation.rounds + 1):
        log(INFO, "[ROUND %d/%d]", server_round, config.federation.rounds)
        arrays, record = run_round(server_round, grid, strategy, arrays, config)
        store.save_round(state, model_from(arrays, config), record)
        log(
            INFO,
            "round %d: train %s, evaluate %s",
            server_round,
            record["train"],
            record["evaluate"],
        )
    release = publish_release(config, store, state, arrays, workdir)
    log(INFO, "released %s", release)
