"""Experiment configuration: one YAML file, validated by pydantic with errors that name the key.

A config has seven sections — ``data``, ``model``, ``diffusion``, ``train``, ``inference``,
``federation``, ``privacy`` — each a model below with every field documented. Unknown keys are
errors (a typo must never be silently ignored in a medical pipeline). :func:`load_config` turns
any validation failure into one :class:`~medsegdiff_core.errors.ConfigError` line such as
``configs/x.yaml: train.batch_size: Input should be a valid integer (got 'eight')``.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .diffusion.losses import TrainingObjective
from .diffusion.schedule import NoiseSchedule
from .errors import ConfigError, validation_message
from .model.presets import PRESETS, UNetSpec, resolve_spec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the data are and what the classes mean."""

    train: list[Path] = Field(default_factory=list, description="folders of training cases")
    val: list[Path] = Field(default_factory=list, description="folders of validation cases")
    test: list[Path] = Field(default_factory=list, description="folders of test cases")
    layout: Literal["generic", "refuge", "ddti", "isic", "brats", "volumes"] = Field(
        "generic", description="on-disk layout of each folder (see medsegdiff_core.data.layouts)"
    )
    skip_empty_slices: bool = Field(
        True, description="volume layouts: train only on slices that have labels"
    )
    classes: dict[str, list[int]] = Field(
        default_factory=lambda: {"disc": [1, 2], "cup": [2]},
        description="mask channel name -> label values it covers (0 is background)",
    )
    image_channels: int = Field(3, ge=1, description="channels of the raw image")
    skip_cases: list[str] = Field(
        default_factory=list,
        description="case names to leave out of training (the bad cases `medsegdiff data check` "
        "names); any other problem in a training folder stops training",
    )
    augment: bool = Field(True, description="random flips and intensity jitter in training")

    @field_validator("train", "val", "test", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value

    @field_validator("classes")
    @classmethod
    def _valid_classes(cls, classes: dict[str, list[int]]) -> dict[str, list[int]]:
        if not classes:
            raise ValueError("at least one class is needed")
        for name, values in classes.items():
            if not values:
                raise ValueError(f"class {name!r} lists no label values")
            if any(v <= 0 or v > 255 for v in values):
                raise ValueError(
                    f"class {name!r}: label values must be in 1..255 (0 is background)"
                )
        return classes


class ModelConfig(_Section):
    """The network: a named preset, optionally with fields overridden."""

    preset: Literal["tiny", "small", "b", "l", "pp"] = "small"
    image_size: int | None = Field(None, gt=0, description="input side in px (preset's if unset)")
    base_channels: int | None = Field(None, gt=0)
    channel_mult: list[int] | None = None
    num_res_blocks: int | None = Field(None, ge=1)
    cond_res_blocks: int | None = Field(None, ge=1)
    attention_ds: list[int] | None = None
    num_heads: int | None = Field(None, ge=1)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    learn_sigma: bool = False
    use_ff_parser: bool = True


class DiffusionConfig(_Section):
    """The forward process the model is trained on."""

    steps: int = Field(1000, ge=1, description="diffusion steps T")
    schedule: Literal["linear", "cosine"] = "linear"
    prediction: Literal["epsilon", "v"] = Field(
        "v",
        description="network target: the velocity v (our default: few-step samplers need it, "
        "see the README) or the noise (the paper)",
    )
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR-gamma loss weighting (None: uniform, as the paper)"
    )
    # On by default, as measured (README, training options): at equal wall time both together
    # gave +0.3 (DDIM 2) to +0.5 (DPM++ 20) Dice points over the paper's loss on the fundus data.
    x0_loss_weight: float = Field(
        1.0,
        ge=0,
        description="auxiliary Dice + BCE loss on the network's x0 estimate, weighted by the "
        "noise level (0: off)",
    )
    timestep_sampling: Literal["uniform", "high_noise"] = Field(
        "high_noise", description="training timesteps: uniform (the paper) or favouring high noise"
    )

    def noise_schedule(self) -> NoiseSchedule:
        """The schedule these settings describe, carrying the network's prediction type."""
        return NoiseSchedule.from_name(self.schedule, self.steps, self.prediction)

    def objective(self) -> TrainingObjective:
        """The training loss these settings describe."""
        return TrainingObjective(self.snr_gamma, self.x0_loss_weight, self.timestep_sampling)


