"""A site's own privacy settings and its privacy ledger, as the ClientApp sees them.

The experiment's ``privacy`` section (sent by the server in the run config) gives defaults; the
hospital's SuperNode overrides any of its fields with ``privacy.<field>`` keys in its node
config, so the budget is the site's, not the server's::

    flower-supernode ... --node-config "data-path=/data/site privacy.enabled=true \\
        privacy.target_epsilon=3.0 privacy.max_grad_norm=1.0"

The privacy ledger (:class:`~medsegdiff_core.privacy.PrivacyLedger`) is a file the site
chooses, never one the server's run config can move (a fresh ledger would be a fresh budget):
the node config's ``privacy-ledger`` path, else the SuperNode's ``state-dir``, else for a real
site (``data-path``) ``$FEDMEDSEGDIFF_HOME/sites/<site>/`` on the site's machine; only simulated
sites keep it under the run's workdir. It outlives the ClientApp of a round, the SuperNode
process and the federated run: the budget covers the site's data across every run it joins.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsegdiff_core.config import ExperimentConfig, parse_config, resolve_workdir
from medsegdiff_core.privacy import BudgetDecision, Epsilon, PrivacyLedger, PrivacyPlan
from medsegdiff_core.records import PrivacyRecord

from .site import Site

NODE_PREFIX = "privacy."
LEDGER_NAME = "privacy-ledger.json"


def with_site_privacy(config: ExperimentConfig, node_config: Mapping[str, Any]) -> ExperimentConfig:
    """``config`` with the SuperNode's ``privacy.<field>`` node-config keys applied on top.

    Raises:
        ConfigError: an unknown or invalid key, named e.g. ``node config: privacy.delta: ...``.
    """
    overrides = {
        key[len(NODE_PREFIX) :]: value
        for key, value in node_config.items()
        if key.startswith(NODE_PREFIX)
    }
    if not overrides:
        return config
    data = config.model_dump(mode="json")
    data["privacy"] = data["privacy"] | overrides
    return parse_config(data, source="node config")


def ledger_path(site: Site, node_config: Mapping[str, Any]) -> Path:
    """Where the site's privacy ledger lives (see the module docstring)."""
    if node_config.get("privacy-ledger"):
        return Path(str(node_config["privacy-ledger"])).expanduser().resolve()
    if node_config.get("data-path") and not node_config.get("state-dir"):
        return resolve_workdir(None) / "sites" / site.name / LEDGER_NAME
    return site.state_dir / LEDGER_NAME


def site_ledger(site: Site, node_config: Mapping[str, Any]) -> PrivacyLedger:
    return PrivacyLedger(ledger_path(site, node_config))


def privacy_record(
    plan: PrivacyPlan | None,
    *,
    delta: float | None = None,
    epsilon: float = 0.0,
    rounds_trained: int = 0,
    decision: BudgetDecision | None = None,
    grad_sample_mode: str = "",
    steps: int = 0,
    empty_batches: int = 0,
    accounted: Epsilon | None = None,
) -> PrivacyRecord:
    """The ``privacy`` record of a train reply: DP off, or the epsilon spent so far.

    ``delta`` is the one the site's ledger pinned (the plan's when not given). ``accounted`` is
    how the ledger counted ``epsilon`` (its accountant and any fallback from PRV; default: the
    plan's accountant, without fallback); a planning fallback is reported beside it.

    Kept out of the ``metrics`` record on purpose: Flower averages metrics across sites and
    requires every site's metrics to have the same keys, and a site without DP has no epsilon.
    """
    if plan is None:
        return PrivacyRecord(enabled=False, declined=False)
    declined = decision is not None and not decision.granted
    accountant = accounted.accountant if accounted is not None else plan.accountant
    fallbacks = [plan.accountant_fallback, accounted.fallback if accounted is not None else ""]
    return PrivacyRecord(
        enabled=True,
        declined=declined,
        reason=decision.reason if declined and decision is not None else "",
        epsilon=float(epsilon),
        delta=plan.delta if delta is None else delta,
        delta_default=plan.delta_is_default,
        target_epsilon=plan.target_epsilon,
        noise_multiplier=plan.noise_multiplier,
        noise_calibrated=plan.noise_calibrated,
        planned_rounds=plan.planned_rounds,
        sample_rate=plan.sample_rate,
        max_grad_norm=plan.max_grad_norm,
        num_examples=plan.num_examples,
        steps=steps,
        empty_batches=empty_batches,
        rounds_trained=rounds_trained,
        grad_sample_mode=grad_sample_mode,
        accountant=accountant,
        accountant_fallback="; ".join(f for f in fallbacks if f),
    )
