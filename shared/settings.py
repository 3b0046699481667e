"""The settings models: every key of the pipeline file, with its default and its bounds.

Loaded once at the edge (shared.config.load_settings) and passed down; nothing reads
settings globally. The pipeline's stages are part of them: `stages` declares each stage (its
handler, how it consumes, what follows it) and `entry` names the stage that reads the intake;
shared.graph checks the graph they form. Every key is documented in pipeline.example.toml.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared.urls import server_list

ENV_PREFIX = "ORCH_"
REFERENCE = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
"""`package.module:name`, how the pipeline file names a factory."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouteDecl(_Section):
    """A rule sending a stage's output somewhere other than its `next` stage."""

    when: dict[str, Any] = Field(min_length=1)
    """Conditions on the output envelope, all of which must hold: a dotted path
    (`metadata.<key>`, `data.<key>`, `session_id`, `request_id`, `input`) and the value it
    must equal, or a list of values it may equal. In TOML, `when = { metadata.task = "x" }`."""
    to: str
    """The stage the output goes to when the conditions hold."""

    @field_validator("when")
    @classmethod
    def _flatten(cls, value: dict[str, Any]) -> dict[str, Any]:
        # TOML reads `{ metadata.task = "x" }` as {"metadata": {"task": "x"}}.
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: Mapping[str, Any]) -> None:
            for key, item in node.items():
                path = f"{prefix}{key}"
                if isinstance(item, Mapping):
                    walk(f"{path}.", item)
                else:
                    flat[path] = item

        walk("", value)
        return flat


class StageDecl(_Section):
    """One stage of the pipeline: its handler, its input channel, how it consumes, what
    follows it."""

    handler: str = Field(pattern=REFERENCE)
    """The stage's factory, `package.module:name`: it builds the handler (shared.stage)."""
    enabled: bool = True
    """False removes the stage from the graph (e.g. a built-in stage you do not want)."""
    next: str | None = None
    """The stage its output goes to; none for a last stage, whose output is the result."""
    routes: list[RouteDecl] = Field(default_factory=list)
    """Rules tried in order before `next`; the first that matches decides."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The handler's own settings, checked against the options model its factory declares."""
    capacity: int = Field(default=512, ge=1)
    """Messages its input channel holds; when full, publishing into it fails."""
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Bytes its input channel holds."""
    max_ack_pending: int = Field(default=512, ge=1)
    batch: int = Field(default=64, ge=1, le=1024)
    concurrency: int = Field(default=128, ge=1)
    ack_wait: float = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=5, ge=1)
    backoff: list[float] = Field(default_factory=lambda: [1.0, 5.0, 30.0])
    timeout: float = Field(default=300.0, gt=0)
    """Longest the handler may take on one message; then that attempt fails and is retried."""
    shed_after: float = Field(default=15.0, ge=0)
    """Seconds an output waits for room in a full next channel (retried, while this stage's
    room to take in more shrinks) before the request is shed as `backpressure`: a next stage
    that restarts slows this one down instead of costing requests. 0 sheds at once."""
    instances: int = Field(default=1, ge=1, le=64)
    """How many processes of this stage `orchestrator up` starts."""

    @field_validator("backoff")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(d < 0 for d in value):
            raise ValueError("backoff delays must be >= 0")
        return value


class MiddlewareDecl(_Section):
    """A middleware wrapped around the handler calls of some stages (shared.middleware)."""

    factory: str = Field(pattern=REFERENCE)
    """`package.module:name` of its factory."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Passed to the factory, checked against the options model it declares."""
    stages: list[str] | None = None
    """The stages it applies to; all when unset."""


class ResultsSettings(_Section):
    """The results stream, where answers wait for their clients."""

    max_age: float = Field(default=3600.0, gt=0)
    max_msgs: int = Field(default=1_000_000, ge=1)
    max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)


class TokensSettings(_Section):
    """The token stream: answers' tokens as they are generated, for requests that ask."""

    max_age: float = Field(default=600.0, gt=0)
    """Seconds tokens are kept: long enough to follow an answer; the result keeps it after."""
    max_msgs: int = Field(default=1_000_000, ge=1)
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    window: float = Field(default=0.05, ge=0)
    """Tokens arriving within this many seconds of a message go out together in the next;
    the first goes out at once."""


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


class MetricsSettings(_Section):
    """What a stage process records about its messages (for `/metrics`, `$SRV.STATS`, OTLP)."""

    enabled: bool = True
    """False: nothing recorded; `/metrics` then shows only the consumer state."""


class HttpSettings(_Section):
    """The stage process's HTTP endpoint: `/metrics` (Prometheus), `/healthz`, `/readyz`."""

    port: int = Field(default=0, ge=0, le=65535)
    """0: no endpoint. Processes on one host need one port each."""
    host: str = "127.0.0.1"
    """The address to listen on: `0.0.0.0` to be scraped from other hosts or containers."""


class Settings(BaseSettings):
    """Everything a process of this project needs to know, loaded once at start-up."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      extra="forbid")  # fmt: skip
    layers: ClassVar[tuple[Mapping[str, Any], ...]] = ()
    """What load_settings puts under the environment: the pipeline file, then the default
    graph (set on a subclass); not a setting."""
    source: ClassVar[Path | None] = None
    """The pipeline file these settings were read from (set on a subclass); not a setting."""

    nats_url: str | None = Field(
        default=None, validation_alias=AliasChoices("ORCH_NATS_URL", "NATS_URL", "nats_url")
    )
    subject_prefix: str = Field(default="orch", pattern=r"^[A-Za-z0-9_-]+$")
    stream_prefix: str = Field(default="ORCH", pattern=r"^[A-Za-z0-9_-]+$")
    partitions: int = Field(default=8, ge=1, le=1024)
    storage: Literal["file", "memory"] = "file"
    replicas: int = Field(default=1, ge=1, le=5)
    placement: list[str] = Field(default_factory=list)
    """Server tags (a cluster's `server_tags`) that every stream's and bucket's replicas must
    be placed on; existing ones are moved there when a stage starts (the server moves them)."""
    duplicate_window: float = Field(default=120.0, gt=0)
    max_message_bytes: int = Field(default=256 * 1024, ge=1024)
    publish_timeout: float = Field(default=5.0, gt=0)
    drain_timeout: float = Field(default=30.0, gt=0)
    instance: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_{}-]{1,64}$")
    """This process's name among a stage's instances (`{host}` stands for the host name). A
    process restarted under the same name takes its partitions back at once; unset, every
    process gets a name of its own and a restarted one waits `affinity.failover_after`. Give
    each live process its own: `orchestrator up --instances` does."""
    health_file: Path | None = None
    entry: str | None = None
    """The stage that reads the intake, where clients publish."""
    stages: dict[str, StageDecl] = Field(default_factory=dict)
    middleware: list[MiddlewareDecl] = Field(default_factory=list)
    results: ResultsSettings = ResultsSettings()
    tokens: TokensSettings = TokensSettings()
    dead_letter: DeadLetterSettings = DeadLetterSettings()
    affinity: AffinitySettings = AffinitySettings()
    metrics: MetricsSettings = MetricsSettings()
    http: HttpSettings = HttpSettings()

    @field_validator("nats_url", mode="before")
    @classmethod
    def _servers(cls, value: object) -> object:
        # One URL, several comma-separated, or (in the file) a list of them.
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        return ",".join(server_list(value)) if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit overrides beat the environment, which beats the file, then the defaults."""
        layers = [InitSettingsSource(settings_cls, dict(data)) for data in cls.layers]
        return (init_settings, env_settings, *layers)
