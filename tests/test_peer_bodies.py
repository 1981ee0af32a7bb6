"""Any request body a member can send, for every peer op a host serves: an answer or a clear refusal.

The transport checks each body's fields against its op's types (peer_wire.OPS); what they hold is
anyone's choice. Hypothesis fills them (disk names biased to a disk that exists, as the owner and as a
replica) and sends them, as two members, to a host's ``handle_peer`` in-process: every request must end
in a reply or a PeerError, never in another exception (which the transport would answer as "internal
error" after logging a traceback), and the host's disks must stay as they were.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pvbd.base.home import Config, Home
from p2pvbd.daemon import attach_services
from p2pvbd.kernel_hook_ctl import ExportMode, HookController
from p2pvbd.migrate import _root
from p2pvbd.replica_store import ReplicaStore
from p2pvbd.swarm import access, trust
from p2pvbd.swarm.node import Swarm
from p2pvbd.swarm.peer_transport import PeerError
from p2pvbd.wire.peer_wire import OPS, validate_body
from tests.test_dht_schema import FakeIndex

ME = "office-pc"
OWNED, REPLICA = "vm1", "vm2"  # a disk this host owns, and one it holds a replica of (owned by home-pc)
CALLERS = ("mallory", "home-pc")

_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
         | st.text(max_size=8) | st.binary(max_size=64))
anything = st.recursive(_leaf, lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                        max_leaves=24)
def _mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` three times in four: values that pass the first checks, to reach the ones behind them."""
    return st.integers(0, 3).flatmap(lambda k: usual if k else other)


_disk = _mostly(st.sampled_from([OWNED, REPLICA, REPLICA]),
                st.sampled_from(["nosuch", "../x", ""]) | st.text(max_size=10))
# The disks' geometry and a migration's modes: a prepare that gets past its checks opens the others.
_usual = {"size": st.just(1 << 20), "block_size": st.just(64 << 10), "mode": st.sampled_from(["sync", "async"]),
          "epoch": st.sampled_from([1, 3, 3, 4]), "counter": st.integers(0, 5)}
_host_names = st.sampled_from([ME, *CALLERS, ""]) | st.text(max_size=10)
_small_ints = st.integers(-3, 300) | st.integers(-(2**63), 2**64 - 1)
_by_type: dict[type, st.SearchStrategy[Any]] = {
    int: _small_ints, float: st.floats() | st.integers(-5, 10**6).map(float), bytes: st.binary(max_size=80),
    str: st.text(max_size=12), bool: st.booleans(),
    list: st.lists(st.lists(_small_ints | st.binary(max_size=16) | anything, max_size=5) | anything, max_size=12),
    dict: st.dictionaries(st.text(max_size=8), anything, max_size=4)
    | st.fixed_dictionaries({"start": _small_ints, "count": _small_ints}),
}
SKIP = frozenset({"hello", "cancel"})  # answered by the transport itself


def _field(name: str, kind: Any) -> st.SearchStrategy[Any]:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if name in _usual:
        return _mostly(_usual[name], st.one_of(*(_by_type[k] for k in kinds)))
    if name in ("disk", "vm"):
        return _disk if str in kinds else st.one_of(*(_by_type[k] for k in kinds))
    if name in ("to", "host", "op"):
        return (_host_names | st.sampled_from(["read", "write", "write_zeroes", "trim", "flush"])) if str in kinds \
            else st.one_of(*(_by_type[k] for k in kinds))
    return st.one_of(*(_by_type[k] for k in kinds))


@st.composite
def requests(draw: st.DrawFn, ops: list[str]) -> tuple[str, str, dict[str, Any]]:
    op = draw(st.sampled_from(ops))
    body = {name: draw(_field(name, kind)) for name, kind in OPS[op].fields.items()}
    extra = draw(st.dictionaries(st.sampled_from(["epoch", "offset", "length", "data", "fua", "hops", "background",
                                                  "since", "level", "parents", "size", "block_size"]), anything,
                                 max_size=3))
    body = extra | body  # an op's own fields keep their types, as the transport demands
    return draw(st.sampled_from([*CALLERS, "home-pc"])), op, body


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> trust.HostIdentity:
    return trust.create_swarm(tmp_path_factory.mktemp("me"), ME)


async def _unreachable(peer: str, host: str, port: int, **_: Any) -> None:
    raise PeerError("connection", f"{peer} at {host}:{port} is not there (test)")


def _host(home: Path, identity: trust.HostIdentity) -> Swarm:
    ctl = HookController()
    ctl.add_export(ReplicaStore.create(home / "disks" / OWNED, OWNED, 1 << 20, 64 << 10, ME, 1), ExportMode.PRIMARY)
    ctl.add_export(ReplicaStore.create(home / "disks" / REPLICA, REPLICA, 1 << 20, 64 << 10, "home-pc", 3),
                   ExportMode.STANDBY)
    swarm = Swarm(Home(home), Config(name=ME, listen="127.0.0.1:7420"), identity, ctl)
    attach_services(swarm, home)
    swarm.dht = FakeIndex([])  # type: ignore[assignment]
    swarm._hold = _unreachable  # type: ignore[method-assign]
    return swarm


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(sorted(set(OPS) - SKIP - {"join", "join_ca"})), min_size=1, max_size=8))
def test_any_body_gets_an_answer_or_a_refusal(identity: trust.HostIdentity,
                                             batch: list[tuple[str, str, dict[str, Any]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        swarm = _host(Path(tmp), identity)
        owned = swarm.ctl.get(OWNED)
        assert owned is not None
        before = (owned.store.owner, owned.store.epoch, owned.mode, _root(owned.store))

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                swarm._nursery = nursery
                await nursery.start(swarm.migration_target.run)  # type: ignore[attr-defined]
                for peer, op, body in batch:
                    if op not in swarm.peer_ops:
                        continue  # served by the daemon's VM service, not the swarm
                    try:
                        validate_body(op, body)  # as the transport does before any handler
                    except PeerError:
                        continue
                    with trio.fail_after(60):  # a hang guard: a refusal takes milliseconds
                        try:
                            reply = await swarm.handle_peer(peer, op, body)
                        except PeerError:
                            continue
                    assert isinstance(reply, dict), (op, body, reply)
                nursery.cancel_scope.cancel()

        trio.run(main)
        # its own disk: nobody else's to take or write (home-pc, vm2's owner, may prepare a migration of vm2)
        assert (owned.store.owner, owned.store.epoch, owned.mode, _root(owned.store)) == before, batch
        for exp in swarm.ctl.exports():
            exp.store.close()



def test_every_peer_op_is_one_record_registered_once(tmp_path: Path, identity: trust.HostIdentity) -> None:
    """Each op a host serves carries its name, its schema, its rule and its handler; registering one twice,
    or one the wire has no schema for, fails at start-up rather than silently replacing a handler."""
    swarm = Swarm(Home(tmp_path), Config(name=ME, listen="127.0.0.1:7420"), identity, HookController())
    attach_services(swarm, tmp_path)
    assert {"get_blocks", "put_blocks", "migrate_commit", "relay_open", "punch"} <= set(swarm.peer_ops)
    assert all(op.name == name and op.schema is OPS[name] for name, op in swarm.peer_ops.items())
    with pytest.raises(ValueError, match="registered twice"):
        swarm.register_ops(swarm.ops()[:1])

    async def handler(peer: str, body: dict[str, Any]) -> dict[str, Any]:
        return {}
    with pytest.raises(ValueError, match="no schema"):
        access.PeerOp("frobnicate", access.member, handler)
