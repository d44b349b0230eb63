"""Federated training with real Flower simulations (each costs tens of seconds: keep few).

* ``flwr run . local`` — the README's path — for 2 rounds: checkpoints, history and a signed
  release; then the release is verified, tampered with and refused by ``medsegdiff predict``.
* The Flower simulation runtime in a child process, killed mid-run and restarted: the run
  resumes from its last checkpoint and ends with the same weights as an uninterrupted run.
* A site that sends a NaN update, then one of the wrong shape: rejected with the site named,
  while the rounds complete with the other sites.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flower_simulation import start_script, write_simulation
from PIL import Image
from safetensors.torch import load_file

from server.local_simulation import processes_naming, run_local

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = (
    "federation.rounds=2 federation.local_steps=4 inference.sampling_steps=3 inference.ensemble=2"
)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medsegdiff_core.cli", "--quiet", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture(scope="module")
def flwr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workdir of a finished 2-round `flwr run . local` with 3 simulated sites."""
    base = tmp_path_factory.mktemp("flwr")
    workdir = base / "work"
    code = run_local(
        base / "flwr-home",
        num_supernodes=3,
        run_config={"workdir": str(workdir), "overrides": OVERRIDES},
        timeout_s=900,
    )
    assert code == 0
    assert not processes_naming(str(base / "flwr-home")), "Flower processes left running"
    return workdir


def test_flwr_run_checkpoints_every_round_and_releases(flwr_run: Path) -> None:
    run_dir = flwr_run / "runs" / "federated-tiny"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed_round"] == 2
    assert [r["round"] for r in state["history"]] == [1, 2]
    assert not [r["round"] for r in state["history"] if r.get("failed")]
    for record in state["history"]:
        assert record["sites_trained"] == ["site-0", "site-1", "site-2"]
        assert record["rejected"] == []
        assert record["train"]["num-examples"] == 120
        assert 0.0 <= record["evaluate"]["dice"] <= 1.0
    for n in (1, 2):
        assert (run_dir / f"round-{n:04d}.safetensors").is_file()
        assert (run_dir / f"round-{n:04d}.json").is_file()
    release = flwr_run / "releases" / "fundus-tiny-v1"
    card = json.loads((release / "model-card.json").read_text())
    assert card["training"]["rounds"] == 2 and len(card["data_sites"]) == 3
    assert set(card["evaluation"]["per_site"]) == {"site-0", "site-1", "site-2"}
    final = load_file(str(release / "model.safetensors"))
    round2 = load_file(str(run_dir / "round-0002.safetensors"))
    assert all(torch.equal(final[k], round2[k]) for k in final)
    # the real run's training-history plot: in the run folder, and the same bytes signed into the
    # release (listed in its manifest)
    plot = run_dir / "training-history.png"
    assert plot.read_bytes() == (release / "training-history.png").read_bytes()
    assert "training-history.png" in (release / "manifest.json").read_text()
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (900, 600)  # loss and Dice; no DP panel


