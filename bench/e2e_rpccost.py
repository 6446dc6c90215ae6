"""CPU cost of one internal unary RPC, with and without the telemetry layer.

    .venv/bin/python bench/e2e_rpccost.py [--calls 10000] [--concurrency 16] [--rounds 3]
        [--baseline-libs DIR]

Every message crosses several internal unary calls (SendMessage, NextBatch,
Fanout, Deliver, AckDelivery); this measures what one costs in CPU on each side,
in these set-ups, each a fresh client process and server process:

- `plain`: bare grpc.aio on both sides;
- `telemetry`: imcommon's telemetry (server handlers instrumented at
  registration, `imcommon.telemetry.insecure_channel` on the client: metrics,
  trace context propagation) with OpenTelemetry's default no-op tracer;
- `services`: the telemetry plus `imcommon.tracing.setup_tracing`, i.e. what every
  service runs without an exporter.

`--baseline-libs DIR` adds `baseline-telemetry` and `baseline-services`: the same
two set-ups with the `imcommon` found in DIR (e.g. `git archive <commit> libs |
tar -x -C /tmp/old`, then DIR=/tmp/old/libs; an imcommon from before
`instrument_server` is driven through its ServerTelemetryInterceptor), so an old
and a new telemetry layer are compared in one run, on one machine state.

The method is Pusher.AckDelivery with a small request, answered by a stub
servicer, so the numbers are the RPC machinery alone. The set-ups run in turn,
`--rounds` times over (so machine noise spreads over all of them); the medians
are printed per set-up with the ratio of client + server CPU to `plain`'s, and
`RESULT {json}`, also written to bench/results/e2e_rpccost.json (or `--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def _import_libs(libs: str | None) -> None:
    if libs:
        sys.path.insert(0, libs)


def _server(conn: Connection, setup: str, libs: str | None) -> None:
    _import_libs(libs)
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
        raw = grpc.aio.server()
        server: Any = raw
        if setup != "plain":
            if hasattr(telemetry, "instrument_server"):
                server = telemetry.instrument_server(raw, Metrics("s"))
            else:  # an imcommon from before instrument_server: the interceptor
                interceptor = telemetry.ServerTelemetryInterceptor(Metrics("s"))
                raw = server = grpc.aio.server(interceptors=[interceptor])
        pusher_pb2_grpc.add_PusherServicer_to_server(Servicer(), server)
        port = raw.add_insecure_port("127.0.0.1:0")
        await raw.start()
        conn.send(port)
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, conn.recv) == "cpu?":
            conn.send(time.process_time())
        await raw.stop(None)

    uvloop.run(run())


def _client(
    conn: Connection, setup: str, libs: str | None, port: int, calls: int, concurrency: int
) -> None:
    _import_libs(libs)
    import grpc
    import uvloop

    from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
    from imcommon.metrics import Metrics
    from imcommon.telemetry import insecure_channel
    from imcommon.tracing import setup_tracing

    if setup.endswith("services"):
        setup_tracing("rpccost-client")

    async def run() -> None:
        address = f"127.0.0.1:{port}"
        channel: Any
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


def measure(setup: str, libs: str | None, calls: int, concurrency: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    s_ours, s_theirs = ctx.Pipe()
    server = ctx.Process(target=_server, args=(s_theirs, setup, libs), daemon=True)
    server.start()
    port = s_ours.recv()
    s_ours.send("cpu?")
    server_c0 = s_ours.recv()
    c_ours, c_theirs = ctx.Pipe()
    n = calls // concurrency * concurrency
    client = ctx.Process(
        target=_client, args=(c_theirs, setup, libs, port, n, concurrency), daemon=True
    )
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
    p.add_argument("--calls", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="times each set-up runs (medians)")
    p.add_argument("--baseline-libs", help="a libs/ dir holding an older imcommon to compare")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/e2e_rpccost.json")
    args = p.parse_args(argv)
    setups: list[tuple[str, str | None]] = [
        ("plain", None),
        ("telemetry", None),
        ("services", None),
    ]
    if args.baseline_libs:
        libs = str(Path(args.baseline_libs).resolve())
        setups += [("baseline-telemetry", libs), ("baseline-services", libs)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in setups}
    for r in range(args.rounds):
        for name, libs in setups:
            run = measure(name, libs, args.calls, args.concurrency)
            runs[name].append(run)
            print(
                f"round {r + 1} {name:19s} client {run['client_us_per_call']:6.1f}  server "
                f"{run['server_us_per_call']:6.1f} us/call  ({run['calls_per_s']} calls/s)",
                flush=True,
            )
    out: dict[str, Any] = {
        "calls": args.calls,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "baseline_libs": args.baseline_libs,
        "setups": {},
    }
    for name, _ in setups:
        med = {
            key: statistics.median(run[key] for run in runs[name])
            for key in ("client_us_per_call", "server_us_per_call", "calls_per_s")
        }
        med["total_us_per_call"] = med["client_us_per_call"] + med["server_us_per_call"]
        out["setups"][name] = {**med, "runs": runs[name]}
    plain = out["setups"]["plain"]["total_us_per_call"]
    print("median of the rounds (client + server CPU per call, ratio to plain):")
    for name, _ in setups:
        s = out["setups"][name]
        s["ratio_to_plain"] = round(s["total_us_per_call"] / plain, 3)
        print(
            f"  {name:19s} client {s['client_us_per_call']:6.1f}  server "
            f"{s['server_us_per_call']:6.1f}  total {s['total_us_per_call']:6.1f} us/call  "
            f"x{s['ratio_to_plain']:.2f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(
        "RESULT "
        + json.dumps({k: {m: v[m] for m in v if m != "runs"} for k, v in out["setups"].items()}),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
