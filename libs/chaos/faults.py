"""The fault scheduler: a seeded random schedule of faults, acted out on a running
`imdev.stack.Stack` (and on the workload's clients), each logged with a timestamp.

A schedule is made of rounds; every round holds each enabled fault kind once, in
a seeded random order, so after N rounds every kind has happened N times. The
same seed gives the same schedule (kinds, targets, pauses); what the system does
in between is, of course, not deterministic.

Server faults block (they signal processes and wait for them to serve again), so
they run in a worker thread and never stall the clients' event loop. A fault
returns once the broken part is serving again: the next fault hits a system that
had a chance to recover, which is harsher on recovery paths than one long outage.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import redis

from imdev.servers import Managed, ServiceProcess
from imdev.stack import Stack

log = logging.getLogger("chaos.faults")


class FaultKind(enum.StrEnum):
    GATEWAY_KILL = "gateway_kill"  # kill -9 one gateway, restart it
    LOGIC_KILL = "logic_kill"
    PUSHER_KILL = "pusher_kill"
    SEQSVC_KILL = "seqsvc_kill"
    SEQSVC_RESTART = "seqsvc_restart"  # SIGTERM, restart
    ROLLING_RESTART = "rolling_restart"  # SIGTERM+restart each process of one kind in turn
    NATS_RESTART = "nats_restart"
    NATS_WIPE = "nats_wipe"  # stop nats-server, delete its JetStream store, start it
    REDIS_RESTART = "redis_restart"  # no persistence configured: comes back empty
    REDIS_FLUSH = "redis_flush"  # FLUSHALL
    POSTGRES_RESTART = "postgres_restart"  # fast shutdown (SIGINT), start
    CLIENT_CUT = "client_cut"  # cut one client's stream mid-traffic
    CLIENT_RESTART = "client_restart"  # close one client "process", reopen on its store


SERVER_KINDS: tuple[FaultKind, ...] = tuple(
    k for k in FaultKind if k not in (FaultKind.CLIENT_CUT, FaultKind.CLIENT_RESTART)
)
CLIENT_KINDS: tuple[FaultKind, ...] = (FaultKind.CLIENT_CUT, FaultKind.CLIENT_RESTART)
ROLLING_TARGETS = ("gateway", "logic", "pusher")


class ClientFaults(Protocol):
    """What the workload lets the scheduler do to its clients. Each returns a
    short description of the victim for the log."""

    async def cut_stream(self, rng: random.Random) -> str: ...

    async def restart_client(self, rng: random.Random, offline_s: float) -> str: ...


@dataclass(frozen=True)
class PlannedFault:
    kind: FaultKind
    choice: int  # picks the victim among the candidates, modulo their number
    hard: bool  # for restarts that can be gentle or not (NATS)
    downtime_s: float  # how long the victim stays down (kill -> start)
    pause_s: float  # quiet time after the fault, before the next one


@dataclass
class FaultEvent:
    """One fault as it happened. `at` is seconds since the scheduler started,
    `wall` a Unix timestamp (to find it in the services' logs)."""

    kind: str
    target: str
    at: float
    wall: float
    duration_s: float = 0.0
    error: str = ""
    note: str = ""  # e.g. the victim failed to start and had to be started again

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.wall))
        stamp += f".{int(self.wall * 1000) % 1000:03d}"
        err = f" ERROR {self.error}" if self.error else ""
        note = f" NOTE {self.note}" if self.note else ""
        return (
            f"{stamp} +{self.at:7.2f}s {self.kind:<17} {self.target} "
            f"({self.duration_s:.2f}s){err}{note}"
        )


def plan(
    seed: int,
    kinds: Sequence[FaultKind],
    rounds: int,
    mean_pause_s: float,
    max_downtime_s: float = 1.0,
) -> list[PlannedFault]:
    """`rounds` rounds of every kind in `kinds`, each round in a random order;
    pauses are exponential with mean `mean_pause_s` (capped at 4x the mean)."""
    rng = random.Random(seed)
    out: list[PlannedFault] = []
    for _ in range(rounds):
        order = list(kinds)
        rng.shuffle(order)
        for kind in order:
            pause = min(rng.expovariate(1 / mean_pause_s), 4 * mean_pause_s) if mean_pause_s else 0
            out.append(
                PlannedFault(
                    kind=kind,
                    choice=rng.randrange(1 << 30),
                    hard=rng.random() < 0.5,
                    downtime_s=rng.uniform(0, max_downtime_s),
                    pause_s=pause,
                )
            )
    return out


