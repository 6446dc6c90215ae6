"""Presence: online / offline / last seen, read from the routes in Redis.

- Online: the user's route hash (gateway/routes.py) has a live field, i.e. one
  whose expires_ms is above Redis TIME. A gateway that dies stops refreshing its
  routes, so its users read offline at most IM_GATEWAY_ROUTE_TTL_S after its last
  refresh, with nobody cleaning up.
- Last seen (offline users): the user's `lastseen` key, stamped by every route
  write and removal (routes.py): the moment a device last disconnected cleanly,
  or the last refresh of a route whose gateway died. 0 = unknown (never seen, or
  longer ago than IM_GATEWAY_LAST_SEEN_TTL_S). For an online user it is now.
- Visible only to users who share a conversation with the caller (Logic.SharedUsers);
  a request naming any other user (a "stranger") is refused whole, naming them.
  The caller may always ask about itself.

GetPresence reads once. SubscribePresence stores the users on the connection (at
most IM_GATEWAY_PRESENCE_MAX_SUBSCRIPTIONS), pushes their state at once as one
PresenceUpdate, then each change: a poller reads every subscribed user of this
gateway in one pipelined round every IM_GATEWAY_PRESENCE_POLL_S and pushes a
PresenceUpdate to each subscribed connection whose users changed (state, or last
seen while offline). A change is therefore pushed at most one poll interval after
Redis shows it: a user whose gateway was killed is shown offline within
route TTL + poll interval. Changes shorter than a poll interval (offline and back)
may be missed; subscribers see the latest state, not every transition.

Nothing here is on the message path: reads run in their own tasks, frames are
queued without waiting (Connection.signal), and Redis down means GetPresence
UNAVAILABLE, FrameError UNAVAILABLE for a SubscribePresence, and no updates until
it answers (subscriptions stay; the next successful poll pushes what changed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from gateway.config import Settings
from gateway.connection import Connection
from gateway.ephemeral import (
    INVALID_ARGUMENT,
    PERMISSION_DENIED,
    RATE_LIMITED,
    UNAVAILABLE,
    Refused,
    check_user_ids,
    refused_by_logic,
)
from gateway.ratelimit import TokenBucket
from gateway.routes import last_seen_key, route_key
from im.gateway.v1 import gateway_pb2
from im.logic.v1 import logic_pb2, logic_pb2_grpc
from imcommon.metrics import Metrics

log = logging.getLogger(__name__)

FRAME = "subscribe_presence"
ONLINE = gateway_pb2.PresenceState.PRESENCE_STATE_ONLINE
OFFLINE = gateway_pb2.PresenceState.PRESENCE_STATE_OFFLINE

#: Most users in one GetPresence call (gateway.proto).
MAX_GET_PRESENCE = 200
#: Most users one SharedUsers call may name (logic.proto).
SHARED_USERS_MAX = 1000
#: Users read per Redis pipeline (two commands each) by the poller.
READ_BATCH = 1000
POLL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# KEYS[1] a user's route key. {live routes, Redis time in ms}.
STATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 2, #all, 2 do
  local exp = tonumber(string.match(all[i], '^(%d+)|'))
  if exp and exp > now then live = live + 1 end
end
return {live, now}
"""
_STATE_SHA = hashlib.sha1(STATE.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class State:
    online: bool
    #: Unix ms: now when online, else when last seen (0 = unknown).
    last_seen_ms: int

    def proto(self, user_id: str) -> gateway_pb2.Presence:
        return gateway_pb2.Presence(
            user_id=user_id,
            state=ONLINE if self.online else OFFLINE,
            last_seen_ms=self.last_seen_ms,
        )

    def differs(self, other: State | None) -> bool:
        """Worth a PresenceUpdate: the state changed, or the last seen while offline
        (an online user's last seen is "now" and always moves)."""
        if other is None or other.online != self.online:
            return True
        return not self.online and other.last_seen_ms != self.last_seen_ms


class PresenceStore:
    """Reads presence from the routes (read-only: the route writes stamp last seen).
    One pipeline per READ_BATCH users, two single-key commands per user; the state
    script goes by its SHA, with the body again only after NOSCRIPT."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def read(self, user_ids: Sequence[str]) -> dict[str, State]:
        """The state of each distinct user. Raises redis errors."""
        users = list(dict.fromkeys(user_ids))
        out: dict[str, State] = {}
        for start in range(0, len(users), READ_BATCH):
            batch = users[start : start + READ_BATCH]
            results = await self._pipeline(batch, by_sha=True)
            if any(isinstance(r, NoScriptError) for r in results[0::2]):
                results = await self._pipeline(batch, by_sha=False)
            for i, user in enumerate(batch):
                state, seen = results[2 * i], results[2 * i + 1]
                for r in (state, seen):
                    if isinstance(r, Exception):
                        raise r
                live, now = int(state[0]), int(state[1])
                out[user] = State(True, now) if live else State(False, int(seen or 0))
        return out

    async def _pipeline(self, users: list[str], *, by_sha: bool) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for user in users:
                key = route_key(self._prefix, user)
                if by_sha:
                    pipe.evalsha(_STATE_SHA, 1, key)
                else:
                    pipe.eval(STATE, 1, key)
                pipe.get(last_seen_key(self._prefix, user))
            return list(await pipe.execute(raise_on_error=False))


class StateSource(Protocol):
    async def read(self, user_ids: Sequence[str]) -> dict[str, State]: ...


class Visibility(Protocol):
    async def shared(self, user_id: str, user_ids: Sequence[str]) -> set[str]:
        """The subset of `user_ids` sharing a conversation with `user_id`. Raises
        Refused (UNAVAILABLE when logic does not answer)."""
        ...


class LogicVisibility:
    """Visibility over Logic.SharedUsers."""

    def __init__(self, stub: logic_pb2_grpc.LogicStub, timeout_s: float) -> None:
        self._stub = stub
        self._timeout_s = timeout_s

    async def shared(self, user_id: str, user_ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for start in range(0, len(user_ids), SHARED_USERS_MAX):
            try:
                resp = await self._stub.SharedUsers(
                    logic_pb2.SharedUsersRequest(
                        user_id=user_id, user_ids=user_ids[start : start + SHARED_USERS_MAX]
                    ),
                    timeout=self._timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                raise refused_by_logic(exc, "presence visibility") from None
            out.update(resp.user_ids)
        return out


class _ConnPresence:
    """One connection's subscriptions: user -> the state last pushed to it."""

    __slots__ = ("bucket", "closed", "queue", "subs", "worker")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.subs: dict[str, State] = {}
        #: SubscribePresence frames not processed yet, in arrival order.
        self.queue: deque[gateway_pb2.SubscribePresence] = deque()
        self.worker: asyncio.Task[None] | None = None
        self.closed = False


class PresenceService:
    """GetPresence, SubscribePresence and the poller (module docstring)."""

    def __init__(
        self,
        settings: Settings,
        store: StateSource,
        visibility: Visibility,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._store = store
        self._visibility = visibility
        self._clock = clock
        #: user -> the connections here subscribed to them.
        self._subscribers: dict[str, set[Connection]] = {}
        self._redis_down = False
        self._frames = metrics.counter(
            "gateway_presence_frames",
            "SubscribePresence frames by result: ok, or the FrameError code that refused them",
            ["result"],
        )
        self._subscriptions = metrics.gauge(
            "gateway_presence_subscriptions",
            "Presence subscriptions of the streams on this gateway (connection, user pairs)",
        )
        self._watched = metrics.gauge(
            "gateway_presence_watched_users", "Distinct users the presence poller reads"
        )
        self._watched.set_function(lambda: len(self._subscribers))
        self._polls = metrics.counter(
            "gateway_presence_polls", "Presence poll rounds by result (ok, failed)", ["result"]
        )
        self._poll_seconds = metrics.histogram(
            "gateway_presence_poll_seconds",
            "Duration of one presence poll round (Redis reads and queueing updates)",
            buckets=POLL_BUCKETS,
        )
        self._updates = metrics.counter(
            "gateway_presence_updates",
            "PresenceUpdate frames queued to streams, by cause (subscribe, change)",
            ["cause"],
        )

    # -- GetPresence -------------------------------------------------------------

    async def get(self, caller: str, user_ids: Sequence[str]) -> list[gateway_pb2.Presence]:
        """The presence of each of `user_ids`, in order. Raises Refused:
        INVALID_ARGUMENT, PERMISSION_DENIED (a stranger among them; nothing is
        answered), UNAVAILABLE (logic or Redis)."""
        ids = list(user_ids)
        problem = check_user_ids(ids, MAX_GET_PRESENCE)
        if problem is not None:
            raise Refused(INVALID_ARGUMENT, problem)
        await self._check_visible(caller, ids)
        states = await self._read(ids)
        return [states[u].proto(u) for u in ids]

    async def _check_visible(self, caller: str, user_ids: Sequence[str]) -> None:
        others = [u for u in dict.fromkeys(user_ids) if u != caller]
        if not others:
            return
        shared = await self._visibility.shared(caller, others)
        strangers = [u for u in others if u not in shared]
        if strangers:
            named = ", ".join(strangers[:10]) + (" ..." if len(strangers) > 10 else "")
            raise Refused(
                PERMISSION_DENIED,
                f"no conversation shared with {len(strangers)} of the users: {named}",
            )

    async def _read(self, user_ids: Sequence[str]) -> dict[str, State]:
        try:
            return await self._store.read(user_ids)
        except (RedisError, OSError) as exc:
            raise Refused(UNAVAILABLE, f"presence store unavailable ({exc})") from None

    # -- SubscribePresence ---------------------------------------------------------

    def on_subscribe(self, conn: Connection, frame: gateway_pb2.SubscribePresence) -> None:
        """Checks and limits one SubscribePresence frame and queues it for the
        connection's worker (frames of one connection are processed in order).
        Never waits: called from the stream's read loop."""
        st = conn.presence_state
        if st is None:
            st = conn.presence_state = _ConnPresence(
                TokenBucket(
                    self._settings.presence_subscribe_rate_per_s,
                    self._settings.presence_subscribe_burst,
                    self._clock(),
                )
            )
        limit = self._settings.presence_max_subscriptions
        problem = check_user_ids(list(frame.user_ids), limit)
        if problem is None and not frame.unsubscribe:
            new = set(frame.user_ids) - st.subs.keys()
            if len(st.subs) + len(new) > limit:
                problem = (
                    f"{len(st.subs)} subscriptions + {len(new)} new > {limit} per connection "
                    "(IM_GATEWAY_PRESENCE_MAX_SUBSCRIPTIONS)"
                )
        if problem is not None:
            self._refuse(conn, Refused(INVALID_ARGUMENT, problem))
            return
        if not st.bucket.take(self._clock()):
            self._refuse(
                conn,
                Refused(
                    RATE_LIMITED,
                    f"more than {self._settings.presence_subscribe_rate_per_s:g} "
                    f"SubscribePresence frames/s (burst {self._settings.presence_subscribe_burst})",
                ),
            )
            return
        st.queue.append(frame)
        if st.worker is None:
            st.worker = asyncio.ensure_future(self._work(conn, st))

    def _refuse(self, conn: Connection, exc: Refused) -> None:
        self._frames.labels(exc.label).inc()
        conn.frame_error(FRAME, exc.code, exc.reason)

    async def _work(self, conn: Connection, st: _ConnPresence) -> None:
        try:
            while st.queue and not st.closed:
                frame = st.queue.popleft()
                try:
                    if frame.unsubscribe:
                        self._unsubscribe(conn, st, frame.user_ids)
                    else:
                        await self._subscribe(conn, st, list(dict.fromkeys(frame.user_ids)))
                    self._frames.labels("ok").inc()
                except Refused as exc:
                    self._refuse(conn, exc)
        except Exception:
            log.exception("presence subscription failed", extra=conn.log_extra())
        finally:
            st.worker = None

    async def _subscribe(self, conn: Connection, st: _ConnPresence, users: list[str]) -> None:
        limit = self._settings.presence_max_subscriptions
        if len(st.subs.keys() | set(users)) > limit:
            raise Refused(INVALID_ARGUMENT, f"more than {limit} subscriptions per connection")
        await self._check_visible(conn.key[0], users)
        states = await self._read(users)
        if st.closed:
            return
        update = gateway_pb2.PresenceUpdate(presences=[states[u].proto(u) for u in users])
        for user in users:
            if user not in st.subs:
                self._subscribers.setdefault(user, set()).add(conn)
                self._subscriptions.inc()
            st.subs[user] = states[user]
        if not conn.signal(gateway_pb2.ServerFrame(presence=update)):
            # Not written (queue full): make the next poll push them again.
            for user in users:
                st.subs[user] = _UNSENT
        else:
            self._updates.labels("subscribe").inc()

    def _unsubscribe(self, conn: Connection, st: _ConnPresence, users: Sequence[str]) -> None:
        for user in users:
            if st.subs.pop(user, None) is None:
                continue
            self._subscriptions.dec()
            conns = self._subscribers.get(user)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._subscribers[user]

    def forget(self, conn: Connection) -> None:
        """Drops the subscriptions of a stream that ended. Idempotent."""
        st = conn.presence_state
        if not isinstance(st, _ConnPresence) or st.closed:
            return
        st.closed = True
        st.queue.clear()
        if st.worker is not None:
            st.worker.cancel()
        self._unsubscribe(conn, st, list(st.subs))

    # -- the poller ------------------------------------------------------------------

    async def run(self) -> None:
        """The poller: every presence_poll_s, one round over every subscribed user
        of this gateway (nothing while there are none). Runs until cancelled."""
        interval = self._settings.presence_poll_s
        while True:
            await asyncio.sleep(interval)
            if not self._subscribers:
                continue
            try:
                await self.poll_once()
            except Exception:
                # Presence must never take the gateway (and its streams) down.
                self._polls.labels("failed").inc()
                log.exception("presence poll failed")

    async def poll_once(self) -> int:
        """Reads every subscribed user and pushes the changes; returns how many
        PresenceUpdate frames were queued. Redis errors are logged and counted."""
        started = time.perf_counter()
        users = list(self._subscribers)
        try:
            states = await self._store.read(users)
        except (RedisError, OSError) as exc:
            self._polls.labels("failed").inc()
            if not self._redis_down:
                self._redis_down = True
                log.warning(
                    "presence poll failed (Redis); no presence updates until it answers",
                    extra={"error": str(exc)},
                )
            return 0
        if self._redis_down:
            self._redis_down = False
            log.info("presence poll works again")
        changes: dict[Connection, list[str]] = {}
        for user, state in states.items():
            for conn in self._subscribers.get(user, ()):
                st = conn.presence_state
                if state.differs(st.subs.get(user)):
                    changes.setdefault(conn, []).append(user)
        sent = 0
        for conn, changed in changes.items():
            st = conn.presence_state
            update = gateway_pb2.PresenceUpdate(presences=[states[u].proto(u) for u in changed])
            # Not written (queue full, closing): the next round tries again.
            if conn.signal(gateway_pb2.ServerFrame(presence=update)):
                sent += 1
                for user in changed:
                    if user in st.subs:
                        st.subs[user] = states[user]
        if sent:
            self._updates.labels("change").inc(sent)
        self._polls.labels("ok").inc()
        self._poll_seconds.observe(time.perf_counter() - started)
        return sent


#: A state no read returns: the next poll pushes the user again.
_UNSENT = State(online=False, last_seen_ms=-1)
