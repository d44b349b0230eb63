"""The Flower ServerApp: federated rounds with FedAvg or FedProx, started from a random
initialisation or a verified public release, a checkpoint every round, resume after a crash, and
a signed model release at the end.

The round loop is ours (so that it can start at any round and screen updates); configuring and
averaging are Flower's own strategies.
"""

from __future__ import annotations

import math
import re
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from medsegdiff_core.checkpoint import check_architecture, save_experiment_checkpoint
from medsegdiff_core.config import (
    ExperimentConfig,
    FederationConfig,
    config_from_run_config,
    resolve_workdir,
)
from medsegdiff_core.errors import CheckpointError
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.records import (
    NUM_EXAMPLES,
    CappedClaim,
    CentralDPRound,
    PrivacyRecord,
    RecordError,
    RoundRecord,
    SecureAggregationRound,
    SiteMetrics,
    SiteReason,
    round_counts,
)
from medsegdiff_core.release import (
    PASSPHRASE_ENV,
    TRAINING_HISTORY,
    ReleaseError,
    generate_signing_key,
    load_private_key,
    load_release,
    passphrase_from_env,
    public_path,
    write_release,
)
from medsegdiff_core.training import seed_everything

from .central_dp import CentralDP
from .model_card import model_card
from .run_store import RunState, RunStore, registered_examples
from .secure_aggregation import (
    SecureAggregation,
    SecureRound,
    apply_update,
    check_aggregate,
    quantization_error,
    screen_secure,
)
from .secure_aggregation import max_weight as secure_max_weight
from .server_momentum import ServerMomentum
from .validation import CappedClaim as CappedClaimUsed
from .validation import Screening, cap_claimed_examples, screen_updates, site_name

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


def _privacy_of(msg: Message) -> PrivacyRecord | None:
    """The privacy record a site sent with its reply (None: none, or one that does not parse,
    which screening then rejects)."""
    if msg.has_error() or "privacy" not in msg.content.config_records:
        return None
    try:
        return PrivacyRecord.from_config(msg.content["privacy"])
    except RecordError:
        return None


def _declined(msg: Message) -> bool:
    """A site that declined the round (its privacy budget would be exceeded)."""
    privacy = _privacy_of(msg)
    return privacy is not None and privacy.declined


def _privacy_records(replies: list[Message]) -> dict[str, PrivacyRecord]:
    return {site_name(m): p for m in replies if (p := _privacy_of(m)) is not None}


def initial_weights(config: ExperimentConfig) -> ArrayRecord:
    seed_everything(config.train.seed)
    return ArrayRecord(MedSegDiffUNet(config.unet_spec()).state_dict())


_RELEASE_FOLDER = re.compile(r"(.+)-v(\d+)")


