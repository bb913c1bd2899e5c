"""Typed configuration: one TOML file plus ``POISONWATCH_*`` environment overrides.

Every option has a default that works for the demo. An environment variable
``POISONWATCH_<SECTION>_<OPTION>`` overrides ``[section] option``; for example
``POISONWATCH_DATABASE_URL`` sets ``[database] url``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import ConfigError

ENV_PREFIX = "POISONWATCH_"
# The config file of API worker processes (monitor.asgi), which take no arguments.
CONFIG_FILE_VARIABLE = "POISONWATCH_CONFIG"
# Directory in which prometheus_client's multiprocess mode keeps each process's metric values.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Section):
    url: str = Field("sqlite:///poisonwatch.db", description="SQLAlchemy URL; SQLite paths are relative to the working directory.")


def _split_commas(value: Any) -> Any:
    # Environment overrides arrive as one string; lists are given comma-separated there.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the HTTP API; 0 picks a free one.")
    max_batch_size: int = Field(1000, ge=1, description="Most predictions or labels one request may carry.")
    max_input_values: int = Field(65536, ge=1, description="Most float values one prediction's input may have.")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body in bytes; larger requests get a 413."
    )
    token_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=list,
        description="SHA-256 hex digests of the bearer tokens that may write ('poisonwatch token create' prints one). "
        "Required when 'host' is not a loopback address; when set, writes need a token on loopback too.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty (the default) sends no CORS headers."
    )

    _split_tokens = pydantic.field_validator("token_sha256", "cors_origins", mode="before")(_split_commas)


class SchedulerConfig(_Section):
    enabled: bool = True
    incident_scan_interval_seconds: float = Field(10.0, gt=0)
    influence_interval_seconds: float = Field(5.0, gt=0)
    heldout_interval_seconds: float = Field(300.0, gt=0)
    misfire_grace_seconds: float = Field(30.0, gt=0, description="How late a job run may start before it is skipped.")
    workers: int = Field(2, ge=1, description="Threads that run jobs; heavy JAX work shares them.")
    leader_check_seconds: float | None = Field(
        None,
        gt=0,
        description="How often a replica checks or tries to take the scheduler lock; "
        "defaults to half the shortest job interval.",
    )
    max_backoff_seconds: float = Field(
        60.0, gt=0, description="Maximum pause of a job after consecutive database failures, in seconds."
    )
    retention_interval_seconds: float = Field(3600.0, gt=0, description="How often the retention job runs.")
    release_check_interval_seconds: float = Field(
        300.0, gt=0, description="How often the release-check job looks for model versions without their checks."
    )

    @property
    def shortest_interval_seconds(self) -> float:
        return min(
            self.incident_scan_interval_seconds,
            self.influence_interval_seconds,
            self.heldout_interval_seconds,
            self.retention_interval_seconds,
            self.release_check_interval_seconds,
        )

    @property
    def effective_leader_check_seconds(self) -> float:
        """Seconds between lock checks; half the shortest job interval keeps a takeover within two intervals."""
        if self.leader_check_seconds is not None:
            return self.leader_check_seconds
        return self.shortest_interval_seconds / 2


class IncidentConfig(_Section):
    confidence_threshold: float = Field(0.9, ge=0.0, le=1.0, description="Minimum confidence of a wrong prediction to open an incident.")
    max_attempts: int = Field(3, ge=1, description="Analyses of one incident before it stays failed.")
    retry_base_seconds: float = Field(60.0, gt=0, description="Delay before the first retry of a failed analysis; doubles each time.")


class InfluenceConfig(_Section):
    top_k: int = Field(10, ge=1, le=1000, description="Training examples stored per incident.")
    damping: float = Field(0.01, ge=0.0, description="Added to the Hessian's diagonal before solving.")
    tol: float = Field(1e-5, gt=0.0, lt=1.0, description="Relative residual at which conjugate gradient stops.")
    maxiter: int = Field(200, ge=1, description="Most conjugate-gradient iterations per incident.")
    batch_size: int = Field(256, ge=1, description="Training examples per padded batch of the HVP and scoring passes.")
    solver: Literal["cg", "factors"] = Field(
        "cg",
        description=(
            "Inverse-HVP solver: 'cg' solves per incident; 'factors' computes the top eigenpairs of the damped "
            "Hessian once per model version (a release check) and reuses them, falling back to CG until they exist."
        ),
    )
    factor_rank: int = Field(256, ge=1, description="Eigenpairs kept by the 'factors' solver.")
    factor_tol: float = Field(
        0.05, gt=0.0, lt=1.0, description="Relative residual above which a 'factors' solve counts as unconverged."
    )
    score: Literal["raw", "gradient-norm"] = Field(
        "gradient-norm",
        description="Ranking score: raw influence, or influence over the example's loss-gradient norm.",
    )
    compilation_cache_dir: str = Field(
        "~/.cache/poisonwatch/jax",
        description="JAX's persistent compilation cache, so a restart does not recompile; '' turns it off.",
    )


class RetentionConfig(_Section):
    predictions_days: float | None = Field(
        None, gt=0, description="Days a prediction is kept after receipt; unset keeps predictions forever."
    )
    labels_days: float | None = Field(
        None, gt=0, description="Days a label is kept after receipt; unset keeps labels as long as their prediction."
    )
    batch_size: int = Field(1000, ge=1, le=100_000, description="Rows deleted per transaction.")
    max_batches_per_run: int = Field(100, ge=1, description="Transactions per retention run; the rest waits for the next run.")


class ModelConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    loader: str = Field(description="Import path 'package.module:function' of the loader.")
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the loader as is.")


class Config(_Section):
    database: DatabaseConfig = DatabaseConfig()
    server: ServerConfig = ServerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    incidents: IncidentConfig = IncidentConfig()
    influence: InfluenceConfig = InfluenceConfig()
    retention: RetentionConfig = RetentionConfig()
    models: list[ModelConfig] = Field(default_factory=list)

    @pydantic.model_validator(mode="after")
    def _unique_model_names(self) -> Config:
        names = [model.name for model in self.models]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"model names must be unique; repeated: {', '.join(repeated)}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((model for model in self.models if model.name == name), None)


_SECTIONS = ("database", "server", "scheduler", "incidents", "influence", "retention")


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    overrides: dict[str, dict[str, str]] = {}
    for section in _SECTIONS:
        prefix = f"{ENV_PREFIX}{section.upper()}_"
        for key, value in environ.items():
            if key.startswith(prefix):
                overrides.setdefault(section, {})[key[len(prefix):].lower()] = value
    return overrides


def _format_validation_error(error: pydantic.ValidationError, origin: str) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        problems.append(f"  {location}: {item['msg']} (found {item.get('input')!r})")
    return f"invalid configuration in {origin}:\n" + "\n".join(problems)


def parse_config(data: Mapping[str, Any], *, environ: Mapping[str, str] | None = None, origin: str = "<dict>") -> Config:
    """Validate a configuration mapping, after applying environment overrides."""
    merged: dict[str, Any] = {key: dict(value) if isinstance(value, Mapping) else value for key, value in data.items()}
    for section, values in _environment_overrides(os.environ if environ is None else environ).items():
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"invalid configuration in {origin}: [{section}] must be a table")
        target.update(values)
    try:
        return Config.model_validate(merged)
    except pydantic.ValidationError as error:
        raise ConfigError(_format_validation_error(error, origin)) from None


def load_config(path: str | Path | None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file at ``path`` (defaults only when None) and apply overrides."""
    if path is None:
        return parse_config({}, environ=environ, origin="defaults")
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    return parse_config(data, environ=environ, origin=str(path))
