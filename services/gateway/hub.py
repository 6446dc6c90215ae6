"""The streams open on this gateway, by (user, device), and their routes.

At most one stream per device here: a new one replaces (kicks) the old one, and a
route pointing at another gateway's connection makes that gateway kick it.
Routes in Redis are best effort: if Redis is down or was flushed, streams keep
working, pushes stop reaching them until the next refresh re-registers the route,
and the clients catch up by sync. No message is lost either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from gateway.connection import Connection
from gateway.routes import RouteTable
from gateway.upstream import Peers

log = logging.getLogger(__name__)

REPLACED = "replaced by a newer connection of the same device"
#: Route refreshes per Redis pipeline (one round trip each).
REFRESH_BATCH = 1000


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
    ) -> None:
        self._routes = routes
        self._peers = peers
        self._address = address
        self._refresh_interval_s = refresh_interval_s
        self._conns: dict[tuple[str, str], Connection] = {}
        self._locks: dict[tuple[str, str], _KeyLock] = {}
        self._background: set[asyncio.Task[object]] = set()
        #: Streams whose route registration failed (Redis down): registered again,
        #: not merely refreshed, on the next refresh round.
        self._unregistered: set[Connection] = set()
        self.closing = False

    def __len__(self) -> int:
        return len(self._conns)

    def get(self, user_id: str, device_id: str) -> Connection | None:
        return self._conns.get((user_id, device_id))

    def _background_task(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def attach(self, conn: Connection) -> None:
        """Makes `conn` the device's stream here and points its route at it.

        Registrations of one device are serialised: two quick connections must
        reach Redis in the order they replaced each other here, or the route could
        end up naming the replaced one."""
        old = self._conns.get(conn.key)
        self._conns[conn.key] = conn
        if old is not None:
            log.info("kicking replaced connection", extra=old.log_extra())
            old.kick(REPLACED)
        await self._register(conn)

    async def _register(self, conn: Connection) -> None:
        """Points the device's route at `conn` unconditionally (replacing whatever
        route was there) and kicks the connection the route named before. If Redis
        fails, `conn` is remembered and the next refresh round registers it the same
        way: a refresh would take a route left by a dead gateway for a newer
        connection and kick this live stream."""
        user, device = conn.key
        here = self._address()
        entry = self._locks.setdefault(conn.key, _KeyLock())
        entry.users += 1
        try:
            async with entry.lock:
                if self._conns.get(conn.key) is not conn:
                    self._unregistered.discard(conn)
                    return  # replaced while waiting: the newer one registers
                prev = await self._routes.register(user, device, conn.connection_id, here)
                self._unregistered.discard(conn)
        except (RedisError, OSError) as exc:
            self._unregistered.add(conn)
            log.warning(
                "route not registered (Redis); retried on the next refresh",
                extra={**conn.log_extra(), "error": str(exc)},
            )
            return
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[conn.key]
        if prev is not None and prev.gateway != here:
            self._background_task(
                self._peers.kick(prev.gateway, user, device, prev.connection_id, REPLACED)
            )

    async def detach(self, conn: Connection) -> None:
        """Forgets `conn` and removes its route if the route is still its own."""
        self._unregistered.discard(conn)
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        user, device = conn.key
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
        """One refresh round: extends every open stream's route, re-creates lost
        ones, and kicks streams whose route another connection has taken."""
        for conn in list(self._unregistered):
            if conn.closing or self._conns.get(conn.key) is not conn:
                self._unregistered.discard(conn)
            else:
                await self._register(conn)
        conns = [c for c in self._conns.values() if not c.closing and c not in self._unregistered]
        if not conns:
            return
        here = self._address()
        for start in range(0, len(conns), REFRESH_BATCH):
            batch = conns[start : start + REFRESH_BATCH]
            entries = [(*c.key, c.connection_id, here) for c in batch]
            results = await self._routes.refresh_many(entries)
            for conn, still_ours in zip(batch, results, strict=True):
                current = self._conns.get(conn.key) is conn
                if not still_ours and current:
                    log.info("route taken by another connection; kicking", extra=conn.log_extra())
                    conn.kick(REPLACED)
                elif still_ours and not current:
                    # The stream ended while this round was in Redis: its detach may
                    # have removed the route just before the refresh re-created it.
                    # Remove it again (compare-and-delete: only if still this one's).
                    await self._routes.unregister(*conn.key, conn.connection_id)

    async def refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval_s)
            try:
                await self.refresh_routes()
            except (RedisError, OSError) as exc:
                log.warning("route refresh failed (Redis)", extra={"error": str(exc)})

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
