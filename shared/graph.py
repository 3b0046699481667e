"""The stage graph: the stages, the channel each reads and where each one's output goes.

Read from the settings (`entry`, `stages`), no I/O. The entry stage reads the `intake`
channel, where clients publish; every other stage reads a channel named after itself. A
stage's output goes to the first of its `routes` whose conditions hold, else to its `next`
stage; a stage with neither is a last stage, and its output is the request's result.

The graph must be acyclic (a request passes each stage at most once: its output's
`Nats-Msg-Id` is keyed by request and stage) and every enabled stage must be reachable from
the entry. `graph_problems` names every way a declaration breaks these rules.
"""

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from shared.envelope import Envelope
from shared.errors import ConfigError, Problem
from shared.settings import Settings, StageDecl

INTAKE = "intake"
"""The entry stage's input channel: where clients publish requests."""
RESERVED = frozenset({"results", "dlq", "counters", "tokens"})
"""Channel names the pipeline uses for itself."""
STAGE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
REQUEST_FIELDS = ("session_id", "request_id", "input")
"""Top-level envelope fields a route may test, besides `metadata.<key>` and `data.<key>`."""

_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    # JSON equality: true is not 1, 1 is 1.0.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


@dataclass(frozen=True)
class Condition:
    """One test of a route: the value at `path` equals one of `values`."""

    path: tuple[str, ...]
    values: tuple[Any, ...]

    def holds(self, envelope: Envelope) -> bool:
        """Whether the envelope passes this test."""
        head = self.path[0]
        if head == "metadata":
            value = envelope.metadata.get(self.path[1], _MISSING)
        elif head == "data":
            value = envelope.data.get(self.path[1], _MISSING)
        else:
            value = getattr(envelope, head)
        return value is not _MISSING and any(_same(value, v) for v in self.values)


@dataclass(frozen=True)
class Rule:
    """Send the output to `to` when every condition holds."""

    conditions: tuple[Condition, ...]
    to: str


class Router:
    """Where one stage's output goes: the first matching rule's stage, else `default`
    (None: the output is the result)."""

    __slots__ = ("default", "rules")

    def __init__(self, default: str | None, rules: tuple[Rule, ...] = ()) -> None:
        self.default = default
        self.rules = rules

    def __call__(self, envelope: Envelope) -> str | None:
        """The next stage for `envelope`, or None when it has reached the end."""
        for rule in self.rules:
            if all(c.holds(envelope) for c in rule.conditions):
                return rule.to
        return self.default

    @property
    def targets(self) -> list[str]:
        """Every stage the output may go to."""
        out = [rule.to for rule in self.rules]
        if self.default is not None:
            out.append(self.default)
        return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Stage:
    """One stage of the graph."""

    name: str
    channel: str
    """The channel it reads: `intake` for the entry stage, else its name."""
    decl: StageDecl
    route: Router

    @property
    def last(self) -> bool:
        """Whether its output may be the result (it has no `next`)."""
        return self.route.default is None


class Graph:
    """The enabled stages of a pipeline, entry first, each before the stages it feeds."""

    def __init__(self, settings: Settings) -> None:
        """Build the graph; ConfigError naming every problem if the declaration is broken."""
        problems = graph_problems(settings) or (
            [] if settings.stages else [Problem("stages", "no stages declared")]
        )
        if problems:
            raise ConfigError("invalid stage graph: " + "; ".join(map(str, problems)), problems)
        assert settings.entry is not None
        self.entry_name = settings.entry
        enabled = {name: decl for name, decl in settings.stages.items() if decl.enabled}
        order = _order(settings.entry, enabled)
        self.stages: dict[str, Stage] = {
            name: Stage(
                name=name,
                channel=INTAKE if name == settings.entry else name,
                decl=enabled[name],
                route=_router(enabled[name]),
            )
            for name in order
        }
        self._by_channel = {stage.channel: stage for stage in self.stages.values()}

    def __getitem__(self, name: str) -> Stage:
        return self.stages[name]

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages.values())

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def entry(self) -> Stage:
        """The stage that reads the intake."""
        return self.stages[self.entry_name]

    @property
    def names(self) -> list[str]:
        """Stage names, entry first, each before the stages it feeds."""
        return list(self.stages)

    @property
    def channels(self) -> list[str]:
        """Channel names in the same order (`intake` first)."""
        return [stage.channel for stage in self.stages.values()]

    def reading(self, channel: str) -> Stage | None:
        """The stage that reads `channel`, or None."""
        return self._by_channel.get(channel)

    def describe(self) -> list[str]:
        """One line per edge, for people: `rag -> assemble`, `inference -[when]-> x`."""
        lines = []
        for stage in self:
            for rule in stage.route.rules:
                when = ", ".join(
                    f"{'.'.join(c.path)}={'|'.join(map(str, c.values))}" for c in rule.conditions
                )
                lines.append(f"{stage.name} -[{when}]-> {rule.to}")
            target = stage.route.default or "(result)"
            lines.append(f"{stage.name} -> {target}")
        return lines


