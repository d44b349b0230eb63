"""Differential privacy per site (DP-SGD with Opacus) under a budget the system enforces.

* Opacus computes the same gradients as plain training, per-sample clipped, in every grad-sample
  mode the config offers; an empty Poisson batch is still a (pure-noise) step.
* The epsilon a site reports is what Opacus' RDP accountant computes for the same noise, sample
  rate and step count; the ledger survives a new ClientApp each round (it lives on disk).
* A site at its budget declines, through the real ClientApp handler with real Flower messages,
  and in a real Flower simulation, where the server goes on with the other sites and the
  release's model card states each site's final epsilon and delta. That simulation starts from
  a signed public release (``federation.initial_release``): round 1's global weights are the
  release's, and the card names it; a release that fails verification or has another
  architecture is refused with one line naming it.
* Bad settings are one-line errors naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flower_simulation import write_simulation
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from client.privacy_state import with_site_privacy
from medsegdiff_core.checkpoint import save_experiment_checkpoint
from medsegdiff_core.config import ExperimentConfig, load_config, parse_config
from medsegdiff_core.diffusion import diffusion_loss
from medsegdiff_core.errors import CheckpointError, ConfigError
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.privacy import (
    PLAN_EPSILON_TOLERANCE,
    Epsilon,
    PrivacyLedger,
    PrivacyLedgerError,
    PrivacyPlan,
    PRVUnavailable,
    account,
    default_delta,
    dp_train_steps,
    epsilon_of,
    make_dp_compatible,
    merge_history,
    plan_privacy,
    prv_epsilon,
)
from medsegdiff_core.records import PrivacyRecord, RoundRecord
from medsegdiff_core.release import (
    ReleaseError,
    generate_signing_key,
    load_private_key,
    public_path,
    write_release,
)
from medsegdiff_core.training import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: a second thread only spins, which on a busy 2-core machine made
    the DP steps 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def opacus_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon as Opacus' accountant counts it when its DP optimiser takes ``steps`` steps."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
    return accountant.get_epsilon(delta=delta)


def tiny_config(**privacy: object) -> ExperimentConfig:
    return parse_config(
        {
            "model": {"preset": "tiny", "image_size": 32, "base_channels": 8},
            "diffusion": {"prediction": "v"},
            "privacy": privacy,
        }
    )


def plan(noise: float, sample_rate: float, steps: int, n: int, **kw: object) -> PrivacyPlan:
    values = {
        "noise_multiplier": noise,
        "sample_rate": sample_rate,
        "steps": steps,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "delta_is_default": True,
        "target_epsilon": 8.0,
        "num_examples": n,
        "planned_rounds": 1,
        "noise_calibrated": False,
    }
    return PrivacyPlan(**(values | kw))  # type: ignore[arg-type]


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("privacy", "key"),
    [
        ({"enabled": True, "target_epsilon": 0}, "privacy.target_epsilon"),
        ({"enabled": True, "target_epsilon": -1.0}, "privacy.target_epsilon"),
        ({"enabled": True, "target_epsilon": 3, "delta": 1.0}, "privacy.delta"),
        (
            {"enabled": True, "target_epsilon": 3, "noise_multiplier": -0.5},
            "privacy.noise_multiplier",
        ),
        ({"enabled": True}, "privacy.target_epsilon"),
        ({"central": True}, "privacy.central_clipping_norm"),
        ({"epsilon": 3}, "privacy.epsilon: unknown key"),
    ],
)
def test_bad_privacy_settings_name_the_key(privacy: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(**privacy)


def test_node_config_overrides_are_the_sites_own_and_checked() -> None:
    config = load_config(ROOT / "configs" / "federated-tiny.yaml")
    assert not config.privacy.enabled
    node = {"partition-id": 0, "privacy.enabled": True, "privacy.target_epsilon": 3.0}
    site = with_site_privacy(config, node)
    assert site.privacy.enabled and site.privacy.target_epsilon == 3.0
    assert site.model_dump(exclude={"privacy"}) == config.model_dump(exclude={"privacy"})
    with pytest.raises(ConfigError, match=r"node config: privacy\.delta"):
        with_site_privacy(config, node | {"privacy.delta": 2.0})


def test_plan_delta_noise_and_sample_rate() -> None:
    privacy = tiny_config(enabled=True, target_epsilon=3.0).privacy
    p = plan_privacy(privacy, num_examples=40, batch_size=8, local_steps=30, rounds=3)
    assert p.sample_rate == pytest.approx(0.2) and p.expected_batch_size == pytest.approx(8)
    assert p.delta == default_delta(40) == 1e-5 and p.delta_is_default
    # Opacus picks the noise for the whole plan: 3 rounds of 30 Poisson batches.
    expected = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.2, steps=90, accountant="rdp"
    )
    assert p.noise_calibrated and p.noise_multiplier == pytest.approx(expected)
    assert 2.98 <= opacus_epsilon(p.noise_multiplier, 0.2, 90, 1e-5) <= 3.0
    assert default_delta(10**6) == pytest.approx(1e-7)  # always below 1/N
    with pytest.raises(ConfigError, match=r"privacy\.delta.*1/N"):
        plan_privacy(
            tiny_config(enabled=True, target_epsilon=3.0, delta=0.05).privacy,
            num_examples=40,
            batch_size=8,
            local_steps=30,
            rounds=3,
        )


def test_batchnorm_model_refused_and_ours_needs_no_swap() -> None:
    model = MedSegDiffUNet(tiny_config().unet_spec())
    assert make_dp_compatible(model) is model
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"privacy\.enabled: the model has BatchNorm"):
        make_dp_compatible(bn)


# --- DP-SGD ---------------------------------------------------------------------------------


def _toy_data(n: int, size: int = 32) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    return [
        {"image": torch.randn(3, size, size), "mask": (torch.rand(2, size, size) > 0.5).float()}
        for _ in range(n)
    ]


def autograd_gradient(
    model: nn.Module, schedule, image, x0, t, noise, rows: slice
) -> tuple[float, dict[str, torch.Tensor]]:
    """The diffusion loss of ``rows`` of a batch and its gradient, by plain autograd alone."""
    model.zero_grad()
    loss = diffusion_loss(
        lambda x, tt: model(x, tt, image[rows]), x0[rows], schedule, t=t[rows], noise=noise[rows]
    )["loss"]
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["vmap", "functorch", "hooks", "ghost"])
def test_dp_step_is_the_mean_of_clipped_per_sample_gradients(mode: str) -> None:
    """No noise, every slice sampled: the DP update is -lr * mean_i clip_C(grad_i), where each
    grad_i is computed alone by plain autograd. So Opacus changes nothing the model computes."""
    config = tiny_config()
    schedule = config.diffusion.noise_schedule()
    torch.manual_seed(0)
    base = MedSegDiffUNet(config.unet_spec())
    data = _toy_data(4)
    clip = 0.05
    image = torch.stack([d["image"] for d in data])
    x0 = torch.stack([d["mask"] for d in data]) * 2 - 1
    torch.manual_seed(5)  # the draws batch_loss makes: timesteps, then noise
    t = torch.randint(0, schedule.num_steps, (4,))
    noise = torch.randn(x0.shape)

    reference = copy.deepcopy(base)
    total = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    norms = []
    for i in range(4):
        _, grads = autograd_gradient(reference, schedule, image, x0, t, noise, slice(i, i + 1))
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        norms.append(float(norm))
        for name, g in grads.items():
            total[name] += g * min(1.0, clip / (float(norm) + 1e-6))
    assert max(norms) > clip  # clipping really binds

    model = copy.deepcopy(base)
    torch.manual_seed(5)
    stats = dp_train_steps(
        model,
        schedule,
        data,
        plan(0.0, 1.0, 1, 4, max_grad_norm=clip),
        torch.optim.SGD(model.parameters(), lr=1.0),
        grad_sample_mode=mode,
        sampling_generator=torch.Generator().manual_seed(0),
    )
    assert (stats.steps, stats.examples, stats.history) == (1, 4, [(0.0, 1.0, 1)])
    for name, param in model.named_parameters():
        expected = dict(base.named_parameters())[name] - total[name] / 4
        torch.testing.assert_close(param, expected, rtol=1e-4, atol=1e-6, msg=name)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # unhooked


def test_fedprox_gradient_is_added_after_clipping_and_noise() -> None:
    """The proximal term depends on the weights only: its gradient mu (w - w_ref) joins the
    noisy mean gradient unclipped (here no noise, no binding clip: plain FedProx)."""
    from medsegdiff_core.training import ProximalTerm, batch_loss

    config = tiny_config()
    schedule = config.diffusion.noise_schedule()
    torch.manual_seed(0)
    base = MedSegDiffUNet(config.unet_spec())
    data = _toy_data(4)
    reference = {n: p.detach() - 1.0 for n, p in base.named_parameters()}  # w - w_ref = 1
    mu = 0.3

    plain = copy.deepcopy(base)
    torch.manual_seed(5)
    batch = {k: torch.stack([d[k] for d in data]) for k in ("image", "mask")}
    loss = batch_loss(plain, schedule, batch)["loss"] + ProximalTerm(mu, reference)(plain)
    loss.backward()
    expected = {n: p.detach() - p.grad for n, p in plain.named_parameters()}

    model = copy.deepcopy(base)
    torch.manual_seed(5)
    dp_train_steps(
        model,
        schedule,
        data,
        plan(0.0, 1.0, 1, 4, max_grad_norm=1e6),
        torch.optim.SGD(model.parameters(), lr=1.0),
        proximal=ProximalTerm(mu, reference),
        sampling_generator=torch.Generator().manual_seed(0),
    )
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_empty_poisson_batches_are_noise_steps_and_counted() -> None:
    config = tiny_config()
    model = MedSegDiffUNet(config.unet_spec())
    before = copy.deepcopy(model.state_dict())
    p = plan(1.0, 1e-12, 3, 2)  # nobody is ever sampled
    results = []
    for seed in (7, 7, 8):
        trained = copy.deepcopy(model)
        stats = dp_train_steps(
            trained,
            config.diffusion.noise_schedule(),
            _toy_data(2),
            p,
            torch.optim.SGD(trained.parameters(), lr=1e-12),
            noise_generator=torch.Generator().manual_seed(seed),
        )
        assert (stats.steps, stats.empty_batches, stats.examples) == (3, 3, 0)
        assert stats.history == [(1.0, 1e-12, 3)]  # Opacus' own accountant counted them
        results.append(trained.state_dict())
    for key, value in before.items():
        assert not torch.equal(results[0][key], value)  # noise moved every weight
        assert torch.isfinite(results[0][key]).all()
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=0)
    assert any(not torch.equal(results[0][k], results[2][k]) for k in before)


# --- accounting -----------------------------------------------------------------------------


def test_ledger_epsilon_is_opacus_and_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "privacy-ledger.json"
    p = plan(1.1, 0.1, 5, 40, target_epsilon=1e9)
    for server_round in (1, 2):
        ledger = PrivacyLedger(path)  # a new ClientApp / SuperNode process each round
        decision = ledger.reserve(server_round, p)
        assert decision.granted
        ledger.complete(decision.entry, [(1.1, 0.1, 5)])
    assert PrivacyLedger(path).epsilon() == pytest.approx(
        opacus_epsilon(1.1, 0.1, 10, 1e-5), rel=1e-12
    )
    # A round that started and never finished (crash) counts in full: the safe side.
    PrivacyLedger(path).reserve(3, p)
    data = json.loads(path.read_text())
    assert [e["status"] for e in data["entries"]] == ["completed", "completed", "started"]
    assert PrivacyLedger(path).epsilon() == pytest.approx(opacus_epsilon(1.1, 0.1, 15, 1e-5))

    path.write_text("{not json")
    with pytest.raises(PrivacyLedgerError, match="refuses to train"):
        PrivacyLedger(path).reserve(4, p)


def test_the_delta_is_pinned_at_the_sites_first_dp_round(tmp_path: Path) -> None:
    # Two rounds fit the budget at delta 1e-3 but not at 1e-5: a later run that raises delta
    # (still below 1/N = 0.025) must not make the site's spent epsilon look smaller.
    target = (opacus_epsilon(1.0, 0.1, 5, 1e-5) + opacus_epsilon(1.0, 0.1, 10, 1e-5)) / 2
    assert opacus_epsilon(1.0, 0.1, 10, 1e-3) < target
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    first = ledger.reserve(1, plan(1.0, 0.1, 5, 40, target_epsilon=target, delta=1e-5))
    ledger.complete(first.entry, [(1.0, 0.1, 5)])
    assert ledger.delta() == 1e-5
    later = ledger.reserve(2, plan(1.0, 0.1, 5, 40, target_epsilon=target, delta=1e-3))
    assert not later.granted and later.delta == 1e-5
    assert later.spent == pytest.approx(opacus_epsilon(1.0, 0.1, 5, 1e-5))
    assert ledger.epsilon() == pytest.approx(opacus_epsilon(1.0, 0.1, 5, 1e-5))
    with pytest.raises(PrivacyLedgerError, match="pinned at its first DP round, is not below"):
        ledger.reserve(3, plan(1.0, 1e-6, 5, 200_000, target_epsilon=target, delta=1e-6))
    assert json.loads(ledger.path.read_text())["delta"] == 1e-5


def test_identical_rounds_are_accounted_as_one_entry() -> None:
    history = [(1.0, 0.1, 5)] * 400 + [(2.0, 0.1, 3)] * 100
    assert merge_history(history) == [(1.0, 0.1, 2000), (2.0, 0.1, 300)]
    assert epsilon_of(history, 1e-5) == pytest.approx(
        epsilon_of([(1.0, 0.1, 2000), (2.0, 0.1, 300)], 1e-5), rel=1e-12
    )


def test_budget_declines_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    one_round = opacus_epsilon(1.0, 0.1, 5, 1e-5)
    p = plan(1.0, 0.1, 5, 40, target_epsilon=1.01 * opacus_epsilon(1.0, 0.1, 10, 1e-5))
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    for server_round in (1, 2):
        decision = ledger.reserve(server_round, p)
        assert decision.granted
        ledger.complete(decision.entry, [(1.0, 0.1, 5)])
    refused = ledger.reserve(3, p)
    assert not refused.granted and "privacy budget" in refused.reason
    assert refused.spent == pytest.approx(opacus_epsilon(1.0, 0.1, 10, 1e-5))
    assert refused.after == pytest.approx(opacus_epsilon(1.0, 0.1, 15, 1e-5))
    assert len(ledger.entries()) == 2 and one_round < refused.spent
    assert epsilon_of([(0.0, 0.1, 1)], 1e-5) == float("inf")  # no noise, no guarantee


def test_ledger_location_is_the_sites_choice_not_the_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.privacy_state import ledger_path
    from client.site import Site

    monkeypatch.setenv("FEDMEDSEGDIFF_HOME", str(tmp_path / "site-home"))
    site = Site("hospital-a", tmp_path, tmp_path / "server-workdir" / "sites" / "x", None, None)  # type: ignore[arg-type]
    real = {"data-path": str(tmp_path)}
    assert ledger_path(site, real) == tmp_path / "site-home" / "sites" / "hospital-a" / (
        "privacy-ledger.json"
    )
    assert ledger_path(site, real | {"state-dir": "/x"}) == site.state_dir / "privacy-ledger.json"
    assert ledger_path(site, {"privacy-ledger": str(tmp_path / "l.json")}) == tmp_path / "l.json"
    assert ledger_path(site, {"partition-id": 0}) == site.state_dir / "privacy-ledger.json"


# --- the ClientApp with real messages ---------------------------------------------------------


def train_message(weights: ArrayRecord, server_round: int) -> Message:
    """A train message as the SuperNode hands it over: metadata set by the SuperLink."""
    return Message(
        content=RecordDict(
            {"arrays": weights, "config": ConfigRecord({"server-round": server_round})}
        ),
        metadata=Metadata(
            run_id=1,
            message_id=f"train-{server_round}",
            src_node_id=0,
            dst_node_id=1,
            reply_to_message_id="",
            group_id=str(server_round),
            created_at=time.time(),
            ttl=3600.0,
            message_type="train",
        ),
    )


def site_context(node_config: dict, run_config: dict) -> Context:
    """A fresh ClientApp context, as every round gets."""
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def test_client_app_reports_opacus_epsilon_and_declines_at_budget(
    fundus_sites: list[Path], tmp_path: Path
) -> None:
    from client import client_app

    overrides = (
        "federation.local_steps=3 train.batch_size=4 model.base_channels=8 federation.rounds=3"
    )
    run_config = {"workdir": str(tmp_path / "work"), "overrides": overrides}
    # The hospital's SuperNode sets its own budget: exactly two rounds of noise 1.0 fit.
    q, delta = 4 / 24, default_delta(24)
    target = 1.001 * opacus_epsilon(1.0, q, 6, delta)
    node_config = {
        "data-path": str(fundus_sites[0]),
        "site-name": "hospital-a",
        "state-dir": str(tmp_path / "hospital-a-state"),
        "privacy.enabled": True,
        "privacy.noise_multiplier": 1.0,
        "privacy.target_epsilon": target,
        "privacy.grad_sample_mode": "functorch",
    }
    config = load_config(ROOT / "configs/federated-tiny.yaml", overrides.split())
    weights = ArrayRecord(MedSegDiffUNet(config.unet_spec()).state_dict())

    replies = [
        client_app.train(train_message(weights, r), site_context(node_config, run_config))
        for r in (1, 2, 3)
    ]

    for server_round, reply in zip((1, 2), replies[:2], strict=True):
        privacy = reply.content["privacy"]
        assert privacy["enabled"] and not privacy["declined"]
        assert "arrays" in reply.content.array_records
        assert reply.content["metrics"]["train-steps"] == 3
        assert privacy["sample-rate"] == pytest.approx(q) and privacy["delta"] == delta
        assert privacy["epsilon"] == pytest.approx(
            opacus_epsilon(1.0, q, 3 * server_round, delta), rel=1e-12
        )
    declined = replies[2].content
    assert declined["privacy"]["declined"] and "privacy budget" in declined["privacy"]["reason"]
    assert not declined.array_records  # no weights leave a site that declines
    assert declined["privacy"]["epsilon"] == pytest.approx(replies[1].content["privacy"]["epsilon"])
    ledger = json.loads((tmp_path / "hospital-a-state" / "privacy-ledger.json").read_text())
    assert [(e["round"], e["steps"], e["status"]) for e in ledger["entries"]] == [
        (1, 3, "completed"),
        (2, 3, "completed"),
    ]


# --- a real Flower simulation ----------------------------------------------------------------


def write_tiny_release(
    root: Path, key: Path, config: ExperimentConfig, *, name: str = "public-tiny", seed: int = 1234
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A signed release (``root/<name>-v1``, signed by ``key``, created if missing) of a model of
    ``config``'s architecture at a random initialisation of its own ``seed``; and its weights."""
    torch.manual_seed(seed)
    model = MedSegDiffUNet(config.unet_spec())
    checkpoint = save_experiment_checkpoint(
        root.parent / f".{name}-checkpoint" / "model", model, config
    )
    if not key.exists():
        generate_signing_key(key)
    card = {"summary": "a public model for the tests"}
    release = write_release(checkpoint, root, name, card, load_private_key(key), version=1)
    return release, {k: v.clone() for k, v in model.state_dict().items()}


