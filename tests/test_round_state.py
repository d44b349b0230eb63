"""State that outlives a federated round: each site's AdamW moments and the server's momentum.

Both are written to disk (safetensors) and read back by a fresh process, as after a restart;
the end-to-end check that a resumed run equals an uninterrupted one is in test_federation.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from client import optimizer_state
from medsegdiff_core.checkpoint import load_optimizer_tensors, optimizer_tensors
from medsegdiff_core.config import load_config
from medsegdiff_core.errors import CheckpointError
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.training import make_optimizer
from server.run_store import RunState, RunStore, config_digest
from server.server_momentum import ServerMomentum

ROOT = Path(__file__).resolve().parents[1]


def trained(seed: int, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 1))
    optimizer = make_optimizer(model, 1e-2, 1e-4)
    for _ in range(steps):
        step(model, optimizer)
    return model, optimizer


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()


def test_optimizer_state_round_trips_and_training_continues_identically(tmp_path: Path) -> None:
    model, optimizer = trained(0)
    optimizer_state.save(optimizer, tmp_path, "run1", server_round=1)

    twin = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 1))
    twin.load_state_dict(model.state_dict())
    fresh = make_optimizer(twin, 1e-2, 1e-4)
    assert optimizer_state.restore(fresh, tmp_path, "run1", server_round=2) == 1
    assert fresh.state_dict()["state"][0]["step"] == 3

    torch.manual_seed(7)
    step(model, optimizer)
    torch.manual_seed(7)
    step(twin, fresh)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Without the kept moments the same step goes elsewhere: the state matters.
    other = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 1))
    other.load_state_dict(twin.state_dict())
    torch.manual_seed(8)
    step(twin, fresh)
    torch.manual_seed(8)
    step(other, make_optimizer(other, 1e-2, 1e-4))
    assert not torch.equal(next(twin.parameters()), next(other.parameters()))


def test_a_redone_round_reads_the_state_from_before_it(tmp_path: Path) -> None:
    _, optimizer = trained(0)
    for server_round in (1, 2, 3):
        optimizer_state.save(optimizer, tmp_path, "run1", server_round)
    files = sorted(p.name for p in (tmp_path / "optimizer" / "run1").iterdir())
    assert files == ["round-0002.safetensors", "round-0003.safetensors"]  # older ones pruned

    fresh = make_optimizer(trained(0)[0], 1e-2, 1e-4)
    # Round 3 redone after a server crash: it must start from round 2's state, not its own.
    assert optimizer_state.restore(fresh, tmp_path, "run1", server_round=3) == 2
    assert optimizer_state.restore(fresh, tmp_path, "run1", server_round=4) == 3
    assert optimizer_state.restore(fresh, tmp_path, "another-run", server_round=4) is None

    optimizer_state.save(optimizer, tmp_path, "run2", 1)  # a new run drops the old run's state
    assert [p.name for p in (tmp_path / "optimizer").iterdir()] == ["run2"]
    with pytest.raises(ValueError, match="not a plain name"):
        optimizer_state.save(optimizer, tmp_path, "../escape", 1)


def test_state_of_another_model_is_refused_and_the_round_starts_afresh(tmp_path: Path) -> None:
    _, optimizer = trained(0)
    optimizer_state.save(optimizer, tmp_path, "run1", 1)
    wider = nn.Sequential(nn.Linear(4, 16), nn.GroupNorm(2, 16), nn.Linear(16, 1))
    fresh = make_optimizer(wider, 1e-2, 1e-4)
    assert optimizer_state.restore(fresh, tmp_path, "run1", 2) is None
    assert fresh.state_dict()["state"] == {}
    with pytest.raises(CheckpointError, match="round-0001.safetensors.*shape"):
        load_optimizer_tensors(
            fresh,
            optimizer_tensors(optimizer),
            source=tmp_path / "optimizer" / "run1" / "round-0001.safetensors",
        )


def arrays(**values: float) -> ArrayRecord:
    return ArrayRecord(
        {k: torch.full((2, 2), v) for k, v in values.items()} | {"count": torch.tensor([3])}
    )


def test_server_momentum_follows_fedavgm() -> None:
    momentum = ServerMomentum(0.5, lr=1.0)
    weights = arrays(w=1.0)
    expected_w, velocity = 1.0, 0.0
    for averaged_w in (0.8, 0.7, 0.75):
        pseudo_gradient = expected_w - averaged_w
        velocity = 0.5 * velocity + pseudo_gradient if velocity else pseudo_gradient
        expected_w -= velocity
        weights = momentum.step(weights, arrays(w=averaged_w))
        state = weights.to_torch_state_dict()
        torch.testing.assert_close(state["w"], torch.full((2, 2), expected_w))
        assert torch.equal(state["count"], torch.tensor([3]))  # integers are not stepped
    assert expected_w < 0.75  # momentum carried the model past the last average

    plain = ServerMomentum(0.0, lr=1.0)
    assert not plain.enabled
    averaged = arrays(w=0.3)
    assert plain.step(arrays(w=1.0), averaged) is averaged


def test_run_store_keeps_run_uid_and_momentum_across_restarts(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "federated-tiny.yaml")
    store = RunStore(tmp_path, config)
    state, weights = store.load()
    assert weights is None and state.velocity == {}
    model = MedSegDiffUNet(config.unet_spec())
    velocity = {"w": torch.arange(4.0)}
    for server_round in (1, 2, 3, 4):
        store.save_round(state, model, {"round": server_round}, velocity)

    again: RunState
    again, weights = RunStore(tmp_path, config).load()
    assert again.uid == state.uid and again.completed_round == 4 and weights is not None
    torch.testing.assert_close(again.velocity["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.glob("momentum-*")) == [
        "momentum-0002.safetensors",
        "momentum-0003.safetensors",
        "momentum-0004.safetensors",
    ]
    assert RunStore(tmp_path / "new", config).load()[0].uid != state.uid


def test_settings_added_later_do_not_change_the_digest_of_older_runs() -> None:
    """A run begun before ``inference.eta``, the secure-aggregation keys, the site size, the
    DP accountant and the DP training recipe existed resumes:
    at their defaults they are not part of the digest; set, they are."""
    import hashlib
    import json

    config = load_config(ROOT / "configs" / "federated-tiny.yaml")
    resumable = {"rounds", "round_timeout_s", "initial_release", "initial_release_public_key"}
    older = config.model_dump(mode="json", exclude={"federation": resumable})
    del older["inference"]["eta"]
    for key in ("max_weight", "secure_aggregation", "num_shares", "reconstruction_threshold"):
        del older["federation"][key]
    for key in ("update_clip_norm", "quantization_clip", "quantization_range"):
        del older["federation"][key]
    del older["federation"]["simulated_train_slices"]
    for key in (
        "accountant",
        "expected_batch_size",
        "local_steps",
        "lr",
        "augmentation_multiplicity",
        "trainable",
        "iterate_averaging",
    ):
        del older["privacy"][key]
    expected = hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()
    assert config_digest(config) == expected
    changed = config.model_copy(
        update={"inference": config.inference.model_copy(update={"eta": 1.0})}
    )
    assert config_digest(changed) != expected
