"""DHT lookup latency and hop count for in-process swarms on loopback.

Usage: .venv/bin/python bench/dht_lookup.py [SIZES...]   (default: 50 200 1000)

Every node is a real p2pvbd.dht.DhtNode on its own 127.0.0.1 UDP port, all sharing one
trio-asyncio loop. Node i joins through up to JOIN_SEEDS random earlier nodes (JOIN_BATCH joins
run at once). KEYS `holders` keys are published by random nodes (PUBLISHERS_PER_KEY each), then
LOOKUPS sequential lookups from random nodes are timed. "hops" is the number of sequential RPCs on
the shortest discovery path to a node holding the value (1 = the lookup's first round already
asked a holder); "rounds" counts crawler iterations, which include kademlia's final sweep of the
k closest. Target: median hops <= 4 at 1000 nodes.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time

import trio
import trio_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pvbd.dht import DhtNode, LookupTrace
from p2pvbd.wire.dht_records import holders_payload

JOIN_SEEDS = 3  # a new host knows a few peers (saved bootstrap list or the swarm invitation)
JOIN_BATCH = 10  # joins in flight at once: fast to build, still a mostly sequential-growth network
KEYS = 20
PUBLISHERS_PER_KEY = 3
LOOKUPS = 200
SEED = 1


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def build(n: int, nursery: trio.Nursery, rng: random.Random) -> list[DhtNode]:
    secret = os.urandom(32)
    nodes: list[DhtNode] = []
    ports: list[int] = []
    for i in range(n):
        node = DhtNode(host_name=f"host{i}", signing_key=Ed25519PrivateKey.generate(), swarm_secret=secret)
        ports.append(await nursery.start(node.run, "127.0.0.1", 0, []))
        nodes.append(node)
    for start in range(1, n, JOIN_BATCH):
        async with trio.open_nursery() as joins:
            for i in range(start, min(n, start + JOIN_BATCH)):
                seeds = rng.sample(range(min(i, start)), min(JOIN_SEEDS, start))
                joins.start_soon(nodes[i].bootstrap, [("127.0.0.1", ports[s]) for s in seeds])
    return nodes


async def bench(n: int) -> dict[str, float]:
    rng = random.Random(SEED)
    t0 = time.perf_counter()
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        nodes = await build(n, nursery, rng)
        t_built = time.perf_counter()
        published: dict[str, set[str]] = {}
        for k in range(KEYS):
            key = f"disk{k}"
            for p in rng.sample(range(n), PUBLISHERS_PER_KEY):
                await nodes[p].publish("holders", key, holders_payload(f"host{p}", 1000, 1))
                published.setdefault(key, set()).add(f"host{p}")
        t_published = time.perf_counter()
        latencies, hops, rounds, contacted, complete = [], [], [], [], 0
        for _ in range(LOOKUPS):
            key = rng.choice(sorted(published))
            trace = LookupTrace()
            t = trio.current_time()
            recs = await rng.choice(nodes).lookup("holders", key, trace=trace)
            latencies.append((trio.current_time() - t) * 1000)
            complete += {r.publisher for r in recs} == published[key]
            hops.append(trace.hops)
            rounds.append(trace.rounds)
            contacted.append(trace.contacted)
        t_done = time.perf_counter()
        nursery.cancel_scope.cancel()
    return {
        "nodes": n, "build_s": t_built - t0, "publish_s": t_published - t_built, "lookup_s": t_done - t_published,
        "complete": complete / LOOKUPS, "lat_median_ms": statistics.median(latencies),
        "lat_p95_ms": _pct(latencies, 0.95), "hops_median": statistics.median(hops), "hops_max": max(hops),
        "rounds_median": statistics.median(rounds), "contacted_median": statistics.median(contacted),
        "bad": sum(sum(v for k, v in node.stats.items()) for node in nodes),
    }


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [50, 200, 1000]
    print(f"{'nodes':>6} {'build s':>8} {'complete':>8} {'lat med ms':>10} {'lat p95 ms':>10} "
          f"{'hops med':>8} {'hops max':>8} {'rounds med':>10} {'asked med':>9} {'drops':>5}")
    for n in sizes:
        r = trio.run(bench, n)
        print(f"{r['nodes']:>6} {r['build_s']:>8.1f} {r['complete']:>8.0%} {r['lat_median_ms']:>10.1f} "
              f"{r['lat_p95_ms']:>10.1f} {r['hops_median']:>8} {r['hops_max']:>8} {r['rounds_median']:>10} "
              f"{r['contacted_median']:>9} {r['bad']:>5}", flush=True)


if __name__ == "__main__":
    main()