def test_release_verified_then_tampering_refused(flwr_run: Path, tmp_path: Path) -> None:
    release = flwr_run / "releases" / "fundus-tiny-v1"
    public_key = flwr_run / "keys" / "release-signing.pem.pub"
    ok = cli("release", "verify", str(release), "--public-key", str(public_key))
    assert ok.returncode == 0 and "signature valid" in ok.stdout

    site = flwr_run / "data" / "synthetic-3" / "site-2" / "val"
    out = tmp_path / "pred"
    result = cli(
        "predict",
        "--release",
        str(release),
        "--public-key",
        str(public_key),
        "--release-name",
        "fundus-tiny",
        "--trust-file",
        str(tmp_path / "verified-releases.json"),
        "--input",
        str(site),
        "--out",
        str(out),
        "--ensemble",
        "2",
        "--steps",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "disc dice" in result.stdout and (out / "metrics.json").is_file()

    def refused(folder: Path, key: Path, *fragments: str) -> None:
        result = cli(
            "predict",
            "--release",
            str(folder),
            "--public-key",
            str(key),
            "--release-name",
            "fundus-tiny",
            "--trust-file",
            str(tmp_path / "verified-releases.json"),
            "--input",
            str(site),
            "--out",
            str(tmp_path / "x"),
        )
        assert result.returncode == 2, result.stdout
        assert "Traceback" not in result.stderr
        for fragment in fragments:
            assert fragment in result.stderr, result.stderr
        assert not (tmp_path / "x").exists()

    flipped = tmp_path / "flipped"
    shutil.copytree(release, flipped)
    weights = bytearray((flipped / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (flipped / "model.safetensors").write_bytes(bytes(weights))
    refused(flipped, public_key, "model.safetensors", "sha256 differs")

    missing = tmp_path / "missing"
    shutil.copytree(release, missing)
    (missing / "model-card.json").unlink()
    refused(missing, public_key, "model-card.json", "missing")

    other_key = tmp_path / "other.pem"
    assert cli("release", "keygen", str(other_key)).returncode == 0
    refused(release, Path(str(other_key) + ".pub"), "manifest.sig", "does not verify")


def start_simulation(
    workdir: Path, *, rounds: int, poisoned: tuple[int, ...] = (), extra: str = ""
) -> subprocess.Popen:
    overrides = OVERRIDES.replace("federation.rounds=2", f"federation.rounds={rounds}") + extra
    script = write_simulation(
        workdir.parent / f"{workdir.name}-sim.py",
        {"workdir": str(workdir), "overrides": overrides},
        poisoned=poisoned,
    )
    return start_script(script)


def finish(process: subprocess.Popen, timeout: float = 900) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_resume_after_server_killed_mid_run(tmp_path: Path) -> None:
    # What must survive the crash: the weights, the server's momentum and each site's AdamW
    # moments (kept by default), all from the last committed round. Under secure aggregation the
    # masks cancel exactly (integer sums), so the resumed run is still the uninterrupted one; and
    # the resumed global weights must reach the sites in the network's order (a checkpoint's keys
    # are sorted), which the secure round's ordered list of arrays depends on. The run is secure
    # because that path restores all the plain one does and more; the plain path's resume is
    # also run for real, through a killed SuperLink, in test_deploy.
    extra = " federation.server_momentum=0.5 federation.secure_aggregation=true"
    reference = tmp_path / "uninterrupted"
    finish(start_simulation(reference, rounds=2, extra=extra))

    crashed = tmp_path / "crashed"
    process = start_simulation(crashed, rounds=2, extra=extra)
    state_path = crashed / "runs" / "federated-tiny" / "state.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if state_path.exists() and json.loads(state_path.read_text())["completed_round"] >= 1:
            break
        time.sleep(0.2)
    kill_group(process)  # the server (and every simulated site) dies mid-run
    killed_after = json.loads(state_path.read_text())["completed_round"]
    assert killed_after < 2

    output = finish(start_simulation(crashed, rounds=2, extra=extra))
    assert f"resuming federated-tiny after round {killed_after}" in output
    assert (crashed / "runs" / "federated-tiny" / "momentum-0002.safetensors").is_file()
    uid = json.loads(state_path.read_text())["uid"]
    kept = crashed / "sites" / "site-0" / "optimizer" / uid / "round-0002.safetensors"
    assert kept.is_file()
    state = json.loads(state_path.read_text())
    assert [r["round"] for r in state["history"]] == [1, 2]
    # every round (the resumed one too) went through SecAgg+
    assert [bool(r.get("secure_aggregation")) for r in state["history"]] == [True] * 2
    expected = load_file(str(reference / "runs" / "federated-tiny" / "round-0002.safetensors"))
    before = load_file(str(reference / "runs" / "federated-tiny" / "round-0001.safetensors"))
    resumed = load_file(str(crashed / "runs" / "federated-tiny" / "round-0002.safetensors"))

    def distance(a: dict, b: dict) -> float:
        return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))

    # Same seeds, same data order, same augmentation: the resumed run is the uninterrupted run
    # (bit-identical here; the tolerance only allows for float kernels that differ per process).
    assert distance(expected, before) > 0.1  # round 2 really trained
    assert distance(resumed, expected) <= 1e-4 * distance(expected, before)
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


def test_poisoned_updates_rejected_and_rounds_complete(tmp_path: Path) -> None:
    workdir = tmp_path / "poisoned"
    finish(start_simulation(workdir, rounds=2, poisoned=(1,)))
    state = json.loads((workdir / "runs" / "federated-tiny" / "state.json").read_text())
    first, second = state["history"]
    assert first["rejected"][0]["site"] == "site-1" and "NaN" in first["rejected"][0]["reason"]
    assert second["rejected"][0]["site"] == "site-1" and "shape" in second["rejected"][0]["reason"]
    for record in (first, second):
        assert record["sites_trained"] == ["site-0", "site-2"]
        assert not record.get("failed")
        assert record["train"]["num-examples"] == 80
    assert (workdir / "releases" / "fundus-tiny-v1" / "manifest.sig").is_file()
    counts = {"rounds": 2, "rounds_succeeded": 2, "rounds_failed": 0, "updates_rejected": 2}
    assert state["counts"].items() >= counts.items()
    card = json.loads((workdir / "releases" / "fundus-tiny-v1" / "model-card.json").read_text())
    assert card["rounds"] == state["counts"]


def test_a_run_whose_every_round_fails_releases_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "all-poisoned"
    process = start_simulation(workdir, rounds=2, poisoned=(0, 1, 2))
    output, _ = process.communicate(timeout=900)
    assert process.returncode != 0, output[-3000:]
    assert "no round of federated-tiny succeeded (2 failed, 6 updates rejected" in output
    assert not (workdir / "releases").exists()
    state = json.loads((workdir / "runs" / "federated-tiny" / "state.json").read_text())
    assert state["counts"]["rounds_failed"] == 2 and state["counts"]["rounds_succeeded"] == 0
    assert all(r["failed"] for r in state["history"])


VOLUME_EXPERIMENT = """
name: federated-brats-tiny
data: {layout: brats, classes: {WT: [1, 2, 4], TC: [1, 4], ET: [4]}, image_channels: 4}
model: {preset: tiny, image_size: 32}
diffusion: {steps: 1000, schedule: linear, prediction: v}
train: {batch_size: 8, lr: 1.0e-3, seed: 0}
inference: {sampler: ddim, sampling_steps: 2, ensemble: 2, fusion: staple, batch_size: 8}
federation: {rounds: 1, local_steps: 3, min_sites: 2, min_available_sites: 3,
             release_name: brats-tiny}
"""


def test_model_card_dice_on_a_volume_site_is_what_evaluate_prints(tmp_path: Path) -> None:
    # Federated evaluation once scored volumes per 2-D slice at model resolution, where every
    # empty slice counted as a perfect case; the card now carries the per-case 3-D Dice.
    from client.site import Site
    from medsegdiff_core.config import load_config
    from medsegdiff_core.data.synthetic_brain import write_brats_cases

    sites = []
    for index in range(3):
        site = tmp_path / "data" / f"hospital-{index}"
        write_brats_cases(site / "train", 2, shape=(32, 32, 6), seed=10 + index)
        write_brats_cases(site / "val", 2, shape=(32, 32, 6), seed=20 + index)
        sites.append(str(site))
    experiment = tmp_path / "brats-tiny.yaml"
    experiment.write_text(VOLUME_EXPERIMENT)
    workdir = tmp_path / "work"
    script = write_simulation(
        tmp_path / "volume-sim.py",
        {"workdir": str(workdir), "experiment": str(experiment)},
        node_config={
            k: {"data-path": site, "site-name": f"site-{k}"} for k, site in enumerate(sites)
        },
    )
    finish(start_script(script))
    release = workdir / "releases" / "brats-tiny-v1"
    card = json.loads((release / "model-card.json").read_text())
    on_card = card["evaluation"]["per_site"]["site-0"]
    assert on_card["num-examples"] == 2  # two cases, not their slices

    config = load_config(experiment)
    seed = Site("site-0", Path(sites[0]), tmp_path, config, torch.device("cpu")).seed(1, "evaluate")
    out = tmp_path / "evaluated"
    result = cli(
        "evaluate",
        "--release",
        str(release),
        "--public-key",
        str(workdir / "keys" / "release-signing.pem.pub"),
        "--release-name",
        "brats-tiny",
        "--trust-file",
        str(tmp_path / "verified-releases.json"),
        "--data",
        str(Path(sites[0]) / "val"),
        "--layout",
        "brats",
        "--seed",
        str(seed % 2**31),
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["num_cases"] == 2
    assert on_card["dice"] == pytest.approx(summary["mean"]["dice"], abs=1e-6)
    for name in ("WT", "TC", "ET"):
        assert on_card[f"dice-{name}"] == pytest.approx(
            summary["per_class"][name]["dice"], abs=1e-6
        )
