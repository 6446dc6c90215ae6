"""CPU cost of one internal unary RPC, with and without the telemetry layer.

    .venv/bin/python bench/e2e_rpccost.py [--calls 5000] [--concurrency 16]

Every message crosses several internal unary calls (SendMessage, NextBatch,
Fanout, Deliver, AckDelivery); this measures what one costs in CPU on each side,
in three set-ups, each a fresh client process and server process:

- `plain`: bare grpc.aio on both sides;
- `interceptors`: imcommon's Server/ClientTelemetryInterceptor (metrics, trace
  context propagation) with OpenTelemetry's default no-op tracer;
- `services`: the interceptors plus `imcommon.tracing.setup_tracing`, i.e. what
  every service runs today (an SDK TracerProvider: real spans, no exporter).

The method is Pusher.AckDelivery with a small request, answered by a stub
servicer, so the numbers are the RPC machinery alone. Prints one line per
set-up and `RESULT {json}` (CPU microseconds per call, client and server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

SETUPS = ("plain", "interceptors", "services")


def _server(conn: Connection, setup: str) -> None:
    import grpc
    import uvloop

    from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
    from imcommon.metrics import Metrics
    from imcommon.telemetry import ServerTelemetryInterceptor
    from imcommon.tracing import setup_tracing

    if setup == "services":
        setup_tracing("rpccost-server")

    class Servicer(pusher_pb2_grpc.PusherServicer):
        async def AckDelivery(self, request: Any, context: Any) -> Any:
            return pusher_pb2.AckDeliveryResponse()

    async def run() -> None:
        interceptors = [] if setup == "plain" else [ServerTelemetryInterceptor(Metrics("s"))]
        server = grpc.aio.server(interceptors=interceptors)
        pusher_pb2_grpc.add_PusherServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, conn.recv) == "cpu?":
            conn.send(time.process_time())
        await server.stop(None)

    uvloop.run(run())


def _client(conn: Connection, setup: str, port: int, calls: int, concurrency: int) -> None:
    import grpc
    import uvloop

    from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
    from imcommon.metrics import Metrics
    from imcommon.telemetry import insecure_channel
    from imcommon.tracing import setup_tracing

    if setup == "services":
        setup_tracing("rpccost-client")

    async def run() -> None:
        address = f"127.0.0.1:{port}"
        if setup == "plain":
            channel = grpc.aio.insecure_channel(address)
        else:
            channel = insecure_channel(address, Metrics("c"))
        stub = pusher_pb2_grpc.PusherStub(channel)
        request = pusher_pb2.AckDeliveryRequest(user_id="u1", device_id="d1", seq=42)
        for _ in range(200):  # warm up
            await stub.AckDelivery(request)

        async def worker(n: int) -> None:
            for _ in range(n):
                await stub.AckDelivery(request)

        t0, c0 = time.monotonic(), time.process_time()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        conn.send((time.monotonic() - t0, time.process_time() - c0))
        await channel.close()

    uvloop.run(run())


def measure(setup: str, calls: int, concurrency: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    s_ours, s_theirs = ctx.Pipe()
    server = ctx.Process(target=_server, args=(s_theirs, setup), daemon=True)
    server.start()
    port = s_ours.recv()
    s_ours.send("cpu?")
    server_c0 = s_ours.recv()
    c_ours, c_theirs = ctx.Pipe()
    n = calls // concurrency * concurrency
    client = ctx.Process(target=_client, args=(c_theirs, setup, port, n, concurrency), daemon=True)
    client.start()
    wall, client_cpu = c_ours.recv()
    client.join(30)
    # The server's CPU includes the client's warm-up calls: a small overcount.
    s_ours.send("cpu?")
    server_cpu = s_ours.recv() - server_c0
    s_ours.send("stop")
    server.join(30)
    return {
        "client_us_per_call": round(client_cpu / n * 1e6, 1),
        "server_us_per_call": round(server_cpu / n * 1e6, 1),
        "calls_per_s": round(n / wall),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    out = {}
    for setup in SETUPS:
        out[setup] = r = measure(setup, args.calls, args.concurrency)
        print(
            f"{setup:13s} client {r['client_us_per_call']:7.1f} us/call  server "
            f"{r['server_us_per_call']:7.1f} us/call  ({r['calls_per_s']} calls/s)",
            flush=True,
        )
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
