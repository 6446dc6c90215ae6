"""Liveness of open streams (I9): a connected device gets every entry of its
timeline within IM_GATEWAY_LIVENESS_S, whatever failed on the push path.

Pushes are the fast path, and every part of it can drop one: Redis flushed or
down (no route, so the pusher pushes nothing), a pusher killed between its
fan-out commit and its Deliver, a fan-out done by logic's repair loop (which
pushes nothing), retransmits given up. The gateway is the one place that knows,
for each open stream, what the device has acknowledged; PostgreSQL (through
logic) knows the timeline's head. Comparing the two needs no state anywhere
else and no work on the message path:

- a stream's *delivered cursor* is the head it opened with (Welcome.head_seq:
  entries at or below it are the client's own sync on connect) or the client's
  cumulative DeliverAck, whichever is higher;
- every stream is checked every `head_check_interval_s` at a random phase: one
  batched Logic.GetHeads per tick for all streams due;
- a head above the cursor and above every Push queued to the stream means an
  entry was never pushed: a Head frame tells the client (which syncs);
- a head that is still above the cursor `catchup_grace_s` later (pushed or not,
  the device has not acknowledged it) makes the gateway push the missing entries
  itself, read from logic's SyncMessages, as ordinary Push frames. A client that
  only reads and ACKs pushes therefore gets everything too.

Pings get the head in their Pong (read with the next tick's lookup, so Pings
of many streams share one call). Duplicate pushes are possible (a catch-up
racing the pusher's own push): clients drop a seq they already hold (protocol
step 7), so they cost a frame, never a second display.

Cost when idle: one head per stream per interval, batched; no frame is written
to a stream that is up to date. Measured for 10,000 idle streams at the default
4 s (`make bench-idle`): about 8 GetHeads calls a second (~300 users each, one
index probe per user), 1-3% of a core in the gateway, 1.6% in logic and 0.5% in
PostgreSQL; no Redis command.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

import grpc

from gateway.config import Settings
from gateway.connection import Connection
from im.common.v1 import common_pb2
from im.logic.v1 import logic_pb2, logic_pb2_grpc
from imcommon.metrics import Metrics

log = logging.getLogger(__name__)

#: Most catch-ups running at once (each reads pages from logic and waits for room
#: in its stream's queue).
MAX_CATCHUPS = 32
#: Longest tick of the check wheel: a recheck or a forced check waits at most this.
MAX_TICK_S = 0.25
#: Most GetHeads calls in flight at once.
MAX_LOOKUPS = 4
#: Page size of a catch-up's SyncMessages (logic caps it at its IM_LOGIC_SYNC_MAX_LIMIT).
CATCHUP_PAGE = 500


class HeadSource(Protocol):
    """Where heads and missing entries are read (logic)."""

    async def heads(self, user_ids: Sequence[str]) -> list[int]:
        """The timeline head of each user, in order (0: empty). Raises on failure."""
        ...

    async def entries(
        self, user_id: str, after_seq: int, limit: int
    ) -> tuple[list[common_pb2.TimelineEntry], bool]:
        """A page of the user's timeline after `after_seq` and whether more follow."""
        ...


class LogicHeads:
    """HeadSource over logic's GetHeads and SyncMessages. `on_store_epoch` is
    called with the store epoch of every GetHeads answer (before the heads are
    returned, so a Welcome written after a head lookup has the epoch too)."""

    def __init__(
        self,
        stub: logic_pb2_grpc.LogicStub,
        timeout_s: float,
        on_store_epoch: Callable[[str], None] | None = None,
    ) -> None:
        self._stub = stub
        self._timeout_s = timeout_s
        self._on_store_epoch = on_store_epoch

    async def heads(self, user_ids: Sequence[str]) -> list[int]:
        resp = await self._stub.GetHeads(
            logic_pb2.GetHeadsRequest(user_ids=user_ids), timeout=self._timeout_s
        )
        if len(resp.heads) != len(user_ids):
            raise RuntimeError(f"GetHeads answered {len(resp.heads)} heads for {len(user_ids)}")
        if resp.store_epoch and self._on_store_epoch is not None:
            self._on_store_epoch(resp.store_epoch)
        return list(resp.heads)

    async def entries(
        self, user_id: str, after_seq: int, limit: int
    ) -> tuple[list[common_pb2.TimelineEntry], bool]:
        resp = await self._stub.SyncMessages(
            logic_pb2.SyncMessagesRequest(user_id=user_id, after_seq=after_seq, limit=limit),
            timeout=self._timeout_s,
        )
        return list(resp.entries), resp.has_more


