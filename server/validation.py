"""Screening client updates before they are averaged.

One broken or malicious site must not be able to ruin the global model (or stop a round): every
reply is checked, and a bad one is left out with a logged reason that names the site. The round
then goes on with the others.

Checks, in order: the reply carries an error; it lacks the ``arrays``/``metrics`` records or a
positive ``num-examples``; its metrics or privacy record do not parse
(:mod:`medsegdiff_core.records`: an unknown key, a value of the wrong type); its keys, shapes
or dtypes differ from the global model; it holds NaN or Inf; its distance from the global
model is more than ``norm_factor`` times the round's lower median distance (a scaled or random
update). That last rule compares sites with each other, so
it is off (``norm_factor=None``) under central DP, whose analysis allows no data-dependent
selection of updates before clipping.

The number of examples a site claims (its FedAvg weight) cannot be verified by the server: it is
only bounded, by ``cap_claimed_examples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from medsegdiff_core.records import NUM_EXAMPLES, PrivacyRecord, RecordError, SiteMetrics


@dataclass
class Screening:
    """Accepted replies (in a stable order) and (site, reason) for each rejected one."""

    accepted: list[Message] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def site_name(msg: Message) -> str:
    """The site's own name when it sent one, else its node id."""
    if msg.has_content() and "site" in msg.content.config_records:
        return str(msg.content["site"].get("name", f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


def _structural_problem(msg: Message, reference: dict[str, np.ndarray]) -> str | None:
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"]:
        return "reply must hold exactly one 'arrays' and one 'metrics' record"
    examples = content["metrics"].get(NUM_EXAMPLES)
    if not isinstance(examples, int | float) or not examples > 0 or not math.isfinite(examples):
        return f"{NUM_EXAMPLES} must be a positive number, got {examples!r}"
    try:
        SiteMetrics.from_dict(content["metrics"])
        if "privacy" in content.config_records:
            PrivacyRecord.from_config(content["privacy"])
    except RecordError as exc:
        return str(exc)
    arrays = content["arrays"]
    missing, extra = reference.keys() - arrays.keys(), arrays.keys() - reference.keys()
    if missing or extra:
        return f"keys differ from the global model (missing {sorted(missing)[:3]}, " + (
            f"unexpected {sorted(extra)[:3]})"
        )
    for key, expected in reference.items():
        value = arrays[key]
        if tuple(value.shape) != expected.shape:
            return f"{key}: shape {tuple(value.shape)} != {expected.shape}"
        if value.dtype != str(expected.dtype) and np.dtype(value.dtype) != expected.dtype:
            return f"{key}: dtype {value.dtype} != {expected.dtype}"
        if not np.isfinite(value.numpy()).all():
            return f"{key}: contains NaN or Inf"
    return None


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 distance between an update and the global weights it started from."""
    total = 0.0
    for key, base in reference.items():
        if np.issubdtype(base.dtype, np.floating):
            diff = arrays[key].numpy().astype(np.float64) - base
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def screen_updates(
    replies: list[Message], global_arrays: ArrayRecord, *, norm_factor: float | None
) -> Screening:
    """Split replies into accepted and rejected (see the module docstring).

    Accepted replies are sorted by site name so that averaging order — and so the result, to
    the last bit — does not depend on which site answered first.
    """
    reference = {k: v.numpy() for k, v in global_arrays.items()}
    reference64 = {
        k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v
        for k, v in reference.items()
    }
    result = Screening()
    candidates: list[tuple[Message, float]] = []
    for msg in replies:
        problem = _structural_problem(msg, reference)
        if problem:
            result.rejected.append((site_name(msg), problem))
        else:
            candidates.append((msg, update_norm(msg.content["arrays"], reference64)))
    if candidates and norm_factor is None:
        result.accepted.extend(msg for msg, _ in candidates)
    elif candidates:
        norms = sorted(norm for _, norm in candidates)
        lower_median = norms[(len(norms) - 1) // 2]
        for msg, norm in candidates:
            if lower_median > 0 and norm > norm_factor * lower_median:
                result.rejected.append(
                    (
                        site_name(msg),
                        f"update norm {norm:.3g} is over {norm_factor:g}x the "
                        f"round's median {lower_median:.3g}",
                    )
                )
            else:
                result.accepted.append(msg)
    result.accepted.sort(key=site_name)
    return result


@dataclass(frozen=True)
class CappedClaim:
    site: str
    claimed: int
    used: int


def cap_claimed_examples(
    accepted: list[Message],
    *,
    max_ratio: float,
    registered: dict[str, int],
    max_weight: int | None = None,
) -> list[CappedClaim]:
    """Bound each site's FedAvg weight, in place, and return the claims that were cut.

    A site may weigh at most ``max_ratio`` times the round's lower median claim, and never more
    than it registered (its first accepted claim in the run: a site's data does not grow while
    a run lasts). A site that claims 10^9 examples then weighs at most ``max_ratio / (max_ratio
    + n - 1)`` of an n-site average instead of all of it. ``max_weight``
    (``federation.max_weight``), when set, is a fixed bound on every claim, the one a site
    applies itself under secure aggregation.
    """
    claims = {site_name(m): int(m.content["metrics"][NUM_EXAMPLES]) for m in accepted}
    if not claims:
        return []
    ordered = sorted(claims.values())
    bound = max(1, math.floor(max_ratio * ordered[(len(ordered) - 1) // 2]))
    if max_weight is not None:
        bound = min(bound, max_weight)
    capped = []
    for msg in accepted:
        site = site_name(msg)
        used = min(claims[site], bound, registered.get(site, claims[site]))
        if used < claims[site]:
            msg.content["metrics"][NUM_EXAMPLES] = used
            capped.append(CappedClaim(site, claims[site], used))
    return capped
