"""State leases: the one map between wire state ids (strings) and engine state ids (ints).

Every live state has a lease: who created it (the client it is charged to), how many chunks it has been
rolled, and when it was last used. A state nobody touches for `ttl` seconds is released, so a crashed
client leaks nothing; a client may hold at most `max_states_per_client` states. A state in use by a
running Imagine is pinned: it cannot expire, and releasing it defers the engine release to the unpin.

Wire ids are random 64-bit hex strings: a capability that cannot be guessed, so any client that holds
an id may use or release it, and ids from a restarted server never alias new states.

Pure bookkeeping, no engine or asyncio: the servicer turns the engine ids returned here into engine calls.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc

from runtime.errors import RequestError, invalid

CLIENT_ID_KEY = "x-client-id"
MAX_CLIENT_ID_LEN = 128


def random_wire_id() -> str:
    return secrets.token_hex(8)


def client_identity(metadata: Iterable[tuple[str, str | bytes]], peer: str) -> str:
    """The client a call is charged to: metadata `x-client-id` if sent, else the peer's address without port.

    Without the header all connections from one host share a quota, and a restarted client finds the
    states of its crashed predecessor still charged to it until they expire.
    """
    for key, value in metadata:
        if key == CLIENT_ID_KEY:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if not text or len(text) > MAX_CLIENT_ID_LEN or not text.isprintable():
                raise invalid(f"{CLIENT_ID_KEY} must be 1-{MAX_CLIENT_ID_LEN} printable characters, got {text!r}")
            return text
    return _peer_host(peer)


def _peer_host(peer: str) -> str:
    # "ipv4:127.0.0.1:53422" -> "ipv4:127.0.0.1", "ipv6:[::1]:53422" -> "ipv6:[::1]"; others unchanged.
    scheme, _, address = peer.partition(":")
    if scheme in ("ipv4", "ipv6") and ":" in address:
        return f"{scheme}:{address.rsplit(':', 1)[0]}"
    return peer


@dataclass(eq=False)
class Lease:
    """One live state. `depth` = chunks rolled since its start state (0 for a created state)."""

    wire_id: str
    engine_id: int
    client_id: str
    depth: int
    last_used: float
    pins: int = 0
    released: bool = False  # removed from the table while pinned: the engine release waits for the unpin


@dataclass(eq=False)
class Reservation:
    """Live-state slots promised to a call in flight, so concurrent calls cannot overshoot the limit."""

    client_id: str
    remaining: int


class LeaseTable:
    """Wire id -> lease, per-client counts, TTL expiry. All methods run on one thread (the server's loop)."""

    def __init__(self, ttl: float, max_states_per_client: int, clock: Callable[[], float] = time.monotonic,
                 new_wire_id: Callable[[], str] = random_wire_id) -> None:
        if ttl <= 0 or max_states_per_client <= 0:
            raise ValueError(f"ttl and max_states_per_client must be > 0, got {ttl}, {max_states_per_client}")
        self.ttl = ttl
        self.max_states_per_client = max_states_per_client
        self._clock = clock
        self._new_wire_id = new_wire_id
        self._leases: dict[str, Lease] = {}
        self._live: dict[str, int] = {}  # client -> leases in the table
        self._reserved: dict[str, int] = {}  # client -> slots reserved by calls in flight
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def num_states(self, client_id: str) -> int:
        return self._live.get(client_id, 0)

    def num_reserved(self, client_id: str) -> int:
        return self._reserved.get(client_id, 0)

    # ---- limits -----------------------------------------------------------------------------------
    def reserve(self, client_id: str, count: int) -> Reservation:
        """Promises `count` new states to `client_id`, or RESOURCE_EXHAUSTED if that passes its limit."""
        live, reserved = self.num_states(client_id), self.num_reserved(client_id)
        if live + reserved + count > self.max_states_per_client:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client {client_id!r} holds {live} live states ({reserved} more reserved by calls in flight); "
                f"{count} more would pass max_states_per_client={self.max_states_per_client}: release some")
        self._add_reserved(client_id, count)
        return Reservation(client_id, count)

    def unreserve(self, reservation: Reservation) -> None:
        """Returns the slots a finished call did not use."""
        self._add_reserved(reservation.client_id, -reservation.remaining)
        reservation.remaining = 0

    def _add_reserved(self, client_id: str, delta: int) -> None:
        count = self._reserved.get(client_id, 0) + delta
        if count:
            self._reserved[client_id] = count
        else:
            self._reserved.pop(client_id, None)

    # ---- lifecycle --------------------------------------------------------------------------------
    def add(self, engine_id: int, depth: int, reservation: Reservation) -> str:
        """Registers a new engine state charged to the reservation's client; returns its wire id."""
        if reservation.remaining <= 0:
            raise RuntimeError(f"reservation of {reservation.client_id!r} is used up")
        wire_id = self._new_wire_id()
        while wire_id in self._leases:
            wire_id = self._new_wire_id()
        client_id = reservation.client_id
        self._leases[wire_id] = Lease(wire_id, engine_id, client_id, depth, self._clock())
        reservation.remaining -= 1
        self._add_reserved(client_id, -1)
        self._live[client_id] = self._live.get(client_id, 0) + 1
        return wire_id

    def lookup(self, wire_ids: Sequence[str], field: str = "state_ids[{}]") -> list[Lease]:
        """The leases of `wire_ids` (repeats allowed), touched now; NOT_FOUND names the first unknown id."""
        leases = []
        for i, wire_id in enumerate(wire_ids):
            lease = self._leases.get(wire_id)
            if lease is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"{field.format(i)}={wire_id!r}: unknown state (never created, released or "
                                   f"expired after {self.ttl:g}s unused)")
            leases.append(lease)
        now = self._clock()
        for lease in leases:
            lease.last_used = now
        return leases

    def pin(self, leases: Iterable[Lease]) -> None:
        for lease in leases:
            lease.pins += 1

    def unpin(self, leases: Iterable[Lease]) -> list[int]:
        """Unpins (touching each lease); returns engine ids released while pinned, now free to release."""
        now, ready = self._clock(), []
        for lease in leases:
            lease.pins -= 1
            lease.last_used = now
            if lease.released and lease.pins == 0:
                ready.append(lease.engine_id)
        return ready

    def remove(self, wire_ids: Sequence[str], field: str = "state_ids[{}]") -> list[int]:
        """Atomic: all ids are known or nothing is removed. Returns the engine ids to release now (the
        pinned ones are released by `unpin`)."""
        leases = self.lookup(wire_ids, field)
        return [lease.engine_id for lease in leases if self._drop(lease)]

    def pop_expired(self) -> list[int]:
        """Removes every unpinned lease unused for longer than the TTL; returns their engine ids."""
        deadline = self._clock() - self.ttl
        expired = [lease for lease in self._leases.values() if lease.pins == 0 and lease.last_used < deadline]
        for lease in expired:
            self._drop(lease)
        self.num_expired += len(expired)
        return [lease.engine_id for lease in expired]

    def drain(self) -> list[int]:
        """Removes every lease (shutdown); returns the engine ids to release now. A lease still pinned by a
        call in flight hands its engine id to that call's `unpin`, as in `remove`."""
        return [lease.engine_id for lease in list(self._leases.values()) if self._drop(lease)]

    def _drop(self, lease: Lease) -> bool:
        """Removes the lease from the table; True when the engine state can be released right away."""
        del self._leases[lease.wire_id]
        self._live[lease.client_id] -= 1
        if not self._live[lease.client_id]:
            del self._live[lease.client_id]
        lease.released = True
        return lease.pins == 0
