"""Versioned, signed model releases: what a hospital downloads and runs locally.

A release is a folder ``<name>-v<N>/`` holding

* ``model.safetensors`` + ``model.json`` — a checkpoint (see :mod:`.checkpoint`);
* ``model-card.md`` + ``model-card.json`` — what the model is, how it was trained, how it scores;
* ``training-history.png`` — optional (releases of federated runs): train loss, validation Dice
  and DP epsilon per round and site (:mod:`.plots`); signed like every other file, and releases
  without it (older runs, ``release create``) verify and load as before;
* ``manifest.json`` — the sha256 of every file above, the name and the version;
* ``manifest.sig`` — an Ed25519 signature of ``manifest.json`` by the releasing server.

:func:`verify_release` checks the signature against a public key the hospital already holds (never
one shipped inside the release, which an attacker could replace along with the files), then
every digest, and that no listed file is missing and no unlisted file is present. Each file is
read once: the bytes whose digest was checked are the bytes the model is built from, so a file
swapped on disk after verification is never used.

:func:`load_release` also checks *which* release it is: the manifest's name must be the one the
site expects, and its version may not be lower than the newest the site has verified before
(kept in a small trust file, :class:`TrustStore`), so an older signed release cannot be passed
off as the current one.

Signing keys are written mode 0600 and, when a passphrase is given (the server reads
``FEDMEDSEGDIFF_SIGNING_KEY_PASSPHRASE``), encrypted; a key that others can read is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .checkpoint import (
    LoadedModel,
    atomic_write_bytes,
    is_plain_file_name,
    model_from_sidecar,
    parse_sidecar,
    tensors_from_bytes,
    weights_name,
)
from .errors import CheckpointError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PASSPHRASE_ENV = "FEDMEDSEGDIFF_SIGNING_KEY_PASSPHRASE"
TRAINING_HISTORY = "training-history.png"
_RELEASE_FILES = {"model.safetensors", "model.json", "model-card.json", "model-card.md"}


class ReleaseError(CheckpointError):
    """A release is missing, altered, or not signed by the trusted key."""


def passphrase_from_env() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def generate_signing_key(path: Path, passphrase: bytes | None = None) -> Ed25519PublicKey:
    """Write a new Ed25519 private key (PEM, mode 0600; encrypted when a passphrase is given)
    and its public key beside it (``.pub``)."""
    key = Ed25519PrivateKey.generate()
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
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


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Read a signing key; refuse one that group or others may read (as ssh does)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReleaseError(f"{path}: signing key not found") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ReleaseError(
            f"{path}: signing key is readable by others (mode {stat.S_IMODE(mode):04o}); "
            f"run chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        needs = "is encrypted: set" if passphrase is None else "is not encrypted: unset"
        raise ReleaseError(f"{path}: signing key {needs} {PASSPHRASE_ENV}") from None
    except ValueError as exc:
        if passphrase is not None and b"ENCRYPTED" in data:
            raise ReleaseError(f"{path}: wrong passphrase in {PASSPHRASE_ENV}") from None
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
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Package a checkpoint as the next version of release ``name`` under ``root``; sign it.

    ``extra_files`` maps a plain file name in the release to the file copied there (e.g.
    :data:`TRAINING_HISTORY`); each is listed and signed in the manifest like the model.

    The folder is assembled under a temporary name and renamed at the end, so a crash never
    leaves a half-written release that looks complete.
    """
    extra = dict(extra_files or {})
    for file_name in extra:
        if not is_plain_file_name(file_name) or file_name in _RELEASE_FILES | {MANIFEST, SIGNATURE}:
            raise ReleaseError(f"{file_name!r}: not a name another file may take in a release")
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
    for file_name, source in extra.items():
        (staging / file_name).write_bytes(Path(source).read_bytes())
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


