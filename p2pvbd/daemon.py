"""The per-host daemon: one trio nursery running the NBD exports and the control socket.

Started by ``p2pvbd daemon``; every other command talks to it through the control socket.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pvbd.base import admission
from p2pvbd.base.control import ControlError, serve_control
from p2pvbd.base.control_ops import ControlOps, OpHandler
from p2pvbd.base.home import Config, Home, HomeError, check_name, is_loopback, parse_nbd_tcp
from p2pvbd.base.listen_check import check_listen
from p2pvbd.base.units import SIZE_RULE
from p2pvbd.kernel_hook_ctl import ExportMode, HookController
from p2pvbd.libvirt.service import LibvirtService
from p2pvbd.migrate import DEFAULT_MAX_DOWNTIME_MS
from p2pvbd.migration import cancel as job_cancel
from p2pvbd.migration import failpoints
from p2pvbd.migration.jobs import run_job
from p2pvbd.migration.pull import PullState
from p2pvbd.migration.replication import Replication
from p2pvbd.migration.target import MigrationTarget
from p2pvbd.nbd import tls as nbd_tls
from p2pvbd.nbd.server import NbdListenError, TcpEndpoint, serve_nbd
from p2pvbd.replica_store import DEFAULT_BLOCK_SIZE, ReplicaStore
from p2pvbd.store import store_delete
from p2pvbd.swarm import invites, trust
from p2pvbd.swarm.access import PeerOp
from p2pvbd.swarm.node import Swarm, advertised_addresses
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.vm.service import VmService

if TYPE_CHECKING:
    from p2pvbd.migration.fetcher import SyncProgress

log = logging.getLogger(__name__)

# Unflushed guest writes are what a crash may lose and what reopening must re-hash; flushing every
# few seconds bounds both, like the kernel's dirty-page writeback (dirty_expire_centisecs = 30 s).
FLUSH_INTERVAL_SECONDS = 5.0
# `disk import` copies in pieces this large; zero pieces are skipped so imports stay sparse.
IMPORT_CHUNK = 1024 * 1024
# A stopping daemon first asks its guests to power off (ACPI) and waits this long before it quits the
# QEMUs still running (`p2pvbd stop --vm-timeout`): systemd and libvirt-guests give a guest 30 s too
# (the unit's TimeoutStopSec=90 leaves room for it, runner.QUIT_TIMEOUT and closing the stores).
DEFAULT_VM_SHUTDOWN_SECONDS = 30.0
# A longer --vm-timeout is a typo: no guest takes a day to power off.
MAX_VM_SHUTDOWN_SECONDS = 86400
# Past the guests' time and runner.QUIT_TIMEOUT for their QEMUs, a stopping daemon stops regardless.
SHUTDOWN_MARGIN_SECONDS = 15.0
# `invite --ttl` default: long enough to walk to the other machine, short enough to be useless later.
DEFAULT_INVITE_TTL = 3600
# Disk sizes are whole 512-byte sectors: what every hypervisor and the NBD clients expect.
SECTOR = 512
# The event-loop watch: how often it looks (10 wake-ups a second cost next to nothing), and the delay
# worth a warning (a guest sees it as a stall; the switchover target is 50 ms, so 100 ms is a problem).
LOOP_WATCH_INTERVAL = 0.1
# `sync NAME` of a disk the catalog does not list: its creator publishes at once (request_publish), so
# the index has it within a round trip or two; this long covers a loaded machine, and is what a typo costs.
CATALOG_WAIT_SECONDS = 2.0
CATALOG_POLL_SECONDS = 0.2
LOOP_STALL_WARNING = 0.1
# `jobs cancel` waits this long for the job to stop: a migration's source tells the destination it gave
# up within 5 s (migrate.py's migrate_abort), a sync stops at its next request; past this it answers anyway.
CANCEL_WAIT_SECONDS = 15.0



@dataclass(frozen=True)
class Services:
    """The services composed onto one swarm node."""

    pulls: PullState  # what each replica's last pull reached; one pull of a disk at a time
    replication: Replication
    target: MigrationTarget


def attach_services(swarm: Swarm, home: Path, more_ops: Sequence[PeerOp] = ()) -> Services:
    """Compose the swarm node with the services whose peer ops it dispatches, handing it what it shows of
    them through narrow hooks (swarm/ops.py): the node imports none of them. Every peer op this host
    serves is registered here, the node's own, the migration target's and the VM service's."""
    pulls = PullState()
    services = Services(pulls, Replication(swarm, home, pulls), MigrationTarget(swarm, pulls))
    swarm.hooks.pace_background = services.replication.pace
    swarm.hooks.replication_policy = services.replication.policy_payload
    swarm.hooks.pull_rate = pulls.rates.get
    swarm.hooks.synced_owner = pulls.synced_owner
    swarm.migration_target = services.target
    swarm.register_ops([*swarm.ops(), *services.target.ops(), *more_ops])
    return services


