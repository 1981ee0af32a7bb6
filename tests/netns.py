"""Real, shaped network links for tests and benchmarks: hosts in Linux network namespaces.

Layout of one :class:`Network`::

    namespace p2pv-<pid>-<k>-br          namespace p2pv-<pid>-<k>-<name>
    +--------------------------------+   +-------------------------------+
    | br0 (bridge, no address)       |   | lo (up)                       |
    |   +- h1  <====== veth ======>  |---|  eth0  10.77.0.1/24           |
    |   +- h2  <====== veth ======>  |---|  ...   (next host)            |
    +--------------------------------+   +-------------------------------+

Everything lives in namespaces this module creates: the root namespace gets no interface, no
address and no route, and the host namespaces have no default route, so traffic can only reach
the other hosts of the same network (or the host's own loopback).

Shaping uses ``tbf`` (this kernel has no netem): ``upload`` is a tbf on the egress of the host's
``eth0``, ``download`` a tbf on the egress of the bridge-side end of its veth. Rates are link
rates (ethernet frames, headers included, like a real link): TCP goodput with MTU 1500 and
timestamps is 1448/1514 ≈ 95.6 % of the rate. Loss uses nftables ``numgen random`` rules inside
the host namespace, cuts ``ip link set … down`` on the bridge side.

Usage::

    from tests.netns import Network, require_root

    require_root()                      # pytest.skip with a reason unless usable
    with Network() as net:
        a = net.add_host("a", upload="50mbit", download="100mbit")
        b = net.add_host("b")
        b.popen(sys.executable, "-m", "http.server", "--bind", b.address, "8000")
        a.run("curl", f"http://{b.address}:8000/")
        net.shape(a, upload="10mbit")   # live change
        net.cut(b); net.restore(b)
        net.readdress(b)                # b moves to another address
        net.loss(a, 5)                  # 5 % drop each direction

Namespaces are named ``p2pv-<pid>-…``. They are removed by :meth:`Network.close` (also on an
exception in the ``with`` block), at interpreter exit, and — for runs that died without either —
by :func:`cleanup_stale`, which every new :class:`Network` calls first.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

PREFIX = "p2pv-"
NETNS_DIR = "/run/netns"
# The routing table of a second link's source rule (plug_beside_nat): any free id below 253 (local, main).
SOURCE_TABLE = "100"

# Host names become part of namespace names (files in /run/netns).
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")

_counter = itertools.count(1)
_live: set[Network] = set()
_lock = threading.Lock()


class NetnsError(RuntimeError):
    """An ip/tc/nft command of the harness failed."""


# --------------------------------------------------------------------------- helpers


def _cmd(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, input=input, timeout=60)
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2)"
    return None


def require_root() -> None:
    """``pytest.skip`` (with the reason) unless network namespaces can be made here."""
    reason = unavailable_reason()
    if reason is not None:
        import pytest

        pytest.skip(reason)


def require_nft() -> None:
    """``pytest.skip`` unless nftables is installed (needed by :meth:`Network.loss`)."""
    require_root()
    if shutil.which("nft") is None:
        import pytest

        pytest.skip("needs nft (apt-get install nftables)")


_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(bit|bps)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_rate(rate: str | int | float) -> int:
    """Bits per second of a rate: ``"50mbit"``, ``"1gbit"``, ``"500kbit"``, ``"2mbps"`` (bytes/s,
    as in tc) or a plain number of bits per second."""
    if isinstance(rate, int | float):
        bits = int(rate)
    else:
        m = _RATE_RE.match(rate)
        if not m:
            raise ValueError(f"bad rate {rate!r} (examples: '50mbit', '1gbit', 20_000_000)")
        value, scale, unit = float(m.group(1)), _SCALE[m.group(2).lower()], (m.group(3) or "bit").lower()
        bits = int(value * scale * (8 if unit == "bps" else 1))
    if bits <= 0:
        raise ValueError(f"rate must be positive: {rate!r}")
    return bits


# tbf parameters (measured on this kernel with a single Python TCP flow through the qdisc; the
# qdisc's byte counter came out at 0.998–1.001× the rate for 1 Mbit/s … 1 Gbit/s, goodput at the
# expected 1448/1514 of it):
#
# burst = max(10 ms of the rate, 8 full frames). The bucket must cover the time between two
#   dequeues: tbf is woken by an hrtimer, but on a loaded machine (many peers on a couple of CPUs)
#   softirqs run late, and every ms of lateness beyond the burst is bandwidth lost for good — with
#   4 ms bursts, runs on the busy test box lost up to 2 %; with 10 ms, none of ~20 did. A bigger burst only
#   lets through one extra burst after idle time: 10 ms of the rate is 0.2 % over a 5 s window.
#   The 8-frame floor keeps very slow links from needing a wake-up per packet, and adds at most
#   ~2 % over 5 s at 1 Mbit/s (larger floors — 32 or 64 KiB — made 1–5 Mbit/s links bursty: goodput
#   over 5 s windows swung by up to ±5 %, and one 1 Mbit/s run stalled down to 0.83×).
#   veth offloads stay on (ethtool is not needed): TSO/GSO hands tbf super-packets of up to 64 KiB,
#   and tbf software-segments any GSO packet larger than its burst (tbf_segment) instead of
#   dropping it; measured accurate with bursts from 3 KiB to 64 KiB, so no 64 KiB burst is needed.
# limit = 50 ms of the rate + burst: the queue a real access link would have; enough for TCP to
#   keep the link full, small enough that a saturated link adds at most ~50 ms of delay.
TBF_BURST_S = 0.010
TBF_MIN_BURST = 8 * 1514
TBF_LATENCY_S = 0.050


def tbf_params(rate: str | int | float) -> dict[str, int]:
    """The tbf parameters used for ``rate``: rate (bit/s), burst and limit (bytes)."""
    bits = parse_rate(rate)
    byte_rate = bits / 8
    burst = max(int(byte_rate * TBF_BURST_S), TBF_MIN_BURST)
    limit = int(byte_rate * TBF_LATENCY_S) + burst
    return {"rate": bits, "burst": burst, "limit": limit}


def _tbf_args(rate: str | int | float) -> list[str]:
    p = tbf_params(rate)
    return ["tbf", "rate", f"{p['rate']}bit", "burst", str(p["burst"]), "limit", str(p["limit"])]


def _set_tbf(ns: str, dev: str, rate: str | int | float | None) -> None:
    if rate is None:
        # No shaping: back to the default qdisc (deleting when there is none is not an error).
        _cmd("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
    else:
        _cmd("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *_tbf_args(rate))


def qdiscs(ns: str, dev: str) -> list[dict[str, Any]]:
    """``tc -j -s qdisc show`` of a device inside a namespace (rates there are in bytes/s)."""
    import json

    return json.loads(_cmd("tc", "-n", ns, "-j", "-s", "qdisc", "show", "dev", dev).stdout or "[]")


def list_namespaces() -> list[str]:
    """Names of all network namespaces of this harness (any pid)."""
    res = _cmd("ip", "netns", "list", check=False)
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of a process (±1 s: boot time is in whole seconds), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(ns: str, pid: int) -> bool:
    """Whether process ``pid`` that named namespace ``ns`` still runs (and is not a reused pid)."""
    if pid == os.getpid():
        with _lock:
            return any(ns.startswith(net.prefix) for net in _live)
    if not _pid_alive(pid):
        return False
    started = _process_start_time(pid)
    try:
        created = os.stat(os.path.join(NETNS_DIR, ns)).st_mtime
    except OSError:
        return True
    # A process that started after the namespace was made cannot have made it: the pid was reused.
    return started is None or started <= created + 2.0


def _kill_ns_processes(ns: str, grace: float = 0.0) -> None:
    """Kill the processes still running inside namespace ``ns`` (all are ours: we made it)."""
    res = _cmd("ip", "netns", "pids", ns, check=False)
    pids = [int(p) for p in res.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for sig in ([signal.SIGTERM] if grace > 0 else []) + [signal.SIGKILL]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGTERM:
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
                time.sleep(0.02)


def _delete_ns(ns: str) -> None:
    _kill_ns_processes(ns)
    _cmd("ip", "netns", "del", ns, check=False)


def cleanup_stale() -> list[str]:
    """Remove ``p2pv-<pid>-…`` namespaces whose creating process is gone (dead, or its pid now
    belongs to a younger process; for this process: not of a live :class:`Network`); returns
    their names."""
    removed = []
    for ns in list_namespaces():
        parts = ns.split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        if _owner_alive(ns, int(parts[1])):
            continue
        _delete_ns(ns)
        removed.append(ns)
    return removed


# --------------------------------------------------------------------------- hosts


class NsHost:
    """One host: a network namespace with ``lo`` and ``eth0`` (``address``) on the network."""

    def __init__(self, network: Network, name: str, ns: str, address: str, index: int) -> None:
        self.network = network
        self.name = name
        self.ns = ns
        self.address = address
        self.dev = "eth0"  # inside self.ns
        self.bridge_dev = f"h{index}"  # inside network.ns
        self.upload: int | None = None  # bit/s, None = unshaped
        self.download: int | None = None
        self.loss_percent: float = 0.0
        self.is_cut = False
        self._procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"NsHost({self.name!r}, ns={self.ns!r}, address={self.address!r})"

    def exec_prefix(self) -> list[str]:
        """Prefix running a command inside this host: ``["ip", "netns", "exec", ns]``."""
        return ["ip", "netns", "exec", self.ns]

    def _argv(self, cmd: Sequence[Any]) -> list[str]:
        if len(cmd) == 1 and isinstance(cmd[0], list | tuple):
            cmd = cmd[0]
        return [*self.exec_prefix(), *map(str, cmd)]

    def run(self, *cmd: Any, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside this host (``host.run("ping", "-c1", other.address)``)."""
        kw.setdefault("timeout", 300)
        return subprocess.run(self._argv(cmd), **kw)

    def popen(self, *cmd: Any, **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside this host; still-running ones are killed by ``close()``."""
        proc = subprocess.Popen(self._argv(cmd), **kw)
        self._procs.append(proc)
        return proc

    def _stop_procs(self, grace: float) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


# --------------------------------------------------------------------------- network


class Network:
    """A bridge (in its own namespace) and hosts attached to it by veth pairs.

    Context manager; ``close()`` is idempotent and also runs at interpreter exit.
    """

    def __init__(self, subnet: str = "10.77.0.0/24", prefix: str = PREFIX) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        self.subnet = ipaddress.ip_network(subnet)
        if not self.subnet.is_private:
            raise ValueError(f"subnet {subnet} is not private")
        self._addresses = self.subnet.hosts()
        self.prefix = f"{prefix}{os.getpid()}-{next(_counter)}-"
        self.ns = self.prefix + "br"
        self.hosts: dict[str, NsHost] = {}
        self._index = itertools.count(1)
        self._closed = False
        cleanup_stale()
        with _lock:
            _live.add(self)
        try:
            _cmd("ip", "netns", "add", self.ns)
            self._ip("link", "set", "lo", "up")
            self._ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
            self._ip("link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> NsHost:
        return self.hosts[name]

    def _ip(self, *args: str, ns: str | None = None) -> None:
        _cmd("ip", "-n", ns or self.ns, *args)

    def _host(self, host: NsHost | str) -> NsHost:
        h = self.hosts[host] if isinstance(host, str) else host
        if h.network is not self:
            raise ValueError(f"{h!r} is not on this network")
        return h

    def add_host(self, name: str, *, upload: str | int | None = None, download: str | int | None = None) -> NsHost:
        """A new host ``name`` with the next address of the subnet.

        ``upload``/``download``: rate limits (``"50mbit"``, bit/s as int) of the host's link
        towards/from the bridge; None = unshaped.
        """
        if self._closed:
            raise NetnsError("network is closed")
        if not _NAME_RE.match(name):
            raise ValueError(f"bad host name {name!r} (letters, digits, '_', '.' and '-')")
        if name in self.hosts or name == "br":
            raise ValueError(f"host name {name!r} already used")
        try:
            address = str(next(self._addresses))
        except StopIteration:
            raise NetnsError(f"subnet {self.subnet} is full") from None
        host = NsHost(self, name, self.prefix + name, address, next(self._index))
        _cmd("ip", "netns", "add", host.ns)
        self.hosts[name] = host
        try:
            self._plug(host)
            self.shape(host, upload=upload, download=download)
        except BaseException:
            del self.hosts[name]
            _delete_ns(host.ns)
            raise
        return host

    def _plug(self, host: NsHost) -> None:
        # Created inside the bridge namespace with the peer moved straight into the host's, so
        # neither end ever appears in the root namespace.
        self._ip("link", "add", host.bridge_dev, "type", "veth", "peer", "name", host.dev, "netns", host.ns)
        self._ip("link", "set", host.bridge_dev, "master", "br0", "up")
        self._ip("link", "set", "lo", "up", ns=host.ns)
        self._ip("addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", host.dev, ns=host.ns)
        self._ip("link", "set", host.dev, "up", ns=host.ns)

    def shape(self, host: NsHost | str, upload: Any = ..., download: Any = ...) -> None:
        """Set (``tc qdisc replace``, live) or remove (None) the rate limits; ``...`` = unchanged."""
        h = self._host(host)
        for rate in (upload, download):
            if rate is not ... and rate is not None:
                parse_rate(rate)  # a bad rate changes nothing
        if upload is not ...:
            _set_tbf(h.ns, h.dev, upload)
            h.upload = None if upload is None else parse_rate(upload)
        if download is not ...:
            _set_tbf(self.ns, h.bridge_dev, download)
            h.download = None if download is None else parse_rate(download)

    def add_nat_host(self, name: str, lan: str, ports: str = "kept") -> NsHost:
        """A host behind its own NAT router, as a home PC behind a DSL router or a car PC behind carrier
        NAT: the router (host ``<name>-nat`` on this network) masquerades the host's private subnet
        ``lan`` (nftables), so the host reaches every other host while none can connect to it: like a
        home router's firewall, it drops what arrives unasked rather than answering it. The host's
        ``address`` is its private one (what it sees and would advertise).

        ``ports``: "kept", a connection's public port is its local one where free (Linux's masquerade;
        most home routers: hole punching works); "random", a new random one per connection (a
        symmetric NAT, as some carriers run: punching fails)."""
        if ports not in ("kept", "random"):
            raise ValueError(f"ports must be 'kept' or 'random', not {ports!r}")
        subnet = ipaddress.ip_network(lan)
        if not subnet.is_private:
            raise ValueError(f"subnet {lan} is not private")
        router = self.add_host(f"{name}-nat")
        gateway, address = (str(a) for a in itertools.islice(subnet.hosts(), 2))
        host = NsHost(self, name, self.prefix + name, address, next(self._index))
        host.bridge_dev = ""  # not on the bridge: shape(), cut() and loss() do not apply
        _cmd("ip", "netns", "add", host.ns)
        self.hosts[name] = host
        self._ip("link", "add", "lan0", "type", "veth", "peer", "name", host.dev, "netns", host.ns, ns=router.ns)
        self._ip("addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", "lan0", ns=router.ns)
        self._ip("link", "set", "lan0", "up", ns=router.ns)
        self._ip("link", "set", "lo", "up", ns=host.ns)
        self._ip("addr", "add", f"{address}/{subnet.prefixlen}", "dev", host.dev, ns=host.ns)
        self._ip("link", "set", host.dev, "up", ns=host.ns)
        self._ip("route", "add", "default", "via", gateway, ns=host.ns)
        _cmd(*router.exec_prefix(), "sysctl", "-qw", "net.ipv4.ip_forward=1")
        wan = router.dev
        unasked = f'iifname "{wan}" ct state established,related accept; iifname "{wan}" drop;'
        script = ("table ip p2pv_nat {\n"
                  "  chain post { type nat hook postrouting priority 100; policy accept;\n"
                  f'    oifname "{wan}" masquerade{" random" if ports == "random" else ""}\n  }}\n'
                  f"  chain wan_in {{ type filter hook input priority 0; policy accept; {unasked} }}\n"
                  f"  chain wan_fwd {{ type filter hook forward priority 0; policy accept; {unasked} }}\n"
                  "}\n")
        _cmd(*router.exec_prefix(), "nft", "-f", "-", input=script)
        return host

    def plug_beside_nat(self, host: NsHost | str) -> str:
        """Give a host behind its NAT router (``add_nat_host``) a second link straight onto the network,
        as a laptop plugged into the office LAN while its mobile link stays up: connections it opens still
        leave through its NAT (the default route stays), and what arrives at the new address is answered
        from it (a source rule). Its open connections live on. Returns the new address."""
        h = self._host(host)
        if h.bridge_dev:
            raise ValueError(f"{h.name} is not behind NAT")
        try:
            address = str(next(self._addresses))
        except StopIteration:
            raise NetnsError(f"subnet {self.subnet} is full") from None
        dev, bridge_dev = "eth1", f"h{next(self._index)}"
        self._ip("link", "add", bridge_dev, "type", "veth", "peer", "name", dev, "netns", h.ns)
        self._ip("link", "set", bridge_dev, "master", "br0", "up")
        # noprefixroute: the network's own route would pull every connection off the NAT
        self._ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", dev, "noprefixroute", ns=h.ns)
        self._ip("link", "set", dev, "up", ns=h.ns)
        self._ip("route", "add", str(self.subnet), "dev", dev, "table", SOURCE_TABLE, ns=h.ns)
        self._ip("rule", "add", "from", address, "table", SOURCE_TABLE, ns=h.ns)
        return address

    def readdress(self, host: NsHost | str) -> str:
        """Move the host to the subnet's next free address (as a laptop that joined another network),
        dropping the old one; established connections to the old address go silent. Returns the new one."""
        h = self._host(host)
        try:
            address = str(next(self._addresses))
        except StopIteration:
            raise NetnsError(f"subnet {self.subnet} is full") from None
        # Old one first: deleting a primary address also deletes the secondaries of its subnet.
        self._ip("addr", "del", f"{h.address}/{self.subnet.prefixlen}", "dev", h.dev, ns=h.ns)
        self._ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", h.dev, ns=h.ns)
        h.address = address
        return address

    def cut(self, host: NsHost | str) -> None:
        """Unplug the host: its bridge port goes down (``eth0`` loses carrier)."""
        h = self._host(host)
        self._ip("link", "set", h.bridge_dev, "down")
        h.is_cut = True

    def restore(self, host: NsHost | str) -> None:
        """Plug the host back in after :meth:`cut`."""
        h = self._host(host)
        self._ip("link", "set", h.bridge_dev, "up")
        h.is_cut = False

    def loss(self, host: NsHost | str, percent: float) -> None:
        """Drop ``percent`` % (0–100, steps of 0.01) of packets entering and, independently,
        leaving the host's ``eth0``, with nftables inside its namespace; 0 removes the rules."""
        h = self._host(host)
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be within 0..100: {percent}")
        if shutil.which("nft") is None:
            raise NetnsError("loss() needs nft (apt-get install nftables)")
        threshold = round(percent * 100)  # out of 10000
        script = "add table inet p2pv_loss\ndelete table inet p2pv_loss\n"  # create-then-delete: idempotent
        if threshold > 0:
            # numgen's value range is 0..9999, so "< 10000" does not parse: 100 % is a plain drop.
            drop = "drop" if threshold >= 10000 else f"numgen random mod 10000 < {threshold} drop"
            script += (
                "table inet p2pv_loss {\n"
                "  chain input { type filter hook input priority -300; policy accept;\n"
                f'    iifname "{h.dev}" {drop}\n  }}\n'
                "  chain output { type filter hook output priority -300; policy accept;\n"
                f'    oifname "{h.dev}" {drop}\n  }}\n'
                "}\n"
            )
        _cmd(*h.exec_prefix(), "nft", "-f", "-", input=script)
        h.loss_percent = float(percent)

    def close(self, grace: float = 3.0) -> None:
        """Stop processes started in the hosts and delete all namespaces of this network."""
        if self._closed:
            return
        self._closed = True
        try:
            for h in self.hosts.values():
                h._stop_procs(grace)
            for h in self.hosts.values():
                _delete_ns(h.ns)
            _delete_ns(self.ns)
            # Belt and braces: anything with our prefix that a failed add_host may have left.
            for ns in list_namespaces():
                if ns.startswith(self.prefix):
                    _delete_ns(ns)
        finally:
            with _lock:
                _live.discard(self)


@atexit.register
def _close_all() -> None:
    with _lock:
        nets = list(_live)
    for net in nets:
        with contextlib.suppress(Exception):
            net.close(grace=0.5)
