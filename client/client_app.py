"""The Flower ClientApp each hospital runs: local training and local evaluation.

Every handler reads the global weights from the message, works on the site's own data with the
shared core (``medsegdiff_core``) and replies with weights and numbers only — never images.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from torch.utils.data import Dataset

from medsegdiff_core.config import ExperimentConfig, InferenceConfig
from medsegdiff_core.inference import evaluate_dataset
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.privacy import (
    dp_train_steps,
    make_dp_compatible,
    plan_privacy,
    restrict_trainable,
    secret_generator,
    secret_seed,
)
from medsegdiff_core.records import PrivacyRecord, SiteMetrics
from medsegdiff_core.training import (
    ProximalTerm,
    autocast_dtype,
    make_optimizer,
    random_batches,
    train_steps,
)

from . import optimizer_state, telemetry
from .privacy_state import privacy_record, site_ledger, with_site_privacy
from .secure_update import secure_aggregation_mod
from .site import Site

app = ClientApp()

# Train messages of a SecAgg+ round go through the site's own check, clip and weighting and
# Flower's masking (client/secure_update.py); any other message reaches the handler as is.
TRAIN_MODS = [secure_aggregation_mod]


def _model_from(msg: Message, site: Site) -> MedSegDiffUNet:
    """The site's copy of the global model, on the site's device."""
    model = MedSegDiffUNet(site.config.unet_spec())
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model.to(site.device)


def _reply(
    msg: Message,
    site: Site,
    metrics: SiteMetrics,
    arrays: ArrayRecord | None = None,
    privacy: PrivacyRecord | None = None,
) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(metrics.to_dict()), "site": ConfigRecord({"name": site.name})}
    )
    if arrays is not None:
        content["arrays"] = arrays
    if privacy is not None:
        content["privacy"] = ConfigRecord(privacy.to_config())
    return Message(content=content, reply_to=msg)


def _optimizer(
    msg: Message, site: Site, model: MedSegDiffUNet, server_round: int, lr: float | None = None
) -> tuple[torch.optim.Optimizer, str | None]:
    """The site's AdamW (at ``lr``, default ``train.lr``), with its moments from the site's last
    round of this run when the run keeps them (``federation.keep_optimizer_state``; the server
    names the run with a uid)."""
    config = site.config
    optimizer = make_optimizer(model, lr or config.train.lr, config.train.weight_decay)
    run_uid = msg.content["config"].get("run-uid")
    if not config.federation.keep_optimizer_state or not run_uid:
        return optimizer, None
    optimizer_state.restore(optimizer, site.state_dir, str(run_uid), server_round)
    return optimizer, str(run_uid)


def _keep_optimizer(
    optimizer: torch.optim.Optimizer, site: Site, run_uid: str | None, server_round: int
) -> None:
    if run_uid is not None:
        optimizer_state.save(optimizer, site.state_dir, run_uid, server_round)


def _proximal(model: MedSegDiffUNet, mu: float) -> ProximalTerm | None:
    """FedProx pulls local weights towards the round's global weights."""
    if mu <= 0:
        return None
    return ProximalTerm(mu, {k: v.detach().clone() for k, v in model.named_parameters()})


@app.train(mods=TRAIN_MODS)
@telemetry.observed
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's data for ``federation.local_steps`` steps."""
    site = Site.from_context(context)
    config = with_site_privacy(site.config, context.node_config)  # the site's own DP settings
    server_round = int(msg.content["config"]["server-round"])
    mu = float(msg.content["config"].get("proximal-mu", 0.0))

    data = site.dataset("train", augment=config.data.augment)
    data.reseed(site.seed(server_round, "augment"))  # the cached dataset outlives the round
    if config.privacy.enabled:
        return _train_private(msg, context, site, config, data, server_round, mu)

    model = _model_from(msg, site)
    torch.manual_seed(site.seed(server_round, "noise"))
    batches = random_batches(
        data, config.train.batch_size, seed=site.seed(server_round, "batches"), device=site.device
    )
    optimizer, run_uid = _optimizer(msg, site, model, server_round)
    stats = train_steps(
        model,
        config.diffusion.noise_schedule(),
        batches,
        optimizer,
        config.federation.local_steps,
        grad_clip=config.train.grad_clip,
        proximal=_proximal(model, mu),
        amp_dtype=autocast_dtype(site.device, config.train.amp),
        objective=config.diffusion.objective(),
    )
    _keep_optimizer(optimizer, site, run_uid, server_round)
    metrics = SiteMetrics(
        num_examples=len(data),
        train_loss=stats.loss,
        train_steps=stats.steps,
        train_seconds=stats.seconds,
    )
    return _reply(msg, site, metrics, ArrayRecord(model.state_dict()), privacy_record(None))


