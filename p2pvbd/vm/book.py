"""VM definitions kept in the swarm: every host learns them from the index, so any host can run a VM.

A definition is a ``vm`` record keyed by the VM's first disk (hosts look records up by the disks they
know, as for replication policies) and published by the host owning that disk: a record from any other
publisher is ignored, so a member cannot redefine a VM whose disks it does not own. That owner is the one
the disk's chain of deeds proves (swarm/proven.py), never an owner record of the index, which any member
can publish. Each host keeps what it learned in ``HOME/vms.json``; the newest ``set_at`` wins, and one
stamped more than ``MAX_CLOCK_AHEAD_SECONDS`` ahead of this host's clock is refused (it would outrank
every later change). The definition also names the hosts that may pull the VM to themselves
(`vm allow`), so that choice is the owner's too, signed with the rest.

The owner of a disk is one of the person's machines, and any one of them can be stolen: a definition
decides what QEMU, run as root, opens on every host that runs the VM. So a definition's host parts
(kernel, initrd, extra QEMU arguments) need this host's approval, kept in ``HOME/vms-approved.json``:
``vm create`` approves its own definition where it runs, ``vm approve`` approves a peer's on this host.
An approval covers everything that decides what runs (``VmDefinition.runs``: the host parts, command
line, memory, CPUs, accelerator, disks): a definition changed in any of them needs approving again.

A name is defined once: ``vm create`` refuses a known one unless told ``--replace``, and ``vm set``
changes the given fields only; either is signed by the owner as a create is (its index record), and a
running QEMU keeps the definition it started with until its next start. ``vm delete`` publishes a
*tombstone* (the definition with ``deleted`` set, stamped newer): every host that learns it drops the VM,
and keeps the tombstone so the old record, still in the index until it expires, is not learned again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pvbd.base.files import atomic_write, read_json_file
from p2pvbd.migration.replication import POLICY_REFRESH, POLICY_REPUBLISH
from p2pvbd.wire.dht_records import FirstSeen
from p2pvbd.wire.vm_definition import MAX_ALLOWED_HOSTS, DefinitionError, VmDefinition

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm

log = logging.getLogger(__name__)

VM_FILE = "vms.json"
APPROVED_FILE = "vms-approved.json"


class VmBook:
    """The VM definitions this host knows, published while it owns their disks."""

    def __init__(self, swarm: Swarm, home: Path) -> None:
        self.swarm = swarm
        self.path = home / VM_FILE
        self.approved_path = home / APPROVED_FILE
        self.vms: dict[str, VmDefinition] = self._load()
        self.approved: set[str] = self._load_approved()
        self._ignored = FirstSeen()  # (disk, publisher) of definitions ignored: logged once
        self._ahead = FirstSeen()  # (VM, set_at) of definitions refused as stamped ahead: logged once
        # Called with a VM's name when a tombstone from the index replaces its definition (the service
        # removes this host's files of it; `vm delete` here removes them itself).
        self.on_deleted: Callable[[str], None] | None = None

    def _load(self) -> dict[str, VmDefinition]:
        vms: dict[str, VmDefinition] = {}
        for payload in read_json_file(self.path, list, log) or ():
            try:
                vm = VmDefinition.from_payload(payload)
            except DefinitionError as e:
                log.warning("ignoring a VM definition in %s: %s", self.path, e)
                continue
            vms[vm.name] = vm
        return vms

    def _load_approved(self) -> set[str]:
        return {d for d in read_json_file(self.approved_path, list, log) or () if isinstance(d, str)}

    def approved_here(self, vm: VmDefinition) -> bool:
        digest = vm.approval_digest()
        return digest is None or digest in self.approved

    def approve(self, vm: VmDefinition) -> None:
        digest = vm.approval_digest()
        if digest is not None and digest not in self.approved:
            self.approved.add(digest)
            atomic_write(self.approved_path, json.dumps(sorted(self.approved)).encode())

    def check_approved(self, vm: VmDefinition) -> None:
        """DefinitionError, saying how to approve, unless this host may run ``vm`` as defined."""
        if not self.approved_here(vm):
            parts = ", ".join(f"{k} {v}" for k, v in vm.host_parts.items() if v)
            raise DefinitionError(f"VM {vm.name} was defined on another host with {parts} (or changed since this "
                                  f"host approved it): run "
                                  f"'p2pvbd vm approve {vm.name}' on {self.swarm.name} to let it run here")

    def _save(self) -> None:
        atomic_write(self.path, json.dumps([vm.as_payload() for vm in self.vms.values()]).encode())

    def get(self, name: str) -> VmDefinition | None:
        vm = self.vms.get(name)
        return None if vm is None or vm.deleted else vm

    def defined(self) -> list[VmDefinition]:
        """The VMs defined now (not the tombstones of deleted ones), by name."""
        return sorted((vm for vm in self.vms.values() if not vm.deleted), key=lambda v: v.name)

    def of_disk(self, disk: str) -> VmDefinition | None:
        return next((vm for vm in self.defined() if disk in vm.disks), None)

    def learn(self, vm: VmDefinition) -> bool:
        """Keep ``vm`` if newer than what is known; True when it changed anything. A disk belongs to one VM:
        an older definition that claims one of its disks is dropped."""
        known = self.vms.get(vm.name)
        if known is not None and known.set_at >= vm.set_at:
            return False
        if vm.too_far_ahead(time.time()):
            if self._ahead.first((vm.name, vm.set_at)):
                log.warning("ignoring a definition of VM %s stamped %.0f s ahead of this host's clock", vm.name,
                            vm.set_at - time.time())
            return False
        for other in [o for o in self.vms.values() if o.name != vm.name and set(o.disks) & set(vm.disks)]:
            if other.set_at >= vm.set_at:
                return False
            del self.vms[other.name]
        self.vms[vm.name] = vm
        self._save()
        return True

    async def define(self, vm: VmDefinition, replace: bool = False) -> VmDefinition:
        """`vm create` (``replace``: `vm create --replace` and `vm set`): this host must own every disk, no
        other VM may use them, and a known name is changed only when ``replace`` says so."""
        for disk in vm.disks:
            exp = self.swarm.ctl.get(disk)
            if exp is None or exp.store.owner != self.swarm.name:
                owner = exp.store.owner if exp is not None else None
                raise DefinitionError(f"{self.swarm.name} does not own disk {disk!r}"
                                      + (f" ({owner} does)" if owner else "")
                                      + ": define the VM on the host that owns its disks")
        await self.refresh()
        known = self.get(vm.name)
        if known is not None and not replace:
            raise DefinitionError(f"{vm.name} exists; change it with `p2pvbd vm set` or `vm create --replace`")
        for other in self.defined():
            if other.name != vm.name and set(other.disks) & set(vm.disks):
                shared = ", ".join(sorted(set(other.disks) & set(vm.disks)))
                raise DefinitionError(f"disk {shared} already belongs to VM {other.name!r}")
        last = self.vms.get(vm.name)  # the definition or the tombstone this one must outrank
        vm = dataclasses.replace(vm, allow=known.allow if known is not None else (),  # who may pull it stays
                                 set_at=max(vm.set_at, last.set_at + 1e-3) if last is not None else vm.set_at)
        self.learn(vm)
        self.approve(vm)
        await self.publish()
        return vm

    async def delete(self, name: str) -> VmDefinition:
        """`vm delete`: replace the definition with its tombstone, here and in the index (the caller has
        checked that the VM runs nowhere). Only the owner of its first disk may: only its record counts."""
        vm = self.get(name)
        if vm is None:
            raise DefinitionError(f"no VM named {name!r} (see 'p2pvbd vm list')")
        await self._check_owner(vm, "deletes it")
        tomb = dataclasses.replace(vm, deleted=True, allow=(), set_at=max(time.time(), vm.set_at + 1e-3))
        self.learn(tomb)
        await self.publish()
        return tomb

    async def _check_owner(self, vm: VmDefinition, what: str) -> None:
        exp = self.swarm.ctl.get(vm.disks[0])
        if exp is None or exp.store.owner != self.swarm.name:
            owner = exp.store.owner if exp is not None else (await self.swarm.owner_of(vm.disks[0]))[0]
            raise DefinitionError(f"only the owner of VM {vm.name}'s disk {vm.disks[0]} {what}"
                                  + (f": run this on {owner}" if owner else ""))

    async def allow(self, name: str, hosts: list[str]) -> VmDefinition:
        """`vm allow`: the hosts that may pull VM ``name`` to themselves (none: only its owner moves it).
        Only the owner of its first disk changes it, as only that host's definition counts."""
        vm = self.get(name)
        if vm is None:
            raise DefinitionError(f"no VM named {name!r} (see 'p2pvbd vm list')")
        await self._check_owner(vm, "says who may pull it")
        hosts = list(dict.fromkeys(hosts))
        if len(hosts) > MAX_ALLOWED_HOSTS:
            raise DefinitionError(f"at most {MAX_ALLOWED_HOSTS} hosts may pull a VM, not {len(hosts)}")
        vm = dataclasses.replace(vm, allow=tuple(hosts), set_at=max(time.time(), vm.set_at + 1e-3))
        self.learn(vm)
        await self.publish()
        return vm

    async def publish(self) -> None:
        """Publish the definitions whose first disk this host owns."""
        for vm in list(self.vms.values()):
            exp = self.swarm.ctl.get(vm.disks[0])
            if exp is None or exp.store.owner != self.swarm.name:
                continue
            try:
                await self.swarm.dht.publish("vm", vm.disks[0], vm.as_payload(), self.swarm.record_ttl)
            except ValueError as e:
                log.warning("cannot publish VM %s: %s", vm.name, e)

    async def refresh(self) -> None:
        for disk in await self.swarm.known_disks():
            records = await self.swarm.dht.lookup("vm", disk)
            if not records:
                continue
            owner, _ = await self.swarm.owner_of(disk)
            for rec in records:
                if rec.publisher != owner:  # only the disk's owner, as its deeds prove, defines the VM using it
                    if self._ignored.first((disk, rec.publisher)):
                        log.info("ignoring %s's definition of the VM on %s: its owner is %s", rec.publisher, disk,
                                 owner or "unknown")
                    continue
                try:
                    vm = VmDefinition.from_payload(rec.payload)
                    if self.learn(vm) and vm.deleted and self.on_deleted is not None:
                        self.on_deleted(vm.name)  # deleted on its owner: this host's files of it go too
                except DefinitionError:
                    log.info("ignoring a malformed VM definition from %s", rec.publisher)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        last_publish = -float("inf")
        while True:
            try:
                await self.refresh()
                if trio.current_time() - last_publish >= POLICY_REPUBLISH:
                    await self.publish()
                    last_publish = trio.current_time()
            except Exception:  # the index being unreachable must not take the daemon down
                log.exception("refreshing VM definitions failed")
            await trio.sleep(POLICY_REFRESH)
