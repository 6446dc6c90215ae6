"""CPU cost of one internal unary RPC, with and without the telemetry layer.

    .venv/bin/python bench/e2e_rpccost.py [--calls 2000] [--blocks 10] [--concurrency 16]
        [--baseline-libs DIR] [--out PATH]

Every message crosses several internal unary calls (SendMessage, NextBatch,
Fanout, Deliver, AckDelivery); this measures what one costs in CPU, client and
server side, bare and through imcommon's telemetry. Set-ups, each one client
process and one server process:

- `telemetry`: imcommon's telemetry (server handlers instrumented at
  registration by `instrument_server`, `imcommon.telemetry.insecure_channel` on
  the client: metrics, trace context propagation) with OpenTelemetry's default
  no-op tracer;
- `services`: the same plus `imcommon.tracing.setup_tracing`, i.e. what every
  service runs without an exporter, with the calls made inside a span as a
  service makes them (so each carries a traceparent the server reads).

`--baseline-libs DIR` adds `baseline-telemetry` and `baseline-services`: the same
two with the `imcommon` found in DIR (e.g. `git archive <commit> libs | tar -x -C
/tmp/old`, DIR=/tmp/old/libs; an imcommon from before `instrument_server` is
driven through its ServerTelemetryInterceptor), so an old and a new telemetry
layer are measured in one run.

This machine is shared and busy, and a call's CPU cost moves with the load (and
with the call rate: grpc batches more when it is busy). So each set-up's server
process serves the method twice, on a bare grpc.aio server and through the
telemetry, and its client alternates blocks of `--calls` calls (16 in flight)
between a bare channel and the instrumented one, `--blocks` times (ABBA order).
The bare blocks are the reference measured under the same conditions: the
number to compare is each set-up's `ratio_to_plain` (its CPU per call over the
bare calls' of the same processes), which is also printed as the overhead in us.

The method is Pusher.AckDelivery with a small request, answered by a stub
servicer, so the numbers are the RPC machinery alone. Prints a line per set-up
and `RESULT {json}`, also written to bench/results/e2e_rpccost.json (or `--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def _use_libs(libs: str | None) -> None:
    if libs:
        sys.path.insert(0, libs)


def _server(conn: Connection, setup: str, libs: str | None) -> None:
    _use_libs(libs)
    import grpc
    import uvloop

    from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
    from imcommon import telemetry
    from imcommon.metrics import Metrics
    from imcommon.tracing import setup_tracing

    if setup.endswith("services"):
        setup_tracing("rpccost-server")

    class Servicer(pusher_pb2_grpc.PusherServicer):
        async def AckDelivery(self, request: Any, context: Any) -> Any:
            return pusher_pb2.AckDeliveryResponse()

    async def run() -> None:
        # Without SO_REUSEPORT (imcommon.server.EXCLUSIVE_PORT, spelled out so that
        # --baseline-libs from before it still work).
        exclusive = [("grpc.so_reuseport", 0)]
        plain = grpc.aio.server(options=exclusive)
        pusher_pb2_grpc.add_PusherServicer_to_server(Servicer(), plain)
        if hasattr(telemetry, "instrument_server"):
            ours = grpc.aio.server(options=exclusive)
            target: Any = telemetry.instrument_server(ours, Metrics("s"))
        else:  # an imcommon from before instrument_server: the interceptor
            interceptor = telemetry.ServerTelemetryInterceptor(Metrics("s"))
            ours = target = grpc.aio.server(interceptors=[interceptor], options=exclusive)
        pusher_pb2_grpc.add_PusherServicer_to_server(Servicer(), target)
        ports = (plain.add_insecure_port("127.0.0.1:0"), ours.add_insecure_port("127.0.0.1:0"))
        await plain.start()
        await ours.start()
        conn.send(ports)
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, conn.recv) == "cpu?":
            conn.send(time.process_time())
        await plain.stop(None)
        await ours.stop(None)

    uvloop.run(run())


def _client(
    conn: Connection,
    server: Connection,
    setup: str,
    libs: str | None,
    ports: tuple[int, int],
    calls: int,
    blocks: int,
    concurrency: int,
) -> None:
    _use_libs(libs)
    import grpc
    import uvloop
    from opentelemetry import trace

    from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
    from imcommon.metrics import Metrics
    from imcommon.telemetry import insecure_channel
    from imcommon.tracing import setup_tracing

    traced = setup.endswith("services")
    if traced:
        setup_tracing("rpccost-client")

    def server_cpu() -> float:
        server.send("cpu?")
        value: float = server.recv()
        return value

    async def run() -> None:
        channels = {
            "plain": grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}"),
            "ours": insecure_channel(f"127.0.0.1:{ports[1]}", Metrics("c")),
        }
        stubs = {k: pusher_pb2_grpc.PusherStub(ch) for k, ch in channels.items()}
        request = pusher_pb2.AckDeliveryRequest(user_id="u1", device_id="d1", seq=42)
        for stub in stubs.values():
            for _ in range(200):  # warm up
                await stub.AckDelivery(request)

        tracer = trace.get_tracer("rpccost")

        async def worker(stub: Any, n: int) -> None:
            # In `services`, calls are made inside a span, as a service's are
            # (inside the handler of the call it serves), so the trace context
            # goes out with every call and the server reads it.
            with tracer.start_as_current_span("work") if traced else contextlib.nullcontext():
                for _ in range(n):
                    await stub.AckDelivery(request)

        per_worker = calls // concurrency
        n = per_worker * concurrency
        out: dict[str, list[tuple[float, float, float]]] = {"plain": [], "ours": []}
        for b in range(blocks):
            order = ("plain", "ours") if b % 4 in (0, 3) else ("ours", "plain")
            for kind in order:
                s0, c0, t0 = server_cpu(), time.process_time(), time.monotonic()
                await asyncio.gather(*(worker(stubs[kind], per_worker) for _ in range(concurrency)))
                t1, c1, s1 = time.monotonic(), time.process_time(), server_cpu()
                out[kind].append(((c1 - c0) / n * 1e6, (s1 - s0) / n * 1e6, n / (t1 - t0)))
        conn.send(out)
        for ch in channels.values():
            await ch.close()

    uvloop.run(run())


def measure(
    setup: str, libs: str | None, calls: int, blocks: int, concurrency: int
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    s_ours, s_theirs = ctx.Pipe()
    server = ctx.Process(target=_server, args=(s_theirs, setup, libs), daemon=True)
    server.start()
    ports = s_ours.recv()
    c_ours, c_theirs = ctx.Pipe()
    client = ctx.Process(
        target=_client,
        args=(c_theirs, s_ours, setup, libs, ports, calls, blocks, concurrency),
        daemon=True,
    )
    client.start()
    blocks_out: dict[str, list[tuple[float, float, float]]] = c_ours.recv()
    client.join(30)
    s_ours.send("stop")
    server.join(30)

    def summary(kind: str) -> dict[str, float]:
        rows = blocks_out[kind]
        client_us = statistics.median(r[0] for r in rows)
        server_us = statistics.median(r[1] for r in rows)
        return {
            "client_us_per_call": round(client_us, 1),
            "server_us_per_call": round(server_us, 1),
            "total_us_per_call": round(client_us + server_us, 1),
            "calls_per_s": round(statistics.median(r[2] for r in rows)),
        }

    plain, ours = summary("plain"), summary("ours")
    ratios = [
        (o[0] + o[1]) / (p[0] + p[1])
        for p, o in zip(blocks_out["plain"], blocks_out["ours"], strict=True)
    ]
    return {
        "plain": plain,
        "instrumented": ours,
        "overhead_us_per_call": round(ours["total_us_per_call"] - plain["total_us_per_call"], 1),
        "ratio_to_plain": round(statistics.median(ratios), 3),
        "block_ratios": [round(r, 3) for r in ratios],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="calls per block")
    p.add_argument("--blocks", type=int, default=10, help="blocks per kind (bare, instrumented)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--baseline-libs", help="a libs/ dir holding an older imcommon to compare")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/e2e_rpccost.json")
    args = p.parse_args(argv)
    setups: list[tuple[str, str | None]] = [("telemetry", None), ("services", None)]
    if args.baseline_libs:
        libs = str(Path(args.baseline_libs).resolve())
        setups += [("baseline-telemetry", libs), ("baseline-services", libs)]
    results: dict[str, Any] = {}
    for name, libs in setups:
        r = results[name] = measure(name, libs, args.calls, args.blocks, args.concurrency)
        bare, ours = r["plain"], r["instrumented"]
        print(
            f"{name:19s} bare {bare['client_us_per_call']:6.1f} + {bare['server_us_per_call']:6.1f}"
            f" = {bare['total_us_per_call']:6.1f} us/call   instrumented "
            f"{ours['client_us_per_call']:6.1f} + {ours['server_us_per_call']:6.1f} = "
            f"{ours['total_us_per_call']:6.1f} us/call   "
            f"overhead {r['overhead_us_per_call']:+6.1f} us"
            f"  x{r['ratio_to_plain']:.3f} (blocks {min(r['block_ratios']):.2f}-"
            f"{max(r['block_ratios']):.2f})",
            flush=True,
        )
    out = {
        "calls_per_block": args.calls,
        "blocks": args.blocks,
        "concurrency": args.concurrency,
        "baseline_libs": args.baseline_libs,
        "setups": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    brief = {
        name: {k: r[k] for k in ("plain", "instrumented", "overhead_us_per_call", "ratio_to_plain")}
        for name, r in results.items()
    }
    print("RESULT " + json.dumps(brief), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
