"""The records a federated run exchanges and keeps, typed: one place defines their keys.

Three records cross a process boundary as plain mappings:

* :class:`PrivacyRecord` — the ``privacy`` ConfigRecord of a site's train reply (DP off, or the
  epsilon it spent so far; or why it declines the round). Wire keys are hyphenated
  (``target-epsilon``); :meth:`PrivacyRecord.to_config` / :meth:`PrivacyRecord.from_config`.
* :class:`SiteMetrics` — the ``metrics`` MetricRecord of a train or evaluate reply
  (``num-examples``, ``train-loss``, ``dice``, ``dice-<class>``, ...), and the server's
  weighted averages of them; :meth:`SiteMetrics.to_dict` / :meth:`SiteMetrics.from_dict`.
* :class:`RoundRecord` — one round's entry in a run's ``state.json`` history (written by the
  ServerApp, read by the model card, the exporter and a resumed run);
  :meth:`RoundRecord.to_json` / :meth:`RoundRecord.from_json`. Entries written by older
  versions, which lack the newer keys, parse with those keys at their defaults.

Parsing is strict: an unknown key or a value of the wrong type raises :class:`RecordError`,
one line naming the record and the key. This module imports neither Flower nor torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import MedSegDiffError, validation_message

NUM_EXAMPLES = "num-examples"  # the FedAvg weighting key of train and evaluate replies
CLASS_DICE_PREFIX = "dice-"  # evaluate metrics: "dice-<class>" per class


class RecordError(MedSegDiffError, ValueError):
    """A record (privacy, metrics, round) has an unknown key or an invalid value."""


def _wire_key(name: str) -> str:
    return name.replace("_", "-")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    @classmethod
    def _parse(cls, data: Any, source: str) -> Self:
        if not isinstance(data, Mapping):
            raise RecordError(f"{source}: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise RecordError(validation_message(source, exc.errors())) from None


class _WireRecord(_Record):
    """A record whose keys on the wire are its field names with hyphens."""

    model_config = ConfigDict(alias_generator=_wire_key)

    def _wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------------------------
# What a site sends
# --------------------------------------------------------------------------------------------


class PrivacyRecord(_WireRecord):
    """A site's privacy state, sent beside its train reply (not in the averaged metrics: a site
    without DP has no epsilon, and Flower requires every site's metrics to have the same keys).

    Without DP only ``enabled`` and ``declined`` are set; the rest is None and not sent.
    ``accountant`` is the accountant ``epsilon`` comes from (``rdp`` or ``prv``); records sent
    before it existed lack it and were all RDP. ``accountant_fallback`` says why a site asking
    for PRV reports an RDP epsilon or RDP-calibrated noise ("" when nothing fell back).
    """

    enabled: bool = False
    declined: bool = False  # the round would exceed the site's budget: it sends no weights
    reason: str | None = None  # why it declined ("" when it did not)
    epsilon: float | None = None  # spent over every round the site trained in
    delta: float | None = None  # the delta epsilon is stated at (pinned at the first DP round)
    delta_default: bool | None = None
    target_epsilon: float | None = None  # the site's budget
    noise_multiplier: float | None = None
    noise_calibrated: bool | None = None
    planned_rounds: int | None = None
    sample_rate: float | None = None
    max_grad_norm: float | None = None
    num_examples: int | None = None  # training slices (the DP unit)
    steps: int | None = None
    empty_batches: int | None = None
    rounds_trained: int | None = None
    grad_sample_mode: str | None = None
    accountant: Literal["rdp", "prv"] | None = None  # whose bound epsilon is; None: older, rdp
    accountant_fallback: str | None = None

    def to_config(self) -> dict[str, bool | int | float | str]:
        """The ConfigRecord form (hyphenated keys; unset fields left out)."""
        return self._wire()

    @classmethod
    def from_config(cls, data: Mapping[str, Any], *, source: str = "privacy record") -> Self:
        return cls._parse(data, source)


class SiteMetrics(_WireRecord):
    """The metrics of a train or evaluate reply, or the server's weighted average of them.

    Train: ``num-examples``, ``train-loss``, ``train-steps``, ``train-seconds``. Evaluate:
    ``num-examples`` (cases scored), ``dice``, ``iou``, ``eval-seconds`` and ``dice-<class>``
    per class (:attr:`class_dice`). Flower's average drops ``num-examples``; the server adds
    the sum back for training.
    """

    num_examples: int | None = None
    train_loss: float | None = None
    train_steps: int | float | None = None  # a site's count; the average across sites
    train_seconds: float | None = None
    dice: float | None = None
    iou: float | None = None
    eval_seconds: float | None = None
    class_dice: dict[str, float] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _gather_class_dice(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "class_dice" not in data:
            flat = dict(data)
            per_class = {
                key.removeprefix(CLASS_DICE_PREFIX): flat.pop(key)
                for key in list(flat)
                if isinstance(key, str) and key.startswith(CLASS_DICE_PREFIX)
            }
            return flat | {"class_dice": per_class}
        return data

    def to_dict(self) -> dict[str, int | float]:
        """The MetricRecord form: hyphenated keys, ``dice-<class>`` per class, unset left out."""
        return self._wire() | {f"{CLASS_DICE_PREFIX}{k}": v for k, v in self.class_dice.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "metrics") -> Self:
        return cls._parse(data, source)

    def __bool__(self) -> bool:
        """False when nothing was measured (a failed round's ``train``, an unevaluated one's
        ``evaluate``)."""
        return bool(self.to_dict())


# --------------------------------------------------------------------------------------------
# What the server keeps
# --------------------------------------------------------------------------------------------


class SiteReason(_Record):
    """A site left out of a round, and why (a rejected update, a declined round)."""

    site: str
    reason: str = ""


class CappedClaim(_Record):
    """A site's claimed num-examples, cut to the FedAvg weight it was given."""

    site: str
    claimed: int
    used: int


