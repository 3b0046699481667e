"""Settings as every entry point loads them: the default graph, then the pipeline file, the
environment and command-line flags."""

from pathlib import Path
from typing import Any

from services import DEFAULT_GRAPH
from shared.config import load_settings
from shared.settings import Settings


def load(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Load settings over the built-in five-stage graph (see shared.config.load_settings)."""
    return load_settings(config, graph=DEFAULT_GRAPH, **overrides)
