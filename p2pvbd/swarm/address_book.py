"""Where this host last found its peers, kept in ``HOME/peers.json`` so a restart finds them again.

The index tells hosts where their peers listen, but a host that restarts needs someone to ask first: a
joined host has the inviter in its ``bootstrap`` list, the swarm's founder has nobody. So every host
remembers the index neighbours it had and the addresses each peer last published, joins through them
when it starts, and tries a peer's remembered addresses when the index has none for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from p2pvbd.base.files import atomic_write, read_json_file
from p2pvbd.base.home import NAME_RE, HomeError, parse_hostport

log = logging.getLogger(__name__)

PEERS_FILE = "peers.json"
# Remembered per peer and overall: a person's swarm is a handful of machines, each with a few addresses.
MAX_ADDRESSES = 16
MAX_HOSTS = 256


class AddressBook:
    """Index neighbours ("host:port") and each peer's published addresses, saved when they change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.neighbours: list[str] = []
        self.hosts: dict[str, list[str]] = {}
        self._saved = ""
        self._load()

    def _load(self) -> None:
        raw = read_json_file(self.path, dict, log)
        if raw is None:
            return
        self.neighbours = _addresses(raw.get("neighbours"))
        hosts = raw.get("hosts")
        if isinstance(hosts, dict):
            self.hosts = {h: a for h, v in list(hosts.items())[:MAX_HOSTS]
                          if isinstance(h, str) and NAME_RE.fullmatch(h) and (a := _addresses(v))}
        self._saved = self._text()

    def bootstrap(self) -> list[tuple[str, int]]:
        """Every remembered address, as index (UDP) peers: a host's index listens on its peer port."""
        seen: dict[str, None] = dict.fromkeys(self.neighbours)
        for addrs in self.hosts.values():
            seen.update(dict.fromkeys(addrs))
        return [parse_hostport(a) for a in seen]

    def learn(self, host: str, addresses: list[str]) -> None:
        if addresses and (host in self.hosts or len(self.hosts) < MAX_HOSTS):
            self.hosts[host] = _addresses(addresses)

    def save_if_changed(self) -> None:
        """Write peers.json when something changed (call from a worker thread: it fsyncs)."""
        text = self._text()
        if text != self._saved:
            atomic_write(self.path, text.encode())
            self._saved = text

    def _text(self) -> str:
        return json.dumps({"neighbours": self.neighbours, "hosts": self.hosts}, sort_keys=True)


def _addresses(value: object) -> list[str]:
    """The "host:port" strings of ``value`` that parse, at most MAX_ADDRESSES."""
    out: list[str] = []
    for a in value if isinstance(value, list) else []:
        try:
            if isinstance(a, str):
                parse_hostport(a)
                out.append(a)
        except (ValueError, HomeError):
            continue
    return out[:MAX_ADDRESSES]
