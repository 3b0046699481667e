"""Configuration: defaults < pipeline TOML file < environment (`ORCH_*`) < explicit overrides.

Loaded once at the edge (`load_settings`) and passed down; nothing reads settings globally.
Every key is documented in pipeline.example.toml.
"""

import os
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared.errors import ConfigError

CONFIG_ENV = "ORCH_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChannelSettings(_Section):
    """Capacity of one inter-stage stream: when full, publishes into it are rejected."""

    capacity: int = Field(ge=1)
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)


class Channels(_Section):
    """The bounded streams between stages, named after the stage that reads them."""

    intake: ChannelSettings = ChannelSettings(capacity=1024)
    assemble: ChannelSettings = ChannelSettings(capacity=512)
    inference: ChannelSettings = ChannelSettings(capacity=512)
    post: ChannelSettings = ChannelSettings(capacity=1024)
    stream: ChannelSettings = ChannelSettings(capacity=512)


class StageSettings(_Section):
    """How one stage consumes its input."""

    max_ack_pending: int = Field(default=512, ge=1)
    batch: int = Field(default=64, ge=1, le=1024)
    concurrency: int = Field(default=128, ge=1)
    ack_wait: float = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=5, ge=1)
    backoff: list[float] = Field(default_factory=lambda: [1.0, 5.0, 30.0])
    timeout: float = Field(default=300.0, gt=0)
    """Longest the handler may take on one message; then that attempt fails and is retried."""
    instances: int = Field(default=1, ge=1, le=64)
    """How many processes of this stage `orchestrator up` starts."""

    @field_validator("backoff")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(d < 0 for d in value):
            raise ValueError("backoff delays must be >= 0")
        return value


class Stages(_Section):
    """Per-stage consumer settings."""

    rag: StageSettings = StageSettings()
    assemble: StageSettings = StageSettings()
    inference: StageSettings = StageSettings()
    post: StageSettings = StageSettings()
    stream: StageSettings = StageSettings()


class ResultsSettings(_Section):
    """The results stream, where answers wait for their clients."""

    max_age: float = Field(default=3600.0, gt=0)
    max_msgs: int = Field(default=1_000_000, ge=1)
    max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)


class AffinitySettings(_Section):
    """Membership of stage instances, which divide a stage's partitions among themselves."""

    heartbeat: float = Field(default=1.0, gt=0)
    failover_after: float = Field(default=3.0, gt=0)

    @field_validator("failover_after")
    @classmethod
    def _longer_than_heartbeat(cls, value: float, info: Any) -> float:
        beat = info.data.get("heartbeat", 1.0)
        if value <= beat:
            raise ValueError(f"failover_after ({value}) must exceed heartbeat ({beat})")
        return value


class DeadLetterSettings(_Section):
    """The dead-letter stream: kept for inspection and replay, bounded by age and size.

    When it is full, stages stop acking what they cannot dead-letter, so nothing is lost:
    the work waits in its input stream until an operator makes room.
    """

    max_age: float = Field(default=7 * 24 * 3600.0, gt=0)
    max_msgs: int = Field(default=1_000_000, ge=1)
    max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)


class RagSettings(_Section):
    """Retrieval: a corpus file (one passage per line) or the built-in sample corpus."""

    corpus: Path | None = None
    top_k: int = Field(default=2, ge=0, le=50)


DEFAULT_TEMPLATE = "Context:\n{context}\n\nQuestion: {input}\nAnswer:"
TEMPLATE_FIELDS = frozenset({"context", "input", "session_id", "request_id"})


class AssembleSettings(_Section):
    """Prompt assembly: a str.format template over the fields in TEMPLATE_FIELDS."""

    template: str = DEFAULT_TEMPLATE

    @field_validator("template")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"template is not a valid format string: {exc}") from None
        unknown = names - TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"template uses unknown fields {sorted(unknown)}; known: {sorted(TEMPLATE_FIELDS)}"
            )
        return value


class WorkerSettings(_Section):
    """The model worker the inference stage calls."""

    kind: str = Field(default="echo", min_length=1)
    """A built-in worker ("echo") or `package.module:factory` for your own."""
    echo_token_delay: float = Field(default=0.0, ge=0)
    """Seconds the echo worker waits before each token (to imitate a model's pace)."""


class Settings(BaseSettings):
    """Everything a process of this project needs to know, loaded once at start-up."""

    model_config = SettingsConfigDict(env_prefix="ORCH_", env_nested_delimiter="__", extra="forbid")
    pipeline_data: ClassVar[Mapping[str, Any]] = {}
    """The parsed pipeline file (load_settings sets it on a subclass); not a setting."""

    nats_url: str | None = Field(
        default=None, validation_alias=AliasChoices("ORCH_NATS_URL", "NATS_URL", "nats_url")
    )
    subject_prefix: str = Field(default="orch", pattern=r"^[A-Za-z0-9_-]+$")
    stream_prefix: str = Field(default="ORCH", pattern=r"^[A-Za-z0-9_-]+$")
    partitions: int = Field(default=8, ge=1, le=1024)
    storage: Literal["file", "memory"] = "file"
    replicas: int = Field(default=1, ge=1, le=5)
    duplicate_window: float = Field(default=120.0, gt=0)
    max_message_bytes: int = Field(default=256 * 1024, ge=1024)
    publish_timeout: float = Field(default=5.0, gt=0)
    drain_timeout: float = Field(default=30.0, gt=0)
    health_file: Path | None = None
    channels: Channels = Channels()
    stages: Stages = Stages()
    results: ResultsSettings = ResultsSettings()
    dead_letter: DeadLetterSettings = DeadLetterSettings()
    affinity: AffinitySettings = AffinitySettings()
    rag: RagSettings = RagSettings()
    assemble: AssembleSettings = AssembleSettings()
    worker: WorkerSettings = WorkerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit overrides beat the environment, which beats the TOML file."""
        data = dict(getattr(settings_cls, "pipeline_data", {}))
        return (init_settings, env_settings, InitSettingsSource(settings_cls, data))


def read_pipeline_file(path: Path) -> dict[str, Any]:
    """Parse the pipeline TOML file; any failure is a one-line ConfigError naming the file.

    A syntax error names the line and column (tomllib puts them in its message).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"pipeline file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline file {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"pipeline file {path} is not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"pipeline file {path} is not valid TOML: {exc}") from None


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Load settings from `config` (or $ORCH_CONFIG), the environment and `overrides`.

    Overrides whose value is None are ignored, so CLI flags can be passed through as they are.
    """
    path = config or os.environ.get(CONFIG_ENV) or None
    cls: type[Settings] = Settings
    if path is not None:
        path = Path(path)
        cls = type("Settings", (Settings,), {"pipeline_data": read_pipeline_file(path)})
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        where = f" in {path} or the environment" if path else " in the environment"
        raise ConfigError(f"invalid configuration{where}: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    """Every problem pydantic found, on one line: `key: message (got value)`; ...`."""
    problems = []
    for error in exc.errors(include_url=False):
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        value = error.get("input")
        got = f" (got {value!r})" if isinstance(value, str | int | float | bool) else ""
        problems.append(f"{key}: {error['msg']}{got}".replace("\n", " "))
    return "; ".join(problems)