class HeadLoader:
    """Coalesces head lookups: every user asked for while no call has taken it
    shares one future, and what is waiting leaves in calls of up to `batch_max`
    users (at most MAX_LOOKUPS at once). A failed call resolves its futures with
    None (unknown): callers treat that as "check again later"."""

    def __init__(
        self,
        source: HeadSource,
        batch_max: int,
        on_call: Callable[[str], None],
    ) -> None:
        self._source = source
        self._batch_max = batch_max
        self._on_call = on_call
        self._waiting: dict[str, asyncio.Future[int | None]] = {}
        self._flushers = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, user_id: str) -> asyncio.Future[int | None]:
        fut = self._waiting.get(user_id)
        if fut is None:
            fut = self._waiting[user_id] = asyncio.get_running_loop().create_future()
            if self._flushers < MAX_LOOKUPS and len(self._waiting) > self._flushers * (
                self._batch_max - 1
            ):
                self._flushers += 1
                task = asyncio.ensure_future(self._flush())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return fut

    async def get(self, user_ids: Iterable[str]) -> dict[str, int | None]:
        futs = {u: self.request(u) for u in user_ids}
        if futs:
            await asyncio.wait(futs.values())
        return {u: f.result() for u, f in futs.items()}

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # take what this turn of the loop asks for, together
            while self._waiting:
                batch: dict[str, asyncio.Future[int | None]] = {}
                for user_id in list(self._waiting)[: self._batch_max]:
                    batch[user_id] = self._waiting.pop(user_id)
                values: Sequence[int | None]
                try:
                    values = await self._source.heads(list(batch))
                    self._on_call("ok")
                except (grpc.aio.AioRpcError, RuntimeError, OSError) as exc:
                    self._on_call("error")
                    log.warning(
                        "head lookup failed; checked again later",
                        extra={"users": len(batch), "error": str(exc)},
                    )
                    values = [None] * len(batch)
                for fut, value in zip(batch.values(), values, strict=True):
                    if not fut.done():
                        fut.set_result(value)
        finally:
            self._flushers -= 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(None)
        self._waiting.clear()


