"""prompt-orchestrator's common library: envelope, settings, bus, stage runtime and client."""

__version__ = "0.1.0"
