"""What every command shares: reaching the daemon of the home, failing with one line, printing."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, NoReturn

from p2pvbd.base.control import call
from p2pvbd.base.home import Home, resolve_home
from p2pvbd.base.units import parse_size

# Width of tables written to a pipe or file: every column of status (nine) fits with long host names.
PIPED_WIDTH = 160


def fail(message: str) -> NoReturn:
    print(f"p2pvbd: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def home_of(args: argparse.Namespace) -> Home:
    return Home(resolve_home(args.home))


def ask(args: argparse.Namespace, op: str, **kwargs: Any) -> Any:
    home = home_of(args)
    home.load_config()  # a clear message when the home was never initialised
    return call(home.control_socket, op, kwargs)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def console() -> Any:
    """Rich's console; when the output is not a terminal, wide enough that no table is cut (rich would
    assume 80 columns)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def rate_arg(text: str) -> float:
    """Bytes per second from '20M' (bytes) or '100mbit' / '1gbit' (bits)."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)bit(?:/s)?\s*$", text, re.IGNORECASE)
    if m:
        return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()] / 8
    return float(size_arg(text.removesuffix("/s")))
