"""The ``medsegdiff`` command line, run as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medsegdiff_core.cli", "--quiet", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=600,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained for a few steps through the CLI, and its data root."""
    work = tmp_path_factory.mktemp("cli")
    data = work / "data"
    synth = run_cli(
        "synth",
        "--out",
        str(data),
        "--sites",
        "2",
        "--size",
        "48",
        "--train",
        "6",
        "--val",
        "2",
        "--test",
        "3",
    )
    assert synth.returncode == 0, synth.stderr
    assert (data / "site-1" / "test" / "images" / "case-0002.png").is_file()
    result = run_cli(
        "train",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--set",
        f"data.train=[{data}/site-0/train, {data}/site-1/train]",
        "train.steps=6",
        "train.checkpoint_every=3",
        f"train.out_dir={work}/run",
    )
    assert result.returncode == 0, result.stderr
    assert (work / "run" / "checkpoints" / "step-000003.safetensors").is_file()
    assert json.loads((work / "run" / "history.json").read_text())[-1]["step"] == 6
    return work / "run" / "model.json", data


def test_predict_writes_masks_uncertainty_and_overlays(trained, tmp_path: Path) -> None:
    checkpoint, data = trained
    folder = tmp_path / "site"
    (folder / "images").mkdir(parents=True)
    for name in ("a", "b"):  # images of their own size, no masks: allowed for predict
        image = Image.open(data / "site-0" / "test" / "images" / "case-0000.png").resize((80, 60))
        image.save(folder / "images" / f"{name}.png")
    out = tmp_path / "out"
    result = run_cli(
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(folder),
        "--out",
        str(out),
        "--ensemble",
        "2",
        "--steps",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(out / "masks" / "a.png").size == (80, 60)  # the input's own resolution
    for kind in ("uncertainty", "overlays"):  # for people: the picture at that size, a key under
        written = Image.open(out / kind / "a.png")
        assert written.width >= 80 and written.height > 60, kind
    assert set(np.unique(np.array(Image.open(out / "masks" / "b.png")))) <= {0, 1, 2}
    assert not (out / "metrics.json").exists()


def test_evaluate_reports_per_case_and_mean(trained, tmp_path: Path) -> None:
    checkpoint, data = trained
    out = tmp_path / "eval"
    result = run_cli(
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data / "site-1" / "test"),
        "--out",
        str(out),
        "--ensemble",
        "2",
        "--steps",
        "3",
        "--sampler",
        "ddim",
        "--fusion",
        "mean",
    )
    assert result.returncode == 0, result.stderr
    assert "disc dice" in result.stdout and "mean" in result.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert [row["case"] for row in report["cases"]] == ["case-0000", "case-0001", "case-0002"]
    dice = report["summary"]["per_class"]["cup"]["dice"]
    assert 0.0 <= dice <= 1.0
    # The uncertainty figures (see tests/test_reliability.py), per case and pooled, per class.
    for row in report["cases"]:
        assert set(row["uncertainty"]) == {"disc", "cup"}
        assert 0.0 <= row["uncertainty"]["cup"]["uncertainty_score"] <= 1.0
    pooled = report["summary"]["uncertainty"]["cup"]
    assert 0.0 <= pooled["ece"] <= 1.0 and 0.0 <= pooled["pixel_auroc"] <= 1.0
    assert "cup uncertainty: spearman(case score, dice)" in result.stdout


def _bad_folder(tmp_path: Path, data: Path) -> Path:
    folder = tmp_path / "bad"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    src = data / "site-0" / "test"
    for name in ("case-0000", "case-0001"):
        (folder / "images" / f"{name}.png").write_bytes(
            (src / "images" / f"{name}.png").read_bytes()
        )
        (folder / "masks" / f"{name}.png").write_bytes((src / "masks" / f"{name}.png").read_bytes())
    return folder