def counts(events: Sequence[FaultEvent]) -> dict[str, int]:
    return dict(sorted(Counter(e.kind for e in events).items()))


@dataclass
class FaultLog:
    """Every fault, in the order it started. Thread-safe enough for one writer
    per track (list.append is atomic)."""

    started: float = field(default_factory=time.monotonic)
    events: list[FaultEvent] = field(default_factory=list)
    echo: Callable[[str], None] | None = None

    def begin(self, kind: FaultKind, target: str) -> FaultEvent:
        ev = FaultEvent(kind.value, target, time.monotonic() - self.started, time.time())
        self.events.append(ev)
        return ev

    def end(self, ev: FaultEvent, error: str = "") -> None:
        ev.duration_s = time.monotonic() - self.started - ev.at
        ev.error = error
        log.info("fault", extra={"fault": ev.to_json()})
        if self.echo:
            self.echo(f"fault {ev}")


class ServerFaults:
    """The server-side faults, acting on a `Stack`. Every method blocks until the
    victim serves again (or raises); run them in a thread."""

    def __init__(
        self, stack: Stack, restart_timeout_s: float = 90.0, start_attempts: int = 8
    ) -> None:
        self.stack = stack
        self.timeout = restart_timeout_s
        self.start_attempts = start_attempts
        self.notes = threading.local()
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    def _procs(self, kind: str) -> list[ServiceProcess]:
        return {
            "gateway": self.stack.gateways,
            "logic": self.stack.logics,
            "pusher": self.stack.pushers,
            "seqsvc": [self.stack.seqsvc],
        }[kind]

    def target(self, f: PlannedFault) -> str:
        """Which process the fault will hit, for the log."""
        k = f.kind
        if k in (FaultKind.GATEWAY_KILL, FaultKind.LOGIC_KILL, FaultKind.PUSHER_KILL):
            svc = k.value.removesuffix("_kill")
            procs = self._procs(svc)
            return f"{svc}[{f.choice % len(procs)}]:{procs[f.choice % len(procs)].port}"
        if k in (FaultKind.SEQSVC_KILL, FaultKind.SEQSVC_RESTART):
            return f"seqsvc:{self.stack.seqsvc.port}"
        if k is FaultKind.ROLLING_RESTART:
            return f"all {ROLLING_TARGETS[f.choice % len(ROLLING_TARGETS)]}"
        if k in (FaultKind.NATS_RESTART, FaultKind.NATS_WIPE):
            return f"nats:{self.stack.nats.port}" + (
                " (kill -9)" if f.hard and k is FaultKind.NATS_RESTART else ""
            )
        if k in (FaultKind.REDIS_RESTART, FaultKind.REDIS_FLUSH):
            return f"redis:{self.stack.redis.port}"
        if k is FaultKind.POSTGRES_RESTART:
            return f"postgres:{self.stack.postgres.port}"
        raise ValueError(f"not a server fault: {k}")

    def apply(self, f: PlannedFault) -> None:
        k = f.kind
        if k in (
            FaultKind.GATEWAY_KILL,
            FaultKind.LOGIC_KILL,
            FaultKind.PUSHER_KILL,
            FaultKind.SEQSVC_KILL,
        ):
            procs = self._procs(k.value.removesuffix("_kill"))
            self.kill_restart(procs[f.choice % len(procs)], f.downtime_s)
        elif k is FaultKind.SEQSVC_RESTART:
            self.term_restart(self.stack.seqsvc, f.downtime_s)
        elif k is FaultKind.ROLLING_RESTART:
            for proc in self._procs(ROLLING_TARGETS[f.choice % len(ROLLING_TARGETS)]):
                self.term_restart(proc, 0.0)
        elif k is FaultKind.NATS_RESTART:
            if f.hard:
                self.kill_restart(self.stack.nats, f.downtime_s)
            else:
                self.term_restart(self.stack.nats, f.downtime_s)
        elif k is FaultKind.NATS_WIPE:
            self.nats_wipe(f.downtime_s)
        elif k is FaultKind.REDIS_RESTART:
            self.term_restart(self.stack.redis, f.downtime_s)
        elif k is FaultKind.REDIS_FLUSH:
            self.redis_flush()
        elif k is FaultKind.POSTGRES_RESTART:
            # PostgresServer.stop() is a fast shutdown (SIGINT).
            self.term_restart(self.stack.postgres, f.downtime_s)
        else:
            raise ValueError(f"not a server fault: {k}")

    # -- the primitives ------------------------------------------------------

    def _lock(self, proc: Managed) -> threading.Lock:
        """One fault at a time per process, when several tracks run at once."""
        with self._guard:
            return self._locks.setdefault(id(proc), threading.Lock())

    def _start(self, proc: Managed) -> None:
        """Starts `proc` like a supervisor would (Kubernetes restarts a crashed
        pod): a process that exits during start-up is started again, a few
        times, and each such exit is noted for the report."""
        for attempt in range(1, self.start_attempts + 1):
            try:
                proc.start(self.timeout)
                return
            except RuntimeError as exc:  # exited before it was ready
                note = f"{proc.name}:{proc.port} start attempt {attempt} failed: {exc}"
                self.notes.items = [*getattr(self.notes, "items", []), note]
                log.warning("fault victim failed to start", extra={"note": note})
                if attempt == self.start_attempts:
                    raise
                time.sleep(min(0.5 * attempt, 3.0))  # supervisor backoff before the next start

    def take_notes(self) -> list[str]:
        """Notes of the calling thread's last fault (and forgets them)."""
        items: list[str] = getattr(self.notes, "items", [])
        self.notes.items = []
        return items

    def kill_restart(self, proc: Managed, downtime_s: float) -> None:
        with self._lock(proc):
            proc.kill()
            _pause(downtime_s)
            self._start(proc)

    def term_restart(self, proc: Managed, downtime_s: float) -> None:
        with self._lock(proc):
            proc.stop(timeout=self.timeout)
            _pause(downtime_s)
            self._start(proc)

    def nats_wipe(self, downtime_s: float) -> None:
        nats = self.stack.nats
        with self._lock(nats):
            nats.stop(timeout=self.timeout)
            nats.wipe_store()
            _pause(downtime_s)
            self._start(nats)

    def redis_flush(self) -> None:
        with (
            self._lock(self.stack.redis),
            redis.Redis.from_url(self.stack.redis.url(), socket_timeout=10) as r,
        ):
            r.flushall()