def _router(decl: StageDecl) -> Router:
    rules = tuple(
        Rule(
            tuple(
                Condition(tuple(path.split(".", 1)), tuple(v) if isinstance(v, list) else (v,))
                for path, v in route.when.items()
            ),
            route.to,
        )
        for route in decl.routes
    )
    return Router(decl.next, rules)


def _targets(decl: StageDecl) -> list[str]:
    return [*(route.to for route in decl.routes), *([decl.next] if decl.next else [])]


def _order(entry: str, stages: Mapping[str, StageDecl]) -> list[str]:
    """Stages reachable from `entry`, each before the stages it feeds (the graph is acyclic)."""
    done: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in stages:
            return
        seen.add(name)
        for target in _targets(stages[name]):
            visit(target)
        done.append(name)

    visit(entry)
    return done[::-1]


def graph_problems(settings: Settings) -> list[Problem]:
    """Everything wrong with the declared graph, each with the key it concerns."""
    stages, entry = settings.stages, settings.entry
    problems: list[Problem] = []
    if not stages:
        return [Problem("stages", "no stages declared")] if entry else []
    enabled = {name for name, decl in stages.items() if decl.enabled}
    listing = ", ".join(sorted(enabled)) or "none enabled"
    for name in stages:
        if not STAGE_NAME.match(name):
            problems.append(Problem(f"stages.{name}", "a stage name is 1-32 lower-case letters, "
                                    "digits, '_' or '-', starting with a letter"))  # fmt: skip
        elif name in RESERVED or (name == INTAKE and name != entry):
            problems.append(Problem(f"stages.{name}", f"{name!r} is reserved for the pipeline's "
                                    "own streams; choose another name"))  # fmt: skip
    if entry is None:
        problems.append(Problem("entry", "no entry stage: set entry to the stage that reads "
                                f"the intake (stages: {listing})"))  # fmt: skip
    elif entry not in stages:
        problems.append(Problem("entry", f"no stage named {entry!r} (stages: {listing})"))
    elif entry not in enabled:
        problems.append(Problem("entry", f"stage {entry!r} is disabled"))
    for name in sorted(enabled):
        decl = stages[name]
        if decl.routes and decl.next is None:
            problems.append(Problem(f"stages.{name}.next", "a stage with routes needs a next "
                                    "stage, for the outputs no route matches"))  # fmt: skip
        for key, target in _edges(name, decl):
            if target not in stages:
                problems.append(Problem(key, f"no stage named {target!r} (stages: {listing})"))
            elif target not in enabled:
                problems.append(Problem(key, f"stage {target!r} is disabled"))
            elif target == entry:
                problems.append(Problem(key, f"{target!r} is the entry stage: it reads only the "
                                        "intake, nothing may route to it"))  # fmt: skip
        for i, route in enumerate(decl.routes):
            for path, value in route.when.items():
                problem = _condition_problem(path, value)
                if problem:
                    problems.append(Problem(f"stages.{name}.routes[{i}].when.{path}", problem))
    if problems:
        return problems
    assert entry is not None
    live = {name: stages[name] for name in enabled}
    cycle = _cycle(live)
    if cycle:
        path = " -> ".join(cycle)
        problems.append(Problem(f"stages.{cycle[-2]}", f"cycle {path}: a request may pass "
                                "each stage only once"))  # fmt: skip
        return problems
    reachable = set(_order(entry, live))
    for name in sorted(enabled - reachable):
        problems.append(Problem(f"stages.{name}", f"unreachable: no next or route leads to it "
                                f"from the entry stage {entry!r} (set enabled = false to "
                                "leave it out)"))  # fmt: skip
    for i, mw in enumerate(settings.middleware):
        for stage in mw.stages or ():
            if stage not in enabled:
                problems.append(Problem(f"middleware[{i}].stages", f"no enabled stage named "
                                        f"{stage!r} (stages: {listing})"))  # fmt: skip
    return problems


def _edges(name: str, decl: StageDecl) -> Iterator[tuple[str, str]]:
    for i, route in enumerate(decl.routes):
        yield f"stages.{name}.routes[{i}].to", route.to
    if decl.next is not None:
        yield f"stages.{name}.next", decl.next


def _condition_problem(path: str, value: Any) -> str | None:
    head, _, key = path.partition(".")
    if head in ("metadata", "data"):
        if not key or "." in key:
            return f"name one key: {head}.<key>"
    elif head not in REQUEST_FIELDS or key:
        return (f"cannot route on {path!r}: use metadata.<key>, data.<key> or one of "
                f"{', '.join(REQUEST_FIELDS)}")  # fmt: skip
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, dict | list) for v in values):
        return "compare with a value, or a list of values any of which may match"
    return None


def _cycle(stages: Mapping[str, StageDecl]) -> list[str] | None:
    """A cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in _targets(stages[name]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(stages):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None
