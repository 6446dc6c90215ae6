"""Idle-connection holder processes for bench/e2e.py.

Thousands of full SDK clients would cost the load generator more than the
gateway, so each idle device here is a raw `Gateway.Connect` stream: its own
gRPC channel (a local subchannel pool, so its own TCP connection and HTTP/2
session, exactly as separate devices would have), the bearer token, and the
Welcome frame read. Nothing else: no sync, no sends, no reader task. The
gateway cannot tell these from SDK clients until they send something; it does
the same work per stream (authentication, a Connection with its tasks, the route
in Redis, route refreshes).

Commands over the pipe (one reply each): `open` {tokens, concurrency} ->
{opened, failed, errors, open_s}; `check` -> {alive}; `close` -> {closed}.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from multiprocessing.connection import Connection
from typing import Any

import grpc

from im.gateway.v1 import gateway_pb2_grpc

log = logging.getLogger("bench.e2e.conns")

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

    async def open(self, args: dict[str, Any]) -> dict[str, Any]:
        sem = asyncio.Semaphore(int(args["concurrency"]))
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
