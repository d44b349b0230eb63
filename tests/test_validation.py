"""Screening of client updates, on real Flower messages (no simulation needed)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.validation import screen_updates

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
