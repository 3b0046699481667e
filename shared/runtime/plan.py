"""A stage made ready to run from its declaration: its factory and middleware found, their
options checked. Nothing is set up yet; the runtime does that when it starts."""

from dataclasses import dataclass

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
    search = [settings.source.resolve().parent] if settings.source else []
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


def plan_problems(settings: Settings, graph: Graph) -> list[Problem]:
    """Every problem finding or configuring any stage's factories (each counted once)."""
    problems: list[Problem] = []
    for name in graph.names:
        try:
            plan_stage(settings, graph, name)
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    return problems