class Daemon:
    """The composition root: builds the services and wires them together; the control ops in its table
    (``control_ops``) are the commands that span several services."""

    def __init__(self, home: Home, config: Config) -> None:
        self.home = home
        self.config = config
        self.ctl = HookController()
        self.cancel_scope: trio.CancelScope | None = None
        if not trust.has_identity(home.path):
            raise HomeError(f"{home.path} has no swarm identity: create it with 'p2pvbd init' or 'p2pvbd join'")
        self.identity = trust.load_identity(home.path)
        self.nbd_tcp = self._nbd_tcp()
        self.swarm = Swarm(home, config, self.identity, self.ctl)
        self.vms = VmService(self.swarm, home.path, home.nbd_socket, self._replicate_disk)
        self.libvirt = LibvirtService(self.swarm, home.path, home.nbd_socket)
        self.services = attach_services(self.swarm, home.path, [*self.vms.ops(), *self.libvirt.ops()])
        self.jobs: dict[int, Any] = {}  # SyncProgress or MigrationProgress: both have as_dict()
        self.cancels: dict[int, job_cancel.JobCancel] = {}  # the jobs a person may cancel
        # Every control command, by name; a ValueError, HomeError or FileExistsError from one is the user's.
        self.control = ControlOps(user_errors=(ValueError, HomeError, FileExistsError))
        self.control.add(self.control_ops())
        self.control.add(self.vms.control_ops())
        self.control.add(self.libvirt.control_ops())
        self._nursery: trio.Nursery | None = None

    def _nbd_tcp(self) -> TcpEndpoint | None:
        """The NBD TCP listener's address and TLS, with a fresh server certificate naming that address."""
        if not self.config.nbd_tcp:
            return None
        host, port = parse_nbd_tcp(self.config.nbd_tcp)
        ctx = nbd_tls.server_ssl_context(self.home.path, self.config.name, host)
        log.info("NBD over TLS on %s:%d for clients with a certificate from 'p2pvbd nbd-client-cert'", host, port)
        if not is_loopback(host):
            log.warning("NBD on %s:%d is reachable from the network; TLS with client certificates guards it",
                        host, port)
        return TcpEndpoint(host, port, ctx)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def open_disks(self) -> None:
        """Open every store in a worker thread: replaying a journal and digesting a big map take a while."""
        for left in await trio.to_thread.run_sync(store_delete.remove_leftovers, self.home.disks_dir):
            log.info("removed %s, a replica whose deletion a crash cut short", left.name)
        for name in self.home.disk_names():
            try:
                store = await trio.to_thread.run_sync(ReplicaStore.open, self.home.disk_dir(name))
            except Exception:
                log.exception("cannot open disk %s; it is not exported", name)
                continue
            self.ctl.add_export(store, self._mode_for(store))
            log.info("exporting %s (%d bytes, owner %s)", name, store.size, store.owner)

    def _mode_for(self, store: ReplicaStore) -> ExportMode:
        return ExportMode.PRIMARY if store.owner == self.config.name else ExportMode.STANDBY

    def close_disks(self) -> None:
        for name in self.ctl.names():
            store = self.ctl.remove_export(name)
            try:
                store.close()
            except Exception:
                log.exception("closing %s failed", name)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.open_disks()
        self.vms.forward_left_vms()
        try:
            async with trio.open_nursery() as nursery:
                self.cancel_scope = nursery.cancel_scope
                self._nursery = nursery
                await nursery.start(serve_nbd, self.ctl, self.home.nbd_socket, self.nbd_tcp)
                await nursery.start(self.swarm.run)
                await nursery.start(self.services.replication.run)
                await nursery.start(self.services.target.run)
                await nursery.start(self.vms.run)
                await nursery.start(self.libvirt.run)
                await nursery.start(serve_control, self.home.control_socket, self.control)
                nursery.start_soon(self._periodic_flush)
                nursery.start_soon(_watch_event_loop)
                log.info("daemon of host %s ready: %s", self.config.name, self.home.path)
                task_status.started()
        finally:
            self.close_disks()

    async def _periodic_flush(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL_SECONDS)
            try:
                await self.ctl.flush_all()
            except Exception:
                log.exception("periodic flush failed")

    # ---- control ops ---------------------------------------------------------------------------
    async def _replicate_disk(self, disk: str, on: list[str], off: list[str], rate: float | None) -> Any:
        """A VM's disks are kept warm wherever its memory is (`vm replicate`)."""
        return await self.services.replication.set(disk, on, off, rate)

    def control_ops(self) -> dict[str, OpHandler]:
        """The daemon's own control commands (the VM service offers the `vm_*` ones)."""
        return {
            "ping": self.op_ping,
            "shutdown": self.op_shutdown,
            "disk_create": self.op_disk_create,
            "disk_import": self.op_disk_import,
            "disk_list": self.op_disk_list,
            "disk_delete": self.op_disk_delete,
            "nbd_uri": self.op_nbd_uri,
            "status": self.op_status,
            "peers": self.op_peers,
            "disk_claim": self.op_disk_claim,
            "revoke": self.op_revoke,
            "invite": self.op_invite,
            "sync": self.op_sync,
            "jobs": self.op_jobs,
            "migrate": self.op_migrate,
            "replicate": self.op_replicate,
            "job": self.op_job,
            "job_cancel": self.op_job_cancel,
            "verify": self.op_verify,
        }

    def _store(self, disk: str) -> ReplicaStore:
        exp = self.ctl.get(disk)
        if exp is None:
            raise ControlError(f"no disk named {disk!r} on host {self.config.name} (see 'p2pvbd disk list')")
        return exp.store

    async def op_ping(self) -> dict[str, Any]:
        return {"host": self.config.name, "pid": os.getpid()}

    async def op_shutdown(self, vm_timeout: float = DEFAULT_VM_SHUTDOWN_SECONDS) -> dict[str, Any]:
        """`p2pvbd stop`: the guests are shut down first (the reply says which powered off and which were
        killed), then the daemon ends once the reply is on its way."""
        if not 0 <= vm_timeout <= MAX_VM_SHUTDOWN_SECONDS:
            raise ControlError(f"--vm-timeout must be between 0 and {MAX_VM_SHUTDOWN_SECONDS} seconds")
        outcome = await self.shutdown(vm_timeout)
        assert self._nursery is not None
        self._nursery.start_soon(self._end)
        return {**outcome, "vm_timeout": vm_timeout}

    async def shutdown(self, vm_timeout: float = DEFAULT_VM_SHUTDOWN_SECONDS) -> dict[str, list[str]]:
        """Shut this host's VMs down while their disks are still served: each guest gets ``vm_timeout``
        seconds to power off after the ACPI button, then its QEMU is quit (its last writes flushed)."""
        with trio.move_on_after(vm_timeout + SHUTDOWN_MARGIN_SECONDS):
            return await self.vms.runner.power_down_all(vm_timeout)
        return {"shut_down": [], "killed": sorted(self.vms.runner.running)}  # past the margin: ended below

    async def _end(self) -> None:
        assert self.cancel_scope is not None
        self.cancel_scope.cancel()

    async def op_disk_create(self, name: str, size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, Any]:
        if 0 < size < block_size and size % SECTOR == 0:  # `--size 512` meant more than 512 bytes
            raise ControlError(f"a disk of {size} bytes is smaller than one block ({block_size} bytes): sizes take "
                               f"{SIZE_RULE}")
        return await self._create_disk(name, size, block_size)

    async def _create_disk(self, name: str, size: int, block_size: int) -> dict[str, Any]:
        """A new disk of any whole number of sectors: an imported image may be smaller than a block."""
        check_name("disk", name)
        if self.ctl.get(name) is not None:
            raise ControlError(f"disk {name!r} already exists")
        if size <= 0 or size % SECTOR:
            raise ControlError(f"disk size must be a positive multiple of {SECTOR} bytes, not {size}")
        store = await trio.to_thread.run_sync(ReplicaStore.create, self.home.disk_dir(name), name, size, block_size,
                                              self.config.name, 1)
        if self.ctl.get(name) is not None:  # created meanwhile by a concurrent command or a peer
            await trio.to_thread.run_sync(store.abandon)
            raise ControlError(f"disk {name!r} already exists")
        self.ctl.add_export(store, ExportMode.PRIMARY)
        self._changed()
        return self._disk_info(store)

    def _changed(self) -> None:
        self.swarm.request_publish()

    async def op_disk_import(self, name: str, path: str, block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, Any]:
        src = trio.Path(path)
        try:
            size = (await src.stat()).st_size
        except OSError as e:
            raise ControlError(f"cannot read {path}: {e.strerror}") from e
        size = max(SECTOR, -(-size // SECTOR) * SECTOR)
        info = await self._create_disk(name, size, block_size)
        written = 0
        async with await src.open("rb") as f:
            offset = 0
            while chunk := await f.read(IMPORT_CHUNK):
                if chunk.count(0) != len(chunk):
                    await self.ctl.write(name, offset, chunk)
                    written += len(chunk)
                offset += len(chunk)
        await self.ctl.flush(name)
        return {**info, "bytes_written": written}

    async def op_disk_delete(self, disk: str, force: bool = False) -> dict[str, Any]:
        """`disk delete`: close this host's replica, remove its files and withdraw it from the index. Refused
        while anything uses it, and for the disk this host owns unless ``force``d (its data may exist nowhere
        else)."""
        store = self._store(disk)
        if why := self._in_use(disk):
            raise ControlError(f"{disk} is in use: {why}")
        if store.owner == self.config.name and not force:
            raise ControlError(f"{self.config.name} owns {disk}: move it first ('p2pvbd migrate {disk} --to HOST') "
                               f"or delete it anyway with 'p2pvbd disk delete {disk} --force'")
        lock = self.services.pulls.lock(disk)
        if lock.locked():
            raise ControlError(f"{disk} is in use: a pull into it is under way here")
        async with lock:
            self.ctl.remove_export(disk)  # no new guest connection, peer read or flush reaches it now
            await trio.to_thread.run_sync(store.abandon)  # no checkpoint: nothing of it is kept
            freed = await trio.to_thread.run_sync(store_delete.delete_store, store.directory)
            self.services.pulls.forget(disk)
        await self.swarm.withdraw(disk)
        log.info("deleted disk %s (%d bytes freed)", disk, freed)
        vm = self.vms.book.of_disk(disk)
        return {"disk": disk, "owner": store.owner, "bytes_freed": freed, "vm": vm.name if vm is not None else ""}

    def _in_use(self, disk: str) -> str:
        """Why ``disk`` cannot be deleted now ("" if it can): a VM, a migration, a guest connection."""
        vm = self.vms.book.of_disk(disk)
        if vm is not None and (rv := self.vms.runner.running.get(vm.name)) is not None and not rv.exited.is_set():
            return f"VM {vm.name} runs on it here (stop it with 'p2pvbd vm stop {vm.name}')"
        if (out := self.swarm.migrations.get(disk)) is not None and out.finished is None:
            return f"it is migrating to {out.dest}"
        if disk in self.services.target.incoming:
            return f"it is migrating here from {self.services.target.incoming[disk].source}"
        if (exp := self.ctl.get(disk)) is not None and exp.clients:
            return f"{len(exp.clients)} NBD client(s) have it open (a VM, or 'p2pvbd attach')"
        policy = self.services.replication.policies.get(disk)
        if policy is not None and self.config.name in policy.hosts and exp is not None and exp.store.owner:
            return (f"its owner keeps a warm replica here (run 'p2pvbd replicate {disk} --off {self.config.name}' "
                    f"on {exp.store.owner} first)")
        return ""

    async def op_disk_list(self) -> list[dict[str, Any]]:
        return [self._disk_info(exp.store) | {"mode": exp.mode.value} for exp in self.ctl.exports()]

    def _disk_info(self, store: ReplicaStore) -> dict[str, Any]:
        return {"name": store.name, "size": store.size, "block_size": store.block_size,
                "owner": store.owner, "epoch": store.epoch}

    async def op_nbd_uri(self, disk: str) -> str:
        self._store(disk)
        return self.home.nbd_uri(disk)

    async def op_status(self, disk: str | None = None) -> dict[str, Any]:
        return await self.swarm.status(disk or None)  # ValueError for a name the swarm does not know

    async def op_peers(self) -> list[dict[str, Any]]:
        return await self.swarm.peers()

    async def op_disk_claim(self, disk: str) -> dict[str, Any]:
        try:
            return await self.services.target.claim(check_name("disk", disk))
        except PeerError as e:
            raise ControlError(e.message) from None

    async def op_revoke(self, host: str) -> dict[str, Any]:
        try:
            return await self.swarm.revoke(check_name("host", host))
        except PeerError as e:
            raise ControlError(e.message) from None

    async def op_invite(self, ttl: int = DEFAULT_INVITE_TTL) -> dict[str, Any]:
        if not self.identity.can_invite:
            raise ControlError(f"host {self.config.name} cannot invite: only the host that created the swarm "
                               "holds its CA key")
        if ttl <= 0:
            raise ControlError("the invite's lifetime must be positive")
        now = time.time()
        addresses = await advertised_addresses(self.config.listen)
        token, record = invites.make_invite(self.identity, addresses, ttl, now)
        await trio.to_thread.run_sync(partial(invites.record_invite, self.home.path, record, now=now))
        try:
            await self.swarm.open_join_port()
        except PeerError as e:
            raise ControlError(f"the invite was made, but {e.message}") from None
        return {"token": token, "expires": record.expires}

    async def op_sync(self, disk: str, sources: list[str] | None = None) -> dict[str, Any]:
        """Start pulling ``disk`` up to the owner's versions; `job` reports progress."""
        check_name("disk", disk)
        await self._known_disk(disk)
        # a VM move's job names a VM, not a disk: only syncs and disk migrations count here
        if any(getattr(p, "disk", None) == disk and p.finished is None for p in self.jobs.values()):
            raise ControlError(f"a sync of {disk} is already running")
        job = max(self.jobs, default=0) + 1
        from p2pvbd.migration.fetcher import SyncProgress

        progress = self.jobs[job] = SyncProgress(disk)
        cancel = self.cancels[job] = job_cancel.JobCancel("sync", partial(self._sync_cancelled, progress))
        assert self._nursery is not None
        self._nursery.start_soon(self._run_sync, disk, sources, progress, cancel)
        return {"job": job}

    async def _known_disk(self, disk: str) -> None:
        """Refuse a mistyped name at once, not after the pull's wait for an owner (pull.INDEX_WAIT_SECONDS):
        a disk made a moment ago on another host is in the index's catalog within CATALOG_WAIT_SECONDS."""
        with trio.move_on_after(CATALOG_WAIT_SECONDS):
            while True:
                if disk in await self.swarm.known_disks():
                    return
                await trio.sleep(CATALOG_POLL_SECONDS)
        raise ControlError(f"no disk named {disk!r} is known in this swarm (p2pvbd status lists them)")

    async def _run_sync(self, disk: str, sources: list[str] | None, progress: SyncProgress,
                        cancel: job_cancel.JobCancel) -> None:
        from p2pvbd.migration.fetcher import SyncError
        from p2pvbd.migration.pull import sync_disk

        await run_job(f"sync of {disk}", progress, partial(sync_disk, self.swarm, self.services.pulls, disk, progress,
                                                           sources), (SyncError, ValueError, OSError, PeerError),
                      cancel)

    async def _sync_cancelled(self, progress: SyncProgress) -> str:
        """What a cancelled sync kept: its blocks, made durable like a finished sync's."""
        exp = self.ctl.get(progress.disk)
        if exp is None:
            return f"cancelled before a replica of {progress.disk} was made here"
        await trio.to_thread.run_sync(exp.store.flush)
        self.swarm.request_publish()
        return job_cancel.sync_cancelled(progress.disk, progress.blocks_fetched, exp.store.held_blocks,
                                         exp.store.n_blocks)

    async def op_jobs(self) -> list[dict[str, Any]]:
        """This host's syncs and migrations, then the pulls it ran as the destination of a migration."""
        mine = [{"job": job, "kind": _kind(self.jobs[job])} | await self.op_job(job) for job in sorted(self.jobs)]
        target = self.services.target
        incoming = [{"job": f"in-{n}", "kind": "incoming migration pull"} | p.as_dict()
                    | {"done": p.finished is not None} for n, p in sorted(target.jobs.items())]
        return mine + incoming

    async def op_migrate(self, to: str, disks: list[str] | None = None, mode: str = "async",
                         max_downtime_ms: float = DEFAULT_MAX_DOWNTIME_MS) -> dict[str, Any]:
        """Start migrating ``disks`` (default: every disk this host owns) to host ``to``."""
        from p2pvbd.migrate import MigrationProgress

        check_name("host", to)
        if mode not in ("sync", "async"):
            raise ControlError("--mode must be sync or async")
        if max_downtime_ms <= 0:
            raise ControlError("--max-downtime must be positive")
        if disks and len(disks) == 1 and self.vms.knows(disks[0]):
            return await self._move_vm(disks[0], to, mode, max_downtime_ms)
        if disks and len(disks) == 1 and self.libvirt.knows(disks[0]):  # an adopted libvirt domain
            job = max(self.jobs, default=0) + 1
            self.jobs[job] = self.libvirt.start_move(disks[0], to)
            return {"jobs": [job], "vm": disks[0]}
        owned = [e.name for e in self.ctl.exports() if e.store.owner == self.config.name]
        disks = disks or owned
        if not disks:
            raise ControlError(f"host {self.config.name} owns no disk to migrate")
        for disk in disks:
            if disk not in owned:
                raise ControlError(f"host {self.config.name} does not own {disk!r}")
            if disk in self.swarm.migrations and self.swarm.migrations[disk].finished is None:
                raise ControlError(f"{disk} is already migrating")
            if (vm := self.vms.running_on(disk)) is not None:
                raise ControlError(f"{disk} is a disk of VM {vm}, running here: move them together with "
                                   f"'p2pvbd migrate {vm} --to {to}'")
        if to == self.config.name:
            raise ControlError(f"{', '.join(disks)} already live(s) on {to}")
        jobs = []
        assert self._nursery is not None
        for disk in disks:
            job = max(self.jobs, default=0) + 1
            progress = self.jobs[job] = self.swarm.migrations[disk] = MigrationProgress(disk, self.config.name, to,
                                                                                        mode)
            cancel = self.cancels[job] = job_cancel.JobCancel("migration",
                                                              partial(self._migration_cancelled, progress))
            self._nursery.start_soon(self._run_migration, progress, max_downtime_ms, cancel)
            jobs.append(job)
        return {"jobs": jobs}

    async def _move_vm(self, name: str, to: str, mode: str, max_downtime_ms: float) -> dict[str, Any]:
        """`migrate VM --to HOST`: the VM with all its disks, as one job."""
        if to == self.config.name and not self.vms.runs_here(name):
            job = max(self.jobs, default=0) + 1
            self.jobs[job] = await self.vms.request_move(name, mode, max_downtime_ms)
            return {"jobs": [job], "vm": name}
        await self.vms.check_here(name, f"p2pvbd migrate {name} --to {to}")
        progress = self.vms.prepare_move(name, to, mode)
        for disk in progress.disks:
            if disk.disk in self.swarm.migrations and self.swarm.migrations[disk.disk].finished is None:
                raise ControlError(f"{disk.disk} is already migrating")
        job = max(self.jobs, default=0) + 1
        self.jobs[job] = progress
        cancel = self.cancels[job] = job_cancel.JobCancel("vm move", partial(self._vm_move_cancelled, progress))
        for disk in progress.disks:
            self.swarm.migrations[disk.disk] = disk
        assert self._nursery is not None
        self._nursery.start_soon(self.vms.run_move, progress, max_downtime_ms, cancel)
        return {"jobs": [job], "vm": name}

    async def _run_migration(self, progress: Any, max_downtime_ms: float, cancel: job_cancel.JobCancel) -> None:
        from p2pvbd.migrate import MigrationError, migrate_disk

        async def migrate() -> None:
            await migrate_disk(self.swarm, progress.disk, progress.dest, progress.mode, max_downtime_ms, progress)
            progress.phase = "done"

        await run_job(f"migration of {progress.disk}", progress, migrate, (MigrationError, PeerError), cancel)

    async def _migration_cancelled(self, progress: Any) -> str:
        exp = self.ctl.get(progress.disk)
        return job_cancel.migration_cancelled(progress.disk, self.config.name, progress.dest,
                                              exp.store.owner if exp is not None else "")

    async def _vm_move_cancelled(self, progress: Any) -> str:
        return job_cancel.vm_move_cancelled(progress.vm, self.config.name, progress.dest,
                                            self.vms.runs_here(progress.vm))

    async def op_replicate(self, disk: str, on: list[str], off: list[str], rate: float | None = None
                           ) -> dict[str, Any]:
        if disk not in await self.swarm.known_disks():
            raise ControlError(f"no disk named {disk!r} in the swarm")
        for host in (*on, *off):
            check_name("host", host)
        if rate is not None and rate <= 0:
            raise ControlError("--rate must be positive")
        policy = await self.services.replication.set(disk, on, off, rate)
        return policy.as_payload()

    async def op_job(self, job: int) -> dict[str, Any]:
        progress = self.jobs.get(job)
        if progress is None:
            raise ControlError(f"no job {job}")
        return progress.as_dict() | {"done": progress.finished is not None}

    async def op_job_cancel(self, job: int) -> dict[str, Any]:
        """Cancel a job unless its commit has started; answers once it stopped, with the state it left."""
        progress = self.jobs.get(job)
        if progress is None:
            raise ControlError(f"no job {job} (see 'p2pvbd jobs')")
        if progress.finished is not None:
            raise ControlError(f"job {job} has already ended ({progress.phase})")
        cancel = self.cancels.get(job)
        if cancel is None:
            raise ControlError(f"job {job} ({_kind(progress)}) cannot be cancelled")
        if not cancel.request(progress.phase):
            return {"job": job, "cancelled": False, "phase": progress.phase,
                    "message": job_cancel.COMMITTING[cancel.kind]}
        with trio.move_on_after(CANCEL_WAIT_SECONDS):
            await cancel.ended.wait()
        return {"job": job, "cancelled": True, "phase": progress.phase,
                "message": progress.error if cancel.ended.is_set() else "cancelling: see 'p2pvbd jobs'"}

    async def op_verify(self, disk: str) -> dict[str, Any]:
        store = self._store(disk)
        bad = await trio.to_thread.run_sync(store.verify)
        return {"disk": disk, "blocks": store.n_blocks, "mismatched_blocks": bad, "ok": not bad}


def _kind(progress: Any) -> str:
    return "vm move" if hasattr(progress, "vm") else "migration" if hasattr(progress, "dest") else "sync"


async def _watch_event_loop() -> None:
    """Log when the event loop was kept from running: every guest request waits that long. Nothing here
    should ever block it; this is how a regression shows up in the daemon's log."""
    while True:
        start, cpu = trio.current_time(), time.thread_time()
        await trio.sleep(LOOP_WATCH_INTERVAL)
        late = trio.current_time() - start - LOOP_WATCH_INTERVAL
        if late >= LOOP_STALL_WARNING:
            # What the loop's own thread computed meanwhile tells work done on the loop (a bug here) from
            # a host too busy to give this daemon a CPU, or a blocking call.
            busy = time.thread_time() - cpu
            log.warning("the event loop was blocked for %.0f ms (computing for %.0f ms of it)", late * 1000,
                        busy * 1000)


def _lock_home(home: Home) -> int:
    """One daemon per home: a second one would corrupt the stores."""
    fd = os.open(home.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HomeError(f"a daemon is already running for {home.path}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


async def _main(home: Home, config: Config, vm_timeout: float) -> None:
    daemon = Daemon(home, config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            daemon.cancel_scope = nursery.cancel_scope  # `p2pvbd stop` ends the whole daemon

            async def stop_on_signal() -> None:
                async for sig in signals:
                    log.info("received %s, shutting down", signal.Signals(sig).name)
                    await daemon.shutdown(vm_timeout)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)


def run_daemon(home: Home, vm_timeout: float = DEFAULT_VM_SHUTDOWN_SECONDS) -> None:
    """Foreground entry point: lock the home, serve until SIGTERM/SIGINT (shutting the guests down, each
    given ``vm_timeout`` seconds to power off), close every store cleanly.

    Raises failpoints.FailpointError before anything starts when the test hook's variable does not parse."""
    config = home.load_config()
    failpoints.configure(os.environ)
    fd = _lock_home(home)
    try:
        check_listen(config.listen, f"change listen in {home.config_path}")
    except HomeError:
        os.close(fd)
        raise
    home.secure()  # a home made by an older version, or by hand, may be open to other users
    before, after = admission.raise_descriptor_limit()
    log.info("open-descriptor limit %d%s", after, f" (raised from {before})" if after != before else "")
    try:
        trio.run(_main, home, config, vm_timeout)
    except BaseExceptionGroup as group:
        # A service that cannot start for a reason the user can fix (an NBD address in use) says so in one line.
        errors = _leaves(group)
        if len(errors) == 1 and isinstance(errors[0], NbdListenError):
            raise HomeError(f"{errors[0]}: change nbd_tcp in {home.config_path}") from None
        if len(errors) == 1 and isinstance(errors[0], HomeError):
            raise errors[0] from None
        raise
    finally:
        os.close(fd)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]