def workdir_path(workdir: Path, value: str) -> Path:
    """A path from the config: absolute, or taken from the workdir."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else workdir / path


def describe_start(start: dict[str, Any] | None) -> str:
    """How a run's round 1 began, in words (state.json's ``initial_release``, or None)."""
    if start is None:
        return "a random initialisation"
    return (
        f"release {start['name']} v{start['version']} "
        f"(manifest sha256 {str(start['manifest_sha256'])[:16]}...)"
    )


def release_weights(config: ExperimentConfig, workdir: Path) -> tuple[ArrayRecord, dict[str, Any]]:
    """Round 1's weights from ``federation.initial_release``, and what state.json and the model
    card record of that release.

    The release is verified as ``medsegdiff predict --release`` verifies one
    (:func:`~medsegdiff_core.release.load_release`: the signature with
    ``federation.initial_release_public_key``, every file's digest, the manifest's name, here
    the one its folder ``<name>-v<N>`` is named with, and its version that N); the model is
    built from the verified bytes and must have the experiment's architecture. Every failure is
    one :class:`ReleaseError` line naming the release.
    """
    fed = config.federation
    assert fed.initial_release is not None and fed.initial_release_public_key is not None
    path = workdir_path(workdir, fed.initial_release)
    where = f"federation.initial_release {path}"
    folder = _RELEASE_FOLDER.fullmatch(path.name)
    if folder is None:
        raise ReleaseError(f"{where}: not a release folder (named <name>-v<N>, as releases are)")
    if not path.is_dir():
        raise ReleaseError(f"{where}: release folder not found")
    try:
        loaded = load_release(
            path,
            workdir_path(workdir, fed.initial_release_public_key),
            expected_name=folder.group(1),
        )
    except CheckpointError as exc:
        raise ReleaseError(f"federation.initial_release: {exc}") from None
    identity = dict(loaded.metadata["release_identity"])
    named = f"{identity['name']} v{identity['version']}"
    if identity["version"] != int(folder.group(2)):
        raise ReleaseError(
            f"{where}: the signed manifest is {named}, not the folder's v{folder.group(2)}"
        )
    try:
        check_architecture(loaded.spec, config.unet_spec(), source=f"{where} ({named})")
    except CheckpointError as exc:
        raise ReleaseError(str(exc)) from None
    weights = in_model_order(config, loaded.model.state_dict())
    return weights, identity | {"path": str(path)}


def check_resumed_start(
    config: ExperimentConfig, workdir: Path, state: RunState, source: Path
) -> None:
    """A resumed run continues from its own checkpoint; refuse a config that names another
    starting point than the one ``state.json`` records (the same release moved elsewhere, by
    its signed manifest's digest, is the same starting point)."""
    recorded = state.initial_release
    configured = config.federation.initial_release
    if configured is None and recorded is None:
        return
    if (
        recorded is not None
        and configured is not None
        and str(workdir_path(workdir, configured)) == recorded.get("path")
    ):
        return
    now = release_weights(config, workdir)[1] if configured is not None else None
    if (
        now is not None
        and recorded is not None
        and now["manifest_sha256"] == recorded.get("manifest_sha256")
    ):
        return
    raise CheckpointError(
        f"{source}: this run started from {describe_start(recorded)}, but "
        f"federation.initial_release now starts from {describe_start(now)}; a resumed run keeps "
        "its starting point: restore the setting, or give the experiment another name"
    )


def starting_weights(
    config: ExperimentConfig,
    workdir: Path,
    state: RunState,
    weights: dict[str, torch.Tensor] | None,
    store: RunStore,
) -> ArrayRecord:
    """The global model the next round starts from: the run's own checkpoint when it resumes,
    else ``federation.initial_release`` (recorded in ``state``), else a random initialisation."""
    if weights is not None:
        check_resumed_start(config, workdir, state, store.state_path)
        return in_model_order(config, weights)
    if config.federation.initial_release is None:
        state.initial_release = None
        return initial_weights(config)
    seed_everything(config.train.seed)  # the server's own draws, as from a random start
    arrays, state.initial_release = release_weights(config, workdir)
    log(
        INFO,
        "round 1 starts from %s at %s",
        describe_start(state.initial_release),
        state.initial_release["path"],
    )
    return arrays


def in_model_order(config: ExperimentConfig, weights: dict[str, torch.Tensor]) -> ArrayRecord:
    """Checkpointed weights in the network's state-dict order. safetensors stores keys sorted,
    and secure aggregation sends the weights as an ordered list that each site names with its
    own architecture's order: a resumed run must send them in that order too."""
    with torch.device("meta"):  # the keys only: no memory, and no draw from the RNG
        keys = MedSegDiffUNet(config.unet_spec()).state_dict().keys()
    return ArrayRecord({key: weights[key] for key in keys})


def _site_metrics(replies: list[Message], server_round: int) -> dict[str, SiteMetrics]:
    """Each replying site's metrics; one that does not parse is logged and left out."""
    metrics: dict[str, SiteMetrics] = {}
    for msg in replies:
        if msg.has_error():
            continue
        source = f"{site_name(msg)}'s metrics"
        try:
            metrics[site_name(msg)] = SiteMetrics.from_dict(msg.content["metrics"], source=source)
        except RecordError as exc:
            log(ERROR, "round %d: %s", server_round, exc)
    return metrics


def _averaged(metrics: Any, server_round: int, extra: dict[str, Any] | None = None) -> SiteMetrics:
    """Flower's weighted average of the sites' metrics (empty when it does not parse: logged)."""
    try:
        return SiteMetrics.from_dict(dict(metrics or {}) | (extra or {}), source="averaged metrics")
    except RecordError as exc:
        log(ERROR, "round %d: %s", server_round, exc)
        return SiteMetrics()


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
    secure: SecureAggregation | None = None,
) -> tuple[ArrayRecord, RoundRecord]:
    """Train on the sites, screen and average their updates, apply the server momentum,
    evaluate; return new weights and the round's record for the history.

    A site whose privacy budget would be exceeded declines: it is logged by name, left out
    without counting as a rejected update, and the round goes on with the others. Claimed
    example counts are capped (``cap_claimed_examples``) against ``registered``, each site's
    first claim in the run. With ``central`` the round is averaged by :class:`CentralDP`; with
    ``secure`` it is trained through SecAgg+ (:mod:`server.secure_aggregation`): the sites
    screen, clip and weight their own updates and the server checks the unmasked mean."""
    fed = config.federation
    _wait_for_sites(grid, fed.min_available_sites, timeout_s=fed.round_timeout_s)
    start = time.monotonic()
    outcome: SecureRound | None = None
    if secure is not None:
        outcome = secure.train(server_round, grid, arrays, run_uid)
        replies, sampled = outcome.replies, outcome.sampled
    else:
        instructions = list(
            strategy.configure_train(server_round, arrays, ConfigRecord({"run-uid": run_uid}), grid)
        )
        replies = list(grid.send_and_receive(instructions, timeout=fed.round_timeout_s))
        sampled = len(instructions)
    replies_s = time.monotonic() - start
    declined = sorted((m for m in replies if _declined(m)), key=site_name)
    privacy = _privacy_records(replies)
    for msg in declined:
        log(
            WARNING,
            "round %d: %s declined to train: %s",
            server_round,
            site_name(msg),
            privacy[site_name(msg)].reason or "",
        )
    replies = [m for m in replies if not _declined(m)]
    clipped: list[str] = []
    if outcome is not None:
        accepted, rejected, cut, clipped = screen_secure(replies, site_name)
        screening = Screening(accepted, rejected)
        capped = [CappedClaimUsed(site, claimed, used) for site, claimed, used in cut]
    else:
        screening = screen_updates(
            replies, arrays, norm_factor=None if central else fed.norm_outlier_factor
        )
        capped = cap_claimed_examples(
            screening.accepted,
            max_ratio=fed.max_weight_ratio,
            registered=registered or {},
            max_weight=fed.max_weight,
        )
    for site, reason in screening.rejected:
        log(WARNING, "round %d: update from %s rejected: %s", server_round, site, reason)
    for site in clipped:
        log(INFO, "round %d: %s clipped its update to the announced bound", server_round, site)
    for claim in capped:
        log(
            WARNING,
            "round %d: %s claimed %d examples; weighted as %d (%s)",
            server_round,
            claim.site,
            claim.claimed,
            claim.used,
            f"federation.max_weight={secure_max_weight(fed)}, applied by the site"
            if outcome is not None
            else f"federation.max_weight_ratio={fed.max_weight_ratio:g} times the round's "
            "median, at most its first claim in the run and federation.max_weight",
        )
    record = RoundRecord(
        round=server_round,
        sites_trained=sorted(site_name(m) for m in screening.accepted),
        rejected=[SiteReason(site=s, reason=r) for s, r in screening.rejected],
        declined=[
            SiteReason(site=site_name(m), reason=privacy[site_name(m)].reason or "")
            for m in declined
        ],
        privacy=privacy,
        capped_examples=[CappedClaim(site=c.site, claimed=c.claimed, used=c.used) for c in capped],
    )
    if outcome is not None:
        record.secure_aggregation = SecureAggregationRound(
            sites_sampled=outcome.sampled,
            masked_vectors=sum(1 for m in outcome.replies if not m.has_error()),
            contributors=len(screening.accepted),
            clipped=clipped,
            dropped=sorted(site_name(m) for m in outcome.replies if m.has_error())
            + ["(no reply)"] * max(0, outcome.sampled - len(outcome.replies)),
            halted=outcome.halted,
            bytes_received=outcome.bytes_received,
            bytes_sent=outcome.bytes_sent,
        )
    if len(screening.accepted) < fed.min_sites:
        log(
            ERROR,
            "round %d: %d usable updates, fewer than federation.min_sites=%d; global model kept",
            server_round,
            len(screening.accepted),
            fed.min_sites,
        )
        record.failed = True
    elif outcome is not None:
        arrays = _apply_secure(
            server_round, outcome, arrays, screening.accepted, fed, momentum, record
        )
        if not record.failed:
            train_metrics = aggregate_metricrecords(
                [RecordDict({"metrics": m.content["metrics"]}) for m in screening.accepted],
                NUM_EXAMPLES,
            )
            total = sum(int(m.content["metrics"][NUM_EXAMPLES]) for m in screening.accepted)
            record.train = _averaged(train_metrics, server_round, {NUM_EXAMPLES: total})
    else:
        if central is not None:
            new_arrays = central.aggregate(
                arrays, [m.content["arrays"] for m in screening.accepted], sampled
            )
            train_metrics = aggregate_metricrecords(
                [m.content for m in screening.accepted], NUM_EXAMPLES
            )
            record.central_dp = CentralDPRound(
                sites_sampled=sampled, updates_averaged=len(screening.accepted)
            )
        else:
            new_arrays, train_metrics = strategy.aggregate_train(server_round, screening.accepted)
        if new_arrays is not None:
            arrays = momentum.step(arrays, new_arrays)
        # Flower's weighted average drops the weighting key; the total is worth keeping.
        total = sum(int(m.content["metrics"][NUM_EXAMPLES]) for m in screening.accepted)
        record.train = _averaged(train_metrics, server_round, {NUM_EXAMPLES: total})
    train_wall = time.monotonic() - start
    record.site_train = _site_metrics(screening.accepted, server_round)
    slowest = max((m.train_seconds or 0.0 for m in record.site_train.values()), default=0.0)
    record.train_wall_s = train_wall
    record.train_replies_s = replies_s  # the rest of train_wall is screening and averaging
    record.round_overhead = train_wall / slowest if slowest > 0 else None
    record.update_bytes = (
        outcome.bytes_received
        if outcome is not None
        else sum(m.content["arrays"].count_bytes() for m in screening.accepted)
    )
    record.model_bytes = arrays.count_bytes()

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
        record.evaluate = _averaged(evaluated, server_round)
        record.site_evaluate = _site_metrics(replies, server_round)
    record.wall_s = time.monotonic() - start
    return arrays, record