class Liveness:
    """Checks every open stream's delivered cursor against its timeline head and
    repairs what the push path dropped (module docstring). One per gateway;
    streams are added once their route is registered and removed when they end."""

    def __init__(
        self,
        settings: Settings,
        source: HeadSource,
        metrics: Metrics,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._source = source
        self._rng = rng or random.Random()
        self._clock = clock
        interval = settings.head_check_interval_s
        self.interval_s = interval
        self.tick_s = min(MAX_TICK_S, interval / 8)
        # A wheel of streams: each sits in one random slot and is checked when
        # the wheel passes it, once per interval.
        slots = max(1, round(interval / self.tick_s))
        self._slots: list[set[Connection]] = [set() for _ in range(slots)]
        self._rechecks: dict[Connection, float] = {}
        #: Pings waiting for the next tick's lookup: (stream, nonce).
        self._pings: list[tuple[Connection, int]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._catchup_slots = asyncio.Semaphore(MAX_CATCHUPS)
        lookups = metrics.counter(
            "gateway_head_lookups",
            "Logic.GetHeads calls of the liveness checks, by result",
            ["result"],
        )
        self._loader = HeadLoader(
            source, settings.heads_batch_max, lambda r: lookups.labels(r).inc()
        )
        self._checked = metrics.counter(
            "gateway_head_checks", "Open streams whose timeline head was checked"
        )
        self._head_frames = metrics.counter(
            "gateway_head_frames", "Head frames written (a head above everything pushed)"
        )
        self._catchups = metrics.counter(
            "gateway_catchups",
            "Catch-ups started: a stream still below its head a grace period later",
        )
        self._catchup_pushes = metrics.counter(
            "gateway_catchup_pushes",
            "Push frames written by catch-ups (entries the push path dropped)",
        )
        self._catchup_errors = metrics.counter(
            "gateway_catchup_errors", "Catch-ups that could not read the timeline (retried)"
        )

    # -- streams ------------------------------------------------------------

    def add(self, conn: Connection) -> None:
        self._slots[self._rng.randrange(len(self._slots))].add(conn)

    def remove(self, conn: Connection) -> None:
        for slot in self._slots:
            slot.discard(conn)
        self._rechecks.pop(conn, None)

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots)

    def check_soon(self, conns: Iterable[Connection]) -> None:
        """Checks these streams on the next tick (e.g. their routes were lost and
        are back: what the pushers could not route is pushed now)."""
        now = self._clock()
        for conn in conns:
            self._rechecks[conn] = now

    async def head_at_connect(self, user_id: str) -> int:
        """The user's timeline head for a new stream's Welcome; -1 if the store did
        not answer within heads_timeout_s (the first check then sets the cursor)."""
        fut = self._loader.request(user_id)
        try:
            head = await asyncio.wait_for(asyncio.shield(fut), self._settings.heads_timeout_s)
        except TimeoutError:
            return -1
        return -1 if head is None else head

    def ping(self, conn: Connection, nonce: int) -> None:
        """Answers a Ping with the head, read with the next tick's lookup (a Pong
        waits at most one tick): Pings of many streams cost one GetHeads together
        with the checks, instead of one small call each (bench/e2e_idle.py)."""
        self._pings.append((conn, nonce))

    # -- the checks ---------------------------------------------------------

    async def run(self) -> None:
        """Turns the wheel until cancelled."""
        tick = 0
        try:
            while True:
                await asyncio.sleep(self.tick_s)
                due = list(self._slots[tick % len(self._slots)])
                tick += 1
                if self._rechecks:
                    now = self._clock()
                    for conn, at in list(self._rechecks.items()):
                        if at <= now:
                            due.append(conn)
                            del self._rechecks[conn]
                due = [c for c in dict.fromkeys(due) if not c.closing]
                pings, self._pings = self._pings, []
                if due or pings:
                    self._spawn(self.check(due, pings))
        finally:
            for task in list(self._tasks):
                task.cancel()
            await self._loader.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("liveness task failed", exc_info=task.exception())

    async def check(
        self, conns: Sequence[Connection], pings: Sequence[tuple[Connection, int]] = ()
    ) -> None:
        """One check of these streams (one head per user, then evaluate() each),
        and the Pongs of these Pings (head 0 when it could not be read)."""
        users = {c.identity.user_id for c in conns}
        users.update(c.identity.user_id for c, _ in pings)
        heads = await self._loader.get(users)
        self._checked.inc(len(conns))
        for conn in conns:
            head = heads.get(conn.identity.user_id)
            if head is not None:
                self.evaluate(conn, head)
        for conn, nonce in pings:
            conn.write_pong(nonce, heads.get(conn.identity.user_id) or 0)

    def evaluate(self, conn: Connection, head: int) -> None:
        """Compares a freshly read head with the stream's cursor and acts."""
        if conn.closing:
            return
        if not conn.cursor_known:
            conn.start_cursor(head)  # the Welcome went out without a head
            return
        delivered = conn.delivered
        if head <= delivered:
            conn.pending_head = 0
            return
        pending = conn.pending_head
        if pending and delivered < pending:
            # Seen a grace period ago and still not acknowledged: push it ourselves.
            conn.pending_head = 0
            if not conn.catching_up:
                self._catchups.inc()
                conn.catching_up = True
                self._spawn(self._catch_up(conn, delivered, head))
            return
        if head > max(delivered, conn.pushed_seq) and conn.write_head(head):
            self._head_frames.inc()
        conn.pending_head = head
        self._rechecks[conn] = self._clock() + self._settings.catchup_grace_s

    async def _catch_up(self, conn: Connection, after: int, head: int) -> None:
        """Pushes the stream's timeline after `after` (at most catchup_max_entries),
        in seq order, then a Head frame: a client that lost or ignored the pushes
        (they were written before, and still not acknowledged) syncs on it; one
        that applied them finds the head at its local seq. A failure leaves it to
        the stream's next check."""
        user_id = conn.identity.user_id
        budget = self._settings.catchup_max_entries
        try:
            async with self._catchup_slots:
                while budget > 0 and not conn.closing:
                    entries, has_more = await self._source.entries(
                        user_id, after, min(budget, CATCHUP_PAGE)
                    )
                    for entry in entries:
                        if not await conn.push_entry(entry.seq, entry.message):
                            return
                        self._catchup_pushes.inc()
                        after = entry.seq
                        budget -= 1
                    if not has_more or not entries:
                        break
            if conn.write_head(max(head, after)):
                self._head_frames.inc()
        except grpc.aio.AioRpcError as exc:
            self._catchup_errors.inc()
            log.info(
                "catch-up could not read the timeline; the next check retries",
                extra={**conn.log_extra(), "code": exc.code().name},
            )
        finally:
            conn.catching_up = False
