"""OpenTelemetry set-up from the standard `OTEL_*` variables, for stages and clients.

The code records through the OpenTelemetry API only. Exporting needs the SDK, configured by
whoever runs the process: `opentelemetry-instrument` (its own set-up stands), an application
embedding the client, or `configure()` below, which every `orchestrator` command calls:

- traces are exported when `OTEL_TRACES_EXPORTER` names exporters (`otlp`; `console`, on
  stderr, which leaves a command's output on stdout alone; `none`: off) or an OTLP endpoint
  is set (`OTEL_EXPORTER_OTLP_ENDPOINT`, or its `_TRACES_` form), then over OTLP/HTTP unless
  `OTEL_TRACES_EXPORTER` says otherwise;
- metrics likewise with `OTEL_METRICS_EXPORTER` (shared.otelmetrics records them);
- sampling (`OTEL_TRACES_SAMPLER`, `_ARG`), the service name and resource attributes
  (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) and the exporters' own variables are the
  SDK's; `OTEL_SDK_DISABLED=true` turns all of this off.

Nothing asked for: nothing is imported beyond the API, and untraced traffic pays nothing.
"""

import atexit
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from opentelemetry import metrics, trace

from shared.errors import ConfigError

log = logging.getLogger(__name__)

SERVICE_NAME = "prompt-orchestrator"
"""The service name when OTEL_SERVICE_NAME does not give one."""


def tracing_on() -> bool:
    """Whether an SDK tracer provider is installed (by us or by whoever runs the process)."""
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def metrics_on() -> bool:
    """Whether an SDK meter provider is installed."""
    provider = metrics.get_meter_provider()
    return type(provider).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider")


def configure(service: str | None = None) -> None:
    """Install the SDK's tracer and meter providers as the `OTEL_*` variables ask; leave any
    provider already installed alone. ConfigError when an exporter is asked for that is not
    installed."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return
    traces = _exporters("TRACES", env)
    meters = _exporters("METRICS", env)
    if not traces and not meters:
        return
    try:
        from opentelemetry.sdk.resources import Resource
    except ImportError:
        raise ConfigError(
            "OTEL_* variables ask for traces or metrics to be exported, but the OpenTelemetry "
            "SDK is not installed: pip install 'prompt-orchestrator[otel]'"
        ) from None
    defaults = {"service.name": service or SERVICE_NAME}
    if "OTEL_SERVICE_NAME" in env:
        defaults = {}
    resource = Resource.create(defaults)  # merges OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if traces and not tracing_on():
        _install_traces(traces, resource)
    if meters and not metrics_on():
        _install_metrics(meters, resource)


def _exporters(signal: str, env: os._Environ[str]) -> list[str]:
    named = env.get(f"OTEL_{signal}_EXPORTER")
    if named is not None:
        return [n.strip() for n in named.split(",") if n.strip() and n.strip() != "none"]
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
        f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
    )
    return ["otlp"] if endpoint else []


def _install_traces(names: list[str], resource: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(resource=resource)  # its sampler follows OTEL_TRACES_SAMPLER
    for name in names:
        if name == "console":
            console = ConsoleSpanExporter(out=sys.stderr)  # stdout is the command's output
            provider.add_span_processor(SimpleSpanProcessor(console))
        else:
            exporter = _otlp("TRACES", name, "trace_exporter", "OTLPSpanExporter")
            provider.add_span_processor(BatchSpanProcessor(exporter()))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # what is batched still goes out on a clean exit
    log.info("exporting traces to %s", ", ".join(names))


def _install_metrics(names: list[str], resource: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )

    readers = []
    for name in names:  # the interval follows OTEL_METRIC_EXPORT_INTERVAL (60 s by default)
        if name == "console":
            console = ConsoleMetricExporter(out=sys.stderr)
            readers.append(PeriodicExportingMetricReader(console))
        else:
            exporter = _otlp("METRICS", name, "metric_exporter", "OTLPMetricExporter")
            readers.append(PeriodicExportingMetricReader(exporter()))
    provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(provider)
    atexit.register(provider.shutdown)
    log.info("exporting metrics to %s", ", ".join(names))


def _otlp(signal: str, name: str, module: str, cls: str) -> Callable[[], Any]:
    if name != "otlp":
        raise ConfigError(f"OTEL_{signal}_EXPORTER={name}: only otlp, console and none are "
                          "supported")  # fmt: skip
    protocol = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise ConfigError(f"OTLP protocol {protocol!r}: only http/protobuf is supported "
                          "(set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)")  # fmt: skip
    try:
        imported = __import__(f"opentelemetry.exporter.otlp.proto.http.{module}",
                              fromlist=[cls])  # fmt: skip
    except ImportError:
        raise ConfigError(f"OTEL_{signal}_EXPORTER=otlp needs the OTLP exporter: pip install "
                          "'prompt-orchestrator[otel]'") from None  # fmt: skip
    exporter: Callable[[], Any] = getattr(imported, cls)
    return exporter
