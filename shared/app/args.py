"""Argument types and the options every command takes, shared by the command modules.

Every value a flag gives is checked as the argument is read, before anything connects: a bad
one is a usage error (exit 2) that names the argument, on one line.
"""

import argparse
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from shared.envelope import REQUEST_ID_PATTERN, SESSION_ID_MAX, MetaValue
from shared.urls import server_list

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: what is wrong, and where help is.

    (The usage text argparse prints first would bury the line that matters.)
    """

    def error(self, message: str) -> NoReturn:
        """Print `<prog>: error: <message> (see <prog> --help)` and exit 2."""
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def session_id(text: str) -> str:
    """An argparse type: a session id, 1 to SESSION_ID_MAX characters."""
    if not 0 < len(text) <= SESSION_ID_MAX:
        raise argparse.ArgumentTypeError(
            f"a session id has 1 to {SESSION_ID_MAX} characters, got {len(text)}"
        )
    return text


def request_id(text: str) -> str:
    """An argparse type: a request id (letters, digits, `_` and `-`; 1 to 128)."""
    if not _REQUEST_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"a request id has 1 to 128 letters, digits, '_' or '-', got {text!r}"
        )
    return text


def meta_pair(text: str) -> tuple[str, MetaValue]:
    """An argparse type: `KEY=VALUE`, one metadata entry (the value is a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"wants KEY=VALUE, got {text!r}")
    return key, value


def parse_time(text: str, now: float | None = None) -> float:
    """`90s`, `15m`, `2h`, `7d` ago; an ISO-8601 time; or unix seconds."""
    now = time.time() if now is None else now
    if m := _DURATION.match(text):
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cannot read time {text!r}: use 15m, 2h, 7d, an ISO-8601 time or unix seconds"
        ) from None
    return parsed.timestamp()


def nats_url(text: str) -> str:
    """An argparse type: one NATS server URL or several, comma-separated."""
    try:
        return ",".join(server_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    value = _whole(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {text}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


class _Servers(argparse.Action):
    """`--nats-url` given more than once lists every server."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, "_servers_given", [])
        given.append(str(values))
        namespace._servers_given = given
        setattr(namespace, self.dest, ",".join(given))


def global_options(default: object = None) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (`demo --nats-url ...`)."""
    p = Parser(add_help=False)
    p.add_argument(
        "--config", type=Path, default=default, help="pipeline TOML file (default: $ORCH_CONFIG)"
    )
    p.add_argument(
        "--nats-url",
        type=nats_url,
        action=_Servers,
        default=default,
        help="NATS server URL; several (a cluster's) comma-separated or by repeating the "
        "option (overrides environment and config)",
    )
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    return p


SUBCOMMAND_OPTIONS = global_options(argparse.SUPPRESS)
"""Parent parser for subcommands: given after the command, the options override; absent,
they leave the values given before it alone."""


def command(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    name: str,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand with a one-line `help` (in the command list) and a `description`."""
    return sub.add_parser(name, help=help, description=description, parents=[SUBCOMMAND_OPTIONS])
