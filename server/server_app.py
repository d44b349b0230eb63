"""The Flower ServerApp: federated rounds with FedAvg or FedProx, a checkpoint every round,
resume after a crash, and a signed model release at the end.

The round loop is ours (so that it can start at any round and screen updates); configuring and
averaging are Flower's own strategies.
"""

from __future__ import annotations

import math
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from medsegdiff_core.checkpoint import save_experiment_checkpoint
from medsegdiff_core.config import ExperimentConfig, config_from_run_config, resolve_workdir
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.privacy import epsilon_of
from medsegdiff_core.release import (
    PASSPHRASE_ENV,
    generate_signing_key,
    load_private_key,
    passphrase_from_env,
    public_path,
    write_release,
)
from medsegdiff_core.training import seed_everything

from .central_dp import CentralDP
from .run_store import RunState, RunStore, registered_examples
from .server_momentum import ServerMomentum
from .telemetry import round_counts
from .validation import cap_claimed_examples, screen_updates, site_name

APP_ROOT = Path(__file__).resolve().parents[1]

app = ServerApp()


class NothingTrainedError(RuntimeError):
    """No round of the run succeeded: there is no trained model to release."""


def make_strategy(config: ExperimentConfig) -> Strategy:
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
        strategy: FedAvg = FedProx(proximal_mu=fed.proximal_mu, **common)
    else:
        strategy = FedAvg(**common)
    return strategy


def make_central_dp(config: ExperimentConfig) -> CentralDP | None:
    pc = config.privacy
    if not pc.central:
        return None
    assert pc.central_clipping_norm is not None  # the config requires it
    return CentralDP(pc.central_noise_multiplier, pc.central_clipping_norm)


def _declined(msg: Message) -> bool:
    """A site that declined the round (its privacy budget would be exceeded)."""
    return (
        not msg.has_error()
        and "privacy" in msg.content.config_records
        and bool(msg.content["privacy"].get("declined", False))
    )


def _privacy_records(replies: list[Message]) -> dict[str, dict[str, Any]]:
    return {
        site_name(m): dict(m.content["privacy"])
        for m in replies
        if not m.has_error() and "privacy" in m.content.config_records
    }


def initial_weights(config: ExperimentConfig) -> ArrayRecord:
    seed_everything(config.train.seed)
    return ArrayRecord(MedSegDiffUNet(config.unet_spec()).state_dict())


def _site_metrics(replies: list[Message]) -> dict[str, dict[str, Any]]:
    return {site_name(m): dict(m.content["metrics"]) for m in replies if not m.has_error()}


def _wait_for_sites(grid: Grid, minimum: int, *, timeout_s: float) -> None:
    """Wait until ``minimum`` SuperNodes are connected (or the timeout passes).

    Flower's strategies size a round's sample from the nodes connected when they are asked,
    before waiting for ``min_available_nodes``; a site still reconnecting after a restart would
    otherwise be left out of the round even with ``fraction_train=1``."""
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < minimum and time.monotonic() < deadline:
        time.sleep(1.0)


