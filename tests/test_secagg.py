"""Secure aggregation (SecAgg+) with real Flower simulations (two: each costs tens of seconds).

* One simulation runs the ServerApp twice on the same seeds, plain FedAvg then SecAgg+: the
  secure global weights equal plain FedAvg's to within the quantisation error, and what the
  server's grid received from the sites under SecAgg+ are masked vectors, not their updates.
* A site that fails mid-round (after sending its key shares) and a site whose update is far
  beyond the announced bound (clipped at the site): the rounds complete with the others.
* A bad secure-aggregation config is one ConfigError line naming the key; the site's own check
  and the server's aggregate check refuse NaN and out-of-bound updates.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flower_simulation import read_record, start_script, write_simulation
from flwr.app import Array, ArrayRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from safetensors.numpy import load_file

from client.secure_update import clipped_update, update_problem
from medsegdiff_core.config import load_config
from medsegdiff_core.errors import ConfigError
from server.secure_aggregation import check_aggregate, quantization_error

ROOT = Path(__file__).resolve().parents[1]
BASE = (
    "federation.rounds=2 federation.local_steps=4 inference.sampling_steps=3 "
    "inference.ensemble=2 federation.fraction_evaluate=0"
)
# 3 sites claim 40 examples each; max_weight 50 keeps their weights near 1 (precision), the
# bounds are wide enough that no site clips here (each site reports whether it clipped).
CLIP, LEVELS, MAX_WEIGHT, CLAIMS = 0.5, 2**24, 50, [40, 40, 40]
SECURE = (
    " name=federated-tiny-secagg federation.release_name=fundus-tiny-secagg"
    " federation.secure_aggregation=true federation.update_clip_norm=50"
    f" federation.quantization_clip={CLIP} federation.quantization_range={LEVELS}"
    f" federation.max_weight={MAX_WEIGHT}"
)
# float32 rounding, relative to the largest weight: the secure run rounds its float64 result
# once; Flower's plain FedAvg sums 3 float32 products in float32 (up to 2 x 3 roundings).
FLOAT32_ROUNDING = 2.0**-24
PLAIN_ROUNDINGS = 2 * 3


def finish(process: subprocess.Popen, timeout: float = 900) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def state_of(workdir: Path, name: str) -> dict:
    return json.loads((workdir / "runs" / name / "state.json").read_text())


def weights(workdir: Path, name: str, server_round: int) -> dict[str, np.ndarray]:
    return load_file(str(workdir / "runs" / name / f"round-{server_round:04d}.safetensors"))


@pytest.fixture(scope="module")
def plain_and_secure(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One simulation, two runs on the same seeds: plain FedAvg, then SecAgg+; each site's
    trained weights tapped before the site's train mods, every train reply the server's grid
    received recorded."""
    base = tmp_path_factory.mktemp("secagg")
    (base / "tap").mkdir()
    script = write_simulation(
        base / "sim.py",
        {"workdir": str(base / "work"), "overrides": BASE},
        server_runs=[{}, {"overrides": BASE + SECURE}],
        tap=base / "tap",
        record=base / "record.pkl",
    )
    finish(start_script(script))
    return base


def test_secure_weights_equal_fedavg_within_the_quantisation_error(
    plain_and_secure: Path,
) -> None:
    work = plain_and_secure / "work"
    plain, secure = state_of(work, "federated-tiny"), state_of(work, "federated-tiny-secagg")
    bound = quantization_error(3, CLAIMS, clip=CLIP, levels=LEVELS, max_weight=MAX_WEIGHT)
    assert bound < 1.2e-7  # 3 * 3 * 0.5 / (2**24 * (120 / 50 - 3 / 2**25))
    for record in secure["history"]:
        sa = record["secure_aggregation"]
        assert record["sites_trained"] == ["site-0", "site-1", "site-2"]
        assert sa["masked_vectors"] == 3 and sa["clipped"] == [] and sa["dropped"] == []
        assert sa["quantization_error"] == pytest.approx(bound)
        assert record["train"]["num-examples"] == 120
    assert [r["sites_trained"] for r in plain["history"]] == [
        r["sites_trained"] for r in secure["history"]
    ]

    # Round 1: both runs start from the same weights and the sites train identically.
    a, b = weights(work, "federated-tiny", 1), weights(work, "federated-tiny-secagg", 1)
    largest = max(float(np.abs(v).max()) for v in a.values())
    allowed = bound + (1 + PLAIN_ROUNDINGS) * FLOAT32_ROUNDING * largest
    measured = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    print(f"round 1: max |secure - FedAvg| = {measured:.3g} <= bound {allowed:.3g}")
    assert measured <= allowed

    # Every round: the secure global equals the exact example-weighted FedAvg of the updates
    # its sites computed (tapped before masking), from the secure run's previous global.
    tap = plain_and_secure / "tap"
    uid = secure["uid"]
    start = _initial_weights()  # round 1 starts from the initial weights, as the plain run
    for server_round in (1, 2):
        sites = [dict(np.load(tap / f"{uid}-{server_round}-{p}.npz")) for p in range(3)]
        exact = {
            k: start[k].astype(np.float64)
            + sum(
                w * (s[k].astype(np.float64) - start[k]) for w, s in zip(CLAIMS, sites, strict=True)
            )
            / sum(CLAIMS)
            for k in start
        }
        got = weights(work, "federated-tiny-secagg", server_round)
        largest = max(float(np.abs(v).max()) for v in exact.values())
        allowed = bound + FLOAT32_ROUNDING * largest
        measured = max(float(np.abs(exact[k] - got[k]).max()) for k in got)
        print(f"round {server_round}: max |secure - FedAvg of its updates| = {measured:.3g}")
        assert measured <= allowed
        start = got

    # After round 1 the two runs' sites start from weights that differ by the quantisation
    # error, which local AdamW steps amplify: the plain run's round 2 is near, not within it.
    a, b = weights(work, "federated-tiny", 2), weights(work, "federated-tiny-secagg", 2)
    drift = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    print(f"round 2: max |secure - plain run| = {drift:.3g}")
    assert drift < 1e-2


