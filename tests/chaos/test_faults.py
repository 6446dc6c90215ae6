"""The fault schedule: seeded, every kind equally often, pauses bounded; and the
scheduler loop logs every fault, survives one that raises, and stops when told."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from chaos.faults import (
    CLIENT_KINDS,
    SERVER_KINDS,
    FaultKind,
    FaultLog,
    PlannedFault,
    plan,
    run_client_faults,
)


def test_the_same_seed_gives_the_same_schedule() -> None:
    assert plan(7, SERVER_KINDS, 3, 1.0) == plan(7, SERVER_KINDS, 3, 1.0)
    assert plan(7, SERVER_KINDS, 3, 1.0) != plan(8, SERVER_KINDS, 3, 1.0)


def test_every_kind_happens_once_per_round() -> None:
    schedule = plan(1, list(FaultKind), 30, 0.5)
    per_kind = Counter(f.kind for f in schedule)
    assert set(per_kind) == set(FaultKind)
    assert set(per_kind.values()) == {30}
    # Each round is a permutation: any window of one round holds each kind once.
    n = len(FaultKind)
    for r in range(30):
        assert {f.kind for f in schedule[r * n : (r + 1) * n]} == set(FaultKind)


def test_pauses_and_downtimes_are_bounded() -> None:
    schedule = plan(3, SERVER_KINDS, 20, 2.0, max_downtime_s=0.5)
    assert all(0 <= f.pause_s <= 8.0 for f in schedule)
    assert all(0 <= f.downtime_s <= 0.5 for f in schedule)
    assert len({f.pause_s for f in schedule}) > 1


def test_server_and_client_kinds_partition_all_kinds() -> None:
    assert set(SERVER_KINDS) | set(CLIENT_KINDS) == set(FaultKind)
    assert not set(SERVER_KINDS) & set(CLIENT_KINDS)


class FlakyClients:
    def __init__(self) -> None:
        self.cuts = 0
        self.restarts: list[float] = []

    async def cut_stream(self, rng: random.Random) -> str:
        self.cuts += 1
        if self.cuts == 2:
            raise RuntimeError("no client connected")
        return f"client-{self.cuts}"

    async def restart_client(self, rng: random.Random, offline_s: float) -> str:
        self.restarts.append(offline_s)
        return "client-r"


async def test_client_faults_are_logged_and_an_error_does_not_stop_the_schedule() -> None:
    clients = FlakyClients()
    schedule = plan(5, CLIENT_KINDS, 3, 0.0)
    log = FaultLog()
    await run_client_faults(clients, schedule, log, asyncio.Event(), seed=5, max_offline_s=0.1)
    assert [e.kind for e in log.events] == [f.kind.value for f in schedule]
    errors = [e for e in log.events if e.error]
    assert len(errors) == 1 and "no client connected" in errors[0].error
    assert clients.cuts == 3 and len(clients.restarts) == 3
    assert all(0 <= s <= 0.1 for s in clients.restarts)
    assert [e.at for e in log.events] == sorted(e.at for e in log.events)
    assert all(e.wall > 0 and e.duration_s >= 0 for e in log.events)


async def test_a_set_stop_event_ends_the_schedule() -> None:
    clients = FlakyClients()
    stop = asyncio.Event()
    stop.set()
    schedule = [PlannedFault(FaultKind.CLIENT_CUT, 0, False, 0.0, 10.0)] * 5
    log = FaultLog()
    await asyncio.wait_for(run_client_faults(clients, schedule, log, stop, seed=1), 5)
    assert log.events == [] and clients.cuts == 0
