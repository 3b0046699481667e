"""Factories named in the pipeline file (`package.module:name`): finding, configuring, opening.

A stage handler and a middleware are each made by a factory the pipeline file names. Finding
one imports its module (from the installed packages, the pipeline file's directory or the
working directory); configuring it checks its `options` table against the model the factory
declares (`@stage(options=...)`, `@middleware(options=...)`), or passes the table through as
a dict when it declares none; opening it calls it once per stage instance. What a factory
returns may be the thing itself, an awaitable of it, or an async context manager yielding it:
set up before the first message, torn down after the drain.

Every failure to find or configure is a Problem naming the pipeline-file key it concerns.
"""

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from shared.errors import ConfigError, Problem

OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True)
class Context(Generic[OptionsT]):
    """What a factory is called with, once per stage instance."""

    stage: str
    """The stage's name in the graph."""
    instance: str
    """This instance's id (unique across hosts and restarts)."""
    options: OptionsT
    """The `options` table, checked against the factory's options model (else a dict)."""
    subject_prefix: str = "orch"
    """The pipeline's subject prefix (for what names subjects of its own)."""
    requester: Any = None
    """The stage's connection, for workers that ask services over NATS (the remote worker):
    `request_stream(subject, data)`. A handler never publishes its output itself."""


class Factory:
    """A factory that declares what it makes and the model its options are checked against.

    Made by `shared.stage.stage` and `shared.middleware.middleware`; calling it calls the
    wrapped function.
    """

    def __init__(
        self, build: Callable[[Context[Any]], Any], kind: str, options: type[BaseModel] | None
    ) -> None:
        self.build = build
        self.kind = kind
        self.options = options
        self.__doc__ = build.__doc__
        self.__name__ = getattr(build, "__name__", kind)

    def __call__(self, context: Context[Any]) -> Any:
        return self.build(context)


def declare(kind: str, options: type[BaseModel] | None) -> Callable[[Callable[..., Any]], Factory]:
    """A decorator turning a function into a Factory of `kind` with `options`."""

    def wrap(build: Callable[..., Any]) -> Factory:
        return Factory(build, kind, options)

    return wrap


@dataclass(frozen=True)
class Prepared:
    """A factory found and its options checked: ready to open."""

    reference: str
    factory: Callable[[Context[Any]], Any]
    options: Any


def prepare(
    reference: str, kind: str, options: Mapping[str, Any], key: str, search: Iterable[Path] = ()
) -> Prepared:
    """Find the factory `reference` names and check `options` against it.

    `key` is where the reference sits in the pipeline file (`stages.rag`); ConfigError names
    it, with every problem found.
    """
    factory = find(reference, f"{key}.{'handler' if kind == 'stage' else 'factory'}", search)
    if isinstance(factory, Factory):
        if factory.kind != kind:
            problem = f"{reference} is a {factory.kind} factory, not a {kind} factory"
            raise ConfigError(f"{key}: {problem}", [Problem(key, problem)])
        if factory.options is not None:
            return Prepared(reference, factory, _check(factory.options, options, key))
    return Prepared(reference, factory, dict(options))


def find(reference: str, key: str, search: Iterable[Path] = ()) -> Callable[[Context[Any]], Any]:
    """Import `package.module:name` and return that callable; ConfigError naming `key`."""
    module_name, _, attr = reference.partition(":")

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{key}: {message}", [Problem(key, message)])

    # Like uvicorn and gunicorn: a module beside the pipeline file or in the working
    # directory is importable even when the process was started through an installed script.
    for directory in (*search, Path(os.getcwd())):
        if str(directory) not in sys.path:
            sys.path.append(str(directory))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise fail(f"cannot import {reference}: no module named {exc.name!r}") from None
        raise fail(f"cannot import {reference}: {exc}") from None
    except Exception as exc:  # the module itself failed while being imported
        raise fail(f"cannot import {reference}: {type(exc).__name__}: {exc}") from None
    try:
        found = getattr(module, attr)
    except AttributeError:
        raise fail(f"cannot import {reference}: module {module_name!r} has no {attr!r}") from None
    if not callable(found):
        raise fail(f"{reference} is not a factory (a {type(found).__name__}, not callable)")
    return found


def _check(model: type[BaseModel], options: Mapping[str, Any], key: str) -> BaseModel:
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"])
            value = error.get("input")
            got = f" (got {value!r})" if isinstance(value, str | int | float | bool) else ""
            message = f"{error['msg']}{got}".replace("\n", " ")
            problems.append(Problem(f"{key}.options" + (f".{where}" if where else ""), message))
        raise ConfigError("; ".join(map(str, problems)), problems) from None


async def open_component(
    prepared: Prepared, context: Context[Any], stack: contextlib.AsyncExitStack
) -> Any:
    """Call the factory and set up what it returns; `stack` tears it down when it closes."""
    made = prepared.factory(context)
    if hasattr(made, "__aenter__") and hasattr(made, "__aexit__"):
        return await stack.enter_async_context(made)
    if inspect.isawaitable(made):
        return await made
    return made
