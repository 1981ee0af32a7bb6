"""`vm set` and `vm create --replace`: a definition with some fields changed, and what the change means.

Pure: the service signs and publishes the result (vm/book.py); this says which fields changed, and
whether the hosts that approved the old definition must approve the new one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from p2pvbd.base.units import parse_size
from p2pvbd.wire.vm_definition import DefinitionError, VmDefinition

# The fields `vm set` may change, as the definition names them; set_at and allow have their own commands.
SETTABLE = ("disks", "memory", "cpus", "accel", "kernel", "initrd", "append", "qemu_args")


def apply(vm: VmDefinition, changes: dict[str, Any]) -> VmDefinition:
    """``vm`` with ``changes`` (field -> value as the CLI sends it: memory with a unit, disks comma-separated,
    "" to clear kernel, initrd or append). DefinitionError for an unknown field or a value out of bounds."""
    unknown = sorted(set(changes) - set(SETTABLE))
    if unknown:
        raise DefinitionError(f"vm set cannot change {', '.join(unknown)}")
    if not changes:
        raise DefinitionError("say what changes: --memory, --cpus, --accel, --kernel, --initrd, --append, "
                              "--disk or --qemu-arg")
    fields = dict(changes)
    if "memory" in fields:
        try:
            fields["memory"] = parse_size(str(fields["memory"]))
        except ValueError as e:
            raise DefinitionError(f"memory: {e}") from None
    if "disks" in fields:
        fields["disks"] = tuple(d for d in str(fields["disks"]).split(",") if d)
    if "qemu_args" in fields:
        fields["qemu_args"] = tuple(a for a in fields["qemu_args"] if a)  # `--qemu-arg ''` alone: none
    if fields.get("kernel") == "":  # no kernel: the guest boots from its first disk, without an initrd
        fields.setdefault("initrd", "")
    try:
        return dataclasses.replace(vm, **fields)
    except TypeError as e:
        raise DefinitionError(str(e)) from None


def differences(before: VmDefinition, after: VmDefinition) -> list[str]:
    """The settable fields whose value differs, in SETTABLE's order."""
    return [f for f in SETTABLE if getattr(before, f) != getattr(after, f)]


def needs_new_approval(before: VmDefinition, after: VmDefinition) -> bool:
    """Whether a host that approved ``before`` must approve ``after`` to run it (vm/book.py): the approval
    covers everything that decides what runs, and a definition taking nothing from the host needs none."""
    digest = after.approval_digest()
    return digest is not None and digest != before.approval_digest()