def test_simulation_site_at_budget_declines_and_card_states_epsilons(tmp_path: Path) -> None:
    from server.server_app import initial_weights

    workdir = tmp_path / "work"
    federated = load_config(ROOT / "configs" / "federated-tiny.yaml")
    # The run starts from a public release in the workdir (a relative path is taken from there),
    # signed by a key of its own, not the server's release key.
    key = tmp_path / "public-key" / "signing.pem"
    release, public_weights = write_tiny_release(workdir / "releases", key, federated)
    received = tmp_path / "received"
    received.mkdir()
    steps, n, batch = 4, 40, 8
    q, delta = batch / n, default_delta(n)
    node_config = {
        0: {"privacy.enabled": True, "privacy.target_epsilon": 8.0},  # noise chosen by Opacus
        1: {  # budget for exactly one round
            "privacy.enabled": True,
            "privacy.noise_multiplier": 1.0,
            "privacy.target_epsilon": 1.001 * opacus_epsilon(1.0, q, steps, delta),
        },
        2: {},  # this hospital trains without DP
    }
    overrides = (
        f"federation.rounds=2 federation.local_steps={steps} inference.sampling_steps=3 "
        "inference.ensemble=2 privacy.central=true privacy.central_clipping_norm=10 "
        "privacy.central_noise_multiplier=0.0001 "
        "federation.initial_release=releases/public-tiny-v1 "
        f"federation.initial_release_public_key={public_path(key)}"
    )
    script = write_simulation(
        tmp_path / "dp-sim.py",
        {"workdir": str(workdir), "overrides": overrides},
        node_config=node_config,
        received=received,
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "round 2: site-1 declined to train: privacy budget" in output
    assert "round 1 starts from release public-tiny v1" in output

    # Round 1's global weights, as every site received them, are the release's exactly: not the
    # random initialisation the run would otherwise have started from; round 2's are trained.
    random_start = initial_weights(federated).to_torch_state_dict()
    assert any(not torch.equal(random_start[k], v) for k, v in public_weights.items())
    for site in range(3):
        (first_round,) = received.glob(f"*-1-{site}.npz")
        with np.load(first_round) as arrays:
            assert set(arrays.files) == set(public_weights)
            for name, value in public_weights.items():
                np.testing.assert_array_equal(arrays[name], value.numpy())
    (second_round,) = received.glob("*-2-0.npz")
    with np.load(second_round) as arrays:
        assert any(not np.array_equal(arrays[k], v.numpy()) for k, v in public_weights.items())

    state = json.loads((workdir / "runs" / "federated-tiny" / "state.json").read_text())
    manifest_sha256 = hashlib.sha256((release / "manifest.json").read_bytes()).hexdigest()
    assert state["initial_release"]["name"] == "public-tiny"
    assert state["initial_release"]["version"] == 1
    assert state["initial_release"]["manifest_sha256"] == manifest_sha256
    first, second = state["history"]
    assert first["sites_trained"] == ["site-0", "site-1", "site-2"] and not first["declined"]
    assert second["sites_trained"] == ["site-0", "site-2"]  # the server went on without site-1
    assert [d["site"] for d in second["declined"]] == ["site-1"]
    assert second["rejected"] == [] and not second.get("failed")
    # site-1 declined: it still counts among the k sampled sites that the noise assumes
    assert second["central_dp"] == {"sites_sampled": 3, "updates_averaged": 2}

    card = json.loads((workdir / "releases" / "fundus-tiny-v1" / "model-card.json").read_text())
    start = card["initialisation"]
    assert start["from"] == "release public-tiny v1" and start["version"] == 1
    assert start["name"] == "public-tiny" and start["manifest_sha256"] == manifest_sha256
    assert start["signing_key"] == state["initial_release"]["signing_key"]
    assert "starting from release public-tiny v1" in card["summary"]
    sites = card["privacy"]["sites"]
    sigma0 = get_noise_multiplier(
        target_epsilon=8.0, target_delta=delta, sample_rate=q, steps=2 * steps, accountant="rdp"
    )
    assert sites["site-0"]["epsilon"] == pytest.approx(opacus_epsilon(sigma0, q, 2 * steps, delta))
    assert sites["site-0"]["epsilon"] <= 8.0 and sites["site-0"]["delta"] == delta
    assert sites["site-0"]["rounds_trained"] == [1, 2]
    assert sites["site-1"]["epsilon"] == pytest.approx(opacus_epsilon(1.0, q, steps, delta))
    assert sites["site-1"]["declined_rounds"] == [2] and sites["site-1"]["rounds_trained"] == [1]
    assert sites["site-2"]["dp"] is False and sites["site-2"]["epsilon"] is None
    central = card["privacy"]["central"]
    assert central["noisy_rounds"] == 2 and central["epsilon"] > 0
    assert central["sites_sampled_per_round"] == [3, 3]
    assert "server itself" in central["does_not_protect"]


# --- starting from a public release ----------------------------------------------------------


def starting_config(release: object, key: object, **model: object) -> ExperimentConfig:
    return parse_config(
        {
            "model": {"preset": "tiny", "image_size": 32, "base_channels": 8} | model,
            "federation": {"initial_release": str(release), "initial_release_public_key": str(key)},
        }
    )


def test_an_initial_release_needs_its_key_and_is_verified_before_use(tmp_path: Path) -> None:
    from server.server_app import release_weights

    with pytest.raises(ConfigError, match=r"federation\.initial_release_public_key is required"):
        parse_config({"federation": {"initial_release": "releases/public-v1"}})
    key, other = tmp_path / "keys" / "public.pem", tmp_path / "keys" / "other.pem"
    generate_signing_key(other)
    release, weights = write_tiny_release(tmp_path / "releases", key, tiny_config())

    arrays, identity = release_weights(starting_config(release, public_path(key)), tmp_path)
    assert all(torch.equal(v, weights[k]) for k, v in arrays.to_torch_state_dict().items())
    assert identity["name"] == "public-tiny" and identity["version"] == 1
    digest = hashlib.sha256((release / "manifest.json").read_bytes()).hexdigest()
    assert identity["manifest_sha256"] == digest and identity["path"] == str(release)
    # relative paths are taken from the workdir
    relative = starting_config("releases/public-tiny-v1", "keys/public.pem.pub")
    assert release_weights(relative, tmp_path)[1] == identity

    def refused(config: ExperimentConfig, *patterns: str) -> None:
        with pytest.raises(ReleaseError) as caught:
            release_weights(config, tmp_path)
        message = str(caught.value)
        assert "\n" not in message and str(release) in message, message
        for pattern in patterns:
            assert pattern in message, message

    refused(
        starting_config(release, public_path(key), base_channels=16),
        "public-tiny v1",
        "another architecture",
        "base_channels is 8, expected 16",
    )
    refused(starting_config(release, public_path(other)), "signature does not verify")
    # a signed v1 passed off as v2 by its folder's name
    renamed = release.rename(tmp_path / "releases" / "public-tiny-v2")
    with pytest.raises(ReleaseError, match="manifest is public-tiny v1, not the folder's v2"):
        release_weights(starting_config(renamed, public_path(key)), tmp_path)
    renamed.rename(release)
    weights_file = release / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes() + b"x")
    refused(starting_config(release, public_path(key)), "model.safetensors", "sha256 differs")