class TrainConfig(_Section):
    """Optimisation."""

    steps: int = Field(2000, ge=1, description="optimizer steps")
    time_budget_s: float | None = Field(None, gt=0, description="stop early after this wall time")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (None: off)")
    ema_decay: float | None = Field(0.999, gt=0, lt=1, description="EMA of weights (None: off)")
    warmup_steps: int = Field(100, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(
        True, description="bf16 autocast on CUDA; on a CPU with native bf16, for inference only"
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads")
    seed: int = 0
    init_from: Path | None = Field(
        None, description="start from this checkpoint's weights (its architecture must match)"
    )
    out_dir: Path = Path("runs/experiment")


class InferenceConfig(_Section):
    """Ensemble sampling and fusion."""

    # Measured (README, few-step ensembles): 2 DDIM steps score the same Dice as 1000-step DDPM
    # at 1/500 of the network evaluations; the case-level uncertainty ranking needs ~20 steps.
    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    sampling_steps: int = Field(2, ge=1, description="network evaluations per member")
    eta: float = Field(
        0.0,
        ge=0,
        description="sampler ddim: fresh noise per step (0: deterministic, members differ only "
        "by their starting noise; 1: DDPM-like)",
    )
    ensemble: int = Field(5, ge=1, description="samples fused per image")
    fusion: Literal["staple", "mean", "majority"] = "staple"
    uncertainty: Literal["entropy", "variance"] = "entropy"
    threshold: float = Field(0.5, gt=0, lt=1)
    batch_size: int = Field(4, ge=1, description="images sampled together")
    seed: int = 0


class FederationConfig(_Section):
    """Federated training: rounds, strategy, and how much each site trains per round.

    Plain settings only: the Flower apps in ``client/`` and ``server/`` read them.
    """

    rounds: int = Field(5, ge=1, description="federated rounds")
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0, description="FedProx mu (strategy fedprox)")
    local_steps: int = Field(50, ge=1, description="optimizer steps per site per round")
    keep_optimizer_state: bool = Field(
        True, description="each site keeps its AdamW moments from round to round (on its disk)"
    )
    server_momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="server momentum on the averaged update (FedAvgM, Hsu et al. 2019); 0 = off",
    )
    server_lr: float = Field(
        1.0, gt=0, description="server step size on the averaged update (1 = plain averaging)"
    )
    min_sites: int = Field(2, ge=1, description="fewest sites whose updates make a round")
    min_available_sites: int = Field(2, ge=1, description="sites that must be connected")
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    evaluate_every: int = Field(1, ge=1, description="federated evaluation every N rounds")
    simulated_sites: int = Field(3, ge=1, description="built-in sites in simulation")
    simulated_train_slices: int = Field(
        40,
        ge=1,
        description="training slices per built-in site in simulation (one fundus case each)",
    )
    norm_outlier_factor: float = Field(
        10.0, gt=1, description="reject updates whose norm exceeds this times the round median"
    )
    max_weight_ratio: float = Field(
        10.0,
        ge=1,
        description="a site's claimed num-examples is capped at this times the round's median "
        "claim (and at its first claim in the run)",
    )
    round_timeout_s: float = Field(3600.0, gt=0)
    release_name: str = Field("fedmedsegdiff", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    initial_release: str | None = Field(
        None,
        description="start round 1 from this signed release's weights instead of a random "
        "initialisation: a release folder <name>-v<N> (relative paths are taken from the "
        "workdir), verified with initial_release_public_key as `predict --release` verifies "
        "one (signature, every file's digest, the manifest's name and version matching the "
        "folder's) and whose architecture must be the experiment's model; a resumed run "
        "continues from its own checkpoint and refuses another starting release than the one "
        "state.json records. None: random initialisation (train.seed)",
    )
    initial_release_public_key: str | None = Field(
        None,
        description="the Ed25519 public key (PEM) that must verify initial_release; required "
        "when initial_release is set (relative paths are taken from the workdir)",
    )
    max_weight: int | None = Field(
        None,
        ge=1,
        description="the most examples (FedAvg weight) a site may claim; announced to the sites "
        "each round and a larger claim is cut to it. None: no fixed bound without secure "
        "aggregation, 1000 with it (where it is also the weights' quantisation scale: keep it "
        "near the largest real claim)",
    )
    # Secure aggregation (SecAgg+, Bell et al. 2020; server/secure_aggregation.py and
    # client/secure_update.py): the server receives masked vectors only and unmasks their sum.
    secure_aggregation: bool = Field(
        False, description="every training round uses Flower's SecAgg+ (see the README)"
    )
    num_shares: int = Field(
        3,
        ge=3,
        description="SecAgg+: each site's secrets are split among this many sites (itself and "
        "its neighbours); more tolerates more dropouts at more cost",
    )
    reconstruction_threshold: int = Field(
        2,
        ge=2,
        description="SecAgg+: shares needed to rebuild a secret; less than num_shares and at "
        "most min_available_sites; a round goes on while this many of a site's neighbours remain",
    )
    update_clip_norm: float = Field(
        10.0,
        gt=0,
        description="SecAgg+: L2 bound the server announces each round; each site clips its "
        "update (local minus global weights) to it before masking, and the server refuses an "
        "aggregate update above it",
    )
    quantization_clip: float = Field(
        1.0,
        gt=0,
        description="SecAgg+: each weight of a site's update is clipped to [-q, q] and quantised "
        "in that range (Flower's clipping_range)",
    )
    quantization_range: int = Field(
        2**22,
        ge=2**8,
        le=2**30,
        description="SecAgg+: quantisation levels in [-quantization_clip, quantization_clip]; "
        "sites x quantization_range must stay below 2**32 (the masks' modulus)",
    )

    @model_validator(mode="after")
    def _initial_release_has_its_key(self) -> FederationConfig:
        if self.initial_release is not None and self.initial_release_public_key is None:
            raise ValueError(
                "federation.initial_release_public_key is required when "
                "federation.initial_release is set (the public key that must verify the release)"
            )
        return self

    @field_validator("reconstruction_threshold")
    @classmethod
    def _threshold_fits(cls, value: int, info: ValidationInfo) -> int:
        if not info.data.get("secure_aggregation"):
            return value
        shares = info.data.get("num_shares")
        if shares is not None and value >= shares:
            raise ValueError(f"must be less than federation.num_shares={shares}")
        sites = info.data.get("min_available_sites")
        if sites is not None and value > sites:
            raise ValueError(
                f"{value} is more than the federation.min_available_sites={sites} sites a round "
                "starts with: the round's sum could not be unmasked"
            )
        return value


class PrivacyConfig(_Section):
    """Differential privacy: sample-level DP-SGD (Opacus) at each site, under the site's own budget.

    A site's SuperNode may override any field with its node config (``privacy.<field>=value``),
    so each hospital sets and controls its own budget; the experiment's values are the defaults.
    The ``central_*`` fields are the server's optional central (site-level) DP.
    """

    enabled: bool = Field(False, description="train this site with DP-SGD (Opacus)")
    target_epsilon: float | None = Field(
        None, gt=0, description="the site's budget: total epsilon over every round it trains in"
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="DP delta; default min(1e-5, 0.1/N) for N training slices; must be < 1/N",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping bound C")
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="noise std / C; None: chosen by Opacus so that the planned rounds of "
        "federation.local_steps Poisson batches spend target_epsilon",
    )
    planned_rounds: int | None = Field(
        None, ge=1, description="rounds the noise is calibrated for (default federation.rounds)"
    )
    grad_sample_mode: Literal["vmap", "hooks", "functorch", "ghost"] = Field(
        "vmap", description="how per-sample gradients are computed (see bench/privacy.py)"
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp",
        description="privacy accountant for planning the noise and for the site's ledger: "
        "Opacus' RDP, or PRV (tighter: 0.85-0.96x RDP's epsilon on our histories), which falls "
        "back to RDP, and the privacy record says so, where its numerical bound cannot be "
        "computed soundly; rdp by default, since PRV is not sound everywhere (see privacy.py)",
    )
    # The site's DP training recipe: each key is unset or off by default, so a site that sets
    # none trains as without DP; bench/privacy.py --part ablation measures each one.
    expected_batch_size: int | None = Field(
        None,
        ge=1,
        description="DP rounds: expected Poisson batch size q*N (default train.batch_size); "
        "larger batches with fewer steps cut the noise per step at the same epsilon",
    )
    local_steps: int | None = Field(
        None,
        ge=1,
        description="DP rounds: optimiser steps per round (default federation.local_steps)",
    )
    lr: float | None = Field(None, gt=0, description="DP rounds: learning rate (default train.lr)")
    augmentation_multiplicity: int = Field(
        1,
        ge=1,
        description="views of each sampled slice (own augmentation, timestep and noise) whose "
        "loss is averaged before the slice's gradient is clipped (De et al. 2022); vmap only",
    )
    trainable: Literal["all", "decoder", "norms"] = Field(
        "all",
        description="parameters a DP round trains: all; decoder (the mask decoder: up path and "
        "output head); norms (normalisation affines, biases and the output head); the others "
        "stay at the global model's values, and fewer parameters get less noise in total",
    )
    iterate_averaging: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="DP rounds: send the exponential moving average (this decay, bias-corrected) "
        "of the round's iterates instead of the last one; 0: the last iterate",
    )
    central: bool = Field(
        False, description="server: central DP on the aggregate (fixed clipping, k sampled sites)"
    )
    central_noise_multiplier: float = Field(1.0, ge=0, description="central noise std / clip")
    central_clipping_norm: float | None = Field(
        None, gt=0, description="central DP: L2 bound on each site's update (required if central)"
    )
    central_delta: float = Field(
        1e-5, gt=0, lt=1, description="delta at which the central epsilon is reported"
    )

    @model_validator(mode="after")
    def _complete(self) -> PrivacyConfig:
        if self.enabled and self.target_epsilon is None:
            raise ValueError(
                "privacy.target_epsilon is required when privacy.enabled is true (the budget)"
            )
        if self.augmentation_multiplicity > 1 and self.grad_sample_mode != "vmap":
            raise ValueError(
                "privacy.augmentation_multiplicity > 1 needs privacy.grad_sample_mode=vmap (it "
                "averages a slice's views inside the per-sample gradient)"
            )
        if self.central and self.central_clipping_norm is None:
            raise ValueError(
                "privacy.central_clipping_norm is required when privacy.central is true"
            )
        return self