def _pause(seconds: float) -> None:
    # A fault's downtime: the victim is deliberately down, nothing waits on it.
    if seconds > 0:
        time.sleep(seconds)


async def _sleep_or_stop(seconds: float, stop: asyncio.Event) -> bool:
    """Sleeps `seconds` unless `stop` is set first. True if stopped."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except TimeoutError:
        return stop.is_set()


async def run_server_faults(
    faults: ServerFaults, schedule: Sequence[PlannedFault], log_: FaultLog, stop: asyncio.Event
) -> None:
    """Acts out `schedule` in order until it ends or `stop` is set. A fault that
    raises is logged with its error and the schedule goes on (the next fault
    will find out whether the system recovered)."""
    for f in schedule:
        if stop.is_set():
            return
        ev = log_.begin(f.kind, faults.target(f))

        def act(f: PlannedFault = f) -> tuple[list[str], str]:
            """Runs in a worker thread; the notes are that thread's."""
            error = ""
            try:
                faults.apply(f)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            return faults.take_notes(), error

        notes, error = await asyncio.to_thread(act)
        ev.note = "; ".join(notes)
        log_.end(ev, error)
        if await _sleep_or_stop(f.pause_s, stop):
            return


async def run_client_faults(
    clients: ClientFaults,
    schedule: Sequence[PlannedFault],
    log_: FaultLog,
    stop: asyncio.Event,
    seed: int,
    max_offline_s: float = 3.0,
) -> None:
    """Acts out client faults (stream cuts, process restarts) in order until the
    schedule ends or `stop` is set."""
    rng = random.Random(seed)
    for f in schedule:
        if stop.is_set():
            return
        if f.kind is FaultKind.CLIENT_CUT:
            ev = log_.begin(f.kind, "")
            try:
                ev.target = await clients.cut_stream(rng)
            except Exception as exc:
                log_.end(ev, f"{type(exc).__name__}: {exc}")
            else:
                log_.end(ev)
        elif f.kind is FaultKind.CLIENT_RESTART:
            ev = log_.begin(f.kind, "")
            try:
                ev.target = await clients.restart_client(rng, rng.uniform(0, max_offline_s))
            except Exception as exc:
                log_.end(ev, f"{type(exc).__name__}: {exc}")
            else:
                log_.end(ev)
        else:
            raise ValueError(f"not a client fault: {f.kind}")
        if await _sleep_or_stop(f.pause_s, stop):
            return
