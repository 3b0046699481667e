"""Loading configuration: defaults < pipeline TOML file < environment (`ORCH_*`) < overrides.

Every problem, from any source, is reported at once as a ConfigError whose message is one line
and whose `problems` name each key: values out of bounds, unknown keys (including `ORCH_*`
variables that name no setting), keys of an earlier layout with where they are set now, and a
broken stage graph (shared.graph).
"""

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from shared.errors import ConfigError, Problem
from shared.graph import graph_problems
from shared.settings import ENV_PREFIX, Settings

CONFIG_ENV = "ORCH_CONFIG"
NOT_SETTINGS = frozenset({"CONFIG", "LOG_LEVEL", "NATS_SERVER", "TEST_DOCKER"})
"""`ORCH_*` variables that are read elsewhere, not settings."""

MOVED = {
    "channels": "a stage's input channel is declared with the stage",
    "rag": "stage options live under their stage",
    "assemble": "stage options live under their stage",
    "worker": "the model worker is an option of the inference stage",
}
"""Top-level sections of earlier versions, and why they moved (see `moved_to`)."""


def moved_to(path: tuple[str, ...], entry: str | None) -> str | None:
    """Where the key at `path`, from an earlier version's layout, is set now."""
    head, rest = path[0], list(path[1:])
    if head == "channels" and rest:
        stage = (entry or "<entry stage>") if rest[0] == "intake" else rest[0]
        return ".".join(["stages", stage, *rest[1:]])
    if head in ("rag", "assemble"):
        return ".".join(["stages", head, "options", *rest])
    if head == "worker":
        if rest == ["kind"]:
            return "stages.inference.options.worker"
        if rest == ["echo_token_delay"]:
            return "stages.inference.options.echo.token_delay"
        return ".".join(["stages", "inference", "options", *rest])
    return None


def read_pipeline_file(path: Path) -> dict[str, Any]:
    """Parse the pipeline TOML file; any failure is a one-line ConfigError naming the file.

    A syntax error names the line and column (tomllib puts them in its message).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"pipeline file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline file {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"pipeline file {path} is not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"pipeline file {path} is not valid TOML: {exc}") from None


def load_settings(
    config: Path | str | None = None,
    *,
    graph: Mapping[str, Any] | None = None,
    check_graph: bool = True,
    **overrides: Any,
) -> Settings:
    """Load settings from `config` (or $ORCH_CONFIG), the environment and `overrides`.

    `graph` is the default pipeline (`entry` and `stages`, as in a pipeline file) that the
    file and environment add to: a stage they declare under a name the default has is merged
    into it, key by key. Overrides whose value is None are ignored, so CLI flags can be passed
    through as they are. The stage graph is checked (shared.graph) before returning, unless
    `check_graph` is false (the caller checks it, with more).
    """
    path = config or os.environ.get(CONFIG_ENV) or None
    layers: list[Mapping[str, Any]] = []
    if path is not None:
        path = Path(path)
        layers.append(read_pipeline_file(path))
    if graph is not None:
        layers.append(graph)
    cls = type("Settings", (Settings,), {"layers": tuple(layers), "source": path})
    where = f"in {path} or the environment" if path else "in the environment"
    problems = _unknown_variables(os.environ, layers)
    settings = None
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = cls(**given)
    except ValidationError as exc:
        problems += _problems(exc, _entry(layers))
    except SettingsError as exc:  # a variable holding a list or table that is not JSON
        problems.append(_unparsable(cls, given, exc))
    if settings is not None and check_graph:
        problems += graph_problems(settings)
    if problems:
        raise ConfigError(f"invalid configuration {where}: " + "; ".join(map(str, problems)),
                          problems)  # fmt: skip
    assert settings is not None
    return settings


def _unparsable(cls: type[Settings], given: Mapping[str, Any], exc: SettingsError) -> Problem:
    """Which environment variable pydantic-settings could not parse, and how to write it.

    Its error names only the top-level field, so each variable under that field is left out
    in turn until the error goes away.
    """
    field = re.search(r'field "(\w+)"', str(exc))
    prefix = f"{ENV_PREFIX}{field.group(1).upper() if field else ''}"
    hint = 'lists and tables set from the environment are JSON, e.g. [1.0, 5.0] or {"k": 1}'
    for name in sorted(k for k in os.environ if k.upper().startswith(prefix)):
        value = os.environ.pop(name)
        try:
            cls(**given)
        except SettingsError:
            continue
        except ValidationError:
            pass
        finally:
            os.environ[name] = value
        return Problem(name, f"cannot parse {value!r}: {hint}")
    return Problem(prefix + "*", f"a variable cannot be parsed: {hint}")


def _entry(layers: list[Mapping[str, Any]]) -> str | None:
    for layer in layers:
        if isinstance(layer.get("entry"), str):
            return layer["entry"]
    return None


def _unknown_variables(
    environ: Mapping[str, str], layers: list[Mapping[str, Any]]
) -> list[Problem]:
    """`ORCH_*` variables that name no setting: pydantic-settings would ignore them."""
    fields = {name.upper() for name in Settings.model_fields}
    problems = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :]
        head = key.split("__", 1)[0]
        if key in NOT_SETTINGS or head in fields:
            continue
        path = tuple(part.lower() for part in key.split("__"))
        target = moved_to(path, _entry(layers)) if path[0] in MOVED else None
        if target is not None:
            variable = ENV_PREFIX + "__".join(target.split(".")).upper()
            problems.append(Problem(name, f"moved: set {variable} ({MOVED[path[0]]})"))
        else:
            problems.append(Problem(name, "no such setting"))
    return problems


def _problems(exc: ValidationError, entry: str | None) -> list[Problem]:
    """Every problem pydantic found: the key, the message and the value given."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(str(part) for part in error["loc"])
        value = error.get("input")
        if error["type"] == "extra_forbidden" and loc and loc[0] in MOVED:
            for path in _leaves(loc, value):
                target = moved_to(path, entry)
                problems.append(Problem(".".join(path), f"moved: set {target} ({MOVED[loc[0]]})"))
            continue
        got = f" (got {value!r})" if isinstance(value, str | int | float | bool) else ""
        if error["type"] == "value_error":  # our own validators' words, without pydantic's prefix
            message = f"{error['ctx']['error']}{got}"
        else:
            message = f"{error['msg']}{got}"
        message = message.replace("\n", " ")
        problems.append(Problem(".".join(loc) or "(top level)", message))
    return problems


def _leaves(prefix: tuple[str, ...], value: Any) -> list[tuple[str, ...]]:
    if isinstance(value, Mapping) and value:
        return [leaf for k, v in value.items() for leaf in _leaves((*prefix, str(k)), v)]
    return [prefix]
