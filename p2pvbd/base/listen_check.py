"""Whether this machine can listen on a peer address, asked before anything depends on it.

`init` and `join` ask before they write a home (a join would otherwise spend its one-time token on a host
whose daemon cannot start), and the daemon asks before it starts its services, so a taken port or a
name that does not resolve is one line naming the setting, not a traceback from inside a nursery.
"""

from __future__ import annotations

import errno
import socket

from p2pvbd.base.home import AddressError, HomeError, parse_hostport

# What a peer address needs (swarm/node.py): TCP port P for peer links and UDP port P for the index.
PEER_SOCKET_KINDS = (socket.SOCK_STREAM, socket.SOCK_DGRAM)


class ListenError(HomeError):
    """A peer address this machine cannot listen on: a user's setting, told in one line."""


def _reason(e: OSError) -> str:
    if isinstance(e, socket.gaierror):
        return "no such address on this machine"
    if e.errno == errno.EADDRINUSE:
        return "address in use"
    if e.errno == errno.EADDRNOTAVAIL:
        return "not an address of this machine"
    if e.errno == errno.EACCES:
        return "permission denied: ports below 1024 need root"
    return e.strerror or str(e)


def listen_problem(listen: str) -> str | None:
    """Why ``listen`` ('HOST:PORT') cannot be listened on for peers now, or None if it can.

    Resolves the host and binds every socket the daemon will bind there (then closes them at once);
    SO_REUSEADDR as trio's listeners set it, so a port in TIME_WAIT after a stopped daemon counts as free."""
    host, port = parse_hostport(listen)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return "no such address on this machine"
    for family, _, _, _, sockaddr in infos:
        for kind in PEER_SOCKET_KINDS:
            try:
                with socket.socket(family, kind) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind(sockaddr)
            except OSError as e:
                reason = _reason(e)
                return reason if kind == socket.SOCK_STREAM else f"UDP port {port}: {reason}"
    return None


def check_listen(listen: str, fix: str) -> None:
    """Raise ListenError, one line ending in ``fix`` (what to change, and where), unless ``listen`` works."""
    try:
        problem = listen_problem(listen)
    except AddressError as e:
        raise ListenError(f"{e}: {fix}") from None
    if problem is not None:
        raise ListenError(f"cannot listen on {listen} ({problem}): {fix}")
