"""The typed records of a federated run (medsegdiff_core/records.py): their wire and JSON
forms round trip, older state.json entries parse, and a bad key is a one-line error."""

from __future__ import annotations

import json

import pytest

from medsegdiff_core.records import (
    CappedClaim,
    CentralDPRound,
    PrivacyRecord,
    RecordError,
    RoundRecord,
    SiteMetrics,
    SiteReason,
    history_from_json,
    round_counts,
)

DP_WIRE = {
    "enabled": True,
    "declined": False,
    "reason": "",
    "epsilon": 1.25,
    "delta": 1e-5,
    "delta-default": True,
    "target-epsilon": 8.0,
    "noise-multiplier": 1.1,
    "noise-calibrated": True,
    "planned-rounds": 3,
    "sample-rate": 0.25,
    "max-grad-norm": 1.0,
    "num-examples": 40,
    "steps": 2,
    "empty-batches": 0,
    "rounds-trained": 1,
    "grad-sample-mode": "hooks",
}


def test_privacy_record_round_trips_with_the_wire_keys_unchanged() -> None:
    record = PrivacyRecord.from_config(DP_WIRE)
    assert (record.target_epsilon, record.noise_multiplier, record.num_examples) == (8.0, 1.1, 40)
    assert record.to_config() == DP_WIRE
    assert list(record.to_config()) == list(DP_WIRE)
    # Without DP only the two flags go on the wire (a ConfigRecord holds no None).
    off = PrivacyRecord()
    assert off.to_config() == {"enabled": False, "declined": False}
    assert PrivacyRecord.from_config(off.to_config()) == off
    # Python names are accepted too.
    assert PrivacyRecord(enabled=True, target_epsilon=3.0).to_config()["target-epsilon"] == 3.0


def test_site_metrics_round_trip_with_per_class_dice() -> None:
    train = {"num-examples": 40, "train-loss": 0.5, "train-steps": 3, "train-seconds": 1.5}
    assert SiteMetrics.from_dict(train).to_dict() == train
    evaluate = {"num-examples": 2, "dice": 0.7, "iou": 0.6, "eval-seconds": 3.0, "dice-cup": 0.5}
    metrics = SiteMetrics.from_dict(evaluate)
    assert metrics.class_dice == {"cup": 0.5} and metrics.dice == 0.7
    assert metrics.to_dict() == evaluate
    assert not SiteMetrics() and SiteMetrics().to_dict() == {}
    # Flower's weighted average of the sites' step counts is a float: kept as it is.
    assert SiteMetrics.from_dict({"train-steps": 2.5}).to_dict() == {"train-steps": 2.5}


def full_round() -> RoundRecord:
    return RoundRecord(
        round=3,
        sites_trained=["site-a", "site-b"],
        rejected=[SiteReason(site="node-9", reason="client error: unavailable")],
        declined=[SiteReason(site="site-c", reason="privacy budget: ...")],
        privacy={
            "site-a": PrivacyRecord.from_config(DP_WIRE),
            "site-b": PrivacyRecord(),
            "site-c": PrivacyRecord.from_config(DP_WIRE | {"declined": True, "reason": "x"}),
        },
        capped_examples=[CappedClaim(site="site-b", claimed=10**9, used=400)],
        train=SiteMetrics(num_examples=440, train_loss=0.4, train_steps=3.0, train_seconds=2.0),
        evaluate=SiteMetrics.from_dict({"dice": 0.6, "iou": 0.5, "dice-disc": 0.8}),
        failed=False,
        central_dp=CentralDPRound(sites_sampled=3, updates_averaged=2),
        site_train={"site-a": SiteMetrics(num_examples=40, train_loss=0.4, train_seconds=1.0)},
        train_wall_s=2.5,
        train_replies_s=2.0,
        round_overhead=None,
        update_bytes=2000,
        model_bytes=1000,
        site_evaluate={"site-a": SiteMetrics.from_dict({"num-examples": 2, "dice-disc": 0.8})},
        wall_s=12.5,
    )


def test_round_record_round_trips_through_state_json() -> None:
    record = full_round()
    entry = json.loads(json.dumps(record.to_json()))
    assert RoundRecord.from_json(entry) == record
    assert entry["privacy"]["site-a"]["target-epsilon"] == 8.0
    assert entry["privacy"]["site-b"] == {"enabled": False, "declined": False}
    assert entry["train"] == {
        "num-examples": 440,
        "train-loss": 0.4,
        "train-steps": 3.0,
        "train-seconds": 2.0,
    }
    assert entry["evaluate"]["dice-disc"] == 0.8
    assert entry["round_overhead"] is None  # written as null, as before
    assert entry["central_dp"] == {"sites_sampled": 3, "updates_averaged": 2}
    assert entry["capped_examples"] == [{"site": "site-b", "claimed": 10**9, "used": 400}]
    assert "failed" not in entry  # written only for a failed round
    failed = RoundRecord(round=1, failed=True).to_json()
    assert failed["failed"] is True and failed["train"] == {} and failed["evaluate"] == {}
    assert "central_dp" not in failed and "site_evaluate" not in failed
    # Evaluation that ran with no usable reply is kept apart from no evaluation at all.
    assert RoundRecord(round=1, site_evaluate={}).to_json()["site_evaluate"] == {}


