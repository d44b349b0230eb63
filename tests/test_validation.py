"""Screening of client updates, on real Flower messages (no simulation needed)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from server.central_dp import CentralDP
from server.validation import cap_claimed_examples, screen_updates

# Messages can only be built inside a Flower run; give this process a run identity.
TaskIdentity.run_id = 1
TaskIdentity.node_id = 1
TaskIdentity.task_id = 1


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


GLOBAL = record({"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)})


def reply(site: str, w: np.ndarray, b: np.ndarray | None = None, examples: float = 10) -> Message:
    arrays = {"w": w, "b": np.zeros(3, np.float32) if b is None else b}
    content = RecordDict(
        {
            "arrays": record(arrays),
            "metrics": MetricRecord({"num-examples": examples}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def good(site: str, scale: float = 0.1) -> Message:
    return reply(site, np.full((4, 3), scale, np.float32))


def test_good_updates_pass_in_site_order() -> None:
    result = screen_updates([good("c"), good("a"), good("b", 0.2)], GLOBAL, norm_factor=10)
    assert [m.content["site"]["name"] for m in result.accepted] == ["a", "b", "c"]
    assert result.rejected == []


def test_each_kind_of_bad_update_is_rejected_with_its_site_named() -> None:
    nan = np.full((4, 3), 0.1, np.float32)
    nan[0, 0] = np.nan
    replies = [
        good("ok-1"),
        good("ok-2"),
        good("ok-3", 0.15),
        reply("nan", nan),
        reply("shape", np.zeros((4, 2), np.float32)),
        reply("dtype", np.zeros((4, 3), np.float64)),
        reply("keys", np.zeros((4, 3), np.float32)),
        reply("examples", np.zeros((4, 3), np.float32), examples=0),
        good("huge", 1e4),
    ]
    # a reply with an extra array is a key mismatch
    replies[6].content["arrays"]["unexpected"] = Array(np.zeros(1, np.float32))
    result = screen_updates(replies, GLOBAL, norm_factor=10)
    reasons = dict(result.rejected)
    assert sorted(m.content["site"]["name"] for m in result.accepted) == ["ok-1", "ok-2", "ok-3"]
    assert "NaN" in reasons["nan"]
    assert "shape" in reasons["shape"]
    assert "dtype" in reasons["dtype"]
    assert "unexpected" in reasons["keys"]
    assert "num-examples" in reasons["examples"]
    assert "norm" in reasons["huge"]


def test_two_sites_one_scaled_update_is_caught() -> None:
    result = screen_updates([good("a"), good("b", 50.0)], GLOBAL, norm_factor=10)
    assert [m.content["site"]["name"] for m in result.accepted] == ["a"]
    assert result.rejected[0][0] == "b"


def test_under_central_dp_no_update_is_judged_against_the_others() -> None:
    # The norm rule compares sites; central DP's analysis allows only clipping.
    result = screen_updates([good("a"), good("b", 50.0)], GLOBAL, norm_factor=None)
    assert [m.content["site"]["name"] for m in result.accepted] == ["a", "b"]


def test_a_site_claiming_a_billion_examples_does_not_decide_the_average() -> None:
    honest = [reply(s, np.full((4, 3), 0.1, np.float32), examples=40) for s in ("a", "b")]
    liar = reply("liar", np.full((4, 3), 5.0, np.float32), examples=1e9)
    accepted = screen_updates([*honest, liar], GLOBAL, norm_factor=100).accepted
    capped = cap_claimed_examples(accepted, max_ratio=10, registered={})
    assert [(c.site, c.claimed, c.used) for c in capped] == [("liar", 10**9, 400)]
    arrays, _ = FedAvg().aggregate_train(1, accepted)
    # weight 400 / 480 at most: 0.1 * 80/480 + 5.0 * 400/480
    np.testing.assert_allclose(arrays["w"].numpy(), 0.1 / 6 + 5.0 * 5 / 6, rtol=1e-6)

    # Later in the run a site cannot claim more than it first registered.
    again = [reply("a", np.zeros((4, 3), np.float32), examples=40), good("b")]
    again[1].content["metrics"]["num-examples"] = 300
    capped = cap_claimed_examples(again, max_ratio=10, registered={"a": 40, "b": 40})
    assert [(c.site, c.claimed, c.used) for c in capped] == [("b", 300, 40)]
    assert again[1].content["metrics"]["num-examples"] == 40


def test_central_dp_divides_by_the_sampled_sites_not_the_updates_received() -> None:
    # Three sites sampled, two updates accepted: the third counts as a zero update, so the
    # mean's sensitivity is C/3 as the noise assumes (dividing by 2 would exceed it).
    first = record({"w": np.full((4, 3), 1.0, np.float32), "b": np.zeros(3, np.float32)})
    second = record({"w": np.full((4, 3), 0.01, np.float32), "b": np.zeros(3, np.float32)})
    mean = CentralDP(noise_multiplier=0.0, clipping_norm=1.0).aggregate(
        GLOBAL, [first, second], sampled=3
    )
    clipped_first = 1.0 / np.sqrt(12)  # norm sqrt(12) clipped to 1
    np.testing.assert_allclose(mean["w"].numpy(), (clipped_first + 0.01) / 3, rtol=1e-6)
    np.random.seed(0)  # Flower's noise draws from numpy's global generator
    noisy = CentralDP(noise_multiplier=2.0, clipping_norm=1.0).aggregate(
        GLOBAL, [second], sampled=4
    )
    noise = noisy["w"].numpy() - 0.01 / 4
    assert 0.1 < noise.std() < 1.0  # std sigma * C / k = 0.5
