"""Checkpoints: weights in safetensors plus a JSON sidecar that says what they are.

A checkpoint is two files side by side, ``NAME.safetensors`` and ``NAME.json``. The sidecar holds
the full network spec, the diffusion settings, the class names and the default inference
settings, so a checkpoint is usable on its own. Nothing is ever unpickled: safetensors stores raw
tensors only, which makes checkpoints and releases from other sites safe to open.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file

from . import __version__
from .config import DiffusionConfig, ExperimentConfig, InferenceConfig
from .errors import CheckpointError
from .model import MedSegDiffUNet, UNetSpec

FORMAT = "medsegdiff-checkpoint"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    """A network rebuilt from a checkpoint, with everything needed to run it."""

    model: MedSegDiffUNet
    spec: UNetSpec
    diffusion: DiffusionConfig
    inference: InferenceConfig
    classes: dict[str, list[int]]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors to a safetensors file atomically (contiguous CPU copies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt file is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def tensors_from_bytes(data: bytes, *, source: Path) -> dict[str, torch.Tensor]:
    """Load safetensors bytes already in memory (e.g. verified against a signed digest)."""
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a readable safetensors file ({exc})") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state (e.g. AdamW's step and moments) as flat tensors
    ``"<param index>.<name>"``, for safetensors. Hyper-parameters are not included: they come
    from the config that rebuilds the optimizer."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value)
    return tensors


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], *, source: str | Path
) -> None:
    """Restore :func:`optimizer_tensors` into an optimizer built for the same parameters.

    Raises CheckpointError naming ``source`` if the state belongs to other parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or not name or int(index) >= len(params):
            raise CheckpointError(f"{source}: optimizer state entry {key!r} fits no parameter")
        param = params[int(index)]
        if value.dim() > 0 and value.shape != param.shape:
            raise CheckpointError(
                f"{source}: optimizer state {key!r} has shape {tuple(value.shape)}, "
                f"the parameter has {tuple(param.shape)}"
            )
        state.setdefault(int(index), {})[name] = value.to(param.device)
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def save_checkpoint(
    path: str | Path,
    model: MedSegDiffUNet,
    *,
    diffusion: DiffusionConfig,
    classes: dict[str, list[int]],
    inference: InferenceConfig | None = None,
    metadata: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``path`` (``.safetensors``) and its ``.json`` sidecar; return the sidecar's path.

    ``state_dict`` overrides the model's own weights (e.g. to save EMA weights).
    """
    weights = Path(path).with_suffix(".safetensors")
    save_tensors(weights, state_dict if state_dict is not None else model.state_dict())
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": weights.name,
        "architecture": model.spec.to_dict(),
        "diffusion": diffusion.model_dump(mode="json"),
        "inference": (inference or InferenceConfig()).model_dump(mode="json"),
        "classes": classes,
        "metadata": metadata or {},
    }
    json_path = weights.with_suffix(".json")
    atomic_write_bytes(json_path, json.dumps(sidecar, indent=2).encode())
    return json_path


def save_experiment_checkpoint(
    path: str | Path,
    model: MedSegDiffUNet,
    config: ExperimentConfig,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    **metadata: Any,
) -> Path:
    """:func:`save_checkpoint` with an experiment's diffusion, classes and inference settings;
    the metadata names the experiment and preset, plus ``metadata`` (e.g. ``step=`` or
    ``round=``)."""
    return save_checkpoint(
        path,
        model,
        diffusion=config.diffusion,
        classes=config.data.classes,
        inference=config.inference,
        metadata={"experiment": config.name, "preset": config.model.preset} | metadata,
        state_dict=state_dict,
    )


def _sidecar_path(path: Path) -> Path:
    if path.is_dir():
        candidates = sorted(path.glob("*.json"))
        if len(candidates) != 1:
            raise CheckpointError(f"{path}: expected exactly one checkpoint .json in the folder")
        return candidates[0]
    return path.with_suffix(".json")


def read_sidecar(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Find and parse a checkpoint's JSON sidecar (``path`` may be the folder, .json or weights)."""
    json_path = _sidecar_path(Path(path))
    try:
        raw = json_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{json_path}: checkpoint sidecar not found") from None
    return json_path, parse_sidecar(raw, source=json_path)


def parse_sidecar(raw: bytes, *, source: Path) -> dict[str, Any]:
    """A sidecar's JSON, checked to be one this package can read; errors name ``source``."""
    json_path = source
    try:
        sidecar = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{json_path}: sidecar is not valid JSON ({exc})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise CheckpointError(f"{json_path}: not a MedSegDiff checkpoint sidecar")
    if sidecar.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: format version {sidecar['format_version']} is newer than this "
            f"package understands ({FORMAT_VERSION}); upgrade fedmedsegdiff"
        )
    return sidecar