def test_an_older_state_json_entry_parses_with_defaults() -> None:
    old = {  # before wall times, bytes, declined sites, privacy, capped claims, central DP
        "round": 1,
        "sites_trained": ["site-a"],
        "rejected": [],
        "train": {"train-loss": 0.5, "num-examples": 80},
        "evaluate": {"dice": 0.6},
        "site_train": {"site-a": {"num-examples": 40}},
    }
    record = RoundRecord.from_json(old)
    assert record.declined == [] and record.privacy == {} and record.capped_examples == []
    assert record.central_dp is None and record.site_evaluate is None and not record.failed
    assert (record.update_bytes, record.model_bytes, record.wall_s) == (0, 0, None)
    assert record.train.num_examples == 80 and record.site_train["site-a"].num_examples == 40
    # A partial privacy record (an older site) parses, the unsent fields None.
    partial = RoundRecord.from_json(old | {"privacy": {"site-a": {"enabled": True}}})
    assert partial.privacy["site-a"].epsilon is None
    history = history_from_json([old, old | {"round": 2, "failed": True, "declined": []}])
    assert round_counts(history).to_json() == {
        "rounds": 2,
        "rounds_succeeded": 1,
        "rounds_failed": 1,
        "updates_rejected": 0,
        "updates_declined": 0,
        "claims_capped": 0,
    }


def test_round_counts() -> None:
    counts = round_counts([full_round(), RoundRecord(round=4, failed=True)])
    assert (counts.rounds, counts.rounds_succeeded, counts.rounds_failed) == (2, 1, 1)
    assert (counts.updates_rejected, counts.updates_declined, counts.claims_capped) == (1, 1, 1)
    assert round_counts([]).rounds == 0


@pytest.mark.parametrize(
    ("parse", "data", "message"),
    [
        (PrivacyRecord.from_config, {"enabled": True, "epsilom": 1.0}, "epsilom: unknown key"),
        (PrivacyRecord.from_config, {"epsilon": "lots"}, "epsilon: Input should be a valid"),
        (SiteMetrics.from_dict, {"num-examples": 3, "hd95": 1.0}, "metrics: hd95: unknown key"),
        (SiteMetrics.from_dict, {"num-examples": 2.5}, "num-examples: Input should be a valid"),
        (SiteMetrics.from_dict, {"dice-cup": "x"}, "metrics: class_dice.cup"),
        (RoundRecord.from_json, {"sites_trained": []}, "round record: round: Field required"),
        (RoundRecord.from_json, {"round": 2, "walls": 1}, "round record 2: walls: unknown key"),
        (
            RoundRecord.from_json,
            {"round": 2, "train": {"train-loss": "x"}},
            "round record 2: train.train-loss: Input should be a valid number",
        ),
        (
            RoundRecord.from_json,
            {"round": 2, "privacy": {"site-a": {"enabled": "maybe"}}},
            "round record 2: privacy.site-a.enabled: Input should be a valid boolean",
        ),
        (RoundRecord.from_json, [1, 2], "round record: expected a mapping"),
    ],
)
def test_an_unknown_or_invalid_field_is_a_one_line_error(parse, data, message) -> None:
    with pytest.raises(RecordError) as caught:
        parse(data)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers that catch ValueError still do


def test_the_accountant_of_a_privacy_record_is_typed_and_optional() -> None:
    # DP_WIRE is a record as sites sent it before the accountant field: it parses without one.
    assert PrivacyRecord.from_config(DP_WIRE).accountant is None
    prv = DP_WIRE | {"accountant": "prv", "accountant-fallback": ""}
    record = PrivacyRecord.from_config(prv)
    assert record.accountant == "prv" and record.to_config() == prv
    fallback = DP_WIRE | {"accountant": "rdp", "accountant-fallback": "prv mesh ...; rdp used"}
    assert PrivacyRecord.from_config(fallback).accountant_fallback.endswith("rdp used")
    with pytest.raises(RecordError, match="accountant: Input should be 'rdp' or 'prv'"):
        PrivacyRecord.from_config(DP_WIRE | {"accountant": "moments"})