def _apply_secure(
    server_round: int,
    outcome: SecureRound,
    arrays: ArrayRecord,
    accepted: list[Message],
    fed: FederationConfig,
    momentum: ServerMomentum,
    record: RoundRecord,
) -> ArrayRecord:
    """Check the unmasked mean update and apply it (with the server momentum); a round whose
    protocol halted or whose aggregate is refused keeps the global model (``record.failed``)."""
    sa = record.secure_aggregation
    assert sa is not None
    if outcome.mean_update is None:
        log(ERROR, "round %d: no aggregate (%s); global model kept", server_round, outcome.halted)
        record.failed = True
        return arrays
    weights = [int(m.content["metrics"][NUM_EXAMPLES]) for m in accepted]
    sa.quantization_error = quantization_error(
        sa.masked_vectors,
        weights,
        clip=fed.quantization_clip,
        levels=fed.quantization_range,
        max_weight=secure_max_weight(fed),
    )
    dimension = sum(int(u.size) for u in outcome.mean_update)
    sa.aggregate_bound = fed.update_clip_norm + math.sqrt(dimension) * sa.quantization_error
    sa.aggregate_norm, problem = check_aggregate(outcome.mean_update, arrays, sa.aggregate_bound)
    if problem is not None:
        log(ERROR, "round %d: aggregate refused: %s; global model kept", server_round, problem)
        sa.aggregate_refused = problem
        record.failed = True
        return arrays
    return momentum.step(arrays, apply_update(arrays, outcome.mean_update))


