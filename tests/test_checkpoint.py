"""Checkpoints: safetensors + JSON sidecar, no pickles, clear errors for the wrong model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medsegdiff_core.checkpoint import load_checkpoint, save_checkpoint
from medsegdiff_core.config import DiffusionConfig, InferenceConfig
from medsegdiff_core.errors import CheckpointError
from medsegdiff_core.model import MedSegDiffUNet, resolve_spec

CLASSES = {"disc": [1, 2], "cup": [2]}


def _save(tmp_path: Path, **spec_overrides) -> tuple[MedSegDiffUNet, Path]:
    torch.manual_seed(0)
    model = MedSegDiffUNet(resolve_spec("tiny", mask_channels=2, **spec_overrides))
    for p in model.parameters():
        p.data.add_(torch.randn_like(p))
    path = save_checkpoint(
        tmp_path / "ckpt" / "model",
        model,
        diffusion=DiffusionConfig(schedule="cosine"),
        classes=CLASSES,
        inference=InferenceConfig(ensemble=3),
        metadata={"step": 12},
    )
    return model, path


def test_round_trip(tmp_path: Path) -> None:
    model, path = _save(tmp_path)
    assert path.suffix == ".json" and path.with_suffix(".safetensors").is_file()
    loaded = load_checkpoint(path)
    assert loaded.spec == model.spec and loaded.classes == CLASSES
    assert loaded.diffusion.schedule == "cosine" and loaded.inference.ensemble == 3
    assert loaded.metadata["step"] == 12
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key])
    # the folder and the weights file name the same checkpoint
    assert load_checkpoint(path.parent).spec == model.spec
    assert load_checkpoint(path.with_suffix(".safetensors")).spec == model.spec


def test_weights_are_not_a_pickle(tmp_path: Path) -> None:
    _, path = _save(tmp_path)
    head = path.with_suffix(".safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # pickle / torch.save zip
    sidecar = json.loads(path.read_text())
    assert sidecar["architecture"]["mask_channels"] == 2


def test_architecture_mismatch_names_the_fields(tmp_path: Path) -> None:
    _, path = _save(tmp_path)
    expected = resolve_spec("tiny", mask_channels=3, image_size=64)
    with pytest.raises(
        CheckpointError, match=r"image_size is 32, expected 64; mask_channels is 2, expected 3"
    ):
        load_checkpoint(path, expected=expected)


def test_weights_that_do_not_fit_the_sidecar(tmp_path: Path) -> None:
    _, path = _save(tmp_path)
    other = tmp_path / "other"
    _, other_path = _save(other, base_channels=8)
    path.with_suffix(".safetensors").write_bytes(
        other_path.with_suffix(".safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights do not match"):
        load_checkpoint(path)


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    _, path = _save(tmp_path)
    weights = path.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        load_checkpoint(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_checkpoint(path)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.json: sidecar is not valid JSON"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="sidecar not found"):
        load_checkpoint(tmp_path / "nothing.json")


@pytest.mark.parametrize(
    "weights", ["../../etc/passwd", "/etc/passwd", "sub/model.safetensors", "..", "", 3]
)
def test_weights_entry_must_be_a_plain_file_name(tmp_path: Path, weights) -> None:
    _, path = _save(tmp_path)
    sidecar = json.loads(path.read_text())
    sidecar["weights"] = weights
    path.write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: key 'weights'")
    assert "plain file name" in message