def test_a_resumed_run_keeps_the_release_it_started_from(tmp_path: Path) -> None:
    from server.server_app import check_resumed_start, release_weights

    key = tmp_path / "keys" / "public.pem"
    first, _ = write_tiny_release(tmp_path / "releases", key, tiny_config())
    second, _ = write_tiny_release(tmp_path / "releases", key, tiny_config(), name="other")
    state_path = tmp_path / "runs" / "x" / "state.json"
    _, recorded = release_weights(starting_config(first, public_path(key)), tmp_path)

    def resume(config: ExperimentConfig, start: dict | None) -> None:
        state = SimpleNamespace(initial_release=start)
        check_resumed_start(config, tmp_path, state, state_path)  # type: ignore[arg-type]

    resume(starting_config(first, public_path(key)), recorded)
    (tmp_path / "elsewhere").mkdir()
    moved = first.rename(tmp_path / "elsewhere" / first.name)  # the same release, moved
    resume(starting_config(moved, public_path(key)), recorded)
    for config, now in [
        (starting_config(second, public_path(key)), "release other v1"),
        (tiny_config(), "a random initialisation"),
    ]:
        with pytest.raises(CheckpointError) as caught:
            resume(config, recorded)
        message = str(caught.value)
        assert "\n" not in message and str(state_path) in message
        assert "started from release public-tiny v1" in message and now in message
    resume(tiny_config(), None)
    with pytest.raises(CheckpointError, match="started from a random initialisation"):
        resume(starting_config(second, public_path(key)), None)


