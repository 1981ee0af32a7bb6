"""Peer connections over real sockets on 127.0.0.1: who gets in, who does not, and concurrency."""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2pvbd.swarm import invites, trust
from p2pvbd.swarm import peer_transport as pt
from p2pvbd.wire.dht_records import FirstSeen
from p2pvbd.wire.peer_wire import MAX_FRAME_BYTES, OPS, OpSpec, PeerError, encode_request
from tests.helpers import settled

# echo may carry padding as big as a block (an op must say so: frames above 64 KiB are refused otherwise).
TEST_OPS = {**OPS, "echo": OpSpec({"n": int}, max_frame=MAX_FRAME_BYTES), "boom": OpSpec(), "refuse": OpSpec(),
            "slow": OpSpec(), "hold": OpSpec(), "stubborn": OpSpec()}
# What the "hold" handler saw: started, and stopped by a cancel (not finished).
HOLD: dict[str, trio.Event] = {}


@pytest.fixture
def alpha(tmp_path: Path) -> trust.HostIdentity:
    return trust.create_swarm(tmp_path / "alpha", "alpha")


@pytest.fixture
def beta(alpha: trust.HostIdentity, tmp_path: Path) -> trust.HostIdentity:
    now = time.time()
    token, record = invites.make_invite(alpha, ["127.0.0.1:1"], 600, now)
    invites.record_invite(alpha.home, record, now=now)
    invite = invites.parse_invite(token)
    key = trust.new_host_key()
    reply = invites.accept_join(alpha, invites.make_join_request(invite, key, "beta"), now)
    return invites.finish_join(tmp_path / "beta", invite, key, "beta", reply)


@pytest.fixture
def gamma(tmp_path: Path) -> trust.HostIdentity:
    return trust.create_swarm(tmp_path / "gamma", "gamma")


async def handler(peer: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
    if op == "echo":
        await trio.sleep(random.random() * 0.02)  # replies come back out of order
        return {"n": body["n"], "peer": peer}
    if op == "refuse":
        raise PeerError("not_found", "no such thing")
    if op == "boom":
        raise RuntimeError("handler bug")
    if op == "slow":
        if (started := HOLD.get("slow")) is not None:
            started.set()
        await trio.sleep(10)
    if op == "hold":
        HOLD["started"].set()
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            HOLD["cancelled"].set()
            raise
    if op == "stubborn":  # cannot be stopped: its reply comes after the client left
        with trio.CancelScope(shield=True):
            await trio.sleep(0.2)
        if (done := HOLD.get("stubborn")) is not None:
            done.set()
    return {}


@pytest.fixture
async def server(alpha: trust.HostIdentity, nursery: trio.Nursery) -> AsyncIterator[int]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = await nursery.start(lambda task_status: pt.serve_peers(
        listeners, trust.server_ssl_context(alpha), handler, ops=TEST_OPS, task_status=task_status))
    yield port


@pytest.fixture
async def join_server(alpha: trust.HostIdentity, nursery: trio.Nursery) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return await nursery.start(pt.serve_join, listeners, alpha)


async def test_many_concurrent_requests(server: int, beta: trust.HostIdentity) -> None:
    results: dict[int, dict[str, Any]] = {}
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as conn:
        assert conn.peer_name == "alpha"

        async def one(n: int) -> None:
            results[n] = await conn.request("echo", {"n": n})

        async with trio.open_nursery() as n:
            for i in range(300):
                n.start_soon(one, i)
    assert results == {i: {"n": i, "peer": "beta"} for i in range(300)}


async def test_two_clients_and_error_replies(server: int, alpha: trust.HostIdentity,
                                             beta: trust.HostIdentity) -> None:
    async with (pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as b,
                pt.open_peer("127.0.0.1", server, trust.client_ssl_context(alpha)) as a):
        with pytest.raises(PeerError) as e:
            await b.request("refuse", {})
        assert (e.value.code, e.value.message) == ("not_found", "no such thing")
        with pytest.raises(PeerError) as e:
            await b.request("boom", {})
        assert e.value.code == "internal"
        with pytest.raises(PeerError) as e:
            await b.request("nope", {})
        assert e.value.code == "unknown_op"
        with pytest.raises(PeerError) as e:
            await b.request("echo", {"n": "one"})
        assert e.value.code == "bad_request"
        with pytest.raises(PeerError) as e:
            await b.request("slow", {}, timeout=0.2)
        assert e.value.code == "timeout"
        # The connection and the server survive all of that.
        assert await b.request("echo", {"n": 1}) == {"n": 1, "peer": "beta"}
        assert await a.request("echo", {"n": 2}) == {"n": 2, "peer": "alpha"}


async def test_other_swarm_is_refused_both_ways(server: int, gamma: trust.HostIdentity, alpha: trust.HostIdentity,
                                                nursery: trio.Nursery) -> None:
    with pytest.raises(PeerError) as e:
        async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(gamma)):
            pytest.fail("a host of another swarm got in")
    assert e.value.code == "connection"
    assert "CERTIFICATE_VERIFY_FAILED" in e.value.message  # gamma's side rejects alpha's certificate
    # And a gamma server refuses alpha's certificate even if alpha trusted gamma's CA.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = await nursery.start(lambda task_status: pt.serve_peers(
        listeners, trust.server_ssl_context(gamma), handler, ops=TEST_OPS, task_status=task_status))
    ctx = trust.client_ssl_context(alpha)
    ctx.load_verify_locations(cadata=gamma.ca_pem.decode())
    with pytest.raises(PeerError) as e:
        async with pt.open_peer("127.0.0.1", port, ctx):
            pytest.fail("gamma's server accepted alpha")
    assert e.value.code == "connection"


