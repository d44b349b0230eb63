"""The training-history plot: drawn from typed RoundRecords, written by the server's RunStore
after every committed round, signed into the release, and never the reason a round fails."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsegdiff_core.config import load_config
from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.plots import training_history_plot, training_history_png
from medsegdiff_core.records import PrivacyRecord, RoundRecord, SiteMetrics
from medsegdiff_core.release import (
    MANIFEST,
    TRAINING_HISTORY,
    ReleaseError,
    load_public_key,
    load_release,
    verify_release,
)

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-0", "site-1", "site-2")
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]  # matplotlib's first three site colours


def history(rounds: int = 3, *, dp: bool = False, failed: tuple[int, ...] = ()) -> list:
    """Hand-built rounds as the ServerApp records them: each site's train loss and validation
    Dice, their weighted averages; with ``dp`` site-0 and site-1 report the epsilon spent."""
    records = []
    for n in range(1, rounds + 1):
        privacy = {
            site: PrivacyRecord(enabled=True, epsilon=1.5 * n * (i + 1), target_epsilon=10.0)
            if dp and i < 2
            else PrivacyRecord()
            for i, site in enumerate(SITES)
        }
        records.append(
            RoundRecord(
                round=n,
                failed=n in failed,
                sites_trained=list(SITES),
                privacy=privacy,
                site_train={
                    s: SiteMetrics(num_examples=40, train_loss=1.0 / (n + i))
                    for i, s in enumerate(SITES)
                },
                train=SiteMetrics(num_examples=120, train_loss=0.6 / n),
                site_evaluate={
                    s: SiteMetrics(num_examples=4, dice=0.4 + 0.1 * n + 0.05 * i)
                    for i, s in enumerate(SITES)
                },
                evaluate=SiteMetrics(dice=0.45 + 0.1 * n),
            )
        )
    return records


def _pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def _has_colour(picture: np.ndarray, rgb: tuple[int, int, int], at_least: int = 50) -> bool:
    return int((np.abs(picture.astype(int) - rgb).sum(axis=2) <= 6).sum()) >= at_least


def _rows_with(picture: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.flatnonzero((np.abs(picture.astype(int) - rgb).sum(axis=2) <= 6).any(axis=1))


def test_plot_draws_loss_and_dice_per_site_and_global(tmp_path: Path) -> None:
    path = training_history_plot(history(failed=(2,)), tmp_path / "h.png")
    assert path == tmp_path / "h.png"
    picture = _pixels(path.read_bytes())
    assert picture.shape == (600, 900, 3)  # two panels
    for colour in TAB10:  # every site's line, in its colour
        assert _has_colour(picture, colour), colour
    assert _has_colour(picture, (0, 0, 0), 500)  # the global (weighted) line, thick black
    assert _has_colour(picture, (217, 217, 217), 2000)  # the failed round shaded grey
    # A site's line appears in both panels (train loss above, Dice below).
    rows = _rows_with(picture, TAB10[2])
    assert rows.min() < 300 < rows.max()


def test_plot_with_dp_adds_an_epsilon_panel() -> None:
    picture = _pixels(training_history_png(history(dp=True)))
    assert picture.shape == (900, 900, 3)  # three panels
    # site-1's colour (a DP site) reaches into the third panel; site-2 (no DP) does not.
    assert _rows_with(picture, TAB10[1]).max() > 600
    assert _rows_with(picture, TAB10[2]).max() < 600
    # No DP anywhere, or DP sites without an epsilon yet: two panels.
    plain = history()
    plain[0].privacy["site-0"] = PrivacyRecord(enabled=True, declined=True)
    assert _pixels(training_history_png(plain)).shape == (600, 900, 3)


def test_plot_leaves_out_unmeasured_and_non_finite_values() -> None:
    records = history(rounds=2)
    records[0].train = SiteMetrics()  # a failed round: nothing averaged
    records[0].site_evaluate = None  # a round without evaluation
    records[1].site_train["site-1"].train_loss = float("nan")  # a diverged site
    records[1].evaluate.dice = float("inf")
    assert _pixels(training_history_png(records)).shape == (600, 900, 3)
    assert _pixels(training_history_png([])).shape == (600, 900, 3)  # before any round


# --------------------------------------------------------------------------------------------
# The server: the run folder after every round, the signed release
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def store(tmp_path: Path):
    from server.run_store import RunState, RunStore

    config = load_config(ROOT / "configs" / "federated-tiny.yaml")
    torch.manual_seed(0)
    model = MedSegDiffUNet(config.unet_spec())
    return RunStore(tmp_path / "runs" / config.name, config), RunState(), model


def test_run_store_redraws_the_plot_after_every_round(store) -> None:
    run_store, state, model = store
    records = history(rounds=2, dp=True)
    run_store.save_round(state, model, records[0])
    first = run_store.training_history_path.read_bytes()
    assert run_store.training_history_path == run_store.directory / TRAINING_HISTORY
    assert _pixels(first).shape == (900, 900, 3)
    run_store.save_round(state, model, records[1])
    second = run_store.training_history_path.read_bytes()
    assert second != first  # redrawn with round 2
    assert json.loads(run_store.state_path.read_text())["completed_round"] == 2


def test_a_plot_failure_warns_once_and_the_round_is_committed(
    store, caplog: pytest.LogCaptureFixture
) -> None:
    run_store, state, model = store
    records = history(rounds=3)
    run_store.save_round(state, model, records[0])
    assert run_store.training_history_path.is_file()
    # Values matplotlib cannot lay out (a diverged run's losses): drawing raises.
    records[1].train.train_loss, records[2].train.train_loss = 1e308, -1e308
    with pytest.raises(Exception):  # noqa: B017 - whatever matplotlib raises
        training_history_png(records)
    run_store.save_round(state, model, records[1])
    with caplog.at_level(logging.WARNING):
        run_store.save_round(state, model, records[2])
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and TRAINING_HISTORY in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert json.loads(run_store.state_path.read_text())["completed_round"] == 3
    assert (run_store.directory / "round-0003.safetensors").is_file()
    # No plot rounds behind state.json is left for a release to carry.
    assert not run_store.training_history_path.exists()


def test_release_signs_the_plot_and_releases_without_it_still_load(store, tmp_path: Path) -> None:
    from flwr.app import ArrayRecord

    from server.server_app import publish_release

    run_store, state, model = store
    for record in history(rounds=2, dp=True):
        run_store.save_round(state, model, record)
    arrays = ArrayRecord(model.state_dict())
    release = publish_release(run_store.config, run_store, state, arrays, tmp_path)
    public = tmp_path / "keys" / "release-signing.pem.pub"
    verified = verify_release(release, load_public_key(public))
    assert TRAINING_HISTORY in verified.manifest["files"]  # listed and signed
    assert verified.files[TRAINING_HISTORY] == run_store.training_history_path.read_bytes()
    loaded = load_release(release, public, expected_name="fundus-tiny")
    assert loaded.metadata["training_history"] == verified.files[TRAINING_HISTORY]
    assert _pixels(loaded.metadata["training_history"]).shape == (900, 900, 3)

    # A run whose plot could not be drawn releases without it; that release verifies and
    # loads, as releases made before the plot existed do.
    run_store.training_history_path.unlink()
    older = publish_release(run_store.config, run_store, state, arrays, tmp_path)
    assert older.name == "fundus-tiny-v2"
    assert TRAINING_HISTORY not in verify_release(older, load_public_key(public)).files
    assert (
        "training_history" not in load_release(older, public, expected_name="fundus-tiny").metadata
    )

    # The plot is signed like the model: a swapped picture is refused.
    (release / TRAINING_HISTORY).write_bytes(training_history_png(history(rounds=1)))
    with pytest.raises(ReleaseError, match="training-history.png: sha256 differs"):
        verify_release(release, load_public_key(public))


@pytest.mark.parametrize("name", ["model.json", MANIFEST, "../training-history.png"])
def test_an_extra_file_may_not_take_a_release_files_name(store, tmp_path: Path, name) -> None:
    from medsegdiff_core.checkpoint import save_checkpoint
    from medsegdiff_core.release import generate_signing_key, load_private_key, write_release

    run_store, _, model = store
    checkpoint = save_checkpoint(
        tmp_path / "model", model, diffusion=run_store.config.diffusion, classes={"disc": [1]}
    )
    generate_signing_key(tmp_path / "k.pem")
    plot = training_history_plot(history(rounds=1), tmp_path / "h.png")
    with pytest.raises(ReleaseError, match="not a name another file may take"):
        write_release(
            checkpoint, tmp_path / "rel", "x", {}, load_private_key(tmp_path / "k.pem"),
            extra_files={name: plot},
        )  # fmt: skip
    assert not (tmp_path / "rel").exists()