def test_bad_inputs_give_one_line_errors(trained, tmp_path: Path) -> None:
    checkpoint, data = trained
    common = ["--ensemble", "1", "--steps", "2"]

    corrupt = _bad_folder(tmp_path / "1", data)
    path = corrupt / "images" / "case-0001.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run_cli("evaluate", "--checkpoint", str(checkpoint), "--data", str(corrupt), *common)
    assert_one_line_error(result, "case-0001.png")

    resized = _bad_folder(tmp_path / "2", data)
    mask = resized / "masks" / "case-0000.png"
    Image.open(mask).resize((20, 20)).save(mask)
    result = run_cli("evaluate", "--checkpoint", str(checkpoint), "--data", str(resized), *common)
    assert_one_line_error(result, "case-0000.png", "20x20")

    labels = _bad_folder(tmp_path / "3", data)
    mask = labels / "masks" / "case-0001.png"
    array = np.array(Image.open(mask))
    array[0, 0] = 7
    Image.fromarray(array).save(mask)
    result = run_cli("evaluate", "--checkpoint", str(checkpoint), "--data", str(labels), *common)
    assert_one_line_error(result, "case-0001.png", "7")

    missing = _bad_folder(tmp_path / "4", data)
    (missing / "masks" / "case-0000.png").unlink()
    result = run_cli("evaluate", "--checkpoint", str(checkpoint), "--data", str(missing), *common)
    assert_one_line_error(result, "case-0000")

    result = run_cli(
        "predict",
        "--checkpoint",
        str(tmp_path / "nope.json"),
        "--input",
        str(missing),
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_error(result, "nope.json")


def test_config_and_architecture_errors(trained, tmp_path: Path) -> None:
    checkpoint, _ = trained
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: tiny}\ntrain: {stesp: 3}\n")
    assert_one_line_error(run_cli("train", "--config", str(config)), "c.yaml", "train.stesp")
    config.write_text("model: {preset: tiny}\ntrain: {steps: many}\n")
    assert_one_line_error(run_cli("train", "--config", str(config)), "train.steps")
    # fine-tuning from a checkpoint of another architecture (3 classes instead of 2)
    config.write_text(
        "model: {preset: tiny}\ndata: {classes: {a: [1], b: [2], c: [3]}, train: [x]}\n"
        f"train: {{init_from: {checkpoint}}}\n"
    )
    result = run_cli("train", "--config", str(config))
    assert_one_line_error(result, "model.json", "mask_channels is 2, expected 3")


def test_output_folder_may_not_overlap_the_input_or_overwrite_files(
    trained, tmp_path: Path
) -> None:
    checkpoint, data = trained
    common = ["--checkpoint", str(checkpoint), "--ensemble", "1", "--steps", "2"]
    site = _bad_folder(tmp_path, data)  # a clean labelled folder: images/ and masks/
    masks = {p: p.read_bytes() for p in sorted((site / "masks").iterdir())}

    # --out the site itself would write the predictions over the ground truth (Dice 1.0)
    result = run_cli("predict", *common, "--input", str(site), "--out", str(site))
    assert_one_line_error(result, f"{site}: output folder is the input folder {site}")
    result = run_cli("evaluate", *common, "--data", str(site), "--out", str(site / "eval"))
    assert_one_line_error(result, str(site / "eval"), f"lies inside the input folder {site}")
    result = run_cli("evaluate", *common, "--data", str(site), "--out", str(tmp_path))
    assert_one_line_error(result, str(tmp_path), f"contains the input folder {site}")
    link = tmp_path / "link"
    link.symlink_to(site)  # the same folder under another name
    result = run_cli("predict", *common, "--input", str(site), "--out", str(link))
    assert_one_line_error(result, str(link), "is the input folder", str(site))
    assert {p: p.read_bytes() for p in sorted((site / "masks").iterdir())} == masks

    # a file the run did not write is never overwritten, and nothing is written at all
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    foreign = out / "overlays" / "case-0001.png"
    foreign.write_bytes(b"someone else's file")
    result = run_cli("evaluate", *common, "--data", str(site), "--out", str(out))
    assert_one_line_error(result, f"{foreign}: already exists and this run did not write it")
    assert foreign.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in out.rglob("*")) == ["case-0001.png", "overlays"]
    foreign.unlink()
    result = run_cli("evaluate", *common, "--data", str(site), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "metrics.json").is_file() and (out / "masks" / "case-0000.png").is_file()
    result = run_cli("evaluate", *common, "--data", str(site), "--out", str(out))
    assert_one_line_error(result, str(out / "masks" / "case-0000.png"), "not overwriting")