async def test_client_without_certificate_is_refused(server: int, alpha: trust.HostIdentity, beta: trust.HostIdentity,
                                                     caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="p2pvbd.swarm.peer_transport")
    monkeypatch.setattr(pt, "_refused_logged", FirstSeen())  # what earlier tests' refusals logged
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=alpha.ca_pem.decode())  # it even trusts the right CA
    for _ in range(3):
        with pytest.raises(PeerError) as e:
            async with pt.open_peer("127.0.0.1", server, ctx):
                pytest.fail("a client without a certificate got in")
        assert e.value.code == "connection"
    # Refused by OpenSSL in the server's handshake, before any request was read; logged once.
    with trio.fail_after(5):  # the server's side of the last handshake ends after the client's
        await settled(lambda: "PEER_DID_NOT_RETURN_A_CERTIFICATE" in caplog.text)
    assert caplog.text.count("PEER_DID_NOT_RETURN_A_CERTIFICATE") == 1, caplog.text
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as conn:
        assert await conn.request("echo", {"n": 5}) == {"n": 5, "peer": "beta"}


async def test_garbage_does_not_stop_the_server(server: int, beta: trust.HostIdentity) -> None:
    garbage = [b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 40, b"\x16\x03\x01\xff\xff" + b"\0" * 100, b""]
    streams = []
    for g in garbage:
        s = await trio.open_tcp_stream("127.0.0.1", server)
        await s.send_all(g)
        streams.append(s)
    # Some of those connections are still hanging mid-handshake; a real peer is served regardless.
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as conn:
        assert await conn.request("echo", {"n": 7}) == {"n": 7, "peer": "beta"}
    for s in streams:
        await trio.aclose_forcefully(s)
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as conn:
        assert await conn.request("echo", {"n": 8}) == {"n": 8, "peer": "beta"}


async def test_member_sending_bad_frames_is_dropped_alone(server: int, beta: trust.HostIdentity) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", server)
    s = trio.SSLStream(tcp, trust.client_ssl_context(beta))
    await s.do_handshake()
    await s.send_all(b"\xff\xff\xff\xff" + b"x" * 64)  # length prefix beyond the limit
    with trio.fail_after(5):
        try:
            while await s.receive_some(1024):
                pass
        except trio.BrokenResourceError:
            pass
    await trio.aclose_forcefully(s)
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as conn:
        assert await conn.request("echo", {"n": 8}) == {"n": 8, "peer": "beta"}


async def test_connection_refused_is_a_peer_error() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(PeerError) as e:
        async with pt.open_peer("127.0.0.1", port, trust.join_client_ssl_context()):
            pass
    assert e.value.code == "connection"


async def test_server_going_away_fails_pending_requests(alpha: trust.HostIdentity, beta: trust.HostIdentity) -> None:
    HOLD["slow"] = trio.Event()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: pt.serve_peers(
            listeners, trust.server_ssl_context(alpha), handler, ops=TEST_OPS, task_status=task_status))
        async with pt.open_peer("127.0.0.1", port, trust.client_ssl_context(beta)) as conn:
            async def stop_soon() -> None:
                await HOLD["slow"].wait()  # the request is being served: the server goes away under it
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_soon)
            with pytest.raises(PeerError) as e:
                await conn.request("slow", {}, timeout=5)
            assert e.value.code == "connection"
            with pytest.raises(PeerError):
                await conn.request("echo", {"n": 1})


async def test_cancelled_request_stops_on_the_server(server: int, beta: trust.HostIdentity) -> None:
    HOLD.update(started=trio.Event(), cancelled=trio.Event())
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as conn:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                n.start_soon(conn.request, "hold", {})
                await HOLD["started"].wait()
                scope.cancel()
        with trio.fail_after(5):
            await HOLD["cancelled"].wait()  # the cancel message reached the handler's task
        assert not conn.lost.is_set()
        assert await conn.request("echo", {"n": 3}) == {"n": 3, "peer": "beta"}