def test_the_public_set_is_disjoint_from_the_sites_and_shifted(tmp_path: Path) -> None:
    from PIL import Image

    from medsegdiff_core.cli import main
    from medsegdiff_core.data.synthetic import (
        PUBLIC_STYLE,
        default_site_styles,
        write_fundus_sites,
    )

    cases = {"train": 3, "val": 0, "test": 0}
    sites = write_fundus_sites(tmp_path / "sites", num_sites=3, cases=cases, size=16)
    synth = ["--quiet", "synth", "--public", "--out", str(tmp_path), "--train", "3", "--val", "1"]
    assert main([*synth, "--size", "16"]) == 0
    public = tmp_path / "public"
    assert len(list((public / "train" / "images").glob("case-*.png"))) == 3
    assert len(list((public / "val" / "masks").glob("case-*.png"))) == 1
    meta = json.loads((public / "public.json").read_text())
    assert meta["public"] and meta["style"]["name"] == PUBLIC_STYLE.name
    site_images = [
        np.asarray(Image.open(p)) for s in sites for p in (s / "train" / "images").glob("*.png")
    ]
    for path in (public / "train" / "images").glob("*.png"):
        image = np.asarray(Image.open(path))
        assert not any(np.array_equal(image, other) for other in site_images)
    for style in default_site_styles(3):  # outside every site's range
        assert sum(PUBLIC_STYLE.disc_radius) > sum(style.disc_radius)
        assert PUBLIC_STYLE.contrast > style.contrast
        assert PUBLIC_STYLE.vessel_density < style.vessel_density


