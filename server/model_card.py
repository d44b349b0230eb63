"""The model card of a release: what a hospital should know before running the model.

Built from the run's history (:class:`~medsegdiff_core.records.RoundRecord`, as ``state.json``
keeps it): what round 1 started from (a signed release or a random initialisation), the sites
and their examples, the last federated evaluation, each site's privacy
guarantee as the site reported it, central DP, and how the rounds went.
"""

from __future__ import annotations

import math
from typing import Any

from medsegdiff_core.config import ExperimentConfig
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.privacy import epsilon_of
from medsegdiff_core.records import PrivacyRecord, RoundRecord, SiteMetrics, round_counts

from .run_store import RunState, secure_aggregation_settings


def model_card(config: ExperimentConfig, state: RunState, model: MedSegDiffUNet) -> dict:
    """What a hospital should know before running the model."""
    last_eval: RoundRecord | None = next((r for r in reversed(state.history) if r.evaluate), None)
    sites: dict[str, int] = {}
    for record in state.history:
        for site, metrics in record.site_train.items():
            sites[site] = metrics.num_examples or 0
    fed = config.federation
    start = initialisation_card(config, state)
    return {
        "summary": (
            f"MedSegDiff ({config.model.preset} preset) trained with Flower across "
            f"{len(sites)} sites"
            + (f", starting from {start['from']}" if "name" in start else "")
            + "; no images left any site."
        ),
        "model": {
            "preset": config.model.preset,
            "image_size": model.spec.image_size,
            "image_channels": model.spec.image_channels,
            "classes": config.data.classes,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "initialisation": start,
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
            "round": last_eval.round if last_eval else None,
            "sampler": config.inference.sampler,
            "sampling_steps": config.inference.sampling_steps,
            "ensemble": config.inference.ensemble,
            "fusion": config.inference.fusion,
            "global": last_eval.evaluate.to_dict() if last_eval else {},
            "per_site": _per_site(last_eval.site_evaluate if last_eval else None),
        },
        "privacy": privacy_card(config, state),
        "rounds": round_counts(state.history).to_json(),
    }


def initialisation_card(config: ExperimentConfig, state: RunState) -> dict[str, Any]:
    """What round 1 started from: the signed release (``federation.initial_release``, as
    ``state.json`` records it: name, version, the sha256 of its signed manifest and the
    fingerprint of the key that verified it), or a random initialisation."""
    start = getattr(state, "initial_release", None)
    if start is None:
        return {"from": f"random initialisation (train.seed {config.train.seed})"}
    return {
        "from": f"release {start['name']} v{start['version']}",
        "name": start["name"],
        "version": start["version"],
        "manifest_sha256": start["manifest_sha256"],
        "signing_key": start["signing_key"],
    }


def _per_site(metrics: dict[str, SiteMetrics] | None) -> dict[str, dict[str, Any]]:
    return {site: m.to_dict() for site, m in (metrics or {}).items()}


def privacy_card(config: ExperimentConfig, state: RunState) -> dict[str, Any]:
    """The model card's privacy section: each site's final epsilon and delta, as the sites
    reported them, and the central DP guarantee when the server added one."""
    sites: dict[str, dict[str, Any]] = {}
    last_reported: dict[str, PrivacyRecord] = {}
    for record in state.history:
        trained = set(record.sites_trained)
        declined = {d.site for d in record.declined}
        for site, reported in record.privacy.items():
            entry = sites.setdefault(
                site, {"dp": True, "rounds_trained": [], "declined_rounds": []}
            )
            if site in trained:
                entry["rounds_trained"].append(record.round)
                if not reported.enabled:
                    entry["dp"] = False  # one round without DP voids the site's guarantee
            if site in declined:
                entry["declined_rounds"].append(record.round)
            if reported.enabled:
                last_reported[site] = reported
    per_site: dict[str, dict[str, Any]] = {}
    for site, entry in sorted(sites.items()):
        reported = last_reported.get(site)
        if not entry["rounds_trained"] and reported is None:
            continue
        if entry["dp"] and reported is not None:
            entry |= {
                "epsilon": reported.epsilon,
                "delta": reported.delta,
                "target_epsilon": reported.target_epsilon,
                "noise_multiplier": reported.noise_multiplier,
                "sample_rate": reported.sample_rate,
                "max_grad_norm": reported.max_grad_norm,
                "train_slices": reported.num_examples,
                # records sent before sites could choose PRV carry no accountant: all RDP
                "accountant": reported.accountant or "rdp",
                "accountant_fallback": reported.accountant_fallback or "",
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
                "in; Opacus accountant per site (sites.<site>.accountant: rdp, or prv where the "
                "site chose it and its bound could be computed), Poisson sampling, per-sample "
                "clipping"
            ),
            "not_covered": [
                "federated evaluation: each site's Dice on its validation split is exact",
                "each site's number of training slices (FedAvg weights) is reported exactly",
                "a patient with k slices is protected at k * epsilon (group privacy)",
            ],
        },
        "sites": per_site,
        "central": central_card(config, state),
        "secure_aggregation": secure_aggregation_card(config, state),
    }
    return card


def secure_aggregation_card(config: ExperimentConfig, state: RunState) -> dict[str, Any] | None:
    """Secure aggregation (SecAgg+): its parameters, what it protects, how its rounds went
    (None when the run did not use it)."""
    settings = secure_aggregation_settings(config)
    if settings is None:
        return None
    rounds = [r for r in state.history if r.secure_aggregation is not None]
    return settings | {
        "rounds": len(rounds),
        "rounds_halted": sum(1 for r in rounds if r.secure_aggregation.halted),
        "aggregates_refused": sum(1 for r in rounds if r.secure_aggregation.aggregate_refused),
        "updates_clipped": sum(len(r.secure_aggregation.clipped) for r in rounds),
        "sites_dropped": sum(len(r.secure_aggregation.dropped) for r in rounds),
        "protects": "each site's update from the coordinator and from anyone who sees the "
        "traffic: the server receives masked vectors and unmasks only the example-weighted "
        "sum of the sites' clipped updates",
        "does_not_protect": "the aggregate and the released model (what they reveal about a "
        "site's data; use DP for that), each site's metrics, privacy record and example count "
        "(sent in the clear), and a coordinator that fakes sites unless node authentication "
        "pins the SuperNodes",
    }


def central_card(config: ExperimentConfig, state: RunState) -> dict[str, Any] | None:
    """Server-side central DP: what it adds and protects (None when off)."""
    pc = config.privacy
    if not pc.central:
        return None
    noisy = [r.central_dp for r in state.history if r.central_dp is not None]
    releases = len(noisy)
    sampled = [c.sites_sampled for c in noisy]
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
