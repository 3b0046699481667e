"""`orchestrator validate [FILE]`: check a pipeline file before anything starts.

Every problem is printed on its own line as `FILE:LINE: key: problem` (the line where the key
is written, when the file has it; a syntax error has its own line and column): bad values and
limits, unknown keys, keys of an earlier layout, a route or next stage that does not exist, a
cycle, an unreachable stage, a handler or middleware that cannot be imported, options its
factory refuses. A valid file prints the graph.
"""

import argparse
import os
import re
import sys
from pathlib import Path

from shared.app.args import command
from shared.app.load import load
from shared.config import CONFIG_ENV
from shared.errors import ConfigError, Problem
from shared.graph import Graph
from shared.runtime.plan import plan_problems

_TABLE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def add_validate_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `validate`."""
    cmd = command(
        sub,
        "validate",
        "check a pipeline file; print its graph or every problem",
        "Check a pipeline file (FILE, else --config or $ORCH_CONFIG, else the built-in graph "
        "with the environment) without connecting to anything: its syntax, every value and "
        "limit, the stage graph (each next and route names an existing stage, no cycle, "
        "every stage reachable from the entry) and each stage's handler and each middleware "
        "(importable, options accepted). Prints the graph and exits 0, or prints every "
        "problem as FILE:LINE: key: problem and exits 2.",
    )
    cmd.add_argument("file", nargs="?", type=Path, help="the pipeline file")


def run_validate(args: argparse.Namespace) -> int:
    """Validate and report; the exit code."""
    path: Path | None = args.file or args.config
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    name = str(path) if path else "(built-in graph)"
    graph = None
    try:
        settings = load(path, check_graph=False)  # checked below, beside the factories
    except ConfigError as exc:
        if not exc.problems:  # the file cannot be read or parsed at all
            print(f"error: {exc}", file=sys.stderr)
            return 2
        problems = exc.problems
    else:
        try:
            graph = Graph(settings)
            problems = []
        except ConfigError as exc:
            problems = list(exc.problems)
        problems += plan_problems(settings)  # reported with the graph's, not after a fix
    if problems:
        text = _read(path)
        for problem in problems:
            print(f"{_where(name, text, problem)}{problem}", file=sys.stderr)
        count = len(problems)
        print(f"{name}: {count} problem{'s' if count > 1 else ''}", file=sys.stderr)
        return 2
    assert graph is not None
    print(f"{name}: valid; entry {graph.entry_name!r}, {len(graph)} stages")
    for line in graph.describe():
        print(f"  {line}")
    return 0


def _read(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _where(name: str, text: str, problem: Problem) -> str:
    if problem.key.startswith("ORCH_") or problem.key == "NATS_URL":
        return "environment: "
    line = locate(text, problem.key)
    return f"{name}:{line}: " if line else f"{name}: "


def locate(text: str, key: str) -> int | None:
    """The line (from 1) where `key` (`stages.post.next`, `middleware[0].factory`) or its
    nearest enclosing table is written in the TOML `text`, or None."""
    lines: dict[str, int] = {}
    table: list[str] = []
    arrays: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if match := _TABLE.match(line):
            parts = _split(match.group(2))
            if match.group(1) == "[[":
                name = ".".join(parts)
                arrays[name] = arrays.get(name, -1) + 1
                parts = [*parts[:-1], f"{parts[-1]}[{arrays[name]}]"]
            table = parts
            _remember(lines, table, number)
        elif match := _KEY.match(line):
            _remember(lines, [*table, *_split(match.group(1))], number)
    path = key
    while path:
        if path in lines:
            return lines[path]
        shorter = re.sub(r"(\[\d+\]|\.[^.\[]*)$", "", path)
        if shorter == path:
            return None
        path = shorter
    return None


def _split(dotted: str) -> list[str]:
    return [part.strip().strip("\"'") for part in dotted.split(".")]


def _remember(lines: dict[str, int], parts: list[str], number: int) -> None:
    for end in range(1, len(parts) + 1):
        lines.setdefault(".".join(parts[:end]), number)
