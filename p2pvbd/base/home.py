"""The host's home directory: where its config, disks and sockets live.

One directory per host makes several hosts on one machine (tests, the demo) as easy as one.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import socket
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import tomli_w

from p2pvbd.base.files import atomic_write

HOME_ENV = "P2PVBD_HOME"
CONFIG_FILE = "config.toml"
DISKS_DIR = "disks"
# Only the host's own user may enter HOME: it holds the private key, the disks and the NBD socket.
PRIVATE_DIR_MODE = 0o700
# The NBD and control sockets: only their owner may connect (plaintext NBD reads and writes every disk).
PRIVATE_SOCKET_MODE = 0o600
NBD_SOCKET = "nbd.sock"
CONTROL_SOCKET = "control.sock"
DAEMON_LOCK = "daemon.lock"
DAEMON_LOG = "daemon.log"
# The same rule as disk names: safe in paths, URIs and DNS-like contexts.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # use fullmatch: "$" would let a trailing newline in
DEFAULT_PEER_PORT = 7420
# NBD's port registered with IANA (proto.md, "Protocol phases"): what clients assume when a URI names none.
DEFAULT_NBD_PORT = 10809
# "host:port": a bracketed IPv6 literal, or a host without colons (an IPv4 literal or a name); up to 5 digits.
_BRACKETED_RE = re.compile(r"\[([^\[\]]+)\](?::([0-9]{1,5}))?")
_PLAIN_RE = re.compile(r"([^:\[\]]+)(?::([0-9]{1,5}))?")


class HomeError(Exception):
    """A user-facing problem with the home directory (missing, not initialised, bad config)."""


def resolve_home(arg: str | os.PathLike[str] | None) -> Path:
    """--home, else $P2PVBD_HOME, else the platform's per-user data directory."""
    if arg:
        return Path(arg).expanduser().absolute()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return Path(platformdirs.user_data_dir("p2pvbd")).absolute()


def is_name(x: object) -> bool:
    """A host or disk name as ``check_name`` accepts it (in full: no trailing newline)."""
    return isinstance(x, str) and NAME_RE.fullmatch(x) is not None


