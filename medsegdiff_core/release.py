"""Versioned, signed model releases: what a hospital downloads and runs locally.

A release is a folder ``<name>-v<N>/`` holding

* ``model.safetensors`` + ``model.json`` — a checkpoint (see :mod:`.checkpoint`);
* ``model-card.md`` + ``model-card.json`` — what the model is, how it was trained, how it scores;
* ``manifest.json`` — the sha256 of every file above, the name and the version;
* ``manifest.sig`` — an Ed25519 signature of ``manifest.json`` by the releasing server.

:func:`verify_release` checks the signature against a public key the hospital already holds (never
one shipped inside the release, which an attacker could replace along with the files), then
every digest, and that no listed file is missing and no unlisted file is present. Only then is a
byte of the weights loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .checkpoint import LoadedModel, atomic_write_bytes, load_checkpoint
from .errors import CheckpointError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


class ReleaseError(CheckpointError):
    """A release is missing, altered, or not signed by the trusted key."""


def generate_signing_key(path: Path) -> Ed25519PublicKey:
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key beside it (``.pub``)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = key.public_key()
    public_path(path).write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return public


def public_path(private_key_path: Path) -> Path:
    return private_key_path.with_name(private_key_path.name + ".pub")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ReleaseError(f"{path}: signing key not found") from None
    except (ValueError, TypeError) as exc:
        raise ReleaseError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise ReleaseError(f"{path}: public key not found") from None
    except (ValueError, TypeError) as exc:
        raise ReleaseError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{path}: not an Ed25519 public key")
    return key


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def next_version(root: Path, name: str) -> int:
    """One more than the highest ``<name>-v<N>`` already in ``root``."""
    pattern = re.compile(rf"^{re.escape(name)}-v(\d+)$")
    versions = [int(m.group(1)) for p in root.glob(f"{name}-v*") if (m := pattern.match(p.name))]
    return max(versions, default=0) + 1


def render_model_card(card: dict[str, Any]) -> str:
    """A human-readable model card (Markdown) from its JSON form."""
    lines = [f"# {card['name']} v{card['version']}", "", card.get("summary", ""), ""]
    for section, values in card.items():
        if section in {"name", "version", "summary"}:
            continue
        lines.append(f"## {section.replace('_', ' ').capitalize()}")
        if isinstance(values, dict):
            lines += [f"- **{key}**: {json.dumps(value)}" for key, value in values.items()]
        elif isinstance(values, list):
            lines += [f"- {json.dumps(value)}" for value in values]
        else:
            lines.append(str(values))
        lines.append("")
    return "\n".join(lines)


def write_release(
    checkpoint: Path,
    root: Path,
    name: str,
    card: dict[str, Any],
    signing_key: Ed25519PrivateKey,
    *,
    version: int | None = None,
) -> Path:
    """Package a checkpoint as the next version of release ``name`` under ``root``; sign it.

    The folder is assembled under a temporary name and renamed at the end, so a crash never
    leaves a half-written release that looks complete.
    """
    _, sidecar = _read_checkpoint_files(checkpoint)
    version = version or next_version(root, name)
    final = root / f"{name}-v{version}"
    if final.exists():
        raise ReleaseError(f"{final}: release already exists")
    staging = root / f".{final.name}.partial"
    staging.mkdir(parents=True, exist_ok=False)
    weights = Path(checkpoint).with_suffix(".safetensors")
    (staging / "model.safetensors").write_bytes(weights.read_bytes())
    sidecar["weights"] = "model.safetensors"
    (staging / "model.json").write_text(json.dumps(sidecar, indent=2))
    card = {"name": name, "version": version, **card}
    (staging / "model-card.json").write_text(json.dumps(card, indent=2))
    (staging / "model-card.md").write_text(render_model_card(card))
    manifest = {
        "name": name,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {p.name: _sha256(p) for p in sorted(staging.iterdir())},
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (staging / MANIFEST).write_bytes(manifest_bytes)
    (staging / SIGNATURE).write_bytes(signing_key.sign(manifest_bytes).hex().encode())
    os.replace(staging, final)
    return final


def _read_checkpoint_files(checkpoint: Path) -> tuple[Path, dict[str, Any]]:
    from .checkpoint import read_sidecar

    return read_sidecar(checkpoint)


def verify_release(release: Path, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Check a release's signature and every file's digest; return its manifest.

    Raises:
        ReleaseError: naming the file that is missing, altered or unexpected, or saying that the
            signature does not verify with the given key.
    """
    release = Path(release)
    manifest_path, signature_path = release / MANIFEST, release / SIGNATURE
    for path in (manifest_path, signature_path):
        if not path.is_file():
            raise ReleaseError(f"{path}: missing; {release} is not a complete release")
    manifest_bytes = manifest_path.read_bytes()
    try:
        public_key.verify(bytes.fromhex(signature_path.read_text().strip()), manifest_bytes)
    except (InvalidSignature, ValueError):
        raise ReleaseError(
            f"{signature_path}: signature does not verify with the trusted public key "
            "(altered manifest or a release signed by another key)"
        ) from None
    manifest = json.loads(manifest_bytes)
    listed = manifest["files"]
    for file_name, expected in listed.items():
        path = release / file_name
        if not path.is_file():
            raise ReleaseError(f"{path}: listed in the manifest but missing")
        if _sha256(path) != expected:
            raise ReleaseError(f"{path}: sha256 differs from the signed manifest (altered file)")
    unexpected = sorted(
        p.name
        for p in release.iterdir()
        if p.name not in listed and p.name not in {MANIFEST, SIGNATURE}
    )
    if unexpected:
        raise ReleaseError(f"{release / unexpected[0]}: file not in the signed manifest")
    return manifest


def load_release(release: Path, public_key_path: Path, *, device: str = "cpu") -> LoadedModel:
    """Verify a release with the trusted key, then load its model."""
    verify_release(release, load_public_key(public_key_path))
    loaded = load_checkpoint(Path(release) / "model.json", device=device)
    loaded.metadata["release"] = json.loads((Path(release) / "model-card.json").read_text())
    return loaded


__all__ = [
    "ReleaseError",
    "atomic_write_bytes",
    "generate_signing_key",
    "load_private_key",
    "load_public_key",
    "load_release",
    "next_version",
    "render_model_card",
    "verify_release",
    "write_release",
]
