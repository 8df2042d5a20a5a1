# -*- test-case-name: tests.unit.test_placement -*-
"""Placement: which live agents get the copies (or shares) of a new part. Pure: no I/O, `now` passed in.

The rules, each there because an agent's own report of itself cannot be trusted:

- **Distinct networks.** A part's copies go to agents on distinct networks: at most one per IPv4
  /24 or IPv6 /48 by default (`NetworkRule`), judged by the address the server sees the agent's UDP
  socket at. Identities started by the hundred on one host or one subnet therefore get at most one
  copy of any part. `NetworkRule.parse("off")` makes every agent its own network: for one-machine
  demos and tests where all agents share 127.0.0.1, and for agents that share a NAT.
- **Capped weight.** Networks are drawn at random with a weight that follows the free space their
  agents report, but an agent's weight is at most `CAP_FACTOR` times the median agent's and a
  network's at most `CAP_FACTOR` times the median network's (within its pool). A network whose
  agents report 2^61 bytes free is drawn as if it had twice the median's room, no more (the
  bound is worked out in docs/operations.md, "Placement").
- **Vetting.** Agents not yet vetted (`ReputationView.is_vetted`) form a second pool; each copy is
  drawn from it with probability `UNVETTED_SHARE`, and from the vetted pool otherwise. A pool with
  no usable network left hands over to the other, so a network of new agents still works, and new
  agents get at most that share of new copies while enough vetted ones exist. Disqualified agents
  are never chosen.
- **Cost.** Draws come from a `CandidateTable` (per pool, the agents sorted by network with the
  prefix sums of their weights) that a timer rebuilds (`Placer.refresh`) every `REFRESH`
  seconds (above 10 000 agents, every `REBUILD_PER_AGENT` seconds per agent) and, after a
  membership change, once `REBUILD_PER_AGENT` seconds per agent have passed since the last
  build (so rebuilds cost a bounded fraction of a core at any size; a table of up to
  `REBUILD_AT_ONCE` agents is rebuilt on the next placement after a change). A draw is a bisection, O(log n), and the chosen agent is
  checked against the live registry (still registered and live, room, not excluded, not
  disqualified) before it is taken, so a stale table never places on a departed agent. Only when
  repeated draws keep landing on unusable networks does one placement fall back to one scan of the
  table, O(n).
"""

from __future__ import annotations

import bisect
import itertools
import random
import socket
from array import array
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Protocol, Sequence, TypeVar

from dsss.errors import Unavailable
from dsss.model import PeerAddress

CAP_FACTOR = 2
"""An agent's (network's) weight is at most this times the median agent's (network's)."""
UNVETTED_SHARE = 0.05
"""The chance that a copy is drawn from the unvetted pool first (Storj's new-node fraction)."""
REFRESH = 1.0
"""Seconds: the candidate table is rebuilt this often (by the server's timer, `Placer.refresh`;
a placement rebuilds a table twice this old itself)."""
REBUILD_PER_AGENT = 1e-4
"""Seconds per agent in the table that must pass before a membership change rebuilds it (10k
agents: at most one rebuild a second on churn), for tables above `REBUILD_AT_ONCE` agents."""
REBUILD_AT_ONCE = 100
"""A table of at most this many agents is rebuilt on the next placement after any change."""
DRAW_ATTEMPTS = 12
"""Draws per copy that may land on an unusable network before one scan of the table decides."""


class ReputationView(Protocol):
    """What placement reads of an agent's audit record (dsss.server.reputation implements it)."""

    def is_vetted(self, agent_id: str) -> bool: ...

    def is_disqualified(self, agent_id: str) -> bool: ...


class Candidate(Protocol):
    """An agent as placement sees it (dsss.server.registry.AgentRecord is one)."""

    @property
    def agent_id(self) -> str: ...

    @property
    def address(self) -> PeerAddress | None: ...

    @property
    def free(self) -> int: ...


AgentT = TypeVar("AgentT", bound=Candidate)


class AgentSource(Protocol[AgentT]):
    """Where placement finds agents (dsss.server.registry.Registry is one, of AgentRecords).
    `generation` changes whenever an agent joins, leaves or changes address; `is_live` is asked
    only about agents `live` or `get` returned."""

    @property
    def generation(self) -> int: ...

    def live(self, now: float) -> Sequence[AgentT]: ...

    def is_live(self, rec: AgentT, now: float) -> bool: ...

    def get(self, agent_id: str) -> AgentT | None: ...


class TooFewNetworks(Unavailable):
    """Agents have room, but not on enough distinct networks for the copies asked for."""

    code = "networks"


