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
A fault's span (its start to its return) is what `online.measure` takes out of
online delivery times: the bound runs from when the broken part is back.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import redis

from imdev.cluster import ClusterStack
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
    REDIS_KILL = "redis_kill"  # kill -9, start after the downtime (comes back empty)
    POSTGRES_RESTART = "postgres_restart"  # fast shutdown (SIGINT), start
    # A pusher restarted with its TEST-ONLY crash switch: it exits between a
    # fan-out commit and its Deliver calls; then started again without it.
    PUSHER_CRASH_BEFORE_DELIVER = "pusher_crash_before_deliver"
    NATS_DOWN_LONG = "nats_down_long"  # stopped for longer than logic's repair delay
    ROUTE_REMOVED = "route_removed"  # a connected device's route field deleted from Redis
    CLIENT_CUT = "client_cut"  # cut one client's stream mid-traffic
    CLIENT_RESTART = "client_restart"  # close one client "process", reopen on its store
    # Only on the cluster topology (imdev.cluster.ClusterStack):
    PG_FAILOVER = "pg_failover"  # kill -9 the primary, promote, rebuild it as standby
    NATS_NODE_KILL = "nats_node_kill"  # kill -9 one node (even choices: the stream leader)
    NATS_ROLLING = "nats_rolling"  # SIGTERM+restart every node in turn, quorum kept
    NATS_NODE_WIPE = "nats_node_wipe"  # one node stopped, its store wiped, started
    PG_CUT = "pg_cut"  # one service process's PostgreSQL connections reset (proxy)
    NATS_CUT = "nats_cut"  # one service process's NATS connections reset (proxy)


CLIENT_KINDS: tuple[FaultKind, ...] = (FaultKind.CLIENT_CUT, FaultKind.CLIENT_RESTART)
CLUSTER_ONLY_KINDS: tuple[FaultKind, ...] = (
    FaultKind.PG_FAILOVER,
    FaultKind.NATS_NODE_KILL,
    FaultKind.NATS_ROLLING,
    FaultKind.NATS_NODE_WIPE,
    FaultKind.PG_CUT,
    FaultKind.NATS_CUT,
)
#: The server kinds of the single-node stack (`make chaos`).
SERVER_KINDS: tuple[FaultKind, ...] = tuple(
    k for k in FaultKind if k not in CLIENT_KINDS and k not in CLUSTER_ONLY_KINDS
)
#: The server kinds of `make chaos-cluster`: the cluster's own, then all the others
#: (on the cluster, nats_restart/nats_wipe/nats_down_long hit node 0 and
#: postgres_restart the current primary).
CLUSTER_SERVER_KINDS: tuple[FaultKind, ...] = CLUSTER_ONLY_KINDS + SERVER_KINDS
ALL_SERVER_KINDS: tuple[FaultKind, ...] = CLUSTER_SERVER_KINDS
ROLLING_TARGETS = ("gateway", "logic", "pusher")

#: pusher's TEST-ONLY switch (services/pusher/faults.py): with N, the process
#: exits with CRASH_EXIT_STATUS between the N-th fan-out commit that returned
#: deliveries and its Deliver calls.
CRASH_BEFORE_DELIVER_ENV = "IM_PUSHER_TEST_FAULT_CRASH_BEFORE_DELIVER"
CRASH_EXIT_STATUS = 86
#: The crash comes after 1 to this many fan-outs with deliveries.
CRASH_MAX_FANOUTS = 20
#: Margin of `nats_down_long` beyond logic's repair delay and one repair round.
NATS_DOWN_LONG_MARGIN_S = 2.0


def nats_down_long_s(logic_env: Mapping[str, str]) -> float:
    """How long `nats_down_long` keeps NATS down: logic's repair delay
    (`IM_LOGIC_REPAIR_AFTER_S`, as the stack sets it, else logic's default)
    plus one repair round and a margin, so the repair loop has found the
    conversations stuck and fanned them out itself while NATS was down."""
    from logic.config import Settings as LogicSettings

    fields = LogicSettings.model_fields

    def setting(name: str) -> float:
        value = logic_env.get(f"IM_LOGIC_{name.upper()}")
        return float(value) if value else float(fields[name].default)

    return setting("repair_after_s") + 2 * setting("repair_interval_s") + NATS_DOWN_LONG_MARGIN_S


class ClientFaults(Protocol):
    """What the workload lets the scheduler do to its clients. Each returns a
    short description of the victim for the log."""

    async def cut_stream(self, rng: random.Random) -> str: ...

    async def restart_client(self, rng: random.Random, offline_s: float) -> str: ...


