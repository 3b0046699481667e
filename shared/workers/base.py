"""The ModelWorker protocol and how a worker is chosen from the inference stage's options."""

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from shared.components import find
from shared.errors import ConfigError
from shared.workers.echo import EchoOptions, EchoWorker


@runtime_checkable
class ModelWorker(Protocol):
    """A model behind the inference stage: streams the tokens of a completion."""

    def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str]:
        """Yield the completion of `prompt` token by token."""
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...


def load_worker(
    kind: str, *, echo: EchoOptions | None = None, custom: Mapping[str, Any] | None = None
) -> ModelWorker:
    """Build the worker named by `kind`: a built-in name or `package.module:factory`.

    A factory is called with the `custom` options (a dict) and must return a ModelWorker.
    Modules are imported from the installed packages or the working directory.
    """
    builtins: dict[str, Callable[[], ModelWorker]] = {
        "echo": lambda: EchoWorker.from_options(echo or EchoOptions())
    }
    make = builtins.get(kind)
    if make is not None:
        return make()
    if ":" not in kind:
        raise ConfigError(
            f"unknown worker {kind!r}: use one of {sorted(builtins)} or 'package.module:factory'"
        )
    factory = find(kind, "stages.inference.options.worker")
    worker = factory(dict(custom or {}))
    if not isinstance(worker, ModelWorker):
        raise ConfigError(f"worker {kind!r} does not implement ModelWorker")
    return worker