class ExperimentConfig(_Section):
    """A whole experiment: data, model, diffusion, training and inference settings."""

    name: str = "experiment"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _secure_aggregation_without_central_dp(self) -> ExperimentConfig:
        if self.federation.secure_aggregation and self.privacy.central:
            raise ValueError(
                "federation.secure_aggregation: not supported with privacy.central (central DP "
                "clips each site's update at the server, which secure aggregation hides)"
            )
        return self

    @model_validator(mode="after")
    def _architecture_is_buildable(self) -> ExperimentConfig:
        spec = self.unet_spec()
        if spec.image_size % spec.downsampling_factor:
            raise ValueError(
                f"model.image_size {spec.image_size} must be divisible by "
                f"{spec.downsampling_factor} (2 ** (len(channel_mult) - 1))"
            )
        return self

    def unet_spec(self) -> UNetSpec:
        """The full network spec: the preset, the overrides, and channels from the data."""
        overrides = self.model.model_dump(exclude={"preset"})
        for key in ("channel_mult", "attention_ds"):
            if overrides[key] is not None:
                overrides[key] = tuple(overrides[key])
        return resolve_spec(
            self.model.preset,
            image_channels=self.data.image_channels,
            mask_channels=len(self.data.classes),
            **overrides,
        )


def parse_config(data: dict[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Validate a config mapping; raise ConfigError naming ``source`` and the first bad key."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(source, exc.errors())) from None


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line for a YAML file safe_load refused, naming the file and line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or ""
    # safe_load builds plain values only, so any tag (!!python/object, !custom) is refused:
    # say so, rather than call a well-formed file invalid YAML.
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if isinstance(exc, yaml.constructor.ConstructorError) and tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return f"{path}: YAML tags are not allowed (found {shown}{where}); use plain values"
    return f"{path}: not valid YAML{where}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read and validate a YAML experiment config.

    ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML) applied on top, e.g.
    ``["train.steps=100", "model.preset=tiny"]``.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        apply_override(data, item, source=str(path))
    return parse_config(data, source=str(path))


def resolve_workdir(value: str | Path | None = None) -> Path:
    """Where runs, releases, keys and built-in data live: ``value``, else the environment
    variable ``FEDMEDSEGDIFF_HOME``, else ``~/.fedmedsegdiff``."""
    chosen = value or os.environ.get("FEDMEDSEGDIFF_HOME") or Path.home() / ".fedmedsegdiff"
    return Path(chosen).expanduser().resolve()


def config_from_run_config(run_config: Mapping[str, Any], app_root: Path) -> ExperimentConfig:
    """The experiment a federated run uses, from its flat key-value run config.

    ``experiment`` names a YAML file (relative paths are taken from ``app_root``, the folder of
    the app's pyproject.toml); ``overrides`` is an optional string of ``key=value`` items
    separated by spaces (quote values that contain spaces).
    """
    name = str(run_config.get("experiment", "configs/federated-tiny.yaml"))
    path = Path(name) if Path(name).is_absolute() else app_root / name
    overrides = shlex.split(str(run_config.get("overrides", "")))
    return load_config(path, overrides)


def apply_override(data: dict[str, Any], item: str, *, source: str = "override") -> None:
    """Set ``dotted.key=value`` in a nested mapping (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{source}: override {item!r} is not of the form key=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {key}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        message = _yaml_error(Path(source), exc).split(": ", 1)[1]
        raise ConfigError(f"{source}: override {key}: {message}") from None


__all__ = [
    "PRESETS",
    "DataConfig",
    "DiffusionConfig",
    "ExperimentConfig",
    "FederationConfig",
    "InferenceConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_override",
    "config_from_run_config",
    "load_config",
    "parse_config",
    "resolve_workdir",
]