def run_round(
    server_round: int,
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    config: ExperimentConfig,
    *,
    momentum: ServerMomentum,
    run_uid: str,
    central: CentralDP | None = None,
    registered: dict[str, int] | None = None,
) -> tuple[ArrayRecord, dict[str, Any]]:
    """Train on the sites, screen and average their updates, apply the server momentum,
    evaluate; return new weights and the round's record for the history.

    A site whose privacy budget would be exceeded declines: it is logged by name, left out
    without counting as a rejected update, and the round goes on with the others. Claimed
    example counts are capped (``cap_claimed_examples``) against ``registered``, each site's
    first claim in the run. With ``central`` the round is averaged by :class:`CentralDP`."""
    fed = config.federation
    _wait_for_sites(grid, fed.min_available_sites, timeout_s=fed.round_timeout_s)
    start = time.monotonic()
    instructions = list(
        strategy.configure_train(server_round, arrays, ConfigRecord({"run-uid": run_uid}), grid)
    )
    replies = list(grid.send_and_receive(instructions, timeout=fed.round_timeout_s))
    replies_s = time.monotonic() - start
    declined = sorted((m for m in replies if _declined(m)), key=site_name)
    for msg in declined:
        log(
            WARNING,
            "round %d: %s declined to train: %s",
            server_round,
            site_name(msg),
            msg.content["privacy"].get("reason", ""),
        )
    privacy = _privacy_records(replies)
    replies = [m for m in replies if not _declined(m)]
    screening = screen_updates(
        replies, arrays, norm_factor=None if central else fed.norm_outlier_factor
    )
    for site, reason in screening.rejected:
        log(WARNING, "round %d: update from %s rejected: %s", server_round, site, reason)
    capped = cap_claimed_examples(
        screening.accepted, max_ratio=fed.max_weight_ratio, registered=registered or {}
    )
    for claim in capped:
        log(
            WARNING,
            "round %d: %s claimed %d examples; weighted as %d (federation.max_weight_ratio=%g "
            "times the round's median, and at most its first claim in the run)",
            server_round,
            claim.site,
            claim.claimed,
            claim.used,
            fed.max_weight_ratio,
        )
    record: dict[str, Any] = {
        "round": server_round,
        "sites_trained": sorted(site_name(m) for m in screening.accepted),
        "rejected": [{"site": s, "reason": r} for s, r in screening.rejected],
        "declined": [
            {"site": site_name(m), "reason": str(m.content["privacy"].get("reason", ""))}
            for m in declined
        ],
        "privacy": privacy,
        "capped_examples": [{"site": c.site, "claimed": c.claimed, "used": c.used} for c in capped],
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
        if central is not None:
            new_arrays = central.aggregate(
                arrays, [m.content["arrays"] for m in screening.accepted], len(instructions)
            )
            train_metrics = aggregate_metricrecords(
                [m.content for m in screening.accepted], "num-examples"
            )
            record["central_dp"] = {
                "sites_sampled": len(instructions),
                "updates_averaged": len(screening.accepted),
            }
        else:
            new_arrays, train_metrics = strategy.aggregate_train(server_round, screening.accepted)
        if new_arrays is not None:
            arrays = momentum.step(arrays, new_arrays)
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
    record["train_replies_s"] = replies_s  # the rest of train_wall is screening and averaging
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
    checkpoint = save_experiment_checkpoint(
        store.directory / "final" / "model", model, config, rounds=state.completed_round
    )
    key_path = workdir / "keys" / "release-signing.pem"
    passphrase = passphrase_from_env()
    if not key_path.exists():
        generate_signing_key(key_path, passphrase)
        log(
            WARNING if passphrase is None else INFO,
            "created release signing key %s, mode 0600, %s; give hospitals %s",
            key_path,
            "encrypted with $" + PASSPHRASE_ENV
            if passphrase
            else "NOT encrypted (set $" + PASSPHRASE_ENV + " to encrypt it)",
            public_path(key_path),
        )
    return write_release(
        checkpoint,
        workdir / "releases",
        config.federation.release_name,
        model_card(config, state, model),
        load_private_key(key_path, passphrase),
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
            "server_momentum": fed.server_momentum,
            "server_lr": fed.server_lr,
            "sites_keep_optimizer_state": fed.keep_optimizer_state,
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
        "privacy": privacy_card(config, state),
        "rounds": round_counts(state.history),
    }


def privacy_card(config: ExperimentConfig, state: RunState) -> dict[str, Any]:
    """The model card's privacy section: each site's final epsilon and delta, as the sites
    reported them, and the central DP guarantee when the server added one."""
    sites: dict[str, dict[str, Any]] = {}
    for record in state.history:
        trained = set(record.get("sites_trained", []))
        declined = {d["site"] for d in record.get("declined", [])}
        for site, reported in record.get("privacy", {}).items():
            entry = sites.setdefault(
                site, {"dp": True, "rounds_trained": [], "declined_rounds": []}
            )
            if site in trained:
                entry["rounds_trained"].append(record["round"])
                if not reported.get("enabled"):
                    entry["dp"] = False  # one round without DP voids the site's guarantee
            if site in declined:
                entry["declined_rounds"].append(record["round"])
            if reported.get("enabled"):
                entry["reported"] = reported
    per_site: dict[str, dict[str, Any]] = {}
    for site, entry in sorted(sites.items()):
        reported = entry.pop("reported", None)
        if not entry["rounds_trained"] and reported is None:
            continue
        if entry["dp"] and reported is not None:
            entry |= {
                "epsilon": reported["epsilon"],
                "delta": reported["delta"],
                "target_epsilon": reported["target-epsilon"],
                "noise_multiplier": reported["noise-multiplier"],
                "sample_rate": reported["sample-rate"],
                "max_grad_norm": reported["max-grad-norm"],
                "train_slices": reported["num-examples"],
            }
        else:
            entry |= {"dp": False, "epsilon": None, "delta": None}
        per_site[site] = entry
    dp_sites = [s for s, e in per_site.items() if e["dp"]]
    if dp_sites and len(dp_sites) == len(per_site):
        summary = "per-site DP-SGD (Opacus) at every site"
    elif dp_sites:
        summary = "per-site DP-SGD (Opacus) at " + ", ".join(dp_sites) + " only"
    else:
        summary = "off"
    if config.privacy.central:
        summary += "; central DP on the aggregate (server side)"
    card: dict[str, Any] = {
        "differential_privacy": summary,
        "local": {
            "unit": "one training slice (2-D image + mask) of a site",
            "guarantee": (
                "(epsilon, delta)-DP of everything the site sent, over all rounds it trained "
                "in; Opacus RDP accountant, Poisson sampling, per-sample clipping"
            ),
            "not_covered": [
                "federated evaluation: each site's Dice on its validation split is exact",
                "each site's number of training slices (FedAvg weights) is reported exactly",
                "a patient with k slices is protected at k * epsilon (group privacy)",
            ],
        },
        "sites": per_site,
        "central": central_card(config, state),
    }
    return card


def central_card(config: ExperimentConfig, state: RunState) -> dict[str, Any] | None:
    """Server-side central DP: what it adds and protects (None when off)."""
    pc = config.privacy
    if not pc.central:
        return None
    releases = sum(1 for r in state.history if "central_dp" in r)
    sampled = [r["central_dp"].get("sites_sampled") for r in state.history if "central_dp" in r]
    epsilon = epsilon_of([(pc.central_noise_multiplier, 1.0, releases)], pc.central_delta)
    return {
        "mechanism": "each accepted site update clipped to L2 norm C, summed and divided by "
        "the k sites sampled for the round (a sampled site without an accepted update adds "
        "zero), Gaussian noise of std sigma * C / k added; no screening that compares sites "
        "before clipping",
        "sites_sampled_per_round": sampled,
        "noise_multiplier": pc.central_noise_multiplier,
        "clipping_norm": pc.central_clipping_norm,
        "noisy_rounds": releases,
        "epsilon": epsilon if math.isfinite(epsilon) else None,  # None: no noise, no guarantee
        "delta": pc.central_delta,
        "protects": "site-level: whether any one site took part, and its whole data, against "
        "everyone who sees the global models or the release (sites, model users)",
        "does_not_protect": "anything from the server itself, which sees each site's raw "
        "update before clipping and noise (local DP-SGD at the sites protects against it); "
        "the guarantee assumes every site is sampled each round (no amplification counted)",
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
    central = make_central_dp(config)
    fed = config.federation
    momentum = ServerMomentum(fed.server_momentum, fed.server_lr, state.velocity)
    for server_round in range(state.completed_round + 1, fed.rounds + 1):
        log(INFO, "[ROUND %d/%d]", server_round, fed.rounds)
        arrays, record = run_round(
            server_round,
            grid,
            strategy,
            arrays,
            config,
            momentum=momentum,
            run_uid=state.uid,
            central=central,
            registered=registered_examples(state.history),
        )
        store.save_round(state, model_from(arrays, config), record, momentum.velocity)
        log(
            INFO,
            "round %d: train %s, evaluate %s",
            server_round,
            record["train"],
            record["evaluate"],
        )
        if record.get("failed") and record["declined"]:
            # A budget only shrinks: the sites that declined would decline every later round.
            log(
                ERROR,
                "round %d: too few sites have privacy budget left (%s declined) for "
                "federation.min_sites=%d; training stops here",
                server_round,
                ", ".join(d["site"] for d in record["declined"]),
                config.federation.min_sites,
            )
            break
    counts = round_counts(state.history)
    if counts["rounds_succeeded"] == 0:
        message = (
            f"no round of {config.name} succeeded ({counts['rounds_failed']} failed, "
            f"{counts['updates_rejected']} updates rejected, {counts['updates_declined']} "
            f"declined; see {store.state_path}): nothing trained, so no release is signed"
        )
        log(ERROR, message)
        raise NothingTrainedError(message)
    release = publish_release(config, store, state, arrays, workdir)
    log(INFO, "released %s", release)
