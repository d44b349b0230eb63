"""A hospital's deployment config: the TOML file (``deploy/hospital.example.toml``), checked with
pydantic, and what it gives the SuperNode and the metrics exporter.

Both :mod:`deploy.hospital` (the daemons) and :mod:`deploy.exporter` import from here; this
module imports neither. Every problem with the file is one :class:`ConfigError` line naming the
file and the key, e.g. ``hospital.toml: metrics.port: Input should be a valid integer``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from medsegdiff_core.config import DataConfig, PrivacyConfig
from medsegdiff_core.errors import ConfigError, validation_message

from .toml_text import config_args


class _Table(BaseModel):
    """A table of the hospital TOML: keys spelled with ``-``, unknown keys refused, types as
    written (TOML is typed: ``port = "9101"`` is a mistake, not a port)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        alias_generator=lambda name: name.replace("_", "-"),
    )


class SuperlinkTable(_Table):
    address: str = Field(description="the SuperLink's Fleet API, host:port")
    root_certificates: str | None = None
    auth_key: str | None = None
    insecure: bool = False
    max_wait_time: float | None = Field(None, gt=0)


_DATA_FIELDS = DataConfig.model_fields


class DataTable(_Table):
    """The keys of DataConfig a site sets (its folders come from ``data-path``)."""

    layout: Literal["generic", "refuge", "ddti", "isic", "brats", "volumes"] = "generic"
    classes: dict[str, list[int]] = Field(default_factory=_DATA_FIELDS["classes"].default_factory)
    image_channels: int = Field(_DATA_FIELDS["image_channels"].default, ge=1)
    skip_cases: list[str] = Field(default_factory=list)


# [privacy] overrides the experiment's privacy section key by key: each key of PrivacyConfig,
# its type and bounds, none required (cross-key rules are checked once merged, at the site).
PrivacyTable = create_model(
    "PrivacyTable",
    __config__=ConfigDict(extra="forbid", frozen=True, strict=True),
    **{name: (info.annotation, info) for name, info in PrivacyConfig.model_fields.items()},
)


class MetricsTable(_Table):
    host: str = "127.0.0.1"
    port: int = Field(9101, ge=0, le=65535)
    check_interval_s: float = Field(60.0, gt=0)
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None


class HospitalFile(_Table):
    """The whole hospital TOML, as written."""

    site_name: str
    data_path: str
    state_dir: str
    superlink: SuperlinkTable
    data: DataTable = Field(default_factory=DataTable)
    privacy: PrivacyTable = Field(default_factory=PrivacyTable)  # type: ignore[valid-type]
    metrics: MetricsTable = Field(default_factory=MetricsTable)

    @model_validator(mode="after")
    def _secured(self) -> HospitalFile:
        # Here rather than on [superlink]: checked once every key is known good, so that the
        # first error reported is a bad key if there is one.
        link = self.superlink
        if not link.insecure and (link.root_certificates is None or link.auth_key is None):
            raise ValueError(
                "superlink: needs root-certificates and auth-key "
                "(or insecure = true, for a test on one machine only)"
            )
        return self


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _validated(
    model: type[BaseModel], raw: Mapping[str, Any], source: str, *, table: str | None = None
) -> Any:
    """``model`` from ``raw``, or ConfigError: ``<source>: <key>: <problem>`` for the first
    problem (``table`` prefixes the key, spelled as in the file)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = dict(errors[0])
        if table is not None:
            first["loc"] = (table, *(str(part).replace("_", "-") for part in first["loc"]))
        raise ConfigError(validation_message(source, [first, *errors[1:]])) from None


@dataclass(frozen=True)
class MetricsTls:
    """https for ``/metrics``: the exporter's certificate and key, and with ``client_ca`` a
    client certificate signed by it is required of every scraper."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    source: str = "metrics"  # where the settings came from, for error messages

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError(f"{self.source}: tls-cert and tls-key go together (one is missing)")
        if self.client_ca is not None and self.cert is None:
            raise ConfigError(f"{self.source}: client-ca needs tls-cert and tls-key (https)")

    def check_files(self) -> None:
        """ConfigError naming the setting unless its file is there: prometheus-client would
        only fail with a bare OSError. Checked by the exporter, not at load, so that a missing
        metrics certificate never stops the SuperNode."""
        for name, path in (
            ("tls-cert", self.cert),
            ("tls-key", self.key),
            ("client-ca", self.client_ca),
        ):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{self.source}: {name} {path} is not a readable file")

    def server_kwargs(self) -> dict[str, object]:
        if self.cert is None:
            return {}
        kwargs: dict[str, object] = {"certfile": str(self.cert), "keyfile": str(self.key)}
        if self.client_ca is not None:
            kwargs |= {"client_cafile": str(self.client_ca), "client_auth_required": True}
        return kwargs