async def test_late_reply_to_a_cancelled_request_is_dropped(server: int, beta: trust.HostIdentity) -> None:
    HOLD["stubborn"] = trio.Event()
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as conn:
        with trio.move_on_after(0.05):
            await conn.request("stubborn", {})
        assert not HOLD["stubborn"].is_set()  # the client left before the reply
        with trio.fail_after(5):
            await HOLD["stubborn"].wait()  # its reply is on its way now, with no one waiting
        assert not conn.lost.is_set()
        assert await conn.request("echo", {"n": 4}) == {"n": 4, "peer": "beta"}


async def test_cancelling_mid_send_never_breaks_the_framing(server: int, beta: trust.HostIdentity) -> None:
    pad = b"x" * (2 << 20)  # several TLS records and socket writes per frame: cancels land inside send_all
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as conn:
        async def one(n: int) -> None:
            with trio.move_on_after(random.random() * 0.05):
                await conn.request("echo", {"n": n, "pad": pad})

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert not conn.lost.is_set()
        assert await conn.request("echo", {"n": 99}) == {"n": 99, "peer": "beta"}


async def test_cancel_is_a_one_way_op(server: int, beta: trust.HostIdentity) -> None:
    """A cancel frame gets no reply, whether it names a request in flight or none (old peers answer
    unknown_op to it, which the client drops too); the connection goes on."""
    assert "cancel" in OPS and "cancel" in pt.JOIN_OPS
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(beta)) as conn:
        watched = trio.Event(), []
        conn._pending[777] = watched  # whatever the server sends under id 777 lands here
        await conn._send_whole(encode_request(777, "cancel", {"id": 12345}), trio.current_time() + 10)
        for n in range(3):  # later frames are read, and answered, after the cancel
            assert await conn.request("echo", {"n": n}) == {"n": n, "peer": "beta"}
        assert not watched[0].is_set() and watched[1] == []
        assert not conn.lost.is_set()


# ---- joining over the network --------------------------------------------------------------------


def new_token(alpha: trust.HostIdentity, port: int, ttl: int = 600, now: float | None = None) -> str:
    now = time.time() if now is None else now
    # Tokens carry peer addresses; the joiner dials the join port next to each.
    peer_port = port - pt.JOIN_PORT_OFFSET
    token, record = invites.make_invite(alpha, ["127.0.0.1:1", f"127.0.0.1:{peer_port}"], ttl, now)
    invites.record_invite(alpha.home, record, now=now)
    return token


async def test_join_then_talk(join_server: int, server: int, alpha: trust.HostIdentity, tmp_path: Path) -> None:
    token = new_token(alpha, join_server)  # the first address is dead: the joiner moves on to the next
    delta = await pt.join_swarm(tmp_path / "delta", token, "delta", connect_timeout=5)
    assert delta.name == "delta" and not delta.can_invite
    assert delta.ca_fingerprint == alpha.ca_fingerprint and delta.swarm_secret == alpha.swarm_secret
    async with pt.open_peer("127.0.0.1", server, trust.client_ssl_context(delta)) as conn:
        assert await conn.request("echo", {"n": 9}) == {"n": 9, "peer": "delta"}


async def test_reused_invite_is_refused(join_server: int, alpha: trust.HostIdentity, tmp_path: Path) -> None:
    token = new_token(alpha, join_server)
    await pt.join_swarm(tmp_path / "delta", token, "delta")
    with pytest.raises(invites.InviteError, match="already used"):
        await pt.join_swarm(tmp_path / "epsilon", token, "epsilon")
    assert not trust.has_identity(tmp_path / "epsilon")


async def test_expired_invite_is_refused(join_server: int, alpha: trust.HostIdentity, tmp_path: Path) -> None:
    token = new_token(alpha, join_server, ttl=60, now=time.time() - 120)
    with pytest.raises(invites.InviteError, match="expired"):
        await pt.join_swarm(tmp_path / "delta", token, "delta")


async def test_taken_name_does_not_burn_the_invite(join_server: int, alpha: trust.HostIdentity,
                                                    tmp_path: Path) -> None:
    token = new_token(alpha, join_server)
    with pytest.raises(invites.InviteError, match="already taken"):
        await pt.join_swarm(tmp_path / "delta", token, "alpha")
    assert (await pt.join_swarm(tmp_path / "delta", token, "delta")).name == "delta"