# --- the PRV accountant ----------------------------------------------------------------------


def opacus_prv_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon as Opacus' PRV accountant counts it (its upper bound) after ``steps`` steps."""
    accountant = PRVAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize(("q", "steps"), [(0.2, 90), (0.016, 400)])
def test_prv_epsilon_is_at_most_rdps_for_the_same_history(q: float, steps: int) -> None:
    prv, rdp = opacus_prv_epsilon(1.0, q, steps, 1e-5), opacus_epsilon(1.0, q, steps, 1e-5)
    assert 0 < prv <= rdp
    # What a site reports under each accountant: exactly Opacus' value, and which it is.
    under_prv = account([(1.0, q, steps // 2)] * 2, 1e-5, "prv")
    assert (under_prv.accountant, under_prv.requested, under_prv.fallback) == ("prv", "prv", "")
    assert under_prv.value == pytest.approx(prv, rel=1e-9)
    assert account([(1.0, q, steps)], 1e-5, "rdp") == Epsilon(rdp, "rdp", "rdp")
    assert epsilon_of([(1.0, q, steps)], 1e-5) == pytest.approx(rdp, rel=1e-12)


def test_prv_outside_its_range_falls_back_to_rdp_and_says_so() -> None:
    # At q = 0.2, noise 0.5, 4000 steps the PRV mesh needs 41 M points (55 s, then inf): the
    # guard refuses it before computing, and the site counts RDP's bound instead.
    history = [(0.5, 0.2, 4000)]
    result = account(history, 1e-5, "prv")
    assert result.accountant == "rdp" and result.requested == "prv"
    assert "mesh" in result.fallback and "rdp used" in result.fallback
    assert result.value == epsilon_of(history, 1e-5)  # RDP's, exactly
    with pytest.raises(PRVUnavailable, match="exceeds"):
        prv_epsilon(history, 1e-5)
    assert account([(0.0, 0.2, 1)], 1e-5, "prv").value == float("inf")  # no noise
    assert account([], 1e-5, "prv").value == 0.0


def test_planning_with_prv_reaches_the_target_and_the_ledger_holds_it(tmp_path: Path) -> None:
    privacy = tiny_config(enabled=True, target_epsilon=3.0, accountant="prv").privacy
    assert tiny_config().privacy.accountant == "rdp"  # the default
    p = plan_privacy(privacy, num_examples=40, batch_size=8, local_steps=30, rounds=3)
    rdp_sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.2, steps=90, accountant="rdp"
    )
    assert (p.accountant, p.noise_accountant, p.accountant_fallback) == ("prv", "prv", "")
    assert p.noise_multiplier < rdp_sigma  # less noise for the same budget
    planned = opacus_prv_epsilon(p.noise_multiplier, 0.2, 90, 1e-5)
    assert 3.0 - PLAN_EPSILON_TOLERANCE - 1e-6 <= planned <= 3.0
    assert opacus_epsilon(p.noise_multiplier, 0.2, 90, 1e-5) > 3.0  # RDP would not admit it
    # The ledger counts with the plan's accountant: the three planned rounds fit, a fourth not.
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    for server_round in (1, 2, 3):
        decision = ledger.reserve(server_round, p)
        assert decision.granted and decision.after_by.accountant == "prv"
        ledger.complete(decision.entry, [(p.noise_multiplier, 0.2, 30)])
    assert ledger.epsilon("prv") == pytest.approx(planned, rel=1e-9)
    refused = ledger.reserve(4, p)
    assert not refused.granted and "prv" in refused.reason
    assert json.loads(ledger.path.read_text())["accountant"] == "prv (opacus)"


def test_a_ledger_and_record_written_before_the_accountant_option_still_work(
    tmp_path: Path,
) -> None:
    from server.model_card import privacy_card

    path = tmp_path / "privacy-ledger.json"
    path.write_text(  # exactly as a site wrote it before PRV existed
        json.dumps(
            {
                "format": "fedmedsegdiff-privacy-ledger",
                "version": 1,
                "accountant": "rdp (opacus)",
                "delta": 1e-5,
                "entries": [
                    {
                        "id": "a" * 32,
                        "round": 1,
                        "noise_multiplier": 1.0,
                        "sample_rate": 0.2,
                        "steps": 10,
                        "num_examples": 40,
                        "status": "completed",
                        "started_at": 1.0,
                        "completed_at": 2.0,
                    }
                ],
            }
        )
    )
    ledger = PrivacyLedger(path)
    assert ledger.account("rdp") == Epsilon(opacus_epsilon(1.0, 0.2, 10, 1e-5), "rdp", "rdp")
    spent = ledger.account("prv").value
    assert spent == pytest.approx(opacus_prv_epsilon(1.0, 0.2, 10, 1e-5))
    decision = ledger.reserve(2, plan(1.0, 0.2, 10, 40, target_epsilon=1e9, accountant="prv"))
    assert decision.granted and decision.spent == spent
    ledger.complete(decision.entry, [(1.0, 0.2, 10)])
    assert ledger.epsilon("prv") == pytest.approx(opacus_prv_epsilon(1.0, 0.2, 20, 1e-5))
    assert [e.status for e in ledger.entries()] == ["completed", "completed"]

    # An older privacy record has no accountant: it parses, and the model card says RDP.
    old = {"enabled": True, "declined": False, "epsilon": 1.5, "delta": 1e-5, "num-examples": 40}
    new = old | {"accountant": "prv", "accountant-fallback": ""}
    assert PrivacyRecord.from_config(old).accountant is None
    history = [
        RoundRecord(
            round=1,
            sites_trained=["a", "b"],
            privacy={"a": PrivacyRecord.from_config(old), "b": PrivacyRecord.from_config(new)},
        )
    ]
    sites = privacy_card(tiny_config(), SimpleNamespace(history=history))["sites"]  # type: ignore[arg-type]
    assert (sites["a"]["accountant"], sites["b"]["accountant"]) == ("rdp", "prv")


def test_client_app_with_prv_trains_under_dp_and_reports_the_accountant(
    fundus_sites: list[Path], tmp_path: Path
) -> None:
    from client import client_app

    overrides = "federation.local_steps=2 train.batch_size=4 model.base_channels=8"
    config = load_config(ROOT / "configs/federated-tiny.yaml", overrides.split())
    node_config = {
        "data-path": str(fundus_sites[1]),
        "site-name": "hospital-b",
        "state-dir": str(tmp_path / "hospital-b-state"),
        "privacy.enabled": True,
        "privacy.noise_multiplier": 1.0,
        "privacy.target_epsilon": 50.0,
        "privacy.accountant": "prv",
        "privacy.grad_sample_mode": "vmap",
    }
    weights = ArrayRecord(MedSegDiffUNet(config.unet_spec()).state_dict())
    run_config = {"workdir": str(tmp_path / "work"), "overrides": overrides}
    reply = client_app.train(train_message(weights, 1), site_context(node_config, run_config))
    privacy = PrivacyRecord.from_config(dict(reply.content["privacy"]))
    assert privacy.enabled and not privacy.declined and "arrays" in reply.content.array_records
    assert reply.content["metrics"]["train-steps"] == 2
    assert privacy.accountant == "prv" and privacy.accountant_fallback == ""
    q = 4 / 24
    assert privacy.epsilon == pytest.approx(opacus_prv_epsilon(1.0, q, 2, default_delta(24)))
    assert privacy.epsilon < opacus_epsilon(1.0, q, 2, default_delta(24))


# --- the DP training recipe -------------------------------------------------------------------


def test_augmentation_multiplicity_clips_the_mean_of_a_slices_views() -> None:
    """With K views per slice, each slice's gradient is that of the mean loss of its K rows
    (each with its own timestep and noise), computed alone by plain autograd."""
    from medsegdiff_core.privacy import set_per_sample_gradients

    config = tiny_config()
    schedule = config.diffusion.noise_schedule()
    torch.manual_seed(0)
    model = MedSegDiffUNet(config.unet_spec())
    slices, views = 2, 3
    data = _toy_data(slices)
    rows = [d for d in data for _ in range(views)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("image", "mask")}
    x0 = batch["mask"] * 2 - 1
    torch.manual_seed(5)  # the draws: timesteps, then noise, for every row
    t = torch.randint(0, schedule.num_steps, (slices * views,))
    noise = torch.randn(x0.shape)

    torch.manual_seed(5)
    losses = set_per_sample_gradients(model, schedule, batch, views=views)
    assert losses.shape == (slices,)
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(slices):
        part = slice(i * views, (i + 1) * views)
        loss, grads = autograd_gradient(model, schedule, batch["image"], x0, t, noise, part)
        assert float(losses[i]) == pytest.approx(loss, rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(per_sample[name][i], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_augmentation_multiplicity_needs_vmap() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.augmentation_multiplicity"):
        tiny_config(
            enabled=True, target_epsilon=8, augmentation_multiplicity=2, grad_sample_mode="hooks"
        )


def test_restricted_training_leaves_the_rest_of_the_network_untouched() -> None:
    """``decoder`` and ``norms`` train only their parameters under DP noise; every other
    weight comes back bit for bit, and fewer parameters are trained."""
    from medsegdiff_core.privacy import DECODER_MODULES, restrict_trainable

    config = tiny_config()
    schedule = config.diffusion.noise_schedule()
    torch.manual_seed(0)
    base = MedSegDiffUNet(config.unet_spec())
    total = sum(p.numel() for p in base.parameters())
    counts = {}
    for trainable in ("decoder", "norms"):
        model = copy.deepcopy(base)
        counts[trainable] = restrict_trainable(model, trainable)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        dp_train_steps(
            model,
            schedule,
            _toy_data(4),
            plan(1.0, 0.5, 2, 4),
            make_optimizer(model, 1e-2, 0.0),
            grad_sample_mode="vmap",
            sampling_generator=torch.Generator().manual_seed(0),
        )
        before = dict(base.named_parameters())
        for name, param in model.named_parameters():
            same = torch.equal(param, before[name])
            assert same == (name not in trained), name
        if trainable == "decoder":
            assert all(n.split(".")[0] in DECODER_MODULES for n in trained)
        else:
            assert all(n.endswith(".bias") or "norm" in n or n.startswith("out.") for n in trained)
    assert counts["norms"] < counts["decoder"] < total
    assert restrict_trainable(copy.deepcopy(base), "all") == total
    with pytest.raises(ConfigError, match=r"privacy\.trainable"):
        restrict_trainable(copy.deepcopy(base), "encoder")


def test_iterate_averaging_is_the_bias_corrected_ema_of_the_iterates() -> None:
    from medsegdiff_core.privacy import IterateAverage

    param = nn.Parameter(torch.zeros(2))
    average = IterateAverage([param], decay=0.5)
    iterates = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 0.0])]
    for value in iterates:
        with torch.no_grad():
            param.copy_(value)
        average.update()
    average.copy_to_params()
    weights = [0.25, 0.5, 1.0]  # decay^(T - i); the starting zeros do not count
    expected = sum(w * v for w, v in zip(weights, iterates, strict=True)) / sum(weights)
    torch.testing.assert_close(param.detach(), expected)

    last = nn.Parameter(torch.zeros(1))
    average = IterateAverage([last], decay=0.0)
    for value in (2.0, 7.0):
        with torch.no_grad():
            last.fill_(value)
        average.update()
    average.copy_to_params()
    assert float(last) == 7.0


def test_public_gradient_norms_are_the_unclipped_per_slice_norms() -> None:
    from medsegdiff_core.privacy import per_sample_gradient_norms

    config = tiny_config()
    schedule = config.diffusion.noise_schedule()
    torch.manual_seed(0)
    model = MedSegDiffUNet(config.unet_spec())
    data = _toy_data(3)
    torch.manual_seed(5)
    norms = per_sample_gradient_norms(model, schedule, data, batch_size=2)
    assert norms.shape == (3,) and not any(hasattr(p, "grad_sample") for p in model.parameters())
    image = torch.stack([d["image"] for d in data])
    x0 = torch.stack([d["mask"] for d in data]) * 2 - 1
    torch.manual_seed(5)  # batch 1 draws timesteps then noise for 2 slices, then batch 2
    draws = [(torch.randint(0, schedule.num_steps, (2,)), torch.randn(x0[:2].shape))]
    draws.append((torch.randint(0, schedule.num_steps, (1,)), torch.randn(x0[2:].shape)))
    t = torch.cat([d[0] for d in draws])
    noise = torch.cat([d[1] for d in draws])
    for i in range(3):
        _, grads = autograd_gradient(model, schedule, image, x0, t, noise, slice(i, i + 1))
        norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
        assert float(norms[i]) == pytest.approx(float(norm), rel=1e-4)


def test_client_app_trains_with_the_sites_dp_recipe(
    fundus_sites: list[Path], tmp_path: Path
) -> None:
    """A hospital's node config sets its DP recipe: its own expected batch, steps and learning
    rate, the decoder alone, two views per slice and iterate averaging. The round trains that
    plan (steps, q), and only the decoder's weights leave the site changed."""
    from client import client_app
    from medsegdiff_core.privacy import DECODER_MODULES

    overrides = "federation.local_steps=5 train.batch_size=4 model.base_channels=8"
    config = load_config(ROOT / "configs/federated-tiny.yaml", overrides.split())
    node_config = {
        "data-path": str(fundus_sites[2]),
        "site-name": "hospital-c",
        "state-dir": str(tmp_path / "hospital-c-state"),
        "privacy.enabled": True,
        "privacy.target_epsilon": 50.0,
        "privacy.noise_multiplier": 1.0,
        "privacy.expected_batch_size": 6,
        "privacy.local_steps": 2,
        "privacy.lr": 1e-2,
        "privacy.trainable": "decoder",
        "privacy.augmentation_multiplicity": 2,
        "privacy.iterate_averaging": 0.5,
    }
    torch.manual_seed(3)
    start = MedSegDiffUNet(config.unet_spec()).state_dict()
    run_config = {"workdir": str(tmp_path / "work"), "overrides": overrides}
    reply = client_app.train(
        train_message(ArrayRecord(start), 1), site_context(node_config, run_config)
    )
    privacy = PrivacyRecord.from_config(dict(reply.content["privacy"]))
    assert reply.content["metrics"]["train-steps"] == 2
    assert privacy.sample_rate == pytest.approx(6 / 24) and privacy.steps == 2
    assert privacy.epsilon == pytest.approx(opacus_epsilon(1.0, 6 / 24, 2, default_delta(24)))
    returned = reply.content["arrays"].to_torch_state_dict()
    changed = {k for k, v in returned.items() if not torch.equal(v, start[k])}
    assert changed and all(k.split(".")[0] in DECODER_MODULES for k in changed)


# --- realistic site sizes ---------------------------------------------------------------------


def test_the_generator_writes_the_training_slices_asked_for(tmp_path: Path) -> None:
    from client.site import builtin_sites_folder
    from medsegdiff_core.cli import build_parser
    from medsegdiff_core.data.synthetic import write_fundus_sites

    cases = {"train": 2, "val": 1, "test": 0}
    (site,) = write_fundus_sites(
        tmp_path / "a", num_sites=1, cases=cases, size=16, train_slices_per_site=7
    )
    assert len(list((site / "train" / "images").glob("case-*.png"))) == 7
    assert len(list((site / "val" / "masks").glob("case-*.png"))) == 1
    assert json.loads((site / "site.json").read_text())["cases"]["train"] == 7
    # The default is today's: 40 training slices, in the folder simulations always used.
    assert parse_config({}).federation.simulated_train_slices == 40
    assert builtin_sites_folder(3) == builtin_sites_folder(3, 40) == "synthetic-3"
    assert builtin_sites_folder(3, 400) == "synthetic-3-train400"
    args = build_parser().parse_args(["synth", "--train-slices-per-site", "400"])
    assert args.train == 400 and build_parser().parse_args(["synth"]).train == 40
    with pytest.raises(ConfigError, match=r"federation\.simulated_train_slices"):
        parse_config({"federation": {"simulated_train_slices": 0}})
