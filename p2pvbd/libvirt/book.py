"""What a host knows of libvirt, in its home: the domains adopted here or arrived here (one JSON file
each, with their p2pvbd disks and, for adopted ones, the original images), and how to reach this host's
libvirt (written by `p2pvbd libvirt install-hook`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pvbd.base.files import atomic_write
from p2pvbd.base.home import NAME_RE
from p2pvbd.libvirt.virsh import SYSTEM_URI

DIR = "libvirt"
CONFIG = "config.json"


@dataclass
class DomainRecord:
    domain: str
    disks: dict[str, str]  # the guest's target (vda) -> p2pvbd disk name
    images: dict[str, str] = field(default_factory=dict)  # target -> the original image, kept until deleted


@dataclass
class LibvirtConfig:
    """How this host's libvirt is reached: by this host's daemon (``uri``), and by the other hosts'
    libvirt when they migrate a domain here (``peer_uri``; default qemu+ssh://HOST/system)."""

    uri: str = SYSTEM_URI
    peer_uri: str = ""
    migrate_uri: str = ""  # QEMU's migration stream address, when the host name does not resolve to this host


def _dir(home: Path) -> Path:
    return home / DIR / "domains"


def _path(home: Path, domain: str) -> Path:
    if not NAME_RE.fullmatch(domain):
        raise ValueError(f"domain name {domain!r} cannot be kept in a file name")
    return _dir(home) / f"{domain}.json"


def save(home: Path, rec: DomainRecord) -> None:
    _dir(home).mkdir(parents=True, exist_ok=True)
    atomic_write(_path(home, rec.domain), json.dumps(asdict(rec), indent=1).encode())


def load(home: Path, domain: str) -> DomainRecord | None:
    """The record of ``domain`` here; None for a name no record can have (a peer's request may carry any)."""
    if not NAME_RE.fullmatch(domain):
        return None
    try:
        data: dict[str, Any] = json.loads(_path(home, domain).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return DomainRecord(**data)


def all_records(home: Path) -> list[DomainRecord]:
    if not _dir(home).is_dir():
        return []
    return [r for p in sorted(_dir(home).glob("*.json")) if (r := load(home, p.stem)) is not None]


def forget(home: Path, domain: str) -> None:
    _path(home, domain).unlink(missing_ok=True)


def load_config(home: Path) -> LibvirtConfig:
    try:
        return LibvirtConfig(**json.loads((home / DIR / CONFIG).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return LibvirtConfig()


def save_config(home: Path, cfg: LibvirtConfig) -> None:
    (home / DIR).mkdir(parents=True, exist_ok=True)
    atomic_write(home / DIR / CONFIG, json.dumps(asdict(cfg), indent=1).encode())