def _train_private(
    msg: Message,
    context: Context,
    site: Site,
    config: ExperimentConfig,
    data: Dataset,
    server_round: int,
    mu: float,
) -> Message:
    """DP-SGD (Opacus) within the site's budget, or a reply that declines the round.

    The round is reserved in the site's privacy ledger before the first step and counts even if
    training then fails (see :class:`~medsegdiff_core.privacy.PrivacyLedger`). A declined round
    sends no weights, only the epsilon spent so far and why.
    """
    privacy = config.privacy
    plan = plan_privacy(
        privacy,
        num_examples=len(data),
        batch_size=privacy.expected_batch_size or config.train.batch_size,
        local_steps=privacy.local_steps or config.federation.local_steps,
        rounds=config.federation.rounds,
    )
    ledger = site_ledger(site, context.node_config)
    decision = ledger.reserve(server_round, plan)
    if not decision.granted:
        log(WARNING, "%s declines round %d: %s", site.name, server_round, decision.reason)
        record = privacy_record(
            plan,
            delta=decision.delta,
            epsilon=decision.spent,
            rounds_trained=ledger.rounds_trained(),
            decision=decision,
            grad_sample_mode=privacy.grad_sample_mode,
            accounted=decision.spent_by,
        )
        metrics = SiteMetrics(num_examples=len(data), train_steps=0)
        return _reply(msg, site, metrics, privacy=record)

    model = make_dp_compatible(_model_from(msg, site))
    restrict_trainable(model, privacy.trainable)
    # All randomness of a DP round is secret (the experiment seed is known to the server): the
    # DP noise, the Poisson sampling, and also the per-slice randomness (diffusion timesteps
    # and noise, augmentation), which must be independent of the other slices drawn. A DP
    # round is therefore not replayed bit for bit after a crash, unlike a plain round.
    torch.manual_seed(secret_seed())
    if hasattr(data, "reseed"):
        data.reseed(secret_seed())
    optimizer, run_uid = _optimizer(msg, site, model, server_round, lr=privacy.lr)
    stats = dp_train_steps(
        model,
        config.diffusion.noise_schedule(),
        data,
        plan,
        optimizer,
        grad_sample_mode=privacy.grad_sample_mode,
        proximal=_proximal(model, mu),
        amp_dtype=autocast_dtype(site.device, config.train.amp),
        objective=config.diffusion.objective(),
        sampling_generator=secret_generator("cpu"),
        noise_generator=secret_generator(site.device),
        augmentation_multiplicity=privacy.augmentation_multiplicity,
        iterate_averaging=privacy.iterate_averaging,
    )
    ledger.complete(decision.entry, stats.history)
    _keep_optimizer(optimizer, site, run_uid, server_round)
    accounted = ledger.account(plan.accountant)
    epsilon = accounted.value
    log(
        INFO,
        "%s round %d under DP: epsilon %.4g of %g spent (%s, delta %.3g%s, noise %.4g, q %.4g)",
        site.name,
        server_round,
        epsilon,
        plan.target_epsilon,
        accounted.accountant + (f": {accounted.fallback}" if accounted.fallback else ""),
        decision.delta,
        " (pinned at the site's first DP round)" if decision.delta != plan.delta else "",
        plan.noise_multiplier,
        plan.sample_rate,
    )
    metrics = SiteMetrics(
        num_examples=len(data),
        train_loss=stats.loss,
        train_steps=stats.steps,
        train_seconds=stats.seconds,
    )
    record = privacy_record(
        plan,
        delta=decision.delta,
        epsilon=epsilon,
        rounds_trained=ledger.rounds_trained(),
        grad_sample_mode=privacy.grad_sample_mode,
        steps=stats.steps,
        empty_batches=stats.empty_batches,
        accounted=accounted,
    )
    return _reply(msg, site, metrics, ArrayRecord(model.state_dict()), record)


@app.evaluate()
@telemetry.observed
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this site's validation split with the fast ensemble sampler,
    per case at the images' own resolution (3-D for volumes), exactly as ``medsegdiff
    evaluate`` scores it; ``num-examples`` is the number of cases scored."""
    site = Site.from_context(context)
    config = site.config
    server_round = int(msg.content["config"].get("server-round", 0))
    model = _model_from(msg, site)
    data = site.dataset("val")
    cfg = InferenceConfig.model_validate(
        config.inference.model_dump() | {"seed": site.seed(server_round, "evaluate") % 2**31}
    )
    start = time.monotonic()
    rows, summary = evaluate_dataset(
        model,
        config.diffusion.noise_schedule(),
        data,
        cfg,
        config.data.classes,
        device=site.device,
        amp_dtype=autocast_dtype(site.device, config.train.amp, inference=True),
    )
    metrics = SiteMetrics(
        num_examples=len(rows),
        dice=summary["mean"]["dice"],
        iou=summary["mean"]["iou"],
        eval_seconds=time.monotonic() - start,
        class_dice={name: values["dice"] for name, values in summary["per_class"].items()},
    )
    return _reply(msg, site, metrics)