def model_from(arrays: ArrayRecord, config: ExperimentConfig) -> MedSegDiffUNet:
    model = MedSegDiffUNet(config.unet_spec())
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def publish_release(
    config: ExperimentConfig, store: RunStore, state: RunState, arrays: ArrayRecord, workdir: Path
) -> Path:
    """Save the final model as a checkpoint and package it as a signed, versioned release
    (with the run's training-history plot, when it could be drawn)."""
    model = model_from(arrays, config)
    checkpoint = save_experiment_checkpoint(
        store.directory / "final" / "model", model, config, rounds=state.completed_round
    )
    plot = store.training_history_path  # redrawn after the last round; absent if that failed
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
        extra_files={TRAINING_HISTORY: plot} if plot.is_file() else None,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(context.run_config, APP_ROOT)
    workdir = resolve_workdir(context.run_config.get("workdir") or None)
    store = RunStore(workdir / "runs" / config.name, config)
    state, weights = store.load()
    arrays = starting_weights(config, workdir, state, weights, store)
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
    secure = SecureAggregation(config, context) if fed.secure_aggregation else None
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
            secure=secure,
        )
        store.save_round(state, model_from(arrays, config), record, momentum.velocity)
        log(
            INFO,
            "round %d: train %s, evaluate %s",
            server_round,
            record.train.to_dict(),
            record.evaluate.to_dict(),
        )
        if record.failed and record.declined:
            # A budget only shrinks: the sites that declined would decline every later round.
            log(
                ERROR,
                "round %d: too few sites have privacy budget left (%s declined) for "
                "federation.min_sites=%d; training stops here",
                server_round,
                ", ".join(d.site for d in record.declined),
                config.federation.min_sites,
            )
            break
    counts = round_counts(state.history)
    if counts.rounds_succeeded == 0:
        message = (
            f"no round of {config.name} succeeded ({counts.rounds_failed} failed, "
            f"{counts.updates_rejected} updates rejected, {counts.updates_declined} "
            f"declined; see {store.state_path}): nothing trained, so no release is signed"
        )
        log(ERROR, message)
        raise NothingTrainedError(message)
    release = publish_release(config, store, state, arrays, workdir)
    log(INFO, "released %s", release)