def is_plain_file_name(name: object) -> bool:
    """A bare file name: no folder part, nothing that could lead outside its folder."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _weights_path(json_path: Path, sidecar: dict[str, Any]) -> Path:
    """The sidecar's ``weights`` file, which must be a plain file name beside the sidecar.

    A path ("../../etc/passwd", "/abs/file", "sub/w.safetensors") would let a checkpoint from
    another site make us open any file, so anything but a bare name is refused."""
    name = weights_name(json_path, sidecar)
    return json_path.with_name(name)


def weights_name(json_path: Path, sidecar: dict[str, Any]) -> str:
    name = sidecar.get("weights", json_path.stem + ".safetensors")
    if not is_plain_file_name(name):
        raise CheckpointError(
            f"{json_path}: key 'weights' must be a plain file name in the checkpoint's folder, "
            f"got {name!r}"
        )
    return name


def check_architecture(found: UNetSpec, expected: UNetSpec, *, source: str | Path) -> None:
    """Raise CheckpointError naming every field where a checkpoint's spec differs."""
    mismatches = [
        f"{key} is {value!r}, expected {expected.to_dict()[key]!r}"
        for key, value in found.to_dict().items()
        if expected.to_dict()[key] != value
    ]
    if mismatches:
        raise CheckpointError(
            f"{source}: checkpoint built for another architecture: {'; '.join(mismatches)}"
        )


def load_checkpoint(
    path: str | Path, *, expected: UNetSpec | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Rebuild the network of a checkpoint and load its weights.

    Args:
        path: the checkpoint's ``.json``, ``.safetensors``, or a folder holding one checkpoint.
        expected: if given, the checkpoint must have exactly this spec (e.g. the one a config
            asks for); any difference is an error naming the fields.
    """
    json_path, sidecar = read_sidecar(path)
    return model_from_sidecar(
        json_path,
        sidecar,
        lambda: load_tensors(_weights_path(json_path, sidecar)),
        expected=expected,
        device=device,
    )


def model_from_sidecar(
    json_path: Path,
    sidecar: dict[str, Any],
    read_weights: Callable[[], dict[str, torch.Tensor]],
    *,
    expected: UNetSpec | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Build the network a parsed sidecar describes and load the weights ``read_weights``
    returns (from a file, or from bytes already verified; see :mod:`.release`)."""
    try:
        spec = UNetSpec.from_dict(sidecar["architecture"])
        diffusion = DiffusionConfig.model_validate(sidecar["diffusion"])
        inference = InferenceConfig.model_validate(sidecar.get("inference", {}))
        classes = {str(k): [int(v) for v in vs] for k, vs in sidecar["classes"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{json_path}: sidecar is incomplete or invalid ({exc})") from None
    if expected is not None:
        check_architecture(spec, expected, source=json_path)
    weights_path = _weights_path(json_path, sidecar)
    state = read_weights()
    model = MedSegDiffUNet(spec)
    own = model.state_dict()
    problems = [f"missing {k}" for k in own.keys() - state.keys()][:3]
    problems += [f"unexpected {k}" for k in state.keys() - own.keys()][:3]
    problems += [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ][:3]
    if problems:
        raise CheckpointError(
            f"{weights_path}: weights do not match the architecture in {json_path.name}: "
            + "; ".join(problems)
        )
    model.load_state_dict(state)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        spec=spec,
        diffusion=diffusion,
        inference=inference,
        classes=classes,
        metadata=sidecar.get("metadata", {}),
        path=json_path,
    )