# --- networks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkRule:
    """Which agents count as one network: those whose IPv4 addresses share the first `ipv4` bits
    (IPv6: `ipv6` bits). `ipv4 = ipv6 = None` ("off"): every agent (address and port) is its own."""

    ipv4: int | None = 24
    ipv6: int | None = 48

    def __post_init__(self) -> None:
        if (self.ipv4 is None) != (self.ipv6 is None):
            raise ValueError("both prefix lengths or neither")
        if self.ipv4 is not None and not 0 <= self.ipv4 <= 32:
            raise ValueError(f"an IPv4 prefix length is 0 to 32, not {self.ipv4}")
        if self.ipv6 is not None and not 0 <= self.ipv6 <= 128:
            raise ValueError(f"an IPv6 prefix length is 0 to 128, not {self.ipv6}")

    @classmethod
    def parse(cls, text: str) -> "NetworkRule":
        """`V4,V6` (e.g. `24,48`, the default; `32,128`: every IP address its own network) or
        `off` (every agent its own network). ValueError with the reason otherwise."""
        text = text.strip().lower()
        if text == "off":
            return cls(None, None)
        fields = text.split(",")
        if len(fields) != 2 or not all(f.strip().isdigit() and len(f.strip()) <= 3 for f in fields):
            raise ValueError(f"expected V4,V6 prefix lengths (e.g. 24,48) or off, got {text[:40]!r}")
        return cls(int(fields[0]), int(fields[1]))

    @property
    def off(self) -> bool:
        return self.ipv4 is None

    def __str__(self) -> str:
        return "off" if self.off else f"{self.ipv4},{self.ipv6}"

    def key(self, address: PeerAddress) -> str:
        """The network `address` belongs to, e.g. `203.0.113.0/24` (off: the address itself)."""
        if self.ipv4 is None or self.ipv6 is None:
            return str(address)
        return _network_of(address.host, self.ipv4, self.ipv6)


_MAPPED = bytes(10) + b"\xff\xff"  # the first 12 bytes of an IPv4-mapped IPv6 address


@lru_cache(maxsize=1 << 17)
def _network_of(host: str, v4: int, v6: int) -> str:
    """`host`'s network as `ADDRESS/BITS` (socket's C parsers: the ipaddress module costs
    tens of microseconds a call, and a table rebuild calls this once per agent)."""
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
        if packed[:12] != _MAPPED:
            value = int.from_bytes(packed, "big") >> (128 - v6) << (128 - v6)
            return f"{socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, 'big'))}/{v6}"
        packed = packed[12:]
    else:
        packed = socket.inet_pton(socket.AF_INET, host)
    value = int.from_bytes(packed, "big") >> (32 - v4) << (32 - v4)
    return f"{socket.inet_ntop(socket.AF_INET, value.to_bytes(4, 'big'))}/{v4}"


# --- the candidate table -----------------------------------------------------------------------


