"""The streams open on this gateway, by (user, device), and their routes.

At most one stream per device here: a new one replaces (kicks) the old one, and a
route pointing at another gateway's connection makes that gateway kick it.

Routes in Redis are best effort: if Redis is down or lost them, streams keep
working and no message is lost. The hub puts every open stream's route back as soon
as Redis can hold it again, not at the next refresh round:

- a registration or refresh that fails (Redis down) makes the keeper loop retry on
  a short backoff (REPAIR_BACKOFF_MIN_S doubling to REPAIR_BACKOFF_MAX_S, plus the
  client's own retries) until Redis answers, then re-register every stream; streams
  that open meanwhile are queued for that, not made to wait for Redis;
- a loss while Redis stays up (FLUSHALL, a restart between two calls, failover,
  eviction) is found by a sentinel key per gateway, written before every refresh
  round and checked every `check_interval_s` (1 s) while streams are open: one
  EVALSHA per gateway per second, whatever the number of streams.

Why a sentinel: the only other way to notice a lost route is to touch it, and
refreshing every route every second costs one script per stream per second; a
REFRESH that reports a re-created route notices the loss only at the round (10 s).
One sentinel per gateway is enough because each round writes it before the routes
it vouches for: a loss after that write takes the sentinel too; the routes written
before it are refreshed (re-created if lost) by that same round, and streams that
open later register after it. The check script is run by its SHA, so Redis having
forgotten it (NOSCRIPT) also reveals a restart from a persisted snapshot that
still holds the sentinel but not the newest routes. A failed check or round is
treated like a failed registration (Redis down).

Routes whose stream had none (a registration that failed and later succeeded, a
route re-created after a flush, restart or expiry) are reported to
`on_routes_restored`, once per repair, so pushes missed meanwhile can be caught up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from gateway.connection import Connection
from gateway.routes import Refreshed, RouteTable
from gateway.upstream import Peers

log = logging.getLogger(__name__)

REPLACED = "replaced by a newer connection of the same device"
#: Route refreshes per Redis pipeline (one round trip each).
REFRESH_BATCH = 1000
#: The keeper's wait after a failed round, doubling up to the maximum while Redis
#: stays unreachable. The maximum bounds how long routes lag behind Redis coming
#: back (plus one round); meanwhile a gateway tries about once per second.
REPAIR_BACKOFF_MIN_S = 0.5
REPAIR_BACKOFF_MAX_S = 1.0


class _KeyLock:
    """A lock for one device, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Hub:
    def __init__(
        self,
        routes: RouteTable,
        peers: Peers,
        address: Callable[[], str],
        refresh_interval_s: float,
        *,
        check_interval_s: float = 1.0,
        on_routes_restored: Callable[[list[Connection]], None] | None = None,
    ) -> None:
        self._routes = routes
        self._peers = peers
        self._address = address
        self._refresh_interval_s = refresh_interval_s
        self._check_interval_s = check_interval_s
        self._on_routes_restored = on_routes_restored
        self._conns: dict[tuple[str, str], Connection] = {}
        #: The same streams by user: user -> {device: stream} (GatewayInternal.Signal
        #: to "every device of the user here").
        self._by_user: dict[str, dict[str, Connection]] = {}
        self._locks: dict[tuple[str, str], _KeyLock] = {}
        self._background: set[asyncio.Task[object]] = set()
        #: Streams whose route registration failed or was deferred (Redis down):
        #: registered again, not merely refreshed, by the next round.
        self._unregistered: set[Connection] = set()
        #: Set when a round is due now (a registration failed, Redis lost routes).
        self._round_due = asyncio.Event()
        #: The last Redis call failed and no round has succeeded since.
        self._redis_down = False
        self.closing = False

    def __len__(self) -> int:
        return len(self._conns)

    def get(self, user_id: str, device_id: str) -> Connection | None:
        return self._conns.get((user_id, device_id))

    def devices(self, user_id: str) -> list[Connection]:
        """The user's streams on this gateway (one per device)."""
        conns = self._by_user.get(user_id)
        return list(conns.values()) if conns else []

    def _background_task(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def attach(self, conn: Connection) -> None:
        """Makes `conn` the device's stream here and points its route at it.

        Registrations of one device are serialised: two quick connections must
        reach Redis in the order they replaced each other here, or the route could
        end up naming the replaced one. While Redis is known to be down the route is
        left to the keeper (registered as soon as Redis answers), so the stream is
        not held up; the first stream to find Redis down waits out the client's
        retries (imcommon.redisconn, about 1 s)."""
        old = self._conns.get(conn.key)
        self._conns[conn.key] = conn
        user, device = conn.key
        self._by_user.setdefault(user, {})[device] = conn
        if old is not None:
            log.info("kicking replaced connection", extra=old.log_extra())
            old.kick(REPLACED)
        if self._redis_down:
            self._defer(conn)
            return
        try:
            await self._register(conn)
        except (RedisError, OSError) as exc:
            self._defer(conn)
            log.warning(
                "route not registered (Redis); registered once Redis answers",
                extra={**conn.log_extra(), "error": str(exc)},
            )

    def _defer(self, conn: Connection) -> None:
        """Leaves `conn`'s registration to the keeper's next round, which is due now."""
        self._unregistered.add(conn)
        self._redis_down = True
        self._round_due.set()

    async def _register(self, conn: Connection) -> bool:
        """Points the device's route at `conn` unconditionally (replacing whatever
        route was there) and kicks the connection the route named before. Returns
        False without writing if `conn` was replaced meanwhile. Raises redis errors,
        leaving `conn` as it was (in `_unregistered` or not): a stream whose
        registration failed must be registered this same way later, since a refresh
        would take a route left by a dead gateway for a newer connection and kick
        this live stream."""
        user, device = conn.key
        here = self._address()
        entry = self._locks.setdefault(conn.key, _KeyLock())
        entry.users += 1
        try:
            async with entry.lock:
                if self._conns.get(conn.key) is not conn:
                    self._unregistered.discard(conn)
                    return False  # replaced while waiting: the newer one registers
                prev = await self._routes.register(user, device, conn.connection_id, here)
                self._unregistered.discard(conn)
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[conn.key]
        if prev is not None and prev.gateway != here:
            self._background_task(
                self._peers.kick(prev.gateway, user, device, prev.connection_id, REPLACED)
            )
        return True

    async def detach(self, conn: Connection) -> None:
        """Forgets `conn` and removes its route if the route is still its own."""
        self._unregistered.discard(conn)
        user, device = conn.key
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
            of_user = self._by_user.get(user)
            if of_user is not None:
                of_user.pop(device, None)
                if not of_user:
                    del self._by_user[user]
        try:
            await self._routes.unregister(user, device, conn.connection_id)
        except (RedisError, OSError) as exc:
            log.info(
                "route not removed (Redis); it expires by itself",
                extra={**conn.log_extra(), "error": str(exc)},
            )

    def kick(self, user_id: str, device_id: str, connection_id: str, reason: str) -> bool:
        conn = self._conns.get((user_id, device_id))
        if conn is None or conn.connection_id != connection_id:
            return False
        conn.kick(reason or REPLACED)
        return True

    async def refresh_routes(self) -> None:
        """One round: writes this gateway's sentinel, registers the streams whose
        registration failed, extends every other open stream's route (re-creating
        lost ones), and kicks streams whose route another connection has taken.
        Streams that got back a route they had lost are reported to
        `on_routes_restored`, also when the round fails part way. Raises redis
        errors at the first failure (the rest waits for the next round)."""
        here = self._address()
        restored: list[Connection] = []
        try:
            await self._routes.mark_alive(here)
            for conn in list(self._unregistered):
                if conn.closing or self._conns.get(conn.key) is not conn:
                    self._unregistered.discard(conn)
                elif await self._register(conn):
                    restored.append(conn)
            # A stream whose registration is in flight gets its route from it; a
            # refresh now would re-create it first and pass it off as restored.
            conns = [
                c
                for c in self._conns.values()
                if not c.closing and c not in self._unregistered and c.key not in self._locks
            ]
            for start in range(0, len(conns), REFRESH_BATCH):
                batch = conns[start : start + REFRESH_BATCH]
                entries = [(*c.key, c.connection_id, here) for c in batch]
                results = await self._routes.refresh_many(entries)
                for conn, result in zip(batch, results, strict=True):
                    current = self._conns.get(conn.key) is conn
                    if result == Refreshed.TAKEN:
                        if current:
                            log.info(
                                "route taken by another connection; kicking",
                                extra=conn.log_extra(),
                            )
                            conn.kick(REPLACED)
                    elif not current:
                        # The stream ended while this round was in Redis: its detach
                        # may have removed the route just before the refresh
                        # re-created it. Remove it again (compare-and-delete: only
                        # if still this one's).
                        await self._routes.unregister(*conn.key, conn.connection_id)
                    elif result == Refreshed.RECREATED:
                        restored.append(conn)
        finally:
            if restored:
                self._report_restored(restored)

    def _report_restored(self, conns: list[Connection]) -> None:
        log.info("routes restored", extra={"streams": len(conns)})
        if self._on_routes_restored is None:
            return
        try:
            self._on_routes_restored(conns)
        except Exception:
            log.exception("on_routes_restored failed")

    async def refresh_loop(self) -> None:
        """The keeper: runs until cancelled. A round at start (it writes the
        sentinel), then every `refresh_interval_s`; in between, while streams are
        open, checks the sentinel every `check_interval_s` and runs a round at once
        when Redis lost routes or a registration failed. A failed round is retried
        after REPAIR_BACKOFF_MIN_S, doubling up to REPAIR_BACKOFF_MAX_S, until one
        succeeds; every route is then back."""
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        backoff = REPAIR_BACKOFF_MIN_S
        down_since: float | None = None
        while True:
            try:
                if self._round_due.is_set() or loop.time() >= next_round:
                    self._round_due.clear()
                    await self.refresh_routes()
                    next_round = loop.time() + self._refresh_interval_s
                elif self._conns and not await self._routes.alive(self._address()):
                    log.warning(
                        "Redis lost this gateway's routes (flush or restart); re-registering",
                        extra={"streams": len(self._conns)},
                    )
                    self._round_due.set()
                    continue
            except (RedisError, OSError) as exc:
                self._round_due.set()
                self._redis_down = True
                if down_since is None:
                    down_since = loop.time()
                    log.warning(
                        "Redis unreachable; routes re-registered once it answers",
                        extra={"error": str(exc)},
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, REPAIR_BACKOFF_MAX_S)
                continue
            if not self._round_due.is_set():
                self._redis_down = False
                if down_since is not None:
                    log.info(
                        "Redis answers again; routes re-registered",
                        extra={"down_s": round(loop.time() - down_since, 3)},
                    )
                    down_since = None
            backoff = REPAIR_BACKOFF_MIN_S
            # Woken every check interval even with no stream open, so the checks
            # start within one interval of the first stream opening.
            wait_s = min(max(0.0, next_round - loop.time()), self._check_interval_s)
            try:
                await asyncio.wait_for(self._round_due.wait(), wait_s)
            except TimeoutError:
                pass

    def go_away_all(self, reason: str, reconnect_after_ms: int) -> int:
        """GoAway to every open stream (its client reconnects, to any gateway);
        new streams are still accepted. Returns how many were told."""
        conns = list(self._conns.values())
        for conn in conns:
            conn.go_away(reason, reconnect_after_ms)
        return len(conns)

    async def shutdown(self, reconnect_after_ms: int, wait_s: float) -> None:
        """GoAway to every stream, then waits (up to `wait_s`) until they ended.
        New streams are refused from now on."""
        self.closing = True
        conns = list(self._conns.values())
        log.info("sending GoAway", extra={"streams": len(conns)})
        for conn in conns:
            conn.go_away("gateway shutting down; reconnect to any gateway", reconnect_after_ms)
        waits = [asyncio.ensure_future(c.done.wait()) for c in conns]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=wait_s)
            for w in pending:
                w.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=1.0)
