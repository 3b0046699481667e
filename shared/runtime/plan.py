"""A stage made ready to run from its declaration: its factory and middleware found, their
options checked. Nothing is set up yet; the runtime does that when it starts."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.components import Prepared, prepare
from shared.errors import ConfigError, Problem
from shared.graph import Graph, Stage
from shared.settings import Settings


@dataclass(frozen=True)
class StagePlan:
    """What one stage instance will run."""

    stage: Stage
    handler: Prepared
    middleware: tuple[Prepared, ...]
    """The pipeline file's middleware for this stage, outermost first."""


def plan_stage(settings: Settings, graph: Graph, name: str) -> StagePlan:
    """Find the factories of stage `name` and check their options; ConfigError if any fails."""
    stage = graph[name]
    search = _search_path(settings)
    problems: list[Problem] = []
    handler = None
    try:
        handler = prepare(stage.decl.handler, "stage", stage.decl.options, f"stages.{name}", search)
    except ConfigError as exc:
        problems += exc.problems
    middleware = []
    for i, decl in enumerate(settings.middleware):
        if decl.stages is not None and name not in decl.stages:
            continue
        try:
            middleware.append(
                prepare(decl.factory, "middleware", decl.options, f"middleware[{i}]", search)
            )
        except ConfigError as exc:
            problems += exc.problems
    if problems or handler is None:
        raise ConfigError("; ".join(map(str, problems)), problems)
    return StagePlan(stage, handler, tuple(middleware))


def plan_problems(settings: Settings) -> list[Problem]:
    """Every problem finding or configuring the enabled stages' handlers and the middleware
    (each counted once); the graph need not be valid, so these show beside its problems."""
    search = _search_path(settings)
    problems: list[Problem] = []

    def check(reference: str, kind: str, options: dict[str, Any], key: str) -> None:
        try:
            prepare(reference, kind, options, key, search)
        except ConfigError as exc:
            problems.extend(p for p in exc.problems if p not in problems)

    for name, decl in settings.stages.items():
        if decl.enabled:
            check(decl.handler, "stage", decl.options, f"stages.{name}")
    for i, mw in enumerate(settings.middleware):
        check(mw.factory, "middleware", mw.options, f"middleware[{i}]")
    return problems


def _search_path(settings: Settings) -> list[Path]:
    """Where factories are looked for besides sys.path: beside the pipeline file."""
    return [settings.source.resolve().parent] if settings.source else []