def _median_low(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0.0


class Pool:
    """One pool's agents, sorted by network, in flat arrays (a rebuild allocates a handful of
    objects, not several per agent, so it leaves the garbage collector alone):

    - `agents[i]`, and `cumulative[i]`: the prefix sum of the agents' draw weights. An agent's
      draw weight is its capped weight scaled by its network's cap (`min(1, cap / network
      sum)`), so one bisection draws a network by its capped weight and, within it, an agent by
      its own weight;
    - `network[i]`: agent i's network number; network n's agents are `start[n]` to `start[n + 1]`
      (exclusive) and its key `keys[n]`.
    """

    __slots__ = ("agents", "cumulative", "network", "start", "keys")

    def __init__(self, agents: list[Candidate], cumulative: array[float], network: array[int],
                 start: array[int], keys: list[str]) -> None:
        self.agents = agents
        self.cumulative = cumulative
        self.network = network
        self.start = start
        self.keys = keys

    @classmethod
    def build(cls, agents: list[Candidate], keys: list[str], weights: list[float]) -> "Pool":
        order = sorted(range(len(agents)), key=keys.__getitem__)
        sums: list[float] = []
        start = array("l")
        net_keys: list[str] = []
        network = array("l")
        previous = None
        for i in order:
            k = keys[i]
            if k != previous:
                previous = k
                start.append(len(network))
                net_keys.append(k)
                sums.append(0.0)
            sums[-1] += weights[i]
            network.append(len(net_keys) - 1)
        start.append(len(network))
        cap = CAP_FACTOR * max(1.0, _median_low(sums))
        scale = [min(1.0, cap / s) for s in sums]
        cumulative = array("d", itertools.accumulate(weights[i] * scale[n] for i, n in zip(order, network)))
        return cls([agents[i] for i in order], cumulative, network, start, net_keys)

    @property
    def total(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0

    def weight(self, n: int) -> float:
        """Network n's capped weight."""
        lo, hi = self.start[n], self.start[n + 1]
        return self.cumulative[hi - 1] - (self.cumulative[lo - 1] if lo else 0.0)

    def weights(self) -> dict[str, float]:
        """Each network's capped weight (for tests and the bench)."""
        return {k: self.weight(n) for n, k in enumerate(self.keys)}


@dataclass
class CandidateTable:
    """The live agents at `built_at`, by pool (vetted, unvetted), grouped into networks."""

    built_at: float
    generation: int
    size: int
    vetted: Pool
    unvetted: Pool

    @classmethod
    def build(cls, agents: Iterable[Candidate], rule: NetworkRule, reputation: ReputationView,
              now: float, generation: int) -> "CandidateTable":
        usable = [r for r in agents if r.address is not None and not reputation.is_disqualified(r.agent_id)]
        cap = CAP_FACTOR * max(1.0, _median_low([float(max(0, r.free)) for r in usable]))
        key = rule.key
        pools: tuple[tuple[list[Candidate], list[str], list[float]], ...] = (([], [], []), ([], [], []))
        for rec in usable:
            recs, keys, weights = pools[0] if reputation.is_vetted(rec.agent_id) else pools[1]
            recs.append(rec)
            keys.append(key(rec.address))  # type: ignore[arg-type]
            weights.append(float(max(1, min(rec.free, cap))))
        return cls(now, generation, len(usable), Pool.build(*pools[0]), Pool.build(*pools[1]))


# --- placement ---------------------------------------------------------------------------------


@dataclass
class _Request:
    """One placement in progress: what disqualifies an agent for it."""

    source: AgentSource[Any]
    size: int
    now: float
    excluded: set[PeerAddress]
    used: set[str]  # networks that hold (or are about to hold) a copy


class Placer:
    """Chooses the agents for a part's copies (see the module docstring for the rules)."""

    def __init__(self, rule: NetworkRule, reputation: ReputationView,
                 rng: random.Random | None = None, *, unvetted_share: float = UNVETTED_SHARE,
                 refresh: float = REFRESH) -> None:
        self.rule = rule
        self.reputation = reputation
        self.rng = rng or random.SystemRandom()
        self.unvetted_share = unvetted_share
        self.refresh_every = refresh
        self._table: CandidateTable | None = None
        self.rebuilds = 0

    def refresh(self, source: AgentSource[Any], now: float) -> bool:
        """Rebuild the table if it is due: `REFRESH` seconds old, or the membership changed and
        the hold-off for its size (`REBUILD_PER_AGENT`) has passed. The server calls this from
        a timer every `REFRESH / 4` seconds, so that placements seldom pay for a rebuild.
        Returns whether it rebuilt."""
        t = self._table
        if t is not None:
            age = now - t.built_at
            changed = source.generation != t.generation
            holdoff = 0.0 if t.size <= REBUILD_AT_ONCE else t.size * REBUILD_PER_AGENT
            if 0 <= age < self._max_age(t) and not (changed and age >= holdoff):
                return False
        self._rebuild(source, now)
        return True

    def table(self, source: AgentSource[Any], now: float) -> CandidateTable:
        """The candidate table for a placement now. Rebuilt here only when no timer did it in
        time (older than twice `REFRESH`), or after a membership change for a table of at most
        `REBUILD_AT_ONCE` agents (cheap, and a small network's newest agent is placed on at
        once)."""
        t = self._table
        if t is not None:
            age = now - t.built_at
            changed = source.generation != t.generation
            if 0 <= age < 2 * self._max_age(t) and not (changed and t.size <= REBUILD_AT_ONCE):
                return t
        return self._rebuild(source, now)

    def _max_age(self, t: CandidateTable) -> float:
        """How old a table may grow before a rebuild: `REFRESH`, or for a table of more than
        REFRESH / REBUILD_PER_AGENT agents (10 000) that many times REBUILD_PER_AGENT, so that
        rebuilding never takes more than a small share of the server's time."""
        return max(self.refresh_every, t.size * REBUILD_PER_AGENT)

    def _rebuild(self, source: AgentSource[Any], now: float) -> CandidateTable:
        generation = source.generation
        self._table = CandidateTable.build(source.live(now), self.rule, self.reputation, now, generation)
        self.rebuilds += 1
        return self._table

    def place(self, source: AgentSource[Any], size: int, count: int, now: float,
              exclude: Iterable[PeerAddress] = ()) -> list[Candidate]:
        """Up to `count` agents for a part of `size` bytes, on distinct networks, none of them
        at an excluded address or on an excluded address's network.

        Fewer than `count` when fewer networks qualify. If none does: `TooFewNetworks` when
        agents have room but every one of their networks is excluded, else `Unavailable`
        ("no live agent has room")."""
        if count <= 0:
            return []
        table = self.table(source, now)
        excluded = set(exclude)
        req = _Request(source, size, now, excluded, {self.rule.key(a) for a in excluded})
        excluded_networks = len(req.used)
        chosen: list[Candidate] = []
        rejected: tuple[set[int], set[int]] = (set(), set())
        for _ in range(count):
            order = [(table.unvetted, rejected[1]), (table.vetted, rejected[0])]
            if self.rng.random() >= self.unvetted_share:
                order.reverse()
            for pool, dead in order:
                rec = self._draw(pool, req, dead)
                if rec is not None:
                    assert rec.address is not None
                    chosen.append(rec)
                    req.used.add(self.rule.key(rec.address))
                    break
            else:
                break
        if not chosen:
            self._refuse(table, req, count, excluded_networks)
        return chosen

    # --- inside ---------------------------------------------------------------------------------

    def _usable(self, rec: Candidate, req: _Request) -> bool:
        """Whether `rec` may take this copy now (the table may be a second old)."""
        address = rec.address
        return (
            address is not None
            and req.source.get(rec.agent_id) is rec
            and req.source.is_live(rec, req.now)
            and rec.free >= req.size
            and address not in req.excluded
            and self.rule.key(address) not in req.used
            and not self.reputation.is_disqualified(rec.agent_id)
        )

    def _agent_in(self, pool: Pool, n: int, req: _Request) -> Candidate | None:
        """An agent of network n drawn by weight among those usable now, or None."""
        lo, hi = pool.start[n], pool.start[n + 1]
        usable = [i for i in range(lo, hi) if self._usable(pool.agents[i], req)]
        if not usable:
            return None
        weights = [pool.cumulative[i] - (pool.cumulative[i - 1] if i else 0.0) for i in usable]
        return pool.agents[self.rng.choices(usable, weights=weights, k=1)[0]]

    def _draw(self, pool: Pool, req: _Request, dead: set[int]) -> Candidate | None:
        """One agent from `pool` on a network not yet used, drawn by network weight and then by
        agent weight; None if the pool has none. `dead` collects the networks found unusable
        for this placement."""
        if not pool.agents:
            return None
        last = len(pool.agents) - 1
        for _ in range(DRAW_ATTEMPTS):
            i = min(bisect.bisect_right(pool.cumulative, self.rng.random() * pool.total), last)
            n = pool.network[i]
            if n in dead or pool.keys[n] in req.used:
                continue
            rec = pool.agents[i]
            if self._usable(rec, req):
                return rec
            other = self._agent_in(pool, n, req)
            if other is not None:
                return other
            dead.add(n)
        # Draws keep missing: one scan decides among the networks that are still usable.
        live: list[int] = []
        for n, k in enumerate(pool.keys):
            if n in dead or k in req.used:
                continue
            if any(self._usable(pool.agents[i], req) for i in range(pool.start[n], pool.start[n + 1])):
                live.append(n)
            else:
                dead.add(n)
        if not live:
            return None
        n = self.rng.choices(live, weights=[pool.weight(n) for n in live], k=1)[0]
        return self._agent_in(pool, n, req)

    def _refuse(self, table: CandidateTable, req: _Request, count: int, excluded_networks: int) -> None:
        """Raise the reason nothing could be placed."""
        with_room: set[str] = set()
        for pool in (table.vetted, table.unvetted):
            for rec in pool.agents:
                if (rec.address is not None and req.source.get(rec.agent_id) is rec
                        and req.source.is_live(rec, req.now) and rec.free >= req.size
                        and not self.reputation.is_disqualified(rec.agent_id)):
                    with_room.add(self.rule.key(rec.address))
        if not with_room:
            raise Unavailable(f"no live agent has room for {req.size} bytes")
        need = count + excluded_networks
        if self.rule.off:
            raise TooFewNetworks(f"too few agents with room for {req.size} bytes "
                                 f"(have {len(with_room)}, need {need})")
        raise TooFewNetworks(f"too few distinct networks (have {len(with_room)}, need {need}): "
                             f"a part's copies go to agents on distinct networks "
                             f"(--distinct-networks {self.rule})")