def _initial_weights() -> dict[str, np.ndarray]:
    from server.server_app import initial_weights

    config = load_config(ROOT / "configs" / "federated-tiny.yaml", BASE.split())
    return {k: v.numpy() for k, v in initial_weights(config).items()}


def test_the_server_receives_masked_vectors_not_updates(plain_and_secure: Path) -> None:
    entries = read_record(plain_and_secure / "record.pkl")
    tap = plain_and_secure / "tap"
    work = plain_and_secure / "work"
    start = _initial_weights()
    plain_uid = state_of(work, "federated-tiny")["uid"]
    secure_uid = state_of(work, "federated-tiny-secagg")["uid"]

    plain = [e for e in entries if e["run"] == 0][:3]  # round 1's replies come first
    assert len(plain) == 3  # without SecAgg the server holds each site's weights
    for entry in plain:
        site = int(entry["configs"]["site"]["name"].removeprefix("site-"))
        local = np.load(tap / f"{plain_uid}-1-{site}.npz")
        assert all(np.array_equal(entry["arrays"]["arrays"][k], local[k]) for k in local)

    secure = [e for e in entries if e["run"] == 1]
    assert len(secure) == 2 * 4 * 3  # 2 rounds x 4 stages x 3 sites
    for entry in secure:  # no stage carries an array of weights
        assert all(len(arrays) == 0 for arrays in entry["arrays"].values())
    masked = [
        e for e in secure if Key.MASKED_PARAMETERS in e["configs"].get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(masked) == 6
    for entry in masked:
        site = int(entry["configs"]["site"]["name"].removeprefix("site-"))
        server_round = int(entry["group"])
        vector = np.concatenate(
            [a.ravel() for a in entry["configs"][RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][1:]]
        ).astype(np.float64)
        if server_round == 1:
            local = np.load(tap / f"{secure_uid}-1-{site}.npz")
            update = np.concatenate(
                [(local[k].astype(np.float64) - start[k]).ravel() for k in start]
            )
            # The site's quantised update lies in [0, LEVELS]; masked, the entries are uniform
            # in [0, 2**32) and do not follow the update.
            assert vector.size == update.size
            assert float(np.corrcoef(vector, update)[0, 1]) ** 2 < 1e-3
        assert np.mean(vector > LEVELS) > 0.99
        assert abs(vector.mean() / 2**31 - 1) < 0.01


def test_state_and_model_card_name_secure_aggregation(plain_and_secure: Path) -> None:
    work = plain_and_secure / "work"
    state = state_of(work, "federated-tiny-secagg")
    settings = state["secure_aggregation"]
    assert settings["num_shares"] == 3 and settings["reconstruction_threshold"] == 2
    assert settings["quantization_range"] == LEVELS and settings["max_weight"] == MAX_WEIGHT
    assert "secure_aggregation" not in state_of(work, "federated-tiny")
    card = json.loads((work / "releases" / "fundus-tiny-secagg-v1" / "model-card.json").read_text())
    secure = card["privacy"]["secure_aggregation"]
    assert secure["rounds"] == 2 and secure["update_clip_norm"] == 50
    assert "does_not_protect" in secure
    plain = json.loads((work / "releases" / "fundus-tiny-v1" / "model-card.json").read_text())
    assert plain["privacy"]["secure_aggregation"] is None


def test_a_site_dropping_out_and_one_far_beyond_the_bound(tmp_path: Path) -> None:
    # Site 1 fails in round 1 after it sent its key shares; site 2 sends weights x1000 in both
    # rounds: clipped at the site to the announced L2 bound, so its update still counts.
    workdir = tmp_path / "work"
    script = write_simulation(
        tmp_path / "sim.py",
        {"workdir": str(workdir), "overrides": BASE + SECURE + " federation.update_clip_norm=2"},
        failing={1: (1,)},
        poisoned=(2,),
        poison="scaled",
    )
    output = finish(start_script(script))
    state = state_of(workdir, "federated-tiny-secagg")
    first, second = state["history"]
    assert first["sites_trained"] == ["site-0", "site-2"] and not first.get("failed")
    assert first["secure_aggregation"]["masked_vectors"] == 2
    assert len(first["secure_aggregation"]["dropped"]) == 1
    assert "dropped out of the round" in first["rejected"][0]["reason"]
    assert first["train"]["num-examples"] == 80
    assert second["sites_trained"] == ["site-0", "site-1", "site-2"]
    for record in (first, second):
        sa = record["secure_aggregation"]
        assert "site-2" in sa["clipped"] and sa["aggregate_refused"] is None
        assert sa["aggregate_norm"] <= sa["aggregate_bound"] <= 2 + 1e-3
    assert "site-2 clipped its update" in output
    assert (workdir / "releases" / "fundus-tiny-secagg-v1" / "manifest.sig").is_file()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["federation.reconstruction_threshold=3"], "federation.reconstruction_threshold"),
        (
            ["federation.num_shares=5", "federation.reconstruction_threshold=4"],
            "federation.reconstruction_threshold",
        ),
        (["federation.num_shares=2"], "federation.num_shares"),
        (
            ["privacy.central=true", "privacy.central_clipping_norm=1"],
            "federation.secure_aggregation",
        ),
        (["federation.max_weight=0"], "federation.max_weight"),
    ],
)
def test_a_bad_secure_aggregation_config_is_one_line_naming_the_key(
    overrides: list[str], key: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(
            ROOT / "configs" / "federated-tiny.yaml",
            ["federation.secure_aggregation=true", *overrides],
        )
    message = str(error.value)
    assert "\n" not in message and f": {key}: " in message, message


def test_the_site_refuses_a_broken_update_and_clips_a_large_one() -> None:
    reference = {"w": np.zeros((4,), np.float32), "n": np.zeros((), np.int64)}

    def local(w: list[float]) -> ArrayRecord:
        return ArrayRecord(
            {"w": Array(np.asarray(w, np.float32)), "n": Array(np.zeros((), np.int64))}
        )

    assert "NaN" in update_problem(local([0, float("nan"), 0, 0]), reference)
    wrong = ArrayRecord(
        {"w": Array(np.zeros((3,), np.float32)), "n": Array(np.zeros((), np.int64))}
    )
    assert "shape" in update_problem(wrong, reference)
    assert update_problem(local([3, 4, 0, 0]), reference) is None
    update, clipped = clipped_update(local([3, 4, 0, 0]), reference, 1.0, 10.0)
    assert clipped and np.linalg.norm(update[0]) == pytest.approx(1.0)
    update, clipped = clipped_update(local([0.3, 0.4, 0, 0]), reference, 1.0, 0.35)
    assert clipped and float(np.abs(update[0]).max()) == pytest.approx(0.35)
    update, clipped = clipped_update(local([0.3, 0.4, 0, 0]), reference, 1.0, 1.0)
    assert not clipped and update[1].shape == ()


def test_the_server_refuses_a_broken_or_oversized_aggregate() -> None:
    global_arrays = ArrayRecord({"w": Array(np.zeros((4,), np.float32))})
    norm, problem = check_aggregate([np.array([3.0, 4.0, 0, 0])], global_arrays, 5.0 + 1e-9)
    assert problem is None and norm == pytest.approx(5.0)
    _, problem = check_aggregate([np.array([30.0, 40.0, 0, 0])], global_arrays, 5.0)
    assert "over the bound" in problem
    _, problem = check_aggregate([np.array([np.nan, 0, 0, 0])], global_arrays, 5.0)
    assert "NaN" in problem


def test_max_weight_bounds_claims_without_secure_aggregation_too() -> None:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server.validation import cap_claimed_examples

    # Messages can only be built inside a Flower run; give this process a run identity.
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1

    def reply(site: str, examples: int) -> Message:
        content = RecordDict(
            {
                "metrics": MetricRecord({"num-examples": examples}),
                "site": ConfigRecord({"name": site}),
            }
        )
        return Message(content=content, dst_node_id=1, message_type="train")

    replies = [reply("a", 40), reply("b", 40), reply("c", 40)]
    assert cap_claimed_examples(replies, max_ratio=10, registered={}, max_weight=30)
    assert [int(m.content["metrics"]["num-examples"]) for m in replies] == [30, 30, 30]
    replies = [reply("a", 40), reply("b", 40)]
    assert cap_claimed_examples(replies, max_ratio=10, registered={}, max_weight=None) == []