@dataclass(frozen=True)
class VerifiedRelease:
    """A release whose signature and digests checked out, with the bytes that were checked."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]
    manifest_sha256: str = ""  # of the signed manifest bytes: names exactly this release

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])


def verify_release(release: Path, public_key: Ed25519PublicKey) -> VerifiedRelease:
    """Check a release's signature and every file's digest; return the verified bytes.

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
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not isinstance(manifest.get("version"), int):
        raise ReleaseError(f"{manifest_path}: manifest lacks its files or version")
    files: dict[str, bytes] = {}
    for file_name, expected in listed.items():
        # Even a manifest signed by the trusted key may not lead outside the release.
        if not is_plain_file_name(file_name):
            raise ReleaseError(
                f"{manifest_path}: lists {file_name!r}, not a plain file name in the release"
            )
        path = release / file_name
        if not path.is_file():
            raise ReleaseError(f"{path}: listed in the manifest but missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ReleaseError(f"{path}: sha256 differs from the signed manifest (altered file)")
        files[file_name] = data
    unexpected = sorted(
        p.name
        for p in release.iterdir()
        if p.name not in listed and p.name not in {MANIFEST, SIGNATURE}
    )
    if unexpected:
        raise ReleaseError(f"{release / unexpected[0]}: file not in the signed manifest")
    return VerifiedRelease(release, manifest, files, hashlib.sha256(manifest_bytes).hexdigest())


def _key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def default_trust_path() -> Path:
    """``$FEDMEDSEGDIFF_STATE_DIR`` (else ``$XDG_STATE_HOME/fedmedsegdiff``, else
    ``~/.local/state/fedmedsegdiff``) ``/verified-releases.json``."""
    root = os.environ.get("FEDMEDSEGDIFF_STATE_DIR")
    if not root:
        state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        root = str(Path(state_home) / "fedmedsegdiff")
    return Path(root) / "verified-releases.json"


class TrustStore:
    """The newest version of each release name (per signing key) this site has verified."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReleaseError(f"{self.path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise ReleaseError(f"{self.path}: not a record of verified release versions")
        return data

    def newest(self, name: str, key_id: str) -> int:
        return self._read().get(f"{name}@{key_id}", 0)

    def record(self, name: str, key_id: str, version: int) -> None:
        data = self._read()
        entry = f"{name}@{key_id}"
        if version > data.get(entry, 0):
            data[entry] = version
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(data, indent=2, sort_keys=True).encode())


def load_release(
    release: Path,
    public_key_path: Path,
    *,
    expected_name: str,
    trust: TrustStore | None = None,
    allow_older: bool = False,
    device: str = "cpu",
) -> LoadedModel:
    """Verify a release with the trusted key, check that it is the release the site expects
    (``expected_name``, and no older than the newest version ``trust`` has seen unless
    ``allow_older``), then build its model from the verified bytes.

    ``metadata["release_identity"]`` names exactly what was verified: name, version, the sha256
    of the signed manifest and the verifying key's fingerprint (a federation that starts from
    a release records it, ``federation.initial_release``)."""
    public_key = load_public_key(public_key_path)
    verified = verify_release(release, public_key)
    if verified.name != expected_name:
        raise ReleaseError(
            f"{verified.path / MANIFEST}: release is {verified.name!r}, expected {expected_name!r}"
        )
    key_id = _key_id(public_key)
    if trust is not None:
        newest = trust.newest(verified.name, key_id)
        if verified.version < newest and not allow_older:
            raise ReleaseError(
                f"{verified.path}: {verified.name} v{verified.version} is older than v{newest}, "
                f"which this site verified before ({trust.path}); pass --allow-older to use it"
            )
    sidecar_path = verified.path / "model.json"
    sidecar = parse_sidecar(_release_file(verified, "model.json"), source=sidecar_path)
    weights = weights_name(sidecar_path, sidecar)
    loaded = model_from_sidecar(
        sidecar_path,
        sidecar,
        lambda: tensors_from_bytes(
            _release_file(verified, weights), source=verified.path / weights
        ),
        device=device,
    )
    loaded.metadata["release"] = json.loads(_release_file(verified, "model-card.json"))
    loaded.metadata["release_identity"] = {
        "name": verified.name,
        "version": verified.version,
        "manifest_sha256": verified.manifest_sha256,
        "signing_key": key_id,  # sha256 of the raw public key, first 16 hex digits
    }
    if TRAINING_HISTORY in verified.files:  # the verified bytes; absent from older releases
        loaded.metadata["training_history"] = verified.files[TRAINING_HISTORY]
    if trust is not None:
        trust.record(verified.name, key_id, verified.version)
    return loaded


def _release_file(verified: VerifiedRelease, name: str) -> bytes:
    if name not in verified.files:
        raise ReleaseError(f"{verified.path / name}: not in the signed manifest")
    return verified.files[name]


__all__ = [
    "PASSPHRASE_ENV",
    "TRAINING_HISTORY",
    "ReleaseError",
    "TrustStore",
    "VerifiedRelease",
    "atomic_write_bytes",
    "default_trust_path",
    "generate_signing_key",
    "load_private_key",
    "load_public_key",
    "load_release",
    "next_version",
    "passphrase_from_env",
    "render_model_card",
    "verify_release",
    "write_release",
]
