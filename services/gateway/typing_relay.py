"""Typing indicators: a Typing frame becomes a TypingNotice on the online devices
of the conversation's other members. Ephemeral: never stored, never retried,
never in the way of a message.

Path of one frame:

1. In the stream's read loop (`on_typing`, never awaits): the conversation id is
   checked, then two limits, and a refusal is a FrameError (the stream stays
   open; nothing is forwarded):
   - per connection and conversation, a notice with the same typing state as the
     last forwarded one is refused within IM_GATEWAY_TYPING_MIN_INTERVAL_MS of it
     (a change of state, e.g. "stopped", passes at once);
   - per connection, a token bucket over all conversations
     (IM_GATEWAY_TYPING_RATE_PER_S, IM_GATEWAY_TYPING_BURST) catches floods that
     alternate states or conversations.
   What passes goes on in a task of its own.
2. The members come from Logic.GetMembers (which refuses a non-member:
   PERMISSION_DENIED), cached per conversation for IM_GATEWAY_TYPING_MEMBERS_CACHE_S.
   A caller missing from a cached list is asked for again (a member just added is
   not refused for a cache period). A removed member may still get notices, and
   still send them, for up to the cache period. Conversations above
   IM_GATEWAY_TYPING_MAX_MEMBERS get FrameError INVALID_ARGUMENT.
3. The notice goes to every stream of the other members (never to the typer's
   own devices): streams on this gateway straight from the hub (no Redis needed);
   streams elsewhere by their routes in Redis, with one GatewayInternal.Signal
   call per gateway (IM_GATEWAY_SIGNAL_TIMEOUT_S, one attempt).

Delivery is best effort and silent: a receiver whose queue is full, a gateway
that does not answer, or Redis being down (remote receivers are then skipped)
cost a notice, and the typer gets no error for them. Receivers drop a typing state
by themselves `expires_in_ms` after its last notice, so a lost "stopped" notice
costs at most that long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from redis.exceptions import RedisError

from gateway.config import Settings
from gateway.connection import MAX_CONVERSATION_ID_CHARS, Connection
from gateway.ephemeral import (
    INVALID_ARGUMENT,
    RATE_LIMITED,
    UNAVAILABLE,
    Refused,
    refused_by_logic,
)
from gateway.ratelimit import TokenBucket
from gateway.routes import Route
from im.gateway.v1 import gateway_pb2
from im.logic.v1 import logic_pb2, logic_pb2_grpc
from imcommon.metrics import Metrics

log = logging.getLogger(__name__)

FRAME = "typing"
#: Conversations whose last forwarded notice one connection remembers (LRU); a
#: forgotten one only loses its min-interval check (the bucket still applies).
MAX_TRACKED_CONVERSATIONS = 64
#: Typing fan-outs in flight on this gateway at once; beyond it a frame gets
#: FrameError UNAVAILABLE (the gateway is overloaded; typing is the first to go).
MAX_INFLIGHT = 1000


class MemberSource(Protocol):
    async def members(self, user_id: str, conversation_id: str) -> Sequence[str]:
        """The current members of a conversation `user_id` belongs to. Raises
        Refused (PERMISSION_DENIED for a non-member, UNAVAILABLE...)."""
        ...


class RouteSource(Protocol):
    async def lookup_many(self, user_ids: list[str]) -> dict[str, list[Route]]:
        """Live routes of each user (absent: none). Raises redis errors."""
        ...


class LocalStreams(Protocol):
    def devices(self, user_id: str) -> list[Connection]:
        """The user's streams on this gateway."""
        ...


class SignalTarget(Protocol):
    async def signal(
        self,
        address: str,
        targets: list[tuple[str, str]],
        frame: gateway_pb2.ServerFrame,
        timeout_s: float,
    ) -> int | None:
        """One GatewayInternal.Signal call; streams written, None on failure."""
        ...


