"""The lease policy (pure): who takes what, fair shares, expiry, giving back."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.leases import Lease, fair_share, plan_leases, weight

NOW = 1000.0
GWS = [f"gw{i:03d}" for i in range(10)]


def held(owner: str, *names: str, inc: str = "i1", until: float = NOW + 5,
         epoch: int = 1) -> dict[str, Lease]:
    return {n: Lease(n, owner, inc, until, epoch) for n in names}


def test_fair_share() -> None:
    assert fair_share(10, 1) == 10
    assert fair_share(10, 3) == 4
    assert fair_share(1000, 2) == 500
    assert fair_share(0, 2) == 0
    assert fair_share(5, 0) == 5  # nobody live but us (we always count)


def test_alone_takes_everything_free() -> None:
    plan = plan_leases(me="a", incarnation="i1", now=NOW, gateways=GWS, leases={}, live=[])
    assert sorted(plan.take) == GWS and plan.keep == () and plan.release == ()


def test_takes_up_to_its_fair_share_only() -> None:
    plan = plan_leases(me="a", incarnation="i1", now=NOW, gateways=GWS, leases={},
                       live=["a", "b", "c"])
    assert len(plan.take) == 4


def test_keeps_what_it_holds_and_tops_up() -> None:
    leases = held("a", "gw000", "gw001") | held("b", "gw002", "gw003", "gw004", "gw005")
    plan = plan_leases(me="a", incarnation="i1", now=NOW, gateways=GWS, leases=leases,
                       live=["a", "b"])
    assert plan.keep == ("gw000", "gw001")
    assert len(plan.take) == 3  # share 5
    assert not set(plan.take) & {"gw002", "gw003", "gw004", "gw005"}  # b's are b's


def test_expired_leases_are_free_whoever_held_them() -> None:
    leases = held("b", *GWS[:5], until=NOW - 0.1) | held("b", *GWS[5:], until=NOW + 3)
    plan = plan_leases(me="a", incarnation="i1", now=NOW, gateways=GWS, leases=leases,
                       live=["a"])  # b's heartbeat expired with its leases
    assert sorted(plan.take) == GWS[:5]


def test_a_lease_expiring_exactly_now_is_free() -> None:
    leases = held("b", "gw000", until=NOW)
    plan = plan_leases(me="a", incarnation="i1", now=NOW, gateways=["gw000"], leases=leases,
                       live=["a", "b"])
    assert plan.take == ("gw000",)


def test_a_previous_incarnation_of_ourselves_does_not_count_as_us() -> None:
    leases = held("a", *GWS, inc="old")
    plan = plan_leases(me="a", incarnation="new", now=NOW, gateways=GWS, leases=leases,
                       live=["a"])
    assert plan.keep == () and plan.take == ()  # taken only once they expire


def test_released_leases_are_free() -> None:
    leases = {n: Lease(n, None, None, 0.0, 3) for n in GWS}
    plan = plan_leases(me="a", incarnation="i1", now=NOW, gateways=GWS, leases=leases,
                       live=["a", "b"])
    assert len(plan.take) == 5


def test_surplus_is_given_back_when_another_replica_joins() -> None:
    leases = held("a", *GWS)
    plan = plan_leases(me="a", incarnation="i1", now=NOW, gateways=GWS, leases=leases,
                       live=["a", "b"])
    assert len(plan.release) == 5 and len(plan.keep) == 5 and plan.take == ()
    # the least wanted go: by rendezvous weight
    assert set(plan.release) == set(sorted(GWS, key=lambda g: weight(g, "a"))[:5])


def test_busy_gateways_are_not_given_back() -> None:
    leases = held("a", *GWS)
    least = sorted(GWS, key=lambda g: weight(g, "a"))
    plan = plan_leases(me="a", incarnation="i1", now=NOW, gateways=GWS, leases=leases,
                       live=["a", "b"], busy=least[:3])
    assert not set(plan.release) & set(least[:3])
    assert len(plan.release) == 5


def test_two_replicas_converge_on_a_split() -> None:
    """Both start on an empty table and take turns: each ends with its fair share."""
    gws = [f"gw{i}" for i in range(101)]
    leases: dict[str, Lease] = {}
    for _ in range(5):
        for me in ("a", "b"):
            plan = plan_leases(me=me, incarnation="i", now=NOW, gateways=gws,
                               leases=leases, live=["a", "b"])
            for g in plan.release:
                leases[g] = Lease(g, None, None, 0.0)
            for g in (*plan.keep, *plan.take):
                leases[g] = Lease(g, me, "i", NOW + 5)
    owners = Counter(lease.owner for lease in leases.values())
    assert owners == {"a": 51, "b": 50} or owners == {"a": 50, "b": 51}


def test_rendezvous_spreads_preferences() -> None:
    firsts = Counter(max(("a", "b", "c"), key=lambda r, g=g: weight(g, r))
                     for g in (f"gw{i}" for i in range(3000)))
    assert all(800 < n < 1200 for n in firsts.values()), firsts


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 60), live=st.integers(1, 5),
       owners=st.lists(st.sampled_from(["a", "b", "c", "d", None]), min_size=60,
                       max_size=60),
       expired=st.lists(st.booleans(), min_size=60, max_size=60))
def test_never_takes_a_live_lease_of_another(n: int, live: int, owners: list[str | None],
                                             expired: list[bool]) -> None:
    gws = [f"g{i}" for i in range(n)]
    leases = {g: Lease(g, owners[i], "i", NOW - 1 if expired[i] else NOW + 1)
              for i, g in enumerate(gws)}
    replicas = ["a", "b", "c", "d", "e"][:live]
    plan = plan_leases(me="a", incarnation="i", now=NOW, gateways=gws, leases=leases,
                       live=replicas)
    for g in plan.take:
        assert not leases[g].held(NOW)
    for g in (*plan.keep, *plan.release):
        assert leases[g].held_by("a", "i", NOW)
    assert len(plan.keep) + len(plan.take) <= max(fair_share(n, live), len(plan.keep))
    assert not set(plan.keep) & set(plan.release)
