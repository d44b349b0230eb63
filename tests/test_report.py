"""What a person opens: the legends and colour map of the output PNGs, and ``report.html``
written by a real ``medsegdiff evaluate`` / ``predict``, opened in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsegdiff_core.data import FUNDUS_CLASSES, write_fundus_sites
from medsegdiff_core.data.classes import BRATS_CLASSES
from medsegdiff_core.data.writers import (
    label_colour,
    label_names,
    write_overlay,
    write_uncertainty,
)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _viridis(value: float) -> np.ndarray:
    from matplotlib import colormaps

    return np.rint(np.asarray(colormaps["viridis"](value)[:3]) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Legends and colour map
# --------------------------------------------------------------------------------------------


def test_uncertainty_png_is_the_colour_map_with_a_colour_bar(tmp_path: Path) -> None:
    page = np.asarray(Image.open(write_uncertainty(tmp_path / "u.png", np.zeros((60, 90)))))
    picture = page[:60, :90].reshape(-1, 3)
    # An all-certain map is the colour map's 0 colour everywhere: not grey, not speckled.
    assert (picture == _viridis(0.0)).all()
    assert not (picture[:, 0] == picture[:, 1]).all()
    bar = page[60:]  # the colour bar strip: it holds the map's top colour too, and dark text
    assert (bar.reshape(-1, 3) == _viridis(1.0)).all(axis=1).any()
    assert (bar.max(axis=2) < 60).any()
    full = np.asarray(Image.open(write_uncertainty(tmp_path / "f.png", np.ones((60, 90)))))
    assert (full[:60, :90].reshape(-1, 3) == _viridis(1.0)).all()
    half = write_uncertainty(tmp_path / "v.png", np.full((60, 90), 0.125), kind="variance")
    assert (np.asarray(Image.open(half))[:60, :90] == _viridis(0.5)).all(axis=2).mean() > 0.99


def test_legend_names_each_class_in_its_colour(tmp_path: Path) -> None:
    assert label_names(FUNDUS_CLASSES) == {1: "disc", 2: "cup"}
    assert label_names(BRATS_CLASSES) == {1: "tc", 2: "wt", 4: "et"}
    labels = np.zeros((64, 64), np.uint8)
    labels[10:50, 10:50], labels[20:40, 20:40] = 1, 2
    image = np.full((64, 64, 3), 128, np.uint8)
    page = np.asarray(Image.open(write_overlay(tmp_path / "o.png", image, labels)))
    legend = page[64:].reshape(-1, 3)  # swatches in each label's colour under the picture
    for value in (1, 2):
        assert (legend == label_colour(value)).all(axis=1).sum() > 50, value
    # The legend of BraTS names all three regions, one swatch each, even where none is present.
    page = np.asarray(
        Image.open(write_overlay(tmp_path / "b.png", image, labels, classes=BRATS_CLASSES))
    )
    for value in (1, 2, 4):
        assert (page[64:].reshape(-1, 3) == label_colour(value)).all(axis=1).sum() > 50, value


# --------------------------------------------------------------------------------------------
# The report of a real run
# --------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medsegdiff_core.cli", "--quiet", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained tiny model released by the server's own code (two hand-built rounds
    committed by RunStore, so the run folder has its training-history plot, then
    ``publish_release``), then ``evaluate`` (from the release, on a labelled folder) and
    ``predict`` (from the final checkpoint, no masks) through the CLI."""
    from flwr.app import ArrayRecord
    from test_plots import history

    from medsegdiff_core.config import load_config
    from medsegdiff_core.model import MedSegDiffUNet
    from server.run_store import RunState, RunStore
    from server.server_app import publish_release

    work = tmp_path_factory.mktemp("report")
    site = write_fundus_sites(work / "data", num_sites=1, cases={"test": 4}, size=48)[0]
    config = load_config(
        ROOT / "configs" / "federated-tiny.yaml", ["inference.ensemble=2", "inference.batch_size=4"]
    )
    torch.manual_seed(0)
    model = MedSegDiffUNet(config.unet_spec())
    store, state = RunStore(work / "runs" / config.name, config), RunState()
    for record in history(rounds=2, dp=True):
        store.save_round(state, model, record)
    release = publish_release(config, store, state, ArrayRecord(model.state_dict()), work)
    assert release == work / "releases" / "fundus-tiny-v1"
    key = work / "keys" / "release-signing.pem"
    checkpoint = store.directory / "final" / "model.json"
    trust = ["--trust-file", str(work / "trust.json")]
    evaluated = run_cli(
        "evaluate", "--release", str(release), "--public-key", f"{key}.pub",
        "--release-name", "fundus-tiny", *trust, "--data", str(site / "test"),
        "--out", str(work / "eval"),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    unlabelled = work / "unlabelled" / "images"
    unlabelled.mkdir(parents=True)
    for image in sorted((site / "test" / "images").iterdir())[:2]:
        shutil.copy(image, unlabelled / image.name)
    predicted = run_cli(
        "predict", "--checkpoint", str(checkpoint), "--input", str(unlabelled.parent),
        "--out", str(work / "pred"),
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    return {
        "eval": work / "eval",
        "pred": work / "pred",
        "site": site / "test",
        "run": store.directory,
        "release": release,
    }


class _Page(HTMLParser):
    """The table's rows (cell texts), the <img> tags' attributes and the body's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[dict[str, str | None]] = []
        self.body: dict[str, str | None] = {}
        self.headers: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "body":
            self.body = dict(attrs)
        elif tag == "tr":
            self._in = "row"
            self.rows.append([])
        elif tag in ("td", "th") and self._in == "row":
            self.rows[-1].append("")
            self._in = "cell"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._in == "cell":
            self._in = "row"
        elif tag == "tr":
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "cell":
            self.rows[-1][-1] += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _dump_dom(page: Path, tmp_path: Path) -> str:
    """The DOM of ``page`` after its scripts ran, as headless Chromium renders it."""
    result = subprocess.run(
        [
            CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000",
            "--dump-dom", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def _mean_dice(row: dict) -> float:
    return float(np.mean([c["dice"] for c in row["per_class"].values()]))


def test_report_is_one_file_with_the_metrics_records(runs: dict[str, Path]) -> None:
    text = (runs["eval"] / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", text)  # nothing to fetch
    page = _parse(text)
    records = json.loads((runs["eval"] / "metrics.json").read_text())["cases"]
    header, *rows = page.rows
    assert len(rows) == len(records) == 4
    assert header[:3] == ["case", "mean Dice", "disc Dice"]
    worst = min(records, key=_mean_dice)
    assert rows[0][0] == worst["case"]  # worst mean Dice first, before any click
    shown = {row[0]: row for row in rows}
    for record in records:  # the numbers are metrics.json's, as they are
        assert shown[record["case"]][2] == f"{record['per_class']['disc']['dice']:.3f}"
        auroc = record["uncertainty"]["cup"]["pixel_auroc"]
        assert shown[record["case"]][header.index("cup AUROC")] == (
            "n/a" if auroc is None else f"{auroc:.3f}"
        )
    # prediction, ground truth, uncertainty per case, the training history; all embedded
    assert len(page.images) == 3 * 4 + 1
    assert all(str(img["src"]).startswith("data:image/") for img in page.images)
    assert "fundus-tiny v1" in text and "trained with Flower across 3 sites" in text  # the card
    assert len(text) < 500_000  # thumbnails, not the images

    # The training-history plot: in the run folder, signed into the release, and the very
    # bytes the report embeds (from the verified release) under "Training history".
    in_run = (runs["run"] / "training-history.png").read_bytes()
    assert (runs["release"] / "training-history.png").read_bytes() == in_run
    manifest = json.loads((runs["release"] / "manifest.json").read_text())
    assert "training-history.png" in manifest["files"]
    plot = Image.open(runs["release"] / "training-history.png")
    assert plot.format == "PNG" and plot.size == (900, 900)  # loss, Dice, epsilon (DP) panels
    assert np.asarray(plot.convert("L")).std() > 10  # drawn, not blank
    (history,) = [img for img in page.images if img.get("id") == "training-history"]
    assert str(history["src"]).startswith("data:image/png;base64,")
    assert base64.b64decode(str(history["src"]).split(",", 1)[1]) == in_run
    assert "<h3>Training history</h3>" in text

    predicted = (runs["pred"] / "report.html").read_text()
    page = _parse(predicted)
    assert [row[0] for row in page.rows[1:]] == ["case-0000", "case-0001"]
    assert page.rows[0] == ["case"]  # no masks: no metrics columns
    assert len(page.images) == 2 * 2  # no ground truth, and a checkpoint has no plot
    assert "not a signed release" in predicted and "Training history" not in predicted


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: chromium)")
def test_report_renders_in_chromium_and_sorts(runs: dict[str, Path], tmp_path: Path) -> None:
    report = runs["eval"] / "report.html"
    page = _parse(_dump_dom(report, tmp_path))
    assert page.body.get("data-images") == "13/13"  # every image decoded (naturalWidth > 0)
    assert all(img.get("data-loaded") == "1" for img in page.images)
    (history,) = [img for img in page.images if img.get("id") == "training-history"]
    assert history.get("data-loaded") == "1"  # the training-history plot among them
    records = json.loads((runs["eval"] / "metrics.json").read_text())["cases"]
    assert [row[0] for row in page.rows[1:]] == [r["case"] for r in sorted(records, key=_mean_dice)]

    # Clicks on the headers, in the page itself: mean Dice (now descending), then again
    # (ascending: worst first), then disc Dice (ascending).
    clicks = """<script>window.addEventListener('load',()=>{
      const th=[...document.querySelectorAll('#cases th')];
      const first=()=>document.querySelector('#cases tbody tr td').textContent;
      th[1].click(); const best=first(); th[1].click(); const worst=first();
      th[2].click(); document.body.dataset.sorted=[best,worst,first()].join(',');
      const plot=document.getElementById('training-history');
      document.body.dataset.plot=plot.naturalWidth+'x'+plot.naturalHeight;});</script>"""
    clicked = tmp_path / "clicked.html"
    clicked.write_text(report.read_text().replace("</body>", clicks + "</body>"))
    body = _parse(_dump_dom(clicked, tmp_path)).body
    assert body["data-plot"] == "900x900"  # Chromium decoded the plot at its full size
    best, worst, worst_disc = str(body["data-sorted"]).split(",")
    assert best == max(records, key=_mean_dice)["case"]
    assert worst == min(records, key=_mean_dice)["case"]
    assert worst_disc == min(records, key=lambda r: r["per_class"]["disc"]["dice"])["case"]

    shot = tmp_path / "report.png"
    subprocess.run(
        [
            CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium'}", "--hide-scrollbars",
            f"--screenshot={shot}", "--window-size=1280,1600", report.as_uri(),
        ],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    rendered = np.asarray(Image.open(shot).convert("RGB"))
    assert rendered.shape[:2] == (1600, 1280)
    assert rendered.std() > 10  # a page with content, not a blank or error screen
