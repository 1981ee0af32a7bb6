"""How a sync's blocks are split among the peers holding them, so all are predicted to finish together.

Blocks are grouped by the set of peers holding them (a bitmask). If a group's bytes could be divided at
will, the best split is a max-flow problem (groups -> holders -> sink, each peer's capacity its rate times
the makespan), solved for the smallest feasible makespan; ``discretise`` then rounds that fluid split to
whole blocks. Used by ``sync_planner.plan_sync`` for the static plan and by ``SyncScheduler`` whenever
it re-splits queued work.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

# Up to this many peers, holder sets are counted with bincount (2**16 bins) instead of sorting.
BINCOUNT_PEERS = 16
# Relative tolerance of the float max-flow in the fluid balance.
_EPS = 1e-9

Array = npt.NDArray


def holder_groups(masks: Array[np.unsignedinteger], npeers: int) -> tuple[list[int], Array[np.intp], Array[np.int64]]:
    """Distinct holder sets, each block's group and the blocks per group; O(n) for few peers."""
    if npeers > BINCOUNT_PEERS:
        uniq, inverse, counts = np.unique(masks, return_inverse=True, return_counts=True)
        return uniq.tolist(), inverse.ravel(), counts
    per_set = np.bincount(masks, minlength=1 << npeers)
    present = np.flatnonzero(per_set)
    lut = np.zeros(per_set.size, np.min_scalar_type(present.size))  # a small type: argsort radix-sorts it
    lut[present] = np.arange(present.size)
    return present.tolist(), lut[masks], per_set[present]


def fluid_balance(gmasks: list[int], gbytes: Array[np.float64], rates: Array[np.float64]
                  ) -> tuple[float, Array[np.float64]]:
    """Smallest makespan T if each group's bytes could be split freely among its holders, and that split.

    T is feasible iff the flow source -> group (its bytes) -> holder -> sink (rate * T) saturates, so by
    max-flow/min-cut T* = max over peer sets Q of bytes(groups held only within Q) / rate(Q). Dinkelbach:
    start at total / sum(rates); while the flow falls short, the min cut names a set Q with a larger
    ratio; move T there. T grows through ratios of finitely many sets, in practice a few steps.
    """
    ng, npeers, total = len(gmasks), rates.size, float(gbytes.sum())
    flows = np.zeros((ng, npeers))
    if not ng:
        return 0.0, flows
    holders = [[p for p in range(npeers) if m >> p & 1] for m in gmasks]
    src, sink, t = ng + npeers, ng + npeers + 1, total / float(rates[sorted({p for h in holders for p in h})].sum())
    while True:
        net = _Flow(ng + npeers + 2)
        edges = [[net.add(g, ng + p, math.inf) for p in h] for g, h in enumerate(holders)]
        for g in range(ng):
            net.add(src, g, float(gbytes[g]))
        for p in range(npeers):
            net.add(ng + p, sink, float(rates[p]) * t * (1 + _EPS))
        if net.max_flow(src, sink, total * _EPS) >= total * (1 - _EPS):
            break
        reach = net.levels(src, total * _EPS)
        q = [p for p in range(npeers) if reach[ng + p] >= 0]
        inside = [g for g, h in enumerate(holders) if set(h) <= set(q)]
        nxt = float(gbytes[inside].sum()) / float(rates[q].sum())
        if nxt <= t * (1 + _EPS):  # float noise only; the split below still covers every byte
            break
        t = nxt
    for g, h in enumerate(holders):
        flows[g, h] = [net.cap[e ^ 1] for e in edges[g]]  # an edge's flow is its reverse's capacity
        if flows[g].sum() <= 0:
            flows[g, max(h, key=lambda p: rates[p])] = gbytes[g]
    return t, flows


class _Flow:
    """Dinic's max-flow on float capacities: ~0.1 s for 4095 holder sets of 12 peers."""

    def __init__(self, nodes: int) -> None:
        self.adj: list[list[int]] = [[] for _ in range(nodes)]
        self.to: list[int] = []
        self.cap: list[float] = []

    def add(self, u: int, v: int, cap: float) -> int:
        for a, b, c in ((u, v, cap), (v, u, 0.0)):
            self.adj[a].append(len(self.to))
            self.to.append(b)
            self.cap.append(c)
        return len(self.to) - 2

    def levels(self, s: int, eps: float) -> list[int]:
        """BFS depth of each node over edges with capacity left; -1 where unreachable."""
        level, frontier = [-1] * len(self.adj), [s]
        level[s] = 0
        for u in frontier:
            for e in self.adj[u]:
                if self.cap[e] > eps and level[self.to[e]] < 0:
                    level[self.to[e]] = level[u] + 1
                    frontier.append(self.to[e])
        return level

    def max_flow(self, s: int, t: int, eps: float) -> float:
        total = 0.0
        while (level := self.levels(s, eps))[t] >= 0:
            it = [0] * len(self.adj)

            def push(u: int, limit: float, level: list[int] = level, it: list[int] = it) -> float:
                if u == t:
                    return limit
                while it[u] < len(self.adj[u]):
                    e = self.adj[u][it[u]]
                    if (self.cap[e] > eps and level[self.to[e]] == level[u] + 1
                            and (got := push(self.to[e], min(limit, self.cap[e]))) > eps):
                        self.cap[e] -= got
                        self.cap[e ^ 1] += got
                        return got
                    it[u] += 1
                return 0.0

            while (got := push(s, math.inf)) > eps:
                total += got
        return total


def discretise(flows: Array[np.float64], counts: Array[np.int64], inverse: Array[np.intp]
               ) -> tuple[Array[np.unsignedinteger], Array[np.int64]]:
    """Each block's peer, and blocks per peer: a group's sorted blocks cut into runs sized by the split.

    Rounding carries each peer's accumulated deficit from group to group, so its total stays within
    about a block of its fluid share rather than drifting by one block per group.
    """
    ng, npeers = flows.shape
    who = np.empty(inverse.size, np.min_scalar_type(npeers))
    order = np.argsort(inverse, kind="stable")  # blocks by group, ascending index within a group
    deficit, start, per_peer = np.zeros(npeers), 0, np.zeros(npeers, np.int64)
    for g in range(ng):
        share = flows[g] / flows[g].sum() * counts[g]
        take = np.floor(share).astype(np.int64)
        if (left := int(counts[g] - take.sum())) > 0:
            key = np.where(flows[g] > 0, deficit + share - take, -np.inf)
            take[np.argsort(-key, kind="stable")[:left]] += 1
        deficit += share - take
        per_peer += take
        for p in np.flatnonzero(take).tolist():
            who[order[start:start + take[p]]] = p
            start += int(take[p])
    return who, per_peer
