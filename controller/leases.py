"""Which replica holds which gateway: the lease policy (pure; controller/lease_store.py
reads and writes the leases).

Every gateway is held by at most one replica through a lease that its holder renews
and that anyone may take once it has expired. A replica keeps what it holds, takes
free gateways (never leased, released, or expired) up to its fair share of the fleet
(all of them when it is alone), and gives back what it holds beyond its share when
more replicas are live, so that a new replica gets work and a dead one's gateways
spread over the survivors. Which free gateways a replica prefers, and which it gives
back first, follows rendezvous hashing (highest random weight): two replicas taking
at the same time mostly want different gateways, and a gateway tends to return to
the same replica, so sessions are not moved for nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Lease:
    gateway: str
    owner: str | None  # replica id; None: released or never taken
    incarnation: str | None
    expires_at: float  # database clock, seconds
    epoch: int = 0  # bumped whenever the lease changes hands (a fencing token)

    def held(self, now: float) -> bool:
        return self.owner is not None and self.expires_at > now

    def held_by(self, replica: str, incarnation: str, now: float) -> bool:
        return self.held(now) and self.owner == replica and self.incarnation == incarnation


@dataclass(frozen=True)
class LeasePlan:
    keep: tuple[str, ...]  # held by us: renew
    take: tuple[str, ...]  # free: try to take (another replica may win the race)
    release: tuple[str, ...]  # held by us beyond our share: give back


def fair_share(gateways: int, live_replicas: int) -> int:
    """The most gateways one replica should hold: ceil(gateways / live)."""
    return math.ceil(gateways / max(1, live_replicas))


def weight(gateway: str, replica: str) -> int:
    """Rendezvous hashing: how much `replica` wants `gateway` (stable, uniform)."""
    digest = hashlib.blake2b(f"{gateway}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def plan_leases(*, me: str, incarnation: str, now: float, gateways: Sequence[str],
                leases: Mapping[str, Lease], live: Collection[str],
                busy: Collection[str] = ()) -> LeasePlan:
    """What replica `me` (this incarnation) does with the leases at time `now`.

    `gateways`: the inventory; `leases`: the leases as read (a gateway without one is
    free); `live`: the replicas whose heartbeat is fresh (`me` counts in any case);
    `busy`: gateways with work of ours in flight, never given back while it runs.
    """
    replicas = set(live) | {me}
    share = fair_share(len(gateways), len(replicas))
    mine: list[str] = []
    free: list[str] = []
    for name in gateways:
        lease = leases.get(name)
        if lease is not None and lease.held_by(me, incarnation, now):
            mine.append(name)
        elif lease is None or not lease.held(now):
            free.append(name)
    # least wanted first: what we give back; most wanted first: what we take
    mine.sort(key=lambda g: weight(g, me))
    free.sort(key=lambda g: weight(g, me), reverse=True)
    release: list[str] = []
    if len(mine) > share:
        idle = [g for g in mine if g not in busy]
        release = idle[:len(mine) - share]
    keep = [g for g in mine if g not in release]
    take = free[:max(0, share - len(keep))]
    return LeasePlan(keep=tuple(sorted(keep)), take=tuple(take), release=tuple(release))
