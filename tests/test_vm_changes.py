"""`vm set`'s pure part (vm/changes.py): only the given fields change, and a change that alters what runs
with host parts needs approving again where the old definition was approved."""

from __future__ import annotations

import pytest

from p2pvbd.vm import changes
from p2pvbd.wire.vm_definition import DefinitionError, VmDefinition

VM = VmDefinition("vm1", ("d1",), 128 << 20, kernel="/boot/vmlinuz", initrd="/boot/initrd", append="quiet",
                  allow=("car-pc",))


def test_only_the_given_fields_change() -> None:
    after = changes.apply(VM, {"memory": "256M", "qemu_args": ["-no-reboot"]})
    assert (after.memory, after.qemu_args) == (256 << 20, ("-no-reboot",))
    assert (after.kernel, after.initrd, after.append, after.disks, after.allow) == (
        VM.kernel, VM.initrd, VM.append, VM.disks, VM.allow)
    assert changes.differences(VM, after) == ["memory", "qemu_args"]


def test_clearing_the_kernel_clears_the_initrd_too() -> None:
    after = changes.apply(VM, {"kernel": ""})
    assert (after.kernel, after.initrd) == ("", "")
    assert not changes.needs_new_approval(VM, after)  # nothing of the host is used: nothing to approve


def test_a_change_to_what_runs_needs_approving_again() -> None:
    assert changes.needs_new_approval(VM, changes.apply(VM, {"cpus": 2}))
    assert not changes.needs_new_approval(VM, changes.apply(VM, {"memory": "128M"}))  # the same value


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "say what changes"),
    ({"allow": ["x"]}, "cannot change allow"),
    ({"memory": "1K"}, "memory must be whole MiB"),
    ({"cpus": 0}, "cpus must be 1 to"),
    ({"disks": ""}, "a VM needs 1 to"),
])
def test_a_bad_change_is_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        changes.apply(VM, fields)
