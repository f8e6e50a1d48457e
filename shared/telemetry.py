"""Structured logs that carry trace ids, and OpenTelemetry tracing.

Logs are one JSON object per line (python-json-logger) with `trace_id`/`span_id` of the current
span, so a log line can be joined with its trace. Tracing uses the OpenTelemetry SDK; gRPC spans come
from opentelemetry-instrumentation-grpc's interceptors (installed in shared.server / shared.clients).
"""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from pythonjsonlogger.json import JsonFormatter

from shared.config import GrpcSettings


class TraceContextFilter(logging.Filter):
    """Adds the current span's trace and span ids (hex) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = f"{context.trace_id:032x}" if context.is_valid else ""
        record.span_id = f"{context.span_id:016x}" if context.is_valid else ""
        return True


def configure_logging(service: str, settings: GrpcSettings) -> None:
    """Route every log record to stdout as JSON (or text for people), tagged with the service name."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(TraceContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(
            "{asctime}{levelname}{name}{message}{trace_id}{span_id}", style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
        ))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {service} %(name)s [%(trace_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # The driver logs every reconnect attempt at WARNING; keep it, but not its INFO chatter.
    logging.getLogger("cassandra").setLevel(max(logging.WARNING, root.level))


_provider: TracerProvider | None = None


def configure_tracing(service: str, settings: GrpcSettings) -> TracerProvider:
    """Install the process's tracer provider once (OpenTelemetry allows only one)."""
    global _provider  # noqa: PLW0603 - the SDK itself keeps exactly one global provider
    if _provider is None:
        _provider = TracerProvider(resource=Resource.create({"service.name": f"onecdp-{service}"}))
        if settings.traces_exporter == "console":
            _provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        trace.set_tracer_provider(_provider)
    return _provider