@dataclass
class HospitalConfig:
    """What a hospital's SuperNode and metrics exporter need (see hospital.example.toml)."""

    site_name: str
    data_path: Path
    state_dir: Path
    superlink: str
    root_certificates: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    max_wait_time: float | None = None
    data: DataConfig = field(default_factory=DataConfig)
    privacy: dict[str, Any] = field(default_factory=dict)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9101
    check_interval_s: float = 60.0
    metrics_tls: MetricsTls = field(default_factory=MetricsTls)

    @classmethod
    def load(cls, path: Path) -> HospitalConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], *, source: str = "hospital config"
    ) -> HospitalConfig:
        """Check ``raw`` (the parsed TOML) against :class:`HospitalFile`; ConfigError naming
        ``source`` and the first bad key."""
        file = _validated(HospitalFile, raw, source)
        data = file.data.model_dump()
        data_config = _validated(DataConfig, data, source, table="data")
        link, metrics = file.superlink, file.metrics
        metrics_tls = MetricsTls(
            _path(metrics.tls_cert),
            _path(metrics.tls_key),
            _path(metrics.client_ca),
            source=f"{source}: [metrics]",
        )
        return cls(
            site_name=file.site_name,
            data_path=Path(file.data_path),
            state_dir=Path(file.state_dir),
            superlink=link.address,
            root_certificates=_path(link.root_certificates),
            auth_key=_path(link.auth_key),
            insecure=link.insecure,
            max_wait_time=link.max_wait_time,
            data=data_config,
            privacy=file.privacy.model_dump(exclude_unset=True),
            metrics_host=metrics.host,
            metrics_port=metrics.port,
            check_interval_s=metrics.check_interval_s,
            metrics_tls=metrics_tls,
        )

    def node_config(self) -> str:
        """The ``--node-config`` value: what the ClientApp reads from ``context.node_config``."""
        items: dict[str, Any] = {
            "data-path": str(self.data_path),
            "site-name": self.site_name,
            "state-dir": str(self.state_dir),
        }
        items |= {f"privacy.{k}": v for k, v in self.privacy.items()}
        return config_args(items)

    def supernode_command(self, *, runtime_port: int | None = None) -> list[str]:
        """``flower-supernode`` with this hospital's flags.

        ``runtime_port`` is the SuperNode's local Runtime API port (Flower's default 9094);
        several SuperNodes on one machine need one each."""
        command = ["flower-supernode", "--superlink", self.superlink]
        if self.insecure:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.root_certificates)]
            command += ["--auth-supernode-private-key", str(self.auth_key)]
        if self.max_wait_time is not None:
            command += ["--max-wait-time", str(self.max_wait_time)]
        if runtime_port is not None:
            command += ["--port", str(runtime_port)]
        return [*command, "--node-config", self.node_config()]

    def exporter_command(self, config_path: Path) -> list[str]:
        return [sys.executable, "-m", "deploy.exporter", "site", "--config", str(config_path)]
