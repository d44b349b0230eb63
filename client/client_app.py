"""The Flower ClientApp each hospital runs: local training and local evaluation.

Every handler reads the global weights from the message, works on the site's own data with the
shared core (``medsegdiff_core``) and replies with weights and numbers only — never images.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medsegdiff_core.config import InferenceConfig
from medsegdiff_core.inference import evaluate_dataset
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.training import (
    ProximalTerm,
    autocast_dtype,
    make_optimizer,
    random_batches,
    train_steps,
)

from .site import Site

app = ClientApp()


def _model_from(msg: Message, site: Site) -> MedSegDiffUNet:
    """The site's copy of the global model, on the site's device."""
    model = MedSegDiffUNet(site.config.unet_spec())
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model.to(site.device)


def _reply(msg: Message, site: Site, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})}
    )
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's data for ``federation.local_steps`` steps."""
    site = Site.from_context(context)
    config = site.config
    server_round = int(msg.content["config"]["server-round"])
    mu = float(msg.content["config"].get("proximal-mu", 0.0))

    model = _model_from(msg, site)
    torch.manual_seed(site.seed(server_round, "noise"))
    data = site.dataset("train", augment=config.data.augment)
    data.reseed(site.seed(server_round, "augment"))  # the cached dataset outlives the round
    batches = random_batches(
        data, config.train.batch_size, seed=site.seed(server_round, "batches"), device=site.device
    )
    # FedProx pulls local weights towards the round's global weights.
    proximal = (
        ProximalTerm(mu, {k: v.detach().clone() for k, v in model.named_parameters()})
        if mu > 0
        else None
    )
    stats = train_steps(
        model,
        config.diffusion.noise_schedule(),
        batches,
        make_optimizer(model, config.train.lr, config.train.weight_decay),
        config.federation.local_steps,
        grad_clip=config.train.grad_clip,
        proximal=proximal,
        amp_dtype=autocast_dtype(site.device, config.train.amp),
        snr_gamma=config.diffusion.snr_gamma,
    )
    metrics = {
        "num-examples": len(data),
        "train-loss": stats.loss,
        "train-steps": stats.steps,
        "train-seconds": stats.seconds,
    }
    return _reply(msg, site, metrics, ArrayRecord(model.state_dict()))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this site's validation split with the fast ensemble sampler."""
    site = Site.from_context(context)
    config = site.config
    server_round = int(msg.content["config"].get("server-round", 0))
    model = _model_from(msg, site)
    data = site.dataset("val")
    cfg = InferenceConfig.model_validate(
        config.inference.model_dump() | {"seed": site.seed(server_round, "evaluate") % 2**31}
    )
    start = time.monotonic()
    _, summary = evaluate_dataset(
        model,
        config.diffusion.noise_schedule(),
        data,
        cfg,
        list(config.data.classes),
        device=site.device,
        amp_dtype=autocast_dtype(site.device, config.train.amp),
    )
    metrics: dict[str, float | int] = {
        "num-examples": len(data),
        "dice": summary["mean"]["dice"],
        "iou": summary["mean"]["iou"],
        "eval-seconds": time.monotonic() - start,
    }
    for name, values in summary["per_class"].items():
        metrics[f"dice-{name}"] = values["dice"]
    return _reply(msg, site, metrics)
