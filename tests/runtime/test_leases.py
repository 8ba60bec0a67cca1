"""runtime.leases: wire <-> engine ids, per-client limits, TTL expiry, pinning, client identity."""

from __future__ import annotations

import itertools

import grpc
import pytest

from runtime.errors import RequestError
from runtime.leases import LeaseTable, client_identity


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_table(ttl: float = 10.0, limit: int = 3) -> tuple[LeaseTable, FakeClock]:
    clock = FakeClock()
    counter = itertools.count()
    return LeaseTable(ttl, limit, clock=clock, new_wire_id=lambda: f"w{next(counter)}"), clock


def add(table: LeaseTable, client: str, *engine_ids: int, depth: int = 0) -> list[str]:
    reservation = table.reserve(client, len(engine_ids))
    wire_ids = [table.add(engine_id, depth, reservation) for engine_id in engine_ids]
    table.unreserve(reservation)
    return wire_ids


def test_add_lookup_remove_map_ids_exactly():
    table, _ = make_table()
    assert add(table, "alice", 7, 9) == ["w0", "w1"]
    assert [lease.engine_id for lease in table.lookup(["w1", "w0", "w1"])] == [9, 7, 9]
    assert (len(table), table.num_states("alice")) == (2, 2)
    assert table.remove(["w0"]) == [7]
    assert (len(table), table.num_states("alice")) == (1, 1)
    with pytest.raises(RequestError) as info:
        table.lookup(["w1", "w0"], "branches[{}].state_id")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == ("branches[1].state_id='w0': unknown state (never created, released or expired "
                                  "after 10s unused)")


def test_remove_is_atomic():
    table, _ = make_table()
    add(table, "alice", 1, 2)
    with pytest.raises(RequestError, match=r"state_ids\[1\]='nope': unknown state"):
        table.remove(["w0", "nope"])
    assert len(table) == 2  # nothing released
    assert table.remove(["w1", "w0"]) == [2, 1]
    assert len(table) == 0 and table.num_states("alice") == 0


def test_per_client_limit_counts_live_and_reserved_states():
    table, _ = make_table(limit=3)
    add(table, "alice", 1, 2)
    in_flight = table.reserve("alice", 1)
    with pytest.raises(RequestError) as info:
        table.reserve("alice", 1)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.message == ("client 'alice' holds 2 live states (1 more reserved by calls in flight); 1 more "
                                  "would pass max_states_per_client=3: release some")
    assert add(table, "bob", 5, 6, 7) == ["w2", "w3", "w4"]  # other clients are unaffected
    table.unreserve(in_flight)  # the call finished without keeping a state
    assert table.num_reserved("alice") == 0
    assert add(table, "alice", 3) == ["w5"]
    empty = table.reserve("alice", 0)
    with pytest.raises(RuntimeError, match="reservation of 'alice' is used up"):
        table.add(4, 0, empty)


def test_ttl_expiry_skips_recently_used_and_pinned_states():
    table, clock = make_table(ttl=10.0)
    add(table, "alice", 1, 2, 3)
    clock.now += 6
    table.lookup(["w1"])  # touched at 106
    pinned = table.lookup(["w2"])
    table.pin(pinned)
    clock.now += 5  # 111: w0 unused for 11s, w1 for 5s, w2 pinned
    assert table.pop_expired() == [1]
    clock.now += 100
    assert table.pop_expired() == [2]  # w1 expires, w2 is still pinned
    assert table.unpin(pinned) == []  # unpinning touches it
    clock.now += 10.5
    assert table.pop_expired() == [3]
    assert (len(table), table.num_expired, table.num_states("alice")) == (0, 3, 0)


def test_release_of_pinned_state_waits_for_unpin():
    table, _ = make_table()
    add(table, "alice", 1, 2)
    pinned = table.lookup(["w0", "w0"])  # two branches from one state
    table.pin(pinned)
    assert table.remove(["w0", "w1"]) == [2]  # w1 now; w0 when the call ends
    with pytest.raises(RequestError, match="unknown state"):
        table.lookup(["w0"])
    assert table.unpin(pinned) == [1]


def test_drain_returns_unpinned_states_and_defers_pinned_ones():
    table, _ = make_table()
    add(table, "alice", 1)
    add(table, "bob", 2)
    pinned = table.lookup(["w1"])
    table.pin(pinned)
    assert table.drain() == [1]
    assert len(table) == 0
    assert table.unpin(pinned) == [2]


def test_client_identity():
    assert client_identity([("x-client-id", "trainer-3")], "ipv4:10.0.0.1:5555") == "trainer-3"
    assert client_identity([], "ipv4:127.0.0.1:53422") == "ipv4:127.0.0.1"
    assert client_identity([("user-agent", "x")], "ipv6:[::1]:40000") == "ipv6:[::1]"
    assert client_identity([], "unix:/tmp/sock") == "unix:/tmp/sock"
    with pytest.raises(RequestError, match=r"x-client-id must be 1-128 printable characters, got 'a\\nb'"):
        client_identity([("x-client-id", "a\nb")], "ipv4:127.0.0.1:1")
