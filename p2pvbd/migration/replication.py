"""Standing replication policies: named hosts keep their replica of a disk warm in the background.

A policy (``p2pvbd replicate DISK --on HOST,… [--rate RATE]``) lives in the swarm's index as a
``policy`` record. Every host that learns a policy keeps it in ``HOME/policies.json`` and republishes
it, so it outlives the host that set it; the newest ``set_at`` wins. Each host named in a policy pulls
new versions as they appear, and the owner paces the blocks it serves to such background pulls so
they never take more than RATE of its upload.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pvbd.base.files import atomic_write, read_json_file
from p2pvbd.base.pacing import TokenBucket
from p2pvbd.migration.fetcher import SyncError, SyncProgress
from p2pvbd.migration.pull import PullState, sync_disk
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.wire.dht_records import FirstSeen
from p2pvbd.wire.dht_schema import MAX_CLOCK_AHEAD_SECONDS, check_payload

if TYPE_CHECKING:
    from p2pvbd.swarm.node import Swarm

log = logging.getLogger(__name__)

POLICY_FILE = "policies.json"
# How often a replicating host checks the owner for new versions: the lag a warm replica may have
# behind a busy owner, and the cost of an idle check (one change-feed request to the owner).
CHECK_INTERVAL = 2.0
# How often policies are looked up in the index, to learn new ones and drop ended ones.
POLICY_REFRESH = 5.0
# How often this host republishes the policies it knows: well inside the records' 10-minute lifetime,
# rare enough that an idle host spends next to nothing on it (a change is published at once).
POLICY_REPUBLISH = 60.0


@dataclass(frozen=True)
class Policy:
    disk: str
    hosts: tuple[str, ...]
    rate: float  # bytes/s of the owner's upload; math.inf = unlimited
    set_at: float

    def as_payload(self) -> dict[str, Any]:
        return {"disk": self.disk, "hosts": list(self.hosts), "rate": -1 if math.isinf(self.rate) else self.rate,
                "set_at": self.set_at}

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> Policy:
        hosts = p.get("hosts")
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise ValueError("policy hosts must be a list of names")
        rate = float(p["rate"])
        return cls(str(p["disk"]), tuple(hosts), math.inf if rate < 0 else rate, float(p["set_at"]))


class Replication:
    """The policy book of one host and the background pulls it owes."""

    def __init__(self, swarm: Swarm, home: Path, pulls: PullState) -> None:
        self.swarm, self.pulls = swarm, pulls
        self.path = home / POLICY_FILE
        self.policies: dict[str, Policy] = self._load()
        self.buckets: dict[str, TokenBucket] = {}
        self._ignored = FirstSeen()  # (disk, publisher) of policies ignored: logged once

    def _load(self) -> dict[str, Policy]:
        policies: dict[str, Policy] = {}
        for disk, payload in (read_json_file(self.path, dict, log) or {}).items():
            # the index's schema, as for a policy record: a file written before it existed may hold one the
            # index refuses, which no republish could then place
            try:
                policies[disk] = Policy.from_payload(check_payload("policy", disk, self.swarm.name, payload))
            except ValueError as e:
                log.warning("ignoring the policy of %r in %s: %s", disk, self.path, e)
        return policies

    def _save(self) -> None:
        atomic_write(self.path, json.dumps({d: p.as_payload() for d, p in self.policies.items()}).encode())

    def learn(self, policy: Policy) -> bool:
        """Keep ``policy`` if it is newer than what we have; True when it changed anything."""
        known = self.policies.get(policy.disk)
        if known is not None and known.set_at >= policy.set_at:
            return False
        self.policies[policy.disk] = policy
        self.buckets.pop(policy.disk, None)
        self._save()
        return True

    async def set(self, disk: str, add: list[str], remove: list[str], rate: float | None) -> Policy:
        """`replicate` on the disk's owner: the only host whose policy other hosts follow."""
        local = self.swarm.ctl.get(disk)
        if local is None or local.store.owner != self.swarm.name:
            owner = local.store.owner if local is not None else (await self.swarm.owner_of(disk))[0]
            raise ValueError(f"only the owner of {disk} sets its replication" + (f": run this on {owner}"
                                                                              if owner else ""))
        if unknown := sorted(set(add) - await self.swarm.known_hosts()):
            raise ValueError(f"no host {', '.join(unknown)} is known in this swarm (p2pvbd peers)")
        await self.refresh()
        known = self.policies.get(disk)
        hosts = [h for h in (known.hosts if known else ()) if h not in remove]
        hosts += [h for h in add if h not in hosts]
        new_rate = rate if rate is not None else (known.rate if known else math.inf)
        policy = Policy(disk, tuple(hosts), new_rate, max(time.time(), (known.set_at if known else 0) + 1e-3))
        check_payload("policy", disk, self.swarm.name, policy.as_payload())  # ValueError now, not at each republish
        self.learn(policy)
        await self.publish()
        return policy

    async def publish(self) -> None:
        for policy in list(self.policies.values()):
            try:
                await self.swarm.dht.publish("policy", policy.disk, policy.as_payload(), self.swarm.record_ttl)
            except ValueError as e:  # one the index refuses must not keep the others from being published
                log.warning("cannot publish the policy of %s: %s", policy.disk, e)

    async def refresh(self) -> None:
        """Learn policies from the index: a disk's policy counts only when its owner published it (the
        owner this host's replica records, else the one the deeds prove), so no other member can make a
        host pull; one stamped far ahead of this host's clock is not learned."""
        for disk in await self.swarm.known_disks():
            records = await self.swarm.dht.lookup("policy", disk)
            if not records:
                continue
            local = self.swarm.ctl.get(disk)
            owner = local.store.owner if local is not None and local.store.owner else \
                (await self.swarm.owner_of(disk))[0]
            for rec in records:
                if rec.publisher != owner:
                    if self._ignored.first((disk, rec.publisher)):
                        log.info("ignoring %s's replication policy of %s: its owner is %s", rec.publisher, disk,
                                 owner or "unknown")
                    continue
                try:
                    policy = Policy.from_payload(rec.payload)
                    if policy.set_at > time.time() + MAX_CLOCK_AHEAD_SECONDS:  # would outrank every later one
                        if self._ignored.first((disk, rec.publisher, policy.set_at)):
                            log.warning("ignoring %s's policy of %s: stamped %.0f s ahead of this host's clock",
                                        rec.publisher, disk, policy.set_at - time.time())
                        continue
                    self.learn(policy)
                except (ValueError, KeyError, TypeError):
                    log.info("ignoring a malformed policy record from %s", rec.publisher)

    async def pace(self, disk: str, nbytes: int) -> None:
        """Hold a background reply of ``nbytes`` of ``disk`` as long as its policy's rate needs."""
        await self.bucket(disk).take(nbytes)

    def policy_payload(self, disk: str) -> dict[str, Any] | None:
        """The policy of ``disk`` as ``status`` shows it, or None when no host is named."""
        policy = self.policies.get(disk)
        return policy.as_payload() if policy and policy.hosts else None

    def bucket(self, disk: str) -> TokenBucket:
        """The owner's pacing of background pulls of ``disk`` (one bucket shared by every puller)."""
        policy = self.policies.get(disk)
        rate = policy.rate if policy else math.inf
        b = self.buckets.get(disk)
        if b is None or b.rate != rate:
            b = self.buckets[disk] = TokenBucket(rate)
        return b

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        last_refresh = last_publish = -math.inf
        while True:
            if trio.current_time() - last_refresh >= POLICY_REFRESH:
                try:
                    await self.refresh()
                    if trio.current_time() - last_publish >= POLICY_REPUBLISH:
                        await self.publish()
                        last_publish = trio.current_time()
                except Exception:
                    log.exception("refreshing replication policies failed")
                last_refresh = trio.current_time()
            for policy in list(self.policies.values()):
                if self.swarm.name in policy.hosts:
                    try:
                        await self._keep_warm(policy)
                    except Exception:  # a background pull must never take the daemon down with it
                        log.exception("keeping %s warm failed", policy.disk)
            await trio.sleep(CHECK_INTERVAL)

    async def _keep_warm(self, policy: Policy) -> None:
        """Pull what the owner changed since the last pull. Idle, this is one change-feed request to the
        owner, answered from its per-leaf newest versions; the index is asked only when the owner is not
        known yet or has moved on."""
        local = self.swarm.ctl.get(policy.disk)
        if local is not None and local.store.owner == self.swarm.name:
            return  # the owner keeps nothing warm: it is the reference
        if policy.disk not in self.pulls.synced:
            owner, _ = await self.swarm.owner_of(policy.disk)
            if not owner or owner == self.swarm.name:
                return
        progress = SyncProgress(policy.disk)
        try:
            await sync_disk(self.swarm, self.pulls, policy.disk, progress, background=True)
        except (SyncError, PeerError, OSError, ValueError) as e:
            log.info("keeping %s warm failed for now: %s", policy.disk, getattr(e, "message", e))