@dataclass
class FailoverTimes:
    """One PostgreSQL failover (monotonic times): the primary's kill -9, and the
    launch of the rebuilt standby (None: never rebuilt). In between, no commit
    on the new primary can be confirmed by a synchronous standby, so no send
    first made after the kill may be ACKed before `standby_started`."""

    killed: float
    standby_started: float | None = None


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
    ended: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        del out["ended"]
        return out

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
        ev.ended = True
        log.info("fault", extra={"fault": ev.to_json()})
        if self.echo:
            self.echo(f"fault {ev}")


#: (connected observers, connected SDK devices), each as (user, device) pairs.
ConnectedDevices = Callable[[], tuple[Sequence[tuple[str, str]], Sequence[tuple[str, str]]]]


def settled_since(log_: FaultLog, since: float) -> float:
    """When the server faults that touched [since, now] were all over (monotonic
    time): `since` if none did, inf while one is in progress. Client faults do
    not count (they touch one device's connection, not the server)."""
    server = {k.value for k in ALL_SERVER_KINDS}
    settled = since
    for ev in reversed(log_.events):
        if ev.kind not in server:
            continue
        if not ev.ended:
            return math.inf
        settled = max(settled, log_.started + ev.at + ev.duration_s)
    return settled


class ServerFaults:
    """The server-side faults, acting on a `Stack`. `prepare()` names the victim
    (in the caller's thread: it may look at the clients); the action it returns
    blocks until the victim serves again (or raises): run it in a thread.

    `connected` lists the devices a `route_removed` may pick (observers on even
    choices, SDK devices on odd ones, so a long run hits both);
    `nats_down_long_s` is how long `nats_down_long` keeps NATS down;
    `crash_wait_s` how long a pusher with its crash switch gets to crash."""

    def __init__(
        self,
        stack: Stack,
        restart_timeout_s: float = 90.0,
        start_attempts: int = 8,
        *,
        connected: ConnectedDevices | None = None,
        nats_down_long_s: float = 8.0,
        crash_wait_s: float = 15.0,
        cut: Callable[[str], int] | None = None,
        cut_targets: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.stack = stack
        #: cut(who): resets every proxied connection of process `who` (run in the
        #: proxies' event loop by the caller); cut_targets: {"pg": [who, ...],
        #: "nats": [...]}, the processes whose connections go through proxies.
        self.cut = cut
        #: Each pg_failover's times (monotonic), for the checker's failover numbers.
        self.failovers: list[FailoverTimes] = []
        self.cut_targets = {k: list(v) for k, v in (cut_targets or {}).items()}
        self.timeout = restart_timeout_s
        self.start_attempts = start_attempts
        self.connected = connected
        self.nats_down_long_s = nats_down_long_s
        self.crash_wait_s = crash_wait_s
        self.notes = threading.local()
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    def _procs(self, kind: str) -> list[ServiceProcess]:
        return {
            "gateway": self.stack.gateways,
            "logic": self.stack.logics,
            "pusher": self.stack.pushers,
            "seqsvc": self.stack.seqsvcs,
        }[kind]

    def prepare(self, f: PlannedFault) -> tuple[str, Callable[[], None]]:
        """(the victim for the log, the blocking action)."""
        k = f.kind
        if k in (
            FaultKind.GATEWAY_KILL,
            FaultKind.LOGIC_KILL,
            FaultKind.PUSHER_KILL,
            FaultKind.SEQSVC_KILL,
        ):
            svc = k.value.removesuffix("_kill")
            procs = self._procs(svc)
            i = f.choice % len(procs)
            return f"{svc}[{i}]:{procs[i].port}", lambda: self.kill_restart(procs[i], f.downtime_s)
        if k is FaultKind.SEQSVC_RESTART:
            seqsvcs = self.stack.seqsvcs
            seqsvc = seqsvcs[f.choice % len(seqsvcs)]
            return f"seqsvc:{seqsvc.port}", lambda: self.term_restart(seqsvc, f.downtime_s)
        if k is FaultKind.ROLLING_RESTART:
            kind = ROLLING_TARGETS[f.choice % len(ROLLING_TARGETS)]

            def rolling() -> None:
                for proc in self._procs(kind):
                    self.term_restart(proc, 0.0)

            return f"all {kind}", rolling
        nats, redis_ = self.stack.nats, self.stack.redis
        if k is FaultKind.NATS_RESTART:
            if f.hard:
                return f"nats:{nats.port} (kill -9)", lambda: self.kill_restart(nats, f.downtime_s)
            return f"nats:{nats.port}", lambda: self.term_restart(nats, f.downtime_s)
        if k is FaultKind.NATS_WIPE:
            return f"nats:{nats.port}", lambda: self.nats_wipe(f.downtime_s)
        if k is FaultKind.NATS_DOWN_LONG:
            down = self.nats_down_long_s + f.downtime_s
            return f"nats:{nats.port} (down {down:.1f}s)", lambda: self.term_restart(nats, down)
        if k is FaultKind.REDIS_RESTART:
            return f"redis:{redis_.port}", lambda: self.term_restart(redis_, f.downtime_s)
        if k is FaultKind.REDIS_KILL:
            return f"redis:{redis_.port} (kill -9)", lambda: self.kill_restart(redis_, f.downtime_s)
        if k is FaultKind.REDIS_FLUSH:
            return f"redis:{redis_.port}", self.redis_flush
        if k is FaultKind.POSTGRES_RESTART:
            # PostgresServer.stop() is a fast shutdown (SIGINT).
            pg = self.stack.postgres
            return f"postgres:{pg.port}", lambda: self.term_restart(pg, f.downtime_s)
        if k is FaultKind.PUSHER_CRASH_BEFORE_DELIVER:
            procs = self._procs("pusher")
            i = f.choice % len(procs)
            n = 1 + (f.choice >> 8) % CRASH_MAX_FANOUTS
            return (
                f"pusher[{i}]:{procs[i].port} (crash after {n} fan-outs)",
                lambda: self.crash_before_deliver(procs[i], n),
            )
        if k is FaultKind.ROUTE_REMOVED:
            user, device = self._route_victim(f.choice)
            return f"{user}/{device}", lambda: self.remove_route(user, device)
        if k in CLUSTER_ONLY_KINDS:
            return self._prepare_cluster(f)
        raise ValueError(f"not a server fault: {k}")

    def _cluster(self) -> ClusterStack:
        if not isinstance(self.stack, ClusterStack):
            raise RuntimeError("a cluster fault needs the cluster topology (--cluster)")
        return self.stack

    def _prepare_cluster(self, f: PlannedFault) -> tuple[str, Callable[[], None]]:
        k = f.kind
        cluster = self._cluster()
        if k is FaultKind.PG_FAILOVER:
            return f"postgres primary {cluster.primary_node.node_name}", self.pg_failover
        nodes = cluster.nats_nodes
        if k is FaultKind.NATS_NODE_KILL:
            leader = f.choice % 2 == 0
            what = "stream leader" if leader else f"n{(f.choice >> 1) % len(nodes)}"
            return f"nats {what} (kill -9)", lambda: self.nats_node_kill(
                None if leader else (f.choice >> 1) % len(nodes), f.downtime_s
            )
        if k is FaultKind.NATS_ROLLING:
            return "all nats nodes", self.nats_rolling
        if k is FaultKind.NATS_NODE_WIPE:
            i = f.choice % len(nodes)
            return f"nats n{i}", lambda: self.nats_node_wipe(i, f.downtime_s)
        kind = "pg" if k is FaultKind.PG_CUT else "nats"
        targets = self.cut_targets.get(kind) or []
        if not targets or self.cut is None:
            raise RuntimeError(f"no process reaches {kind} through a proxy")
        who = targets[f.choice % len(targets)]
        cut = self.cut
        return f"{who} -> {kind}", lambda: self._cut(cut, who)

    def _cut(self, cut: Callable[[str], int], who: str) -> None:
        self._note(f"{cut(who)} connection(s) reset")

    def _route_victim(self, choice: int) -> tuple[str, str]:
        observers, devices = self.connected() if self.connected else ((), ())
        pool = (observers if choice % 2 == 0 else devices) or observers or devices
        if not pool:
            raise RuntimeError("no connected device to remove the route of")
        return sorted(pool)[(choice >> 1) % len(pool)]

    # -- the primitives ------------------------------------------------------

    def _lock(self, proc: object) -> threading.Lock:
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
                self._note(f"{proc.name}:{proc.port} start attempt {attempt} failed: {exc}")
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

    def pg_failover(self) -> None:
        """What an operator (or Patroni, or CloudNativePG) does when the primary
        dies: kill -9 it, promote the synchronous standby, rebuild the old
        primary as the new standby with a fresh base backup (never restart it as
        a primary). Writes wait from the kill until the rebuilt standby streams
        again: synchronous commit has no standby to wait for before that."""
        cluster = self._cluster()
        with self._lock(cluster), self._lock(cluster.pg_nodes[0]), self._lock(cluster.pg_nodes[1]):
            t0 = time.monotonic()
            old = cluster.kill_primary()
            times = FailoverTimes(time.monotonic())
            self.failovers.append(times)
            new = cluster.promote_standby(self.timeout)
            t_promoted = time.monotonic() - t0
            cluster.rebuild_deposed(self.timeout)
            times.standby_started = old.standby_started_at
            self._note(
                f"{old.node_name} killed, {new.node_name} promoted after {t_promoted:.2f}s, "
                f"{old.node_name} streaming as synchronous standby after "
                f"{time.monotonic() - t0:.2f}s"
            )

    def nats_node_kill(self, i: int | None, downtime_s: float) -> None:
        """kill -9 node `i` (None: the stream's leader now), start it after
        `downtime_s`."""
        cluster = self._cluster()
        if i is None:
            i = cluster.stream_leader()
            if i is None:
                self._note("no stream leader found; killing n0")
                i = 0
            self._note(f"stream leader n{i}")
        self.kill_restart(cluster.nats_nodes[i], downtime_s)

    def nats_rolling(self) -> None:
        """Every node in turn: SIGTERM, start, and wait until JetStream serves
        again before the next, as a rolling upgrade does."""
        cluster = self._cluster()
        for node in cluster.nats_nodes:
            self.term_restart(node, 0.0)
            cluster.wait_jetstream(self.timeout)

    def nats_node_wipe(self, i: int, downtime_s: float) -> None:
        node = self._cluster().nats_nodes[i]
        with self._lock(node):
            node.stop(timeout=self.timeout)
            node.wipe_store()
            _pause(downtime_s)
            self._start(node)

    def redis_flush(self) -> None:
        with (
            self._lock(self.stack.redis),
            redis.Redis.from_url(self.stack.redis.url(), socket_timeout=10) as r,
        ):
            r.flushall()

    def remove_route(self, user: str, device: str) -> None:
        """Deletes the device's field of its user's route hash (layout:
        services/gateway/routes.py) and nothing else: the stream stays open."""
        key = f"{self.stack.redis_prefix}route:{user}"
        with (
            self._lock(self.stack.redis),
            redis.Redis.from_url(self.stack.redis.url(), socket_timeout=10) as r,
        ):
            if not r.hdel(key, device):
                self._note(f"{user}/{device} had no route to remove")

    def crash_before_deliver(self, proc: ServiceProcess, n: int) -> None:
        """Restarts `proc` (a pusher) with its crash switch at `n`, waits until it
        has crashed (or `crash_wait_s`, then stops it anyway), and starts it again
        without the switch."""
        with self._lock(proc):
            proc.stop(timeout=self.timeout)
            proc.extra_env[CRASH_BEFORE_DELIVER_ENV] = str(n)
            try:
                proc.launch()
                try:
                    proc.wait_ready(self.timeout)
                except RuntimeError:
                    pass  # it crashed before it reported SERVING: that is the fault too
                assert proc.proc is not None
                try:
                    status = proc.proc.wait(self.crash_wait_s)
                except subprocess.TimeoutExpired:
                    proc.stop(timeout=self.timeout)
                    self._note(f"{proc.name}:{proc.port} did not crash in {self.crash_wait_s:g}s")
                else:
                    if status != CRASH_EXIT_STATUS:
                        hint = (
                            f" (unknown setting {CRASH_BEFORE_DELIVER_ENV}?)" if status == 2 else ""
                        )
                        self._note(f"{proc.name}:{proc.port} exited with {status}, not 86{hint}")
            finally:
                proc.extra_env.pop(CRASH_BEFORE_DELIVER_ENV, None)
            self._start(proc)

    def _note(self, note: str) -> None:
        self.notes.items = [*getattr(self.notes, "items", []), note]
        log.warning("fault note", extra={"note": note})


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
        try:
            target, action = faults.prepare(f)
        except Exception as exc:
            ev = log_.begin(f.kind, "")
            log_.end(ev, f"{type(exc).__name__}: {exc}")
            if await _sleep_or_stop(f.pause_s, stop):
                return
            continue
        ev = log_.begin(f.kind, target)

        def act(action: Callable[[], None] = action) -> tuple[list[str], str]:
            """Runs in a worker thread; the notes are that thread's."""
            error = ""
            try:
                action()
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
