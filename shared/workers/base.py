"""The ModelWorker protocol and how a worker is chosen from settings."""

import importlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Protocol, runtime_checkable

from shared.errors import ConfigError
from shared.settings import WorkerSettings


@runtime_checkable
class ModelWorker(Protocol):
    """A model behind the inference stage: streams the tokens of a completion."""

    def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str]:
        """Yield the completion of `prompt` token by token."""
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...


def load_worker(settings: WorkerSettings) -> ModelWorker:
    """Build the worker named by `settings.kind`: a built-in name or `module:factory`.

    A factory is called with the WorkerSettings and must return a ModelWorker. Modules are
    imported from the installed packages or the working directory.
    """
    from shared.workers.echo import EchoWorker

    builtins: dict[str, Callable[[WorkerSettings], ModelWorker]] = {
        "echo": EchoWorker.from_settings
    }
    factory = builtins.get(settings.kind)
    if factory is None:
        module_name, sep, attr = settings.kind.partition(":")
        if not sep:
            raise ConfigError(
                f"unknown worker kind {settings.kind!r}: use one of {sorted(builtins)} "
                "or 'package.module:factory'"
            )
        # Like uvicorn and gunicorn: a worker module in the working directory is importable
        # even when the process was started through an installed script.
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load worker {settings.kind!r}: {exc}") from None
    worker = factory(settings)
    if not isinstance(worker, ModelWorker):
        raise ConfigError(f"worker {settings.kind!r} does not implement ModelWorker")
    return worker
