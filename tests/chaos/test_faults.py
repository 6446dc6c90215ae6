"""The fault schedule: seeded, every kind equally often, pauses bounded; and the
scheduler loop logs every fault, survives one that raises, and stops when told."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import cast

import pytest

from chaos.faults import (
    CLIENT_KINDS,
    CLUSTER_ONLY_KINDS,
    CLUSTER_SERVER_KINDS,
    NATS_DOWN_LONG_MARGIN_S,
    SERVER_KINDS,
    FaultKind,
    FaultLog,
    PlannedFault,
    ServerFaults,
    nats_down_long_s,
    plan,
    run_client_faults,
    run_server_faults,
    settled_since,
)
from imdev.stack import Stack


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
    assert set(SERVER_KINDS) | set(CLIENT_KINDS) | set(CLUSTER_ONLY_KINDS) == set(FaultKind)
    assert not set(SERVER_KINDS) & set(CLIENT_KINDS)
    assert not set(CLUSTER_ONLY_KINDS) & (set(SERVER_KINDS) | set(CLIENT_KINDS))
    # `make chaos-cluster` runs every single-node kind on top of its own.
    assert set(CLUSTER_SERVER_KINDS) == set(SERVER_KINDS) | set(CLUSTER_ONLY_KINDS)


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


# -- the liveness kinds ------------------------------------------------------------


def fake_stack() -> Stack:
    proc = SimpleNamespace(port=1, name="x")
    return cast(
        Stack,
        SimpleNamespace(
            nats=proc,
            redis=proc,
            postgres=proc,
            seqsvc=proc,
            seqsvcs=[proc],
            gateways=[proc, proc],
            logics=[proc, proc],
            pushers=[proc, proc],
            redis_prefix="",
        ),
    )


def test_the_liveness_kinds_are_server_kinds() -> None:
    new = {
        FaultKind.REDIS_KILL,
        FaultKind.PUSHER_CRASH_BEFORE_DELIVER,
        FaultKind.NATS_DOWN_LONG,
        FaultKind.ROUTE_REMOVED,
    }
    assert new <= set(SERVER_KINDS)


def test_nats_down_long_outlasts_logics_repair_delay() -> None:
    from logic.config import Settings

    fields = Settings.model_fields
    default_after = float(fields["repair_after_s"].default)
    interval = float(fields["repair_interval_s"].default)
    assert nats_down_long_s({}) == default_after + 2 * interval + NATS_DOWN_LONG_MARGIN_S
    shortened = nats_down_long_s({"IM_LOGIC_REPAIR_AFTER_S": "2"})
    assert shortened == 2 + 2 * interval + NATS_DOWN_LONG_MARGIN_S
    assert shortened > 2 + interval


def test_a_route_removal_picks_observers_and_sdk_devices_in_turn() -> None:
    faults = ServerFaults(
        fake_stack(), connected=lambda: ([("u00", "obs"), ("u04", "obs")], [("u01", "d1")])
    )
    victims = {
        faults.prepare(PlannedFault(FaultKind.ROUTE_REMOVED, c, False, 0.0, 0.0))[0]
        for c in range(8)
    }
    assert victims == {"u00/obs", "u04/obs", "u01/d1"}
    only_devices = ServerFaults(fake_stack(), connected=lambda: ([], [("u01", "d1")]))
    target, _ = only_devices.prepare(PlannedFault(FaultKind.ROUTE_REMOVED, 0, False, 0.0, 0.0))
    assert target == "u01/d1"  # no observer connected: a device, not nothing
    with pytest.raises(RuntimeError, match="no connected device"):
        ServerFaults(fake_stack(), connected=lambda: ([], [])).prepare(
            PlannedFault(FaultKind.ROUTE_REMOVED, 0, False, 0.0, 0.0)
        )


def test_a_crash_fault_crashes_after_1_to_20_fan_outs() -> None:
    faults = ServerFaults(fake_stack())
    counts_seen = set()
    for f in plan(4, [FaultKind.PUSHER_CRASH_BEFORE_DELIVER], 200, 0.0):
        target, _ = faults.prepare(f)
        n = int(target.split("crash after ")[1].split()[0])
        counts_seen.add(n)
    assert min(counts_seen) >= 1 and max(counts_seen) <= 20
    assert len(counts_seen) > 10


def test_settled_since_waits_for_server_faults_only() -> None:
    log = FaultLog(started=100.0)
    assert settled_since(log, 105.0) == 105.0  # nothing happened
    cut = log.begin(FaultKind.CLIENT_CUT, "u00/d1")  # in progress, but a client fault
    assert settled_since(log, 105.0) == 105.0
    ev = log.begin(FaultKind.REDIS_KILL, "redis")
    assert settled_since(log, 105.0) == math.inf  # in progress
    ev.at, ev.duration_s, ev.ended = 4.0, 3.0, True  # 104 -> 107
    assert settled_since(log, 105.0) == 107.0
    assert settled_since(log, 108.0) == 108.0
    assert "ended" not in ev.to_json() and cut.to_json()["kind"] == "client_cut"


class RefusingFaults:
    """prepare() fails for the first fault (no victim), works for the rest."""

    def __init__(self) -> None:
        self.done: list[FaultKind] = []

    def prepare(self, f: PlannedFault) -> tuple[str, Callable[[], None]]:
        if f.kind is FaultKind.ROUTE_REMOVED:
            raise RuntimeError("no connected device to remove the route of")
        return "victim", lambda: self.done.append(f.kind)

    def take_notes(self) -> list[str]:
        return []


async def test_a_fault_without_a_victim_is_logged_and_the_schedule_goes_on() -> None:
    faults = RefusingFaults()
    schedule = [
        PlannedFault(FaultKind.ROUTE_REMOVED, 0, False, 0.0, 0.0),
        PlannedFault(FaultKind.REDIS_FLUSH, 0, False, 0.0, 0.0),
    ]
    log = FaultLog()
    await run_server_faults(cast(ServerFaults, faults), schedule, log, asyncio.Event())
    assert [e.kind for e in log.events] == ["route_removed", "redis_flush"]
    assert "no connected device" in log.events[0].error and not log.events[1].error
    assert faults.done == [FaultKind.REDIS_FLUSH]