async def test_joiner_will_not_talk_to_another_swarm(alpha: trust.HostIdentity, gamma: trust.HostIdentity,
                                                     nursery: trio.Nursery, tmp_path: Path) -> None:
    # gamma serves the join port at the address alpha's token names: the pin must stop the joiner.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = await nursery.start(pt.serve_join, listeners, gamma)
    token = new_token(alpha, port)
    with pytest.raises(trust.TrustError, match="does not match"):
        await pt.join_swarm(tmp_path / "delta", token, "delta")
    assert not trust.has_identity(tmp_path / "delta")


async def test_join_port_serves_no_peer_ops(join_server: int) -> None:
    async with pt.open_peer("127.0.0.1", join_server, trust.join_client_ssl_context()) as conn:
        assert conn.peer_name == ""
        with pytest.raises(PeerError) as e:
            await conn.request("get_version_map", {"disk": "d"})
        assert e.value.code == "unknown_op"


async def test_a_link_carries_requests_both_ways(alpha: trust.HostIdentity, beta: trust.HostIdentity,
                                                 nursery: trio.Nursery) -> None:
    """The server asks its client over the link the client opened (how a host behind NAT is reached),
    concurrently with the client's own requests; a client that serves nothing drops a link that asks."""
    links: list[pt.PeerConnection] = []
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = await nursery.start(lambda task_status: pt.serve_peers(
        listeners, trust.server_ssl_context(alpha), handler, ops=TEST_OPS, on_link=links.append,
        task_status=task_status))
    async with pt.open_peer("127.0.0.1", port, trust.client_ssl_context(beta), handler=handler,
                            ops=TEST_OPS) as conn:
        (back,) = links
        assert back.peer_name == "beta"
        mine: dict[int, Any] = {}
        theirs: dict[int, Any] = {}

        async def ask(into: dict[int, Any], link: pt.PeerConnection, n: int) -> None:
            into[n] = await link.request("echo", {"n": n})

        async with trio.open_nursery() as n:
            for i in range(50):
                n.start_soon(ask, mine, conn, i)
                n.start_soon(ask, theirs, back, i)
        assert mine == {i: {"n": i, "peer": "beta"} for i in range(50)}
        assert theirs == {i: {"n": i, "peer": "alpha"} for i in range(50)}
        with pytest.raises(PeerError, match="no such thing"):
            await back.request("refuse", {})
    await back.lost.wait()  # the client closed its link: the server's side of it is gone too

    async with pt.open_peer("127.0.0.1", port, trust.client_ssl_context(beta)) as plain:
        back = links[-1]
        with pytest.raises(PeerError):
            await back.request("echo", {"n": 1}, timeout=5)
        await plain.lost.wait()  # it broke the protocol: the link is dropped


class _Carrier(trio.abc.Stream):
    """Whatever carries a relayed link's bytes (swarm/relay.py), as the relay host sees them: it records
    every byte, and may flip one."""

    def __init__(self, inner: trio.abc.Stream, seen: bytearray, flip_at: int | None) -> None:
        self.inner, self.seen, self.flip_at = inner, seen, flip_at

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        out = bytearray(data)
        if self.flip_at is not None and len(self.seen) <= self.flip_at < len(self.seen) + len(out):
            out[self.flip_at - len(self.seen)] ^= 0x01
        self.seen += data
        await self.inner.send_all(bytes(out))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.seen += data
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("flip", [False, True])
async def test_a_carrier_of_a_link_can_neither_read_nor_alter_it(alpha: trust.HostIdentity, beta: trust.HostIdentity,
                                                                 flip: bool) -> None:
    """The ends' own TLS runs inside a relayed link: the carrier sees no plaintext, and a byte it alters
    ends the link instead of reaching the other end."""
    secret = b"the guest's plaintext block" * 100
    a, b = trio.testing.memory_stream_pair()
    seen = bytearray()
    got: list[dict[str, Any]] = []

    async def echo(peer: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        got.append(body)
        return {"n": body["n"]}

    ops = {**OPS, "echo": OpSpec({"n": int, "data": bytes})}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(pt.serve_link, b, "carried", trust.server_ssl_context(alpha), echo, ops=ops))
        carrier = _Carrier(a, seen, flip_at=6000 if flip else None)  # inside the request carrying `secret`
        try:
            async with pt.open_peer_over(carrier, "alpha via carrier", trust.client_ssl_context(beta)) as conn:
                assert conn.peer_name == "alpha"
                reply = await conn.request("echo", {"n": 7, "data": secret}, timeout=5)
                assert not flip, "an altered link delivered a reply"
                assert reply == {"n": 7} and got == [{"n": 7, "data": secret}]
        except PeerError:
            assert flip
            assert got == []  # nothing altered reached the handler
        assert len(seen) > len(secret) and b"plaintext" not in seen
        nursery.cancel_scope.cancel()