def check_name(kind: str, name: str) -> str:
    if not is_name(name):
        raise HomeError(
            f"invalid {kind} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class AddressError(HomeError, ValueError):
    """Not a "host:port" address: a HomeError for a user's setting (a one-line message), a ValueError for
    what a peer sent (refused with the rest of its message)."""


def parse_hostport(text: object, default_port: int | None = DEFAULT_PEER_PORT) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' to a pair; 'HOST' alone too, unless ``default_port`` is None. An IPv6
    address takes brackets, a port is 1-65535 in ASCII digits: the one parser for settings, invites,
    index records and address books."""
    m = isinstance(text, str) and (_BRACKETED_RE.fullmatch(text) or _PLAIN_RE.fullmatch(text))
    if not m:
        raise AddressError(f"not a HOST:PORT address: {text!r}")
    if m.group(2) is None and default_port is None:
        raise AddressError(f"no port in {text!r}")
    port = int(m.group(2)) if m.group(2) is not None else default_port
    assert port is not None
    if not 0 < port < 65536:
        raise AddressError(f"port out of range in {text!r} (peers and clients need a fixed port, 1-65535)")
    return m.group(1), port


def format_hostport(host: str, port: int) -> str:
    """The inverse of ``parse_hostport``: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(x: object, *, scoped: bool = False) -> bool:
    """An IPv4 or IPv6 literal, without brackets or port; an IPv6 one with a zone ("fe80::1%eth0") only if
    ``scoped`` (a zone means something on the host that names it alone). inet_pton, 10x faster than
    ipaddress: the index checks the address of every contact in every datagram with it."""
    if not isinstance(x, str):
        return False
    if scoped and "%" in x:
        x, _, zone = x.partition("%")
        return bool(zone) and "%" not in zone and _parses(socket.AF_INET6, x)
    return _parses(socket.AF_INET, x) or _parses(socket.AF_INET6, x)


def _parses(family: int, text: str) -> bool:
    try:
        socket.inet_pton(family, text)
    except (OSError, ValueError):
        return False
    return True


def parse_nbd_tcp(text: str) -> tuple[str, int]:
    """The ``nbd_tcp`` setting: 'HOST:PORT' (port 10809 if omitted) where HOST is an IP address or 'localhost'.

    Addresses only, no other names: the server's certificate must name what clients connect to, and a
    name that resolves differently later would silently listen elsewhere."""
    host, port = parse_hostport(text, DEFAULT_NBD_PORT)
    if host != "localhost" and not is_ip(host, scoped=True):
        raise HomeError(f"not an NBD TCP address: {text!r} (use an IP address or localhost, e.g. "
                        f"127.0.0.1:{DEFAULT_NBD_PORT})")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (an address or 'localhost')."""
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


@dataclass
class Config:
    """HOME/config.toml. Unknown keys are kept so newer versions' settings survive a rewrite."""

    name: str
    # Every address, so other machines reach a host set up with no --listen; TLS with swarm certificates is
    # the guard (only members get a connection).
    listen: str = f"0.0.0.0:{DEFAULT_PEER_PORT}"
    nbd_tcp: str = ""
    bootstrap: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def to_toml(self) -> dict[str, object]:
        return {**self.extra, "name": self.name, "listen": self.listen, "nbd_tcp": self.nbd_tcp,
                "bootstrap": list(self.bootstrap)}


@dataclass(frozen=True)
class Home:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def disks_dir(self) -> Path:
        return self.path / DISKS_DIR

    @property
    def nbd_socket(self) -> Path:
        return self.path / NBD_SOCKET

    @property
    def control_socket(self) -> Path:
        return self.path / CONTROL_SOCKET

    @property
    def lock_path(self) -> Path:
        return self.path / DAEMON_LOCK

    def disk_dir(self, disk: str) -> Path:
        return self.disks_dir / disk

    def is_initialised(self) -> bool:
        return self.config_path.is_file()

    def load_config(self) -> Config:
        if not self.is_initialised():
            raise HomeError(f"{self.path} is not a p2pvbd home: run 'p2pvbd init NAME --home {self.path}' first")
        try:
            raw = tomllib.loads(self.config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise HomeError(f"cannot read {self.config_path}: {e}") from e
        known = {"name", "listen", "nbd_tcp", "bootstrap"}
        try:
            cfg = Config(
                name=check_name("host", str(raw["name"])),
                listen=str(raw.get("listen", Config.listen)),
                nbd_tcp=str(raw.get("nbd_tcp", "")),
                bootstrap=[str(b) for b in raw.get("bootstrap", [])],
                extra={k: v for k, v in raw.items() if k not in known},
            )
        except KeyError as e:
            raise HomeError(f"{self.config_path} lacks the key {e}") from e
        return cfg

    def save_config(self, cfg: Config) -> None:
        """Atomic replace, so a crash never leaves a half-written config."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config_path, tomli_w.dumps(cfg.to_toml()).encode())

    def check_new(self, name: str, listen: str | None = None, nbd_tcp: str = "") -> None:
        """Refuse, before anything is written, what init would refuse."""
        check_name("host", name)
        if self.is_initialised():
            raise HomeError(f"{self.path} is already initialised as host {self.load_config().name!r}")
        if listen:
            parse_hostport(listen)
        if nbd_tcp:
            parse_nbd_tcp(nbd_tcp)

    def init(self, name: str, listen: str | None = None, nbd_tcp: str = "",
             bootstrap: list[str] | None = None) -> Config:
        self.check_new(name, listen, nbd_tcp)
        self.secure()
        cfg = Config(name=name, listen=listen or Config.listen, nbd_tcp=nbd_tcp, bootstrap=list(bootstrap or []))
        self.save_config(cfg)
        return cfg

    def secure(self) -> None:
        """HOME and HOME/disks exist and are 0700 whatever the umask: they hold the host's key, its disks and
        its sockets. An explicit chmod, because mkdir's mode passes through the umask and a directory made
        earlier as a parent (of the trust directory, by `join`) got the default mode."""
        for d in (self.path, self.disks_dir):
            d.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
            os.chmod(d, PRIVATE_DIR_MODE)

    def disk_names(self) -> list[str]:
        if not self.disks_dir.is_dir():
            return []
        return sorted(p.name for p in self.disks_dir.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def nbd_uri(self, disk: str) -> str:
        return f"nbd+unix:///{disk}?socket={self.nbd_socket}"


def wait_for_daemon_exit(home: Home, timeout: float) -> bool:
    """True once no daemon holds the home's lock (it has closed every store)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(home.lock_path, os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        finally:
            os.close(fd)
