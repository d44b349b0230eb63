"""Signed releases: verification passes untouched releases and names what was changed."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from medsegdiff_core.checkpoint import save_checkpoint
from medsegdiff_core.config import DiffusionConfig
from medsegdiff_core.model import MedSegDiffUNet, resolve_spec
from medsegdiff_core.release import (
    MANIFEST,
    SIGNATURE,
    ReleaseError,
    TrustStore,
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
    manifest = verify_release(folder, load_public_key(public)).manifest
    assert set(manifest["files"]) == {
        "model.safetensors",
        "model.json",
        "model-card.json",
        "model-card.md",
    }
    loaded = load_release(folder, public, expected_name="demo")
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
        load_release(folder, public, expected_name="demo")


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


def test_another_release_name_or_an_older_version_is_refused(release, tmp_path: Path) -> None:
    folder, public = release
    key = load_private_key(public.parent / "signing.pem")
    newer = write_release(folder / "model.json", tmp_path / "releases", "demo", {}, key)
    trust = TrustStore(tmp_path / "site-state" / "verified-releases.json")
    with pytest.raises(ReleaseError, match="release is 'demo', expected 'fundus'"):
        load_release(folder, public, expected_name="fundus", trust=trust)
    assert (
        load_release(newer, public, expected_name="demo", trust=trust).metadata["release"][
            "version"
        ]
        == 2
    )
    # An older signed release handed over as if it were the newest:
    renamed = folder.rename(tmp_path / "releases" / "demo-v3")
    with pytest.raises(ReleaseError, match="demo v1 is older than v2, which this site verified"):
        load_release(renamed, public, expected_name="demo", trust=trust)
    loaded = load_release(renamed, public, expected_name="demo", trust=trust, allow_older=True)
    assert loaded.metadata["release"]["version"] == 1
    assert list(json.loads(trust.path.read_text()).values()) == [2]  # still the newest seen


OPENED: list[str] | None = None


def _record_open(event: str, args: tuple) -> None:
    if OPENED is not None and event == "open" and isinstance(args[0], str | os.PathLike):
        OPENED.append(os.fspath(args[0]))


sys.addaudithook(_record_open)


def test_each_release_file_is_read_once_and_used_as_verified(release) -> None:
    # Reading a file again after its digest was checked would let a file swapped in between
    # (a second process, a network share) be loaded unverified.
    global OPENED
    folder, public = release
    OPENED = []
    try:
        load_release(folder, public, expected_name="demo")
        opened = [Path(p).name for p in OPENED if Path(p).parent == folder]
    finally:
        OPENED = None
    for name in ("model.json", "model-card.json", MANIFEST, SIGNATURE):
        assert opened.count(name) == 1, opened


def test_a_signed_manifest_may_not_list_paths_outside_the_release(tmp_path: Path) -> None:
    key_path = tmp_path / "signing.pem"
    generate_signing_key(key_path)
    folder = tmp_path / "evil-v1"
    folder.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("patient 123")
    manifest = {
        "name": "evil",
        "version": 1,
        "files": {"../secret.txt": hashlib.sha256(secret.read_bytes()).hexdigest()},
    }
    data = json.dumps(manifest).encode()
    (folder / MANIFEST).write_bytes(data)
    (folder / SIGNATURE).write_bytes(load_private_key(key_path).sign(data).hex().encode())
    with pytest.raises(ReleaseError, match=r"lists '\.\./secret\.txt', not a plain file name"):
        verify_release(folder, load_public_key(Path(str(key_path) + ".pub")))


def test_signing_key_is_private_and_can_be_encrypted(tmp_path: Path) -> None:
    key_path = tmp_path / "signing.pem"
    generate_signing_key(key_path, b"correct horse")
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED" in key_path.read_bytes()
    with pytest.raises(ReleaseError, match="is encrypted: set FEDMEDSEGDIFF_SIGNING_KEY_PASS"):
        load_private_key(key_path)
    with pytest.raises(ReleaseError, match="wrong passphrase"):
        load_private_key(key_path, b"wrong")
    assert load_private_key(key_path, b"correct horse") is not None
    key_path.chmod(0o644)
    with pytest.raises(ReleaseError, match=r"readable by others \(mode 0644\); run chmod 600"):
        load_private_key(key_path, b"correct horse")
