"""What every command shares: reaching the daemon of the home, failing with one line, printing."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any, NoReturn

from p2pvbd.base.control import call
from p2pvbd.base.home import Home, resolve_home
from p2pvbd.base.units import parse_size

# Libraries log their own chatter at INFO (kademlia: every lookup and refresh, 99.9% of a quiet daemon's
# lines with two peers); below -v only their warnings and errors are worth a line.
THIRD_PARTY_LEVEL = logging.WARNING
# Width of tables written to a pipe or file: every column of status (nine) fits with long host names.
PIPED_WIDTH = 160


def fail(message: str) -> NoReturn:
    print(f"p2pvbd: error: {message}", file=sys.stderr)
    raise SystemExit(1)


class _OwnOrWarning(logging.Filter):
    """Pass p2pvbd's own records at any level, other loggers' from THIRD_PARTY_LEVEL up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".", 1)[0] == "p2pvbd" or record.levelno >= THIRD_PARTY_LEVEL


def setup_daemon_logging(log_file: str | None, verbose: bool) -> None:
    """The daemon's log: p2pvbd at INFO (DEBUG with -v), libraries at WARNING unless -v shows them all."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", filename=log_file)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_OwnOrWarning())


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