class CentralDPRound(_Record):
    """A round averaged with central DP: the sites sampled (the divisor) and averaged."""

    sites_sampled: int
    updates_averaged: int


class SecureAggregationRound(_Record):
    """A round trained with secure aggregation (SecAgg+): what the server could see of it.

    ``clipped`` names the sites that said they clipped their update; ``dropped`` the sampled
    sites (or nodes) whose masked vector never came; ``halted`` why the protocol stopped before
    unmasking; ``aggregate_refused`` why the unmasked mean update was not applied.
    """

    sites_sampled: int = 0
    masked_vectors: int = 0
    contributors: int = 0  # masked vectors with a weight above 0
    clipped: list[str] = Field(default_factory=list)
    dropped: list[str] = Field(default_factory=list)
    halted: str | None = None
    aggregate_norm: float | None = None
    aggregate_bound: float | None = None
    quantization_error: float | None = None  # bound per weight of the mean update
    aggregate_refused: str | None = None
    bytes_received: int = 0
    bytes_sent: int = 0


class RoundRecord(_Record):
    """One round of a federated run, as ``state.json``'s history keeps it.

    Every field but ``round`` has a default, so entries written before a field existed parse.
    ``failed``, ``central_dp``, ``secure_aggregation`` and ``site_evaluate`` are written only
    when set (a failed round, a round under central DP or secure aggregation, a round with
    federated evaluation).
    """

    round: int
    sites_trained: list[str] = Field(default_factory=list)  # sorted: their updates averaged
    rejected: list[SiteReason] = Field(default_factory=list)
    declined: list[SiteReason] = Field(default_factory=list)
    privacy: dict[str, PrivacyRecord] = Field(default_factory=dict)  # as each site sent it
    capped_examples: list[CappedClaim] = Field(default_factory=list)
    train: SiteMetrics = Field(default_factory=SiteMetrics)  # weighted average; summed examples
    evaluate: SiteMetrics = Field(default_factory=SiteMetrics)  # weighted average
    failed: bool = False  # fewer usable updates than federation.min_sites: model kept
    central_dp: CentralDPRound | None = None
    secure_aggregation: SecureAggregationRound | None = None
    site_train: dict[str, SiteMetrics] = Field(default_factory=dict)
    train_wall_s: float | None = None
    train_replies_s: float | None = None  # the rest of train_wall_s: screening and averaging
    round_overhead: float | None = None  # train_wall_s / the slowest site's train-seconds
    update_bytes: int = 0
    model_bytes: int = 0
    site_evaluate: dict[str, SiteMetrics] | None = None  # None: no evaluation this round
    wall_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``state.json`` history entry (plain JSON values; sites' records in wire form)."""
        data = self.model_dump(mode="json")
        data["privacy"] = {site: p.to_config() for site, p in self.privacy.items()}
        data["train"], data["evaluate"] = self.train.to_dict(), self.evaluate.to_dict()
        data["site_train"] = {site: m.to_dict() for site, m in self.site_train.items()}
        if self.site_evaluate is not None:
            data["site_evaluate"] = {site: m.to_dict() for site, m in self.site_evaluate.items()}
        if not self.failed:
            del data["failed"]
        if self.central_dp is None:
            del data["central_dp"]
        if self.secure_aggregation is None:
            del data["secure_aggregation"]
        if self.site_evaluate is None:
            del data["site_evaluate"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "round record") -> Self:
        if isinstance(data, Mapping) and "round" in data:
            source = f"{source} {data['round']}"
        return cls._parse(data, source)

    @classmethod
    def parse(cls, data: RoundRecord | Mapping[str, Any]) -> RoundRecord:
        """``data`` itself when it is a RoundRecord, else parsed from its JSON form."""
        return data if isinstance(data, RoundRecord) else cls.from_json(data)


def history_from_json(entries: Iterable[Any], *, source: str = "history") -> list[RoundRecord]:
    """A run's history (``state.json``'s ``history`` list) as RoundRecords."""
    if isinstance(entries, str | bytes | Mapping):
        raise RecordError(f"{source}: expected a list of rounds")
    return [RoundRecord.from_json(entry, source=f"{source}: round record") for entry in entries]


def history_to_json(history: Iterable[RoundRecord]) -> list[dict[str, Any]]:
    return [record.to_json() for record in history]


class RoundCounts(_Record):
    """How the rounds of a run went: what ``state.json`` and the model card both state."""

    model_config = ConfigDict(frozen=True)

    rounds: int = 0
    rounds_succeeded: int = 0
    rounds_failed: int = 0
    updates_rejected: int = 0
    updates_declined: int = 0
    claims_capped: int = 0

    def to_json(self) -> dict[str, int]:
        return self.model_dump()


def round_counts(history: Iterable[RoundRecord]) -> RoundCounts:
    """Rounds run, succeeded and failed; updates rejected and declined; claims capped."""
    history = list(history)
    failed = sum(1 for r in history if r.failed)
    return RoundCounts(
        rounds=len(history),
        rounds_succeeded=len(history) - failed,
        rounds_failed=failed,
        updates_rejected=sum(len(r.rejected) for r in history),
        updates_declined=sum(len(r.declined) for r in history),
        claims_capped=sum(len(r.capped_examples) for r in history),
    )
