"""A VM definition as `p2pvbd vm create` records it and the index spreads it: pure, checked strictly.

Any host can run the VM from it: its disks (p2pvbd disks), memory, CPUs, accelerator and, for a direct
kernel boot, kernel, initrd and command line. ``wire/dht_schema`` checks ``vm`` records with it;
``vm/definition`` turns it into QEMU's command line.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pvbd.base.home import NAME_RE
from p2pvbd.base.units import parse_size

# Disks one VM attaches: virtio-blk PCI slots are plenty; a person's VM has a handful.
MAX_VM_DISKS = 8
# Memory bounds: below 16 MiB no Linux boots; above 1 TiB is no personal machine's RAM.
MIN_MEMORY = 16 * 1024 * 1024
MAX_MEMORY = 1 << 40
# QEMU's x86 limit is higher; one person's desktop VM never needs more.
MAX_CPUS = 64
# Extra QEMU arguments and the kernel command line: enough for real use, small enough for the index.
MAX_QEMU_ARGS = 16
MAX_TEXT = 512
# A definition travels as one index record of at most 1152 bytes (dht_records.MAX_RECORD_BYTES), of which
# the signature, key binding, publisher, key and timestamps take up to ~470 bytes.
MAX_PAYLOAD_BYTES = 640
ACCELS = ("auto", "kvm", "tcg")
# Hosts a VM may be pulled to (`vm allow`): a person's handful of machines; eight names of up to 64
# characters still leave the definition within MAX_PAYLOAD_BYTES with short disk names.
MAX_ALLOWED_HOSTS = 8
# A record's ``set_at`` (a definition's, a policy's) further ahead of the reading host's clock than this is
# not learned: machines kept by NTP agree within seconds, and one stamped days ahead would outrank every
# later change until that day. Ten minutes leaves room for a machine whose clock is not kept.
MAX_CLOCK_AHEAD_SECONDS = 600.0
# A path names a file on every host that runs the VM (kernel, initrd): absolute, printable, bounded.
_PATH_RE = re.compile(r"/[\x21-\x7e]{0,1023}")


class DefinitionError(ValueError):
    """A definition that cannot be run as given (the message says which field and why)."""


@dataclass(frozen=True)
class VmDefinition:
    name: str
    disks: tuple[str, ...]
    memory: int = 1 << 30
    cpus: int = 1
    accel: str = "auto"
    kernel: str = ""
    initrd: str = ""
    append: str = ""
    qemu_args: tuple[str, ...] = ()
    set_at: float = field(default_factory=time.time)
    # Hosts that may pull the VM to themselves (`migrate VM --to HOST` run there): the owner's choice.
    allow: tuple[str, ...] = ()
    # `vm delete`: a tombstone, newer than the definition it ends, so every host drops the VM (and never
    # learns the old definition again from a record still in the index).
    deleted: bool = False

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise DefinitionError(f"invalid VM name {self.name!r}: letters, digits, '.', '_' and '-', at most 64")
        if not self.disks or len(self.disks) > MAX_VM_DISKS:
            raise DefinitionError(f"a VM needs 1 to {MAX_VM_DISKS} disks, not {len(self.disks)}")
        for d in self.disks:
            if not isinstance(d, str) or not NAME_RE.fullmatch(d):
                raise DefinitionError(f"invalid disk name {d!r}")
        if len(set(self.disks)) != len(self.disks):
            raise DefinitionError("a disk is named twice")
        if not MIN_MEMORY <= self.memory <= MAX_MEMORY or self.memory % (1024 * 1024):
            raise DefinitionError(f"memory must be whole MiB between 16 MiB and 1 TiB, not {self.memory} bytes")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise DefinitionError(f"cpus must be 1 to {MAX_CPUS}, not {self.cpus}")
        if self.accel not in ACCELS:
            raise DefinitionError(f"accel must be one of {', '.join(ACCELS)}, not {self.accel!r}")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path and not _PATH_RE.fullmatch(path):
                raise DefinitionError(f"{what} must be an absolute path, not {path!r}")
        if self.initrd and not self.kernel:
            raise DefinitionError("--initrd needs --kernel")
        if len(self.append) > MAX_TEXT or not self.append.isprintable():
            raise DefinitionError(f"--append must be printable text of at most {MAX_TEXT} characters")
        if len(self.qemu_args) > MAX_QEMU_ARGS or any(
                not isinstance(a, str) or len(a) > MAX_TEXT or not a.isprintable() for a in self.qemu_args):
            raise DefinitionError(f"at most {MAX_QEMU_ARGS} printable --qemu-arg values")
        if len(self.allow) > MAX_ALLOWED_HOSTS or len(set(self.allow)) != len(self.allow) or any(
                not isinstance(h, str) or not NAME_RE.fullmatch(h) for h in self.allow):
            raise DefinitionError(f"at most {MAX_ALLOWED_HOSTS} distinct host names may pull a VM")
        if len(msgpack.packb(self.as_payload())) > MAX_PAYLOAD_BYTES:
            raise DefinitionError(f"the definition takes more than {MAX_PAYLOAD_BYTES} bytes: shorten --append, "
                                  "--qemu-arg or the paths")

    @property
    def host_parts(self) -> dict[str, Any]:
        """What the VM takes from the host that runs it, beyond its disks: files QEMU opens as root and
        arguments that can open more (a tap device, a host file, a helper program). A host runs a
        definition with any of these only once approved there (see :meth:`approval_digest`)."""
        return {"kernel": self.kernel, "initrd": self.initrd, "qemu_args": list(self.qemu_args)}

    @property
    def runs(self) -> list[Any]:
        """Everything that decides what QEMU runs: its host parts, and the command line, memory, CPUs,
        accelerator and disks (not ``set_at``, nor who may pull it)."""
        return [self.name, list(self.disks), self.memory, self.cpus, self.accel, self.kernel, self.initrd,
                self.append, list(self.qemu_args)]

    def approval_digest(self) -> str | None:
        """What a host approves (`vm approve`): every field of :attr:`runs`, so a definition changed in
        any way that changes what runs needs approving again; None when it takes nothing from the host
        (no host parts: nothing to approve)."""
        if not any(self.host_parts.values()):
            return None
        return hashlib.sha256(b"p2pvbd-vm-approval/2\0" + msgpack.packb(self.runs)).hexdigest()

    def too_far_ahead(self, now: float) -> bool:
        """Stamped beyond :data:`MAX_CLOCK_AHEAD_SECONDS` ahead of ``now``: not to be learned."""
        return self.set_at > now + MAX_CLOCK_AHEAD_SECONDS

    @classmethod
    def from_options(cls, name: str, disks: str, memory: str = "1G", **kw: Any) -> VmDefinition:
        """From the CLI's options: ``disks`` comma-separated, ``memory`` with a unit."""
        try:
            mem = parse_size(memory)
        except ValueError as e:
            raise DefinitionError(f"memory: {e}") from None
        return cls(name, tuple(d for d in disks.split(",") if d), mem, **kw)

    def as_payload(self) -> dict[str, Any]:
        p = {"name": self.name, "disks": list(self.disks), "memory": self.memory, "cpus": self.cpus,
             "accel": self.accel, "kernel": self.kernel, "initrd": self.initrd, "append": self.append,
             "qemu_args": list(self.qemu_args), "set_at": self.set_at}
        if self.allow:  # absent when empty: a record from before `vm allow` existed reads the same
            p["allow"] = list(self.allow)
        if self.deleted:  # absent unless set, likewise
            p["deleted"] = True
        return p

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> VmDefinition:
        """Strict about types: a payload comes from the index or a peer (``set_at`` may be an int)."""
        types: dict[str, type | tuple[type, ...]] = {
            "name": str, "disks": list, "memory": int, "cpus": int, "accel": str, "kernel": str, "initrd": str,
            "append": str, "qemu_args": list, "set_at": (int, float)}
        if not isinstance(p, dict):
            raise DefinitionError("a VM definition must be a map")
        for key, kind in types.items():
            if key not in p:
                raise DefinitionError(f"{key}: missing")
            if not isinstance(p[key], kind) or isinstance(p[key], bool):
                raise DefinitionError(f"{key}: wrong type ({type(p[key]).__name__})")
        if not math.isfinite(p["set_at"]):
            raise DefinitionError("set_at: not finite")
        allow = p.get("allow", [])
        if not isinstance(allow, list):
            raise DefinitionError(f"allow: wrong type ({type(allow).__name__})")
        deleted = p.get("deleted", False)
        if not isinstance(deleted, bool):
            raise DefinitionError(f"deleted: wrong type ({type(deleted).__name__})")
        return cls(p["name"], tuple(p["disks"]), p["memory"], p["cpus"], p["accel"], p["kernel"], p["initrd"],
                   p["append"], tuple(p["qemu_args"]), float(p["set_at"]), tuple(allow), deleted)


