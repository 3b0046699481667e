"""Argument types and the options every command takes, shared by the command modules."""

import argparse
import math
from pathlib import Path


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


def global_options(default: object = None) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (`demo --nats-url ...`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--config", type=Path, default=default, help="pipeline TOML file (default: $ORCH_CONFIG)"
    )
    p.add_argument(
        "--nats-url", default=default, help="NATS server URL (overrides environment and config)"
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
