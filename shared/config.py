"""Settings for every OneCDP process, read from the environment (pydantic-settings).

Two groups for every service, because they come from two places in a deployment: `CASSANDRA_*`
describes the cluster (shared by all services, usually a Secret plus a ConfigMap in Kubernetes),
`ONECDP_*` describes the gRPC side. A service's own settings are a group of their own (`PROFILE_*`).
Unknown keys are forbidden, so a typo in code fails loudly; the list of variables each group reads is
`env_var_names()` (the Kubernetes manifests are checked against it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, NamedTuple, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SERVICE_NAMES = ("identity", "profile", "segmentation", "prediction")
ConsistencyName = Literal["LOCAL_QUORUM", "QUORUM", "LOCAL_ONE", "ONE", "ALL", "EACH_QUORUM"]
_KEYSPACE_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,30}")  # fullmatch: `$` also matches before a final newline
_CURRENCY_CODE = re.compile(r"[A-Z]{3}")


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class CassandraSettings(BaseSettings):
    """Where the Cassandra cluster is and how each service talks to it."""

    model_config = SettingsConfigDict(env_prefix="CASSANDRA_", extra="forbid")

    # Comma-separated hosts. The test suite starts a local node unless this is set explicitly.
    contact_points: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1"])
    port: int = Field(default=9042, ge=1, le=65535)
    local_dc: str = "datacenter1"
    username: str | None = None
    password: SecretStr | None = None
    # LOCAL_QUORUM: a majority of local replicas, so reads see acknowledged writes at RF=3 with a node down.
    consistency: ConsistencyName = "LOCAL_QUORUM"
    # Replication factor for the keyspaces migrations create (NetworkTopologyStrategy in `local_dc`).
    replication_factor: int = Field(default=1, ge=1, le=9)
    # Each service owns the keyspace `<prefix>_<service>`; tests use a unique prefix per test.
    keyspace_prefix: str = "onecdp"
    request_timeout_seconds: float = Field(default=10.0, gt=0)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)

    _split_contact_points = field_validator("contact_points", mode="before")(_split_csv)

    @field_validator("keyspace_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if not _KEYSPACE_PREFIX.fullmatch(value):
            raise ValueError("must be lower_snake_case, start with a letter, at most 31 characters")
        return value

    def keyspace(self, service: str) -> str:
        return f"{self.keyspace_prefix}_{service}"


class TlsFiles(NamedTuple):
    """PEM files for mutual TLS: this process's certificate and key, and the CA its peers must chain to."""

    cert: Path
    key: Path
    ca: Path


def read_pem(path: Path) -> bytes:
    """A PEM file's bytes; a missing or unreadable file fails at start, naming the file."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise OSError(f"cannot read TLS file {path}: {error.strerror}") from error


class GrpcSettings(BaseSettings):
    """How the services listen, find each other, log and trace."""

    model_config = SettingsConfigDict(env_prefix="ONECDP_", extra="forbid")

    bind_host: str = "[::]"
    identity_port: int = Field(default=50051, ge=0, le=65535)
    profile_port: int = Field(default=50052, ge=0, le=65535)
    segmentation_port: int = Field(default=50053, ge=0, le=65535)
    prediction_port: int = Field(default=50054, ge=0, le=65535)
    # Targets other services are called at; empty means `localhost:<port>`. In Kubernetes:
    # `dns:///identity.onecdp.svc.cluster.local:50051` (headless Service, round-robin per call).
    identity_target: str = ""
    profile_target: str = ""
    segmentation_target: str = ""
    prediction_target: str = ""
    # SIGTERM: health turns NOT_SERVING at once, in-flight RPCs get this long to finish.
    grace_period_seconds: float = Field(default=10.0, ge=0)
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_workers: int = Field(default=32, ge=1, le=1024)
    # Servers close connections after this age so clients re-resolve DNS and rebalance.
    max_connection_age_seconds: float = Field(default=300.0, gt=0)
    # Deadline applied to calls to other services when the caller set none.
    client_timeout_seconds: float = Field(default=10.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    traces_exporter: Literal["none", "console"] = "none"
    # Apply the service's schema migrations at start (local runs); Kubernetes runs them as a Job.
    migrate_on_start: bool = True
    # Mutual TLS between services: all three set, or none (plaintext). PEM files; the certificate
    # and key are this process's identity as server and as client, the CA is what peers must be signed by.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # A second, plaintext port that serves only grpc.health.v1. Kubernetes' native gRPC probes cannot
    # present a client certificate, so with mTLS the kubelet probes this port instead of the service's.
    # Unset: none; 0 binds a free port (tests).
    health_port: int | None = Field(default=None, ge=0, le=65535)

    @field_validator("tls_cert_file", "tls_key_file", "tls_ca_file", "health_port", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # An empty variable (a blank ConfigMap entry) means "not set", not the current directory or port 0.
        return None if value == "" else value

    @model_validator(mode="after")
    def _tls_all_or_none(self) -> Self:
        given = [self.tls_cert_file, self.tls_key_file, self.tls_ca_file]
        if any(given) and not all(given):
            raise ValueError("ONECDP_TLS_CERT_FILE, ONECDP_TLS_KEY_FILE and ONECDP_TLS_CA_FILE are set together "
                             "(mutual TLS) or not at all")
        return self

    def tls_files(self) -> TlsFiles | None:
        """The mutual-TLS files, or None for plaintext."""
        if self.tls_cert_file and self.tls_key_file and self.tls_ca_file:
            return TlsFiles(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        return None

    def port_of(self, service: str) -> int:
        _check_service(service)
        port: int = getattr(self, f"{service}_port")
        return port

    def target_of(self, service: str) -> str:
        _check_service(service)
        target: str = getattr(self, f"{service}_target")
        return target or f"localhost:{self.port_of(service)}"


# Profile's reporting currency when none is configured (services.profile.computed uses it as its default too).
DEFAULT_REPORTING_CURRENCY = "USD"


class ProfileSettings(BaseSettings):
    """The profile service's own settings."""

    model_config = SettingsConfigDict(env_prefix="PROFILE_", extra="forbid")

    # The ISO 4217 code the computed money traits are in (monetary, lifetime value, average order value, the
    # RFM monetary score, window sums): only amounts in it are added up there. Amounts in other currencies
    # are not converted (there are no exchange rates) but reported apart, per currency.
    reporting_currency: str = DEFAULT_REPORTING_CURRENCY

    @field_validator("reporting_currency")
    @classmethod
    def _valid_currency(cls, value: str) -> str:
        if not _CURRENCY_CODE.fullmatch(value):
            raise ValueError(f"must be an ISO 4217 currency code of 3 upper-case letters, like USD; got {value!r}")
        return value


def _check_service(service: str) -> None:
    if service not in SERVICE_NAMES:
        raise ValueError(f"unknown service {service!r}; expected one of {', '.join(SERVICE_NAMES)}")


def env_var_names() -> set[str]:
    """Every environment variable the settings read."""
    names: set[str] = set()
    for settings_class in (CassandraSettings, GrpcSettings, ProfileSettings):
        prefix = settings_class.model_config.get("env_prefix", "")
        names.update(f"{prefix}{field}".upper() for field in settings_class.model_fields)
    return names
