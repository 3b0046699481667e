"""Settings as every entry point loads them: the default graph, then the pipeline file, the
environment and command-line flags."""

from pathlib import Path
from typing import Any

from services import DEFAULT_GRAPH
from shared.config import load_settings
from shared.settings import Settings


def load(config: Path | str | None = None, *, check_graph: bool = True, **overrides: Any,
         ) -> Settings:  # fmt: skip
    """Load settings over the built-in five-stage graph (see shared.config.load_settings)."""
    return load_settings(config, graph=DEFAULT_GRAPH, check_graph=check_graph, **overrides)
