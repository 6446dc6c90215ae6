"""Idle-connection holder processes for bench/e2e.py and bench/e2e_idle.py.

Thousands of full SDK clients would cost the load generator more than the
gateway, so each idle device here is a raw `Gateway.Connect` stream: its own
gRPC channel (a local subchannel pool, so its own TCP connection and HTTP/2
session, exactly as separate devices would have), the bearer token, and the
Welcome frame read. Nothing else: no sync, no sends, no reader task. The
gateway cannot tell these from SDK clients until they send something; it does
the same work per stream (authentication, a Connection with its tasks, the route
in Redis, route refreshes).

With `read` (bench/e2e_idle.py) each stream also keeps one read pending and
counts the frames that follow the Welcome, by kind, in one counter per process
(no per-stream record); `ping` makes every stream send a Ping at a fixed
interval, each at its own random phase, like an SDK client that pings.

Commands over the pipe (one reply each): `open` {tokens, concurrency, read?} ->
{opened, failed, errors, open_s}; `check` -> {alive, held}; `stats` -> {frames,
welcome_heads, pings_sent, ping_errors}; `ping` {interval_s} (0 stops) -> {streams};
`close` -> {closed}.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import grpc

from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("bench.e2e.conns")

#: Ticks of the ping wheel: a stream's Ping leaves at most this late.
PING_TICK_S = 0.1

#: A channel of its own per stream, and the SDK's keepalive settings.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),
]


class Holder:
    def __init__(self, address: str) -> None:
        self.address = address
        self.streams: list[tuple[grpc.aio.Channel, Any]] = []
        #: Frames received after the Welcome by streams opened with `read`, by kind.
        self.frames: Counter[str] = Counter()
        #: Welcomes that carried a timeline head (head_seq > 0).
        self.welcome_heads = 0
        self.pings_sent = 0
        self.ping_errors = 0
        self._readers: set[asyncio.Task[None]] = set()
        self._pinger: asyncio.Task[None] | None = None

    async def _read(self, call: Any) -> None:
        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    return
                self.frames[frame.WhichOneof("frame") or "unknown"] += 1
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return

    def start_pings(self, interval_s: float) -> int:
        """Every held stream sends a Ping every `interval_s`, at a random phase
        (a wheel of PING_TICK_S slots, one task for all). 0 stops them."""
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        if interval_s <= 0:
            return 0
        slots = max(1, round(interval_s / PING_TICK_S))
        wheel: list[list[Any]] = [[] for _ in range(slots)]
        for _channel, call in self.streams:
            wheel[random.randrange(slots)].append(call)
        self._pinger = asyncio.ensure_future(self._ping_loop(wheel, interval_s / slots))
        return len(self.streams)

    async def _ping_loop(self, wheel: list[list[Any]], tick_s: float) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tick = 0
        while True:
            tick += 1
            await asyncio.sleep(max(0.0, t0 + tick * tick_s - loop.time()))
            for call in wheel[tick % len(wheel)]:
                if call.done():
                    continue
                self.pings_sent += 1
                frame = gateway_pb2.ClientFrame(ping=gateway_pb2.Ping(nonce=self.pings_sent))
                try:
                    await call.write(frame)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    self.ping_errors += 1

    def stats(self) -> dict[str, Any]:
        return {
            "frames": dict(self.frames),
            "welcome_heads": self.welcome_heads,
            "pings_sent": self.pings_sent,
            "ping_errors": self.ping_errors,
        }

    async def open(self, args: dict[str, Any]) -> dict[str, Any]:
        sem = asyncio.Semaphore(int(args["concurrency"]))
        read = bool(args.get("read", False))
        errors: list[str] = []
        t0 = time.monotonic()

        async def one(token: str) -> None:
            async with sem:
                channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
                stub = gateway_pb2_grpc.GatewayStub(channel)
                call = stub.Connect(metadata=(("authorization", f"Bearer {token}"),))
                try:
                    first = await asyncio.wait_for(call.read(), 60)
                    if first is grpc.aio.EOF or first.WhichOneof("frame") != "welcome":
                        raise RuntimeError(f"first frame was not a Welcome: {first!r}")
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    call.cancel()
                    await channel.close(grace=None)
                    return
                self.streams.append((channel, call))
                if first.welcome.head_seq > 0:
                    self.welcome_heads += 1
                if read:
                    task = asyncio.ensure_future(self._read(call))
                    self._readers.add(task)
                    task.add_done_callback(self._readers.discard)

        await asyncio.gather(*(one(t) for t in args["tokens"]))
        return {
            "opened": len(self.streams),
            "failed": len(errors),
            "errors": errors[:5],
            "open_s": time.monotonic() - t0,
        }

    def alive(self) -> int:
        return sum(1 for _channel, call in self.streams if not call.done())

    async def close(self) -> int:
        self.start_pings(0)
        streams, self.streams = self.streams, []
        for _channel, call in streams:
            call.cancel()
        await asyncio.gather(*(ch.close(grace=None) for ch, _ in streams), return_exceptions=True)
        return len(streams)


async def _serve(conn: Connection, address: str) -> None:
    holder = Holder(address)
    loop = asyncio.get_running_loop()
    while True:
        command, args = await loop.run_in_executor(None, conn.recv)
        try:
            if command == "open":
                reply = await holder.open(args)
            elif command == "check":
                reply = {"alive": holder.alive(), "held": len(holder.streams)}
            elif command == "stats":
                reply = holder.stats()
            elif command == "ping":
                reply = {"streams": holder.start_pings(float(args["interval_s"]))}
            elif command == "close":
                conn.send({"closed": await holder.close()})
                return
            else:
                reply = {"error": f"unknown command {command}"}
        except Exception as exc:
            log.exception("connection holder: %s failed", command)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send(reply)


def conns_main(conn: Connection, address: str, name: str) -> None:
    """Process entry point. Raises its own file-descriptor limit to the hard one:
    every stream is a socket."""
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(_serve(conn, address))
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(_serve(conn, address))
