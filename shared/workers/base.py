"""The ModelWorker protocol and how a worker is chosen from the inference stage's options."""

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from shared.components import find
from shared.envelope import Usage
from shared.errors import ConfigError
from shared.workers.echo import EchoOptions, EchoWorker
from shared.workers.local import LocalOptions, LocalWorker
from shared.workers.openai import OpenAIOptions, OpenAIWorker


@runtime_checkable
class ModelWorker(Protocol):
    """A model behind the inference stage: streams the tokens of a completion.

    A worker may also have `async complete(prompt, *, session_id) -> (text, Usage | None)`:
    the whole answer at once, for requests whose tokens nobody follows. Without it those
    are answered by gathering `stream`. (A subclass that changes `stream` of a worker that
    has `complete`, EchoWorker's say, changes `complete` alike.)
    """

    def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str | Usage]:
        """Yield the completion of `prompt` piece by piece, then (optionally) its Usage."""
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...


async def start(worker: ModelWorker) -> None:
    """Let a worker that has a `start` (load a model, start a server) do it: once, before
    the first request."""
    begin = getattr(worker, "start", None)
    if begin is not None:
        await begin()


def load_worker(
    kind: str,
    *,
    echo: EchoOptions | None = None,
    openai: OpenAIOptions | None = None,
    local: LocalOptions | None = None,
    custom: Mapping[str, Any] | None = None,
) -> ModelWorker:
    """Build the worker named by `kind`: a built-in name or `package.module:factory`.

    A factory is called with the `custom` options (a dict) and must return a ModelWorker.
    Modules are imported from the installed packages or the working directory.
    """

    def openai_worker() -> ModelWorker:
        if openai is None:
            raise ConfigError("worker 'openai' needs its settings")
        return OpenAIWorker(openai)

    builtins: dict[str, Callable[[], ModelWorker]] = {
        "echo": lambda: EchoWorker.from_options(echo or EchoOptions()),
        "openai": openai_worker,
        "local": lambda: LocalWorker(local or LocalOptions()),
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