class LogicMembers:
    """MemberSource over Logic.GetMembers."""

    def __init__(self, stub: logic_pb2_grpc.LogicStub, timeout_s: float) -> None:
        self._stub = stub
        self._timeout_s = timeout_s

    async def members(self, user_id: str, conversation_id: str) -> Sequence[str]:
        try:
            resp = await self._stub.GetMembers(
                logic_pb2.GetMembersRequest(user_id=user_id, conversation_id=conversation_id),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise refused_by_logic(exc, "members of the conversation") from None
        return list(resp.member_ids)


class _ConnTyping:
    """One connection's typing limits."""

    __slots__ = ("bucket", "last")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        #: conversation -> (monotonic time, typing) of the last notice let through.
        self.last: OrderedDict[str, tuple[float, bool]] = OrderedDict()


@dataclass(frozen=True, slots=True)
class _Members:
    expires_at: float
    ids: frozenset[str]


class TypingRelay:
    """Checks, limits and fans out Typing frames (module docstring)."""

    def __init__(
        self,
        settings: Settings,
        members: MemberSource,
        routes: RouteSource,
        local: LocalStreams,
        peers: SignalTarget,
        address: Callable[[], str],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._members = members
        self._routes = routes
        self._local = local
        self._peers = peers
        self._address = address
        self._clock = clock
        self._min_interval_s = settings.typing_min_interval_ms / 1000
        self._cache: OrderedDict[str, _Members] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._frames = metrics.counter(
            "gateway_typing_frames",
            "Typing frames by result: forwarded, or the FrameError code that refused them "
            "(rate_limited, invalid_argument, permission_denied, unavailable)",
            ["result"],
        )
        self._notices = metrics.counter(
            "gateway_typing_notices",
            "TypingNotice frames queued on receivers' streams, by where: local (this "
            "gateway), remote (accepted by another gateway's Signal)",
            ["path"],
        )
        self._signals = metrics.counter(
            "gateway_typing_signals",
            "GatewayInternal.Signal calls to other gateways for typing, by result (ok, failed)",
            ["result"],
        )
        self._skipped = metrics.counter(
            "gateway_typing_routes_unavailable",
            "Typing fan-outs that reached local streams only: Redis did not answer the "
            "route lookup",
        )

    # -- in the read loop ------------------------------------------------------

    def on_typing(self, conn: Connection, typing: gateway_pb2.Typing) -> None:
        """Checks and limits one Typing frame and starts its fan-out. Never waits:
        called from the stream's read loop."""
        try:
            self._admit(conn, typing)
        except Refused as exc:
            self._refuse(conn, exc)
            return
        task = asyncio.ensure_future(self._relay(conn, typing.conversation_id, typing.typing))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _admit(self, conn: Connection, typing: gateway_pb2.Typing) -> None:
        """Raises Refused unless the frame may be forwarded; records it if so."""
        conv = typing.conversation_id
        if not conv:
            raise Refused(INVALID_ARGUMENT, "conversation_id is empty")
        if len(conv) > MAX_CONVERSATION_ID_CHARS:
            raise Refused(
                INVALID_ARGUMENT,
                f"conversation_id is longer than {MAX_CONVERSATION_ID_CHARS} characters",
            )
        now = self._clock()
        state = conn.typing_state
        if state is None:
            state = conn.typing_state = _ConnTyping(
                TokenBucket(self._settings.typing_rate_per_s, self._settings.typing_burst, now)
            )
        last = state.last.get(conv)
        if last is not None and last[1] == typing.typing and now - last[0] < self._min_interval_s:
            wait_ms = max(1, int((self._min_interval_s - (now - last[0])) * 1000))
            raise Refused(
                RATE_LIMITED,
                f"the same typing state of one conversation at most every "
                f"{self._settings.typing_min_interval_ms} ms; repeat in about {wait_ms} ms",
            )
        if not state.bucket.take(now):
            raise Refused(
                RATE_LIMITED,
                f"more than {self._settings.typing_rate_per_s:g} typing frames/s (burst "
                f"{self._settings.typing_burst}) on this connection",
            )
        if len(self._tasks) >= MAX_INFLIGHT:
            raise Refused(UNAVAILABLE, "gateway busy; typing not relayed")
        state.last[conv] = (now, typing.typing)
        state.last.move_to_end(conv)
        while len(state.last) > MAX_TRACKED_CONVERSATIONS:
            state.last.popitem(last=False)

    def _refuse(self, conn: Connection, exc: Refused) -> None:
        self._frames.labels(exc.label).inc()
        conn.frame_error(FRAME, exc.code, exc.reason)

    # -- the fan-out -----------------------------------------------------------

    async def _relay(self, conn: Connection, conversation_id: str, typing: bool) -> None:
        user, device = conn.key
        try:
            members = await self.members(user, conversation_id)
        except Refused as exc:
            self._refuse(conn, exc)
            return
        if len(members) > self._settings.typing_max_members:
            self._refuse(
                conn,
                Refused(
                    INVALID_ARGUMENT,
                    f"typing is relayed in conversations of at most "
                    f"{self._settings.typing_max_members} members; this one has {len(members)}",
                ),
            )
            return
        self._frames.labels("forwarded").inc()
        others = [m for m in members if m != user]
        if not others:
            return
        frame = gateway_pb2.ServerFrame(
            typing=gateway_pb2.TypingNotice(
                conversation_id=conversation_id,
                user_id=user,
                device_id=device,
                typing=typing,
                expires_in_ms=self._settings.typing_expires_ms,
            )
        )
        await self.fan_out(others, frame)

    async def fan_out(self, user_ids: list[str], frame: gateway_pb2.ServerFrame) -> int:
        """Queues `frame` on every stream of `user_ids`: here from the hub, on other
        gateways by their routes. Returns how many streams took it. Never raises."""
        written = 0
        for member in user_ids:
            for stream in self._local.devices(member):
                if stream.signal(frame):
                    written += 1
        if written:
            self._notices.labels("local").inc(written)
        try:
            routes = await self._routes.lookup_many(user_ids)
        except (RedisError, OSError) as exc:
            self._skipped.inc()
            log.debug("typing: routes unavailable; local streams only", extra={"error": str(exc)})
            return written
        here = self._address()
        remote: dict[str, list[tuple[str, str]]] = {}
        for member, member_routes in routes.items():
            for route in member_routes:
                if route.gateway != here:
                    remote.setdefault(route.gateway, []).append((member, route.device_id))
        if not remote:
            return written
        timeout_s = self._settings.signal_timeout_s
        results = await asyncio.gather(
            *(self._peers.signal(gw, targets, frame, timeout_s) for gw, targets in remote.items())
        )
        for result in results:
            self._signals.labels("failed" if result is None else "ok").inc()
            if result:
                self._notices.labels("remote").inc(result)
                written += result
        return written

    async def members(self, user_id: str, conversation_id: str) -> frozenset[str]:
        """The conversation's members, from the cache if `user_id` is in it and it is
        fresh, else from logic (which refuses a non-member). Raises Refused."""
        now = self._clock()
        cached = self._cache.get(conversation_id)
        if cached is not None and cached.expires_at > now and user_id in cached.ids:
            return cached.ids
        ids = frozenset(await self._members.members(user_id, conversation_id))
        if user_id not in ids:
            # logic answered for a member only; be safe if it did not.
            raise Refused(
                gateway_pb2.FrameErrorCode.FRAME_ERROR_CODE_PERMISSION_DENIED,
                "not a member of the conversation",
            )
        ttl = self._settings.typing_members_cache_s
        if ttl > 0:
            self._cache[conversation_id] = _Members(self._clock() + ttl, ids)
            self._cache.move_to_end(conversation_id)
            while len(self._cache) > self._settings.typing_members_cache_max:
                self._cache.popitem(last=False)
        return ids

    async def close(self) -> None:
        """Cancels the fan-outs in flight (at shutdown). Idempotent."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
