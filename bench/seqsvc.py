#!/usr/bin/env python
"""Benchmark of seqsvc against Redis INCR and a PostgreSQL counter (`make bench-seq`).

Starts its own PostgreSQL, Redis and seqsvc processes on free loopback ports (via
libs/imdev/servers.py); every load generator runs in its own process (uvloop), so
the server and the load never share a core's event loop. Measures:

- Redis INCR through redis-py asyncio, 64 concurrent tasks;
- a PostgreSQL `UPDATE ... RETURNING` counter, 64 concurrent tasks (16 connections);
- seqsvc `Next` unary, 64 concurrent callers (and 1 and 8, for latency);
- seqsvc through the coalescing SeqClient, 1,000 concurrent callers;
- seqsvc `NextBatch` of 1,000 keys;
- p99.9 latency in time windows that cross a step boundary vs the other windows
  (double buffer on, and off for comparison);
- seqsvc memory per key with 1M keys in memory, and with max_keys bounding it;
- open loop (calls launched by the clock, latency from the scheduled time, so a
  stall counts against every call due during it): unary `Next` at 1,000 and 3,000
  calls/s offered to one instance, and 6,000 calls/s offered across three instances
  through the routing client;
- three instances on one PostgreSQL: ids/s through the routing client (coalesced
  `next` from 1,000 tasks) with 1, 2 and 3 instances, and the handover of a
  SIGTERMed and of a kill -9ed owner's sections to the others, timed from the
  signal to the first value the client got from the new owner.

Prints a table, writes bench/results/seqsvc.json and ends with `RESULT {json}`.
`--quick` shortens every phase (for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the service package: keep bench/ off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
for sub in ("gen", "libs", "services"):
    sys.path.insert(0, str(ROOT / sub))

from imdev.servers import (  # noqa: E402
    PostgresServer,
    RedisServer,
    ServiceProcess,
    free_port,
)

RESULTS = ROOT / "bench" / "results" / "seqsvc.json"


# ---- statistics --------------------------------------------------------------


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def summary(ids: int, seconds: float, latencies_s: list[float]) -> dict[str, float]:
    lat = sorted(latencies_s)
    return {
        "ids_per_s": round(ids / seconds, 1),
        "calls": len(lat),
        "p50_ms": round(pct(lat, 0.50) * 1000, 3),
        "p99_ms": round(pct(lat, 0.99) * 1000, 3),
        "p999_ms": round(pct(lat, 0.999) * 1000, 3),
    }


# ---- load generators (each runs in its own process) ---------------------------


async def _timed_loop(
    concurrency: int, warmup: float, duration: float, op: Any, ids_per_op: int = 1
) -> dict[str, float]:
    """Runs `op(worker_index)` in `concurrency` tasks; measures ops started after the
    warmup and finished before the end."""
    lat: list[float] = []
    start = time.perf_counter()
    t_measure = start + warmup
    t_end = t_measure + duration
    count = 0

    async def worker(i: int) -> None:
        nonlocal count
        clock = time.perf_counter
        while True:
            t0 = clock()
            if t0 >= t_end:
                return
            await op(i)
            t1 = clock()
            if t0 >= t_measure and t1 <= t_end:
                lat.append(t1 - t0)
                count += ids_per_op

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return summary(count, duration, lat)


async def w_redis(spec: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(spec["url"], max_connections=spec["concurrency"])
    keys = [f"bench:ctr:{i % 64}" for i in range(spec["concurrency"])]

    async def op(i: int) -> None:
        await client.incr(keys[i])

    try:
        return await _timed_loop(spec["concurrency"], spec["warmup"], spec["duration"], op)
    finally:
        await client.aclose()


async def w_pg(spec: dict[str, Any]) -> dict[str, Any]:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(
        spec["dsn"], min_size=16, max_size=16, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)
    sql = "UPDATE bench_counter SET v = v + 1 WHERE k = %s RETURNING v"

    async def op(i: int) -> None:
        async with pool.connection() as conn:
            await conn.execute(sql, (i,))

    try:
        return await _timed_loop(spec["concurrency"], spec["warmup"], spec["duration"], op)
    finally:
        await pool.close()


async def w_unary(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from im.seqsvc.v1 import seqsvc_pb2 as pb
    from im.seqsvc.v1 import seqsvc_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(spec["address"]) as channel:
        stub = pb_grpc.SeqServiceStub(channel)
        nkeys = spec.get("keys", 1000)
        reqs = [pb.NextRequest(key=f"u:bench{i}") for i in range(nkeys)]
        counter = [0]

        async def op(i: int) -> None:
            counter[0] += 1
            await stub.Next(reqs[counter[0] % nkeys], timeout=10)

        return await _timed_loop(spec["concurrency"], spec["warmup"], spec["duration"], op)


async def w_coalesced(spec: dict[str, Any]) -> dict[str, Any]:
    from seqsvc.client import SeqClient

    async with SeqClient(
        spec["address"],
        coalesce_window_ms=spec.get("window_ms", 0.0),
        max_batch=spec.get("max_batch", 1000),
        max_in_flight=spec.get("max_in_flight", 4),
        deadline_s=10,
    ) as seq:
        keys = [f"c:bench{i}" for i in range(spec.get("keys", 10_000))]

        async def op(i: int) -> None:
            await seq.next(keys[i % len(keys)])

        out = await _timed_loop(spec["concurrency"], spec["warmup"], spec["duration"], op)
        out["batches_sent"] = seq.batches_sent
        return out


async def w_batch(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from im.seqsvc.v1 import seqsvc_pb2 as pb
    from im.seqsvc.v1 import seqsvc_pb2_grpc as pb_grpc

    size = spec["batch"]
    async with grpc.aio.insecure_channel(spec["address"]) as channel:
        stub = pb_grpc.SeqServiceStub(channel)
        reqs = [pb.NextBatchRequest(keys=[f"b:{j}:{i}" for i in range(size)]) for j in range(8)]

        async def op(i: int) -> None:
            await stub.NextBatch(reqs[i % 8], timeout=10)

        return await _timed_loop(
            spec["concurrency"], spec["warmup"], spec["duration"], op, ids_per_op=size
        )


async def w_boundary(spec: dict[str, Any]) -> dict[str, Any]:
    """Unary Next on one hot key; splits the run into windows and compares the p99.9
    of windows in which the values crossed a multiple of `step` (a step boundary:
    the ceiling a single-buffered allocator would stop at) with all other windows."""
    import grpc

    from im.seqsvc.v1 import seqsvc_pb2 as pb
    from im.seqsvc.v1 import seqsvc_pb2_grpc as pb_grpc

    step = spec["step"]
    window = spec["window_s"]
    records: list[tuple[float, float, int]] = []
    async with grpc.aio.insecure_channel(spec["address"]) as channel:
        stub = pb_grpc.SeqServiceStub(channel)
        req = pb.NextRequest(key="hot")
        first = (await stub.Next(req)).value  # the key's floor + 1
        floor = first - 1
        start = time.perf_counter()
        t_measure = start + spec["warmup"]
        t_end = t_measure + spec["duration"]

        async def worker() -> None:
            clock = time.perf_counter
            while True:
                t0 = clock()
                if t0 >= t_end:
                    return
                v = (await stub.Next(req, timeout=10)).value
                if t0 >= t_measure:
                    records.append((t0, clock() - t0, v))

        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    windows: dict[int, list[tuple[float, int]]] = {}
    for t0, lat, v in records:
        windows.setdefault(int((t0 - t_measure) / window), []).append((lat, v))
    boundary: list[float] = []
    steady: list[float] = []
    crossings = 0
    for entries in windows.values():
        lo = min(v for _, v in entries)
        hi = max(v for _, v in entries)
        # A boundary lies in (lo - 1, hi]: the window handed out the value just above it.
        crosses = (hi - floor) // step > (lo - 1 - floor) // step
        crossings += crosses
        (boundary if crosses else steady).extend(lat for lat, _ in entries)
    b = sorted(boundary)
    s = sorted(steady)
    return {
        "ids_per_s": round(len(records) / spec["duration"], 1),
        "windows": len(windows),
        "boundary_windows": crossings,
        "boundary_calls": len(b),
        "steady_calls": len(s),
        "boundary_p999_ms": round(pct(b, 0.999) * 1000, 3),
        "steady_p999_ms": round(pct(s, 0.999) * 1000, 3),
        "boundary_p99_ms": round(pct(b, 0.99) * 1000, 3),
        "steady_p99_ms": round(pct(s, 0.99) * 1000, 3),
        "boundary_max_ms": round((b[-1] if b else float("nan")) * 1000, 3),
        "all_p999_ms": round(pct(sorted(b + s), 0.999) * 1000, 3),
        "steady_max_ms": round((s[-1] if s else float("nan")) * 1000, 3),
    }


async def _open_loop(
    rate: float,
    warmup: float,
    duration: float,
    op: Any,
    stop: Any = None,
) -> dict[str, Any]:
    """Open loop: call i is due at `start + i / rate` and is launched when due (or
    as soon after as the event loop wakes up: timers have about 1 ms resolution),
    whether or not earlier calls have answered. Its latency runs from the *due*
    time, so a stall delays every call due during it (no coordinated omission);
    `lag` is how late calls were launched (the generator's own share of the
    latency). Calls due in the warmup are not measured. A failed call counts with
    the time it took to fail, and in `errors`. With `stop` (a callable), runs until
    it returns True instead of for `duration`."""
    clock = time.perf_counter
    interval = 1.0 / rate
    start = clock() + 0.01
    t_measure = start + warmup
    total = int((warmup + duration) * rate) if stop is None else sys.maxsize
    lat: list[float] = []
    lag: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()
    cpu0 = time.process_time()
    next_check = start
    last_done = t_measure

    async def one(i: int, due: float) -> None:
        nonlocal errors, last_done
        launched = clock() - due
        failed = False
        try:
            await op(i)
        except Exception:
            failed = True
        if due >= t_measure:
            done = clock()
            lat.append(done - due)
            lag.append(launched)
            errors += failed
            last_done = max(last_done, done)

    i = 0
    while i < total:
        now = clock()
        while i < total and start + i * interval <= now:
            task = asyncio.create_task(one(i, start + i * interval))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if stop is not None and now >= next_check:
            if stop():
                break
            next_check = now + 0.05
        if i < total:
            await asyncio.sleep(max(0.0, start + i * interval - clock()))
    await asyncio.gather(*tasks)
    elapsed = clock() - start
    measured = max(1e-9, min(duration, clock() - t_measure) if stop is None else elapsed - warmup)
    out: dict[str, Any] = summary(len(lat), measured, lat)
    lag.sort()
    out.update(
        offered_per_s=rate,
        # From the first due time measured to the last answer: below the offered
        # rate when calls queued up (the backlog drained after the window).
        completed_per_s=round(len(lat) / max(1e-9, last_done - t_measure), 1),
        errors=errors,
        lag_p50_ms=round(pct(lag, 0.50) * 1000, 3),
        lag_p99_ms=round(pct(lag, 0.99) * 1000, 3),
        generator_cpu_pct=round(100 * (time.process_time() - cpu0) / elapsed, 1),
        # The raw latencies (us), so several generator processes can be merged.
        lat_us=[round(x * 1e6) for x in lat],
    )
    return out


async def w_open_unary(spec: dict[str, Any]) -> dict[str, Any]:
    """Unary `Next` offered at `rate` calls/s, open loop: straight to one
    instance's stub, or (`routed`) through SeqClient.next_unary, which sends each
    key to its section's owner."""
    from seqsvc.client import SeqClient

    nkeys = spec.get("keys", 1000)
    prefix = spec.get("prefix", "u:open")
    keys = [f"{prefix}{i}" for i in range(nkeys)]
    async with SeqClient(spec["address"], deadline_s=10, max_retries=2) as seq:
        if spec.get("routed"):
            await seq.routing()

            async def op(i: int) -> None:
                await seq.next_unary(keys[i % nkeys])

        else:
            from im.seqsvc.v1 import seqsvc_pb2 as pb

            stub = seq.stub
            reqs = [pb.NextRequest(key=k) for k in keys]

            async def op(i: int) -> None:
                await stub.Next(reqs[i % nkeys], timeout=10)

        return await _open_loop(spec["rate"], spec["warmup"], spec["duration"], op)


async def w_handover(spec: dict[str, Any]) -> dict[str, Any]:
    """Routed unary `Next` at `rate` calls/s, open loop, on keys spread over every
    section, until `stop_file` exists; returns every answer as (wall clock time,
    address that served it, section), for timing handovers. Touches `ready_file`
    after the first answer."""
    import zlib

    from seqsvc.client import SeqClient

    sections = spec["sections"]
    keys = [f"h:{i}" for i in range(spec.get("keys", 8 * sections))]
    seen: list[tuple[float, str, int]] = []

    def observe(address: str, ks: Any, _values: Any) -> None:
        now = time.time()
        for k in ks:
            seen.append((now, address, zlib.crc32(k.encode()) % sections))

    stop_file = Path(spec["stop_file"])
    ready = Path(spec["ready_file"])
    async with SeqClient(
        spec["address"],
        deadline_s=1.0,
        max_retries=8,
        backoff_base_s=0.02,
        backoff_max_s=0.2,
        observer=observe,
    ) as seq:
        await seq.routing()
        await seq.next_unary(keys[0])
        await asyncio.to_thread(ready.touch)

        async def op(i: int) -> None:
            await seq.next_unary(keys[i % len(keys)])

        out = await _open_loop(spec["rate"], 0.0, 0.0, op, stop=stop_file.exists)
    out.pop("lat_us")
    out["seen"] = [(round(t, 4), a, s) for t, a, s in seen]
    return out


async def w_fill(spec: dict[str, Any]) -> dict[str, Any]:
    """Puts `n` distinct keys into seqsvc's memory through NextBatch."""
    import grpc

    from im.seqsvc.v1 import seqsvc_pb2 as pb
    from im.seqsvc.v1 import seqsvc_pb2_grpc as pb_grpc

    n, size = spec["n"], spec["batch"]
    async with grpc.aio.insecure_channel(spec["address"]) as channel:
        stub = pb_grpc.SeqServiceStub(channel)
        for start in range(0, n, size):
            keys = [f"u:{i:012d}" for i in range(start, min(n, start + size))]
            await stub.NextBatch(pb.NextBatchRequest(keys=keys), timeout=30)
    return {"keys": n}


async def bare_server(port: int) -> None:
    """The floor under seqsvc's unary latency: a grpc.aio server (uvloop, as
    seqsvc runs) answering the same `Next` from a dict, with no interceptor,
    metrics, auth, allocator or database. Same process model, same proto."""
    import grpc

    from im.seqsvc.v1 import seqsvc_pb2 as pb
    from im.seqsvc.v1 import seqsvc_pb2_grpc as pb_grpc

    class Bare(pb_grpc.SeqServiceServicer):
        def __init__(self) -> None:
            self.cur: dict[str, int] = {}

        async def Next(self, request: Any, context: Any) -> Any:
            seq = self.cur.get(request.key, 0) + 1
            self.cur[request.key] = seq
            return pb.NextResponse(value=seq)

    server = grpc.aio.server()
    pb_grpc.add_SeqServiceServicer_to_server(Bare(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


class BareServer:
    """`bare_server` in its own process (SIGTERM stops it)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--bare-server", str(self.port)],
            stdout=subprocess.DEVNULL,
        )
        import socket

        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the bare gRPC server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


WORKERS = {
    "redis": w_redis,
    "pg": w_pg,
    "unary": w_unary,
    "coalesced": w_coalesced,
    "batch": w_batch,
    "boundary": w_boundary,
    "fill": w_fill,
    "open_unary": w_open_unary,
    "handover": w_handover,
}


def worker_main(spec: dict[str, Any]) -> None:
    import uvloop

    result = uvloop.run(WORKERS[spec["kind"]](spec))
    # Through a file, not stdout: a result of several MB (an open loop's
    # latencies, a routed run's log of every value's owner) came out of the pipe
    # cut at 64 KiB once the event loop had left stdout non-blocking.
    Path(spec["result_file"]).write_text(json.dumps(result))


class Worker:
    """A generator process and the file its result lands in."""

    def __init__(self, spec: dict[str, Any]) -> None:
        fd, name = tempfile.mkstemp(prefix="bench-seqsvc-worker-", suffix=".json")
        os.close(fd)
        self.result_file = Path(name)
        self.kind = spec["kind"]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                json.dumps({**spec, "result_file": name}),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )


def start_worker(spec: dict[str, Any]) -> Worker:
    return Worker(spec)


def finish_worker(worker: Worker, kind: str) -> dict[str, Any]:
    try:
        _, err = worker.proc.communicate(timeout=600)
        if worker.proc.returncode != 0:
            raise RuntimeError(f"worker {kind} failed:\n{err[-3000:]}")
        result: dict[str, Any] = json.loads(worker.result_file.read_text())
        return result
    finally:
        worker.result_file.unlink(missing_ok=True)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    return finish_worker(start_worker(spec), spec["kind"])


def run_open_loop(
    spec: dict[str, Any], procs: int, servers: Sequence[ServiceProcess | BareServer]
) -> dict[str, Any]:
    """`spec["rate"]` offered by `procs` generator processes together (each at
    rate / procs); merges their latencies and adds the servers' CPU use."""
    cpu0 = [cpu_seconds(s) for s in servers]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    running = [start_worker({**spec, "rate": spec["rate"] / procs}) for _ in range(procs)]
    parts = [finish_worker(p, spec["kind"]) for p in running]
    wall = time.perf_counter() - t0
    lat = sorted(x / 1e6 for part in parts for x in part["lat_us"])
    out: dict[str, Any] = summary(len(lat), spec["duration"], lat)
    out.update(
        offered_per_s=spec["rate"],
        completed_per_s=round(sum(p["completed_per_s"] for p in parts), 1),
        loadavg_1m_before=round(load, 2),
        generators=procs,
        errors=sum(p["errors"] for p in parts),
        lag_p99_ms=max(p["lag_p99_ms"] for p in parts),
        generator_cpu_pct=[p["generator_cpu_pct"] for p in parts],
        # Over the worker's whole life (start-up included): a lower bound of the
        # share during the measured window.
        server_cpu_pct=[
            round(100 * (cpu_seconds(s) - c) / wall, 1) for s, c in zip(servers, cpu0, strict=True)
        ],
        # Every call offered, warm-up included, over the servers' CPU in that time.
        server_cpu_ms_per_call=round(
            1000
            * sum(cpu_seconds(s) - c for s, c in zip(servers, cpu0, strict=True))
            / max(1, int(spec["rate"] * (spec["warmup"] + spec["duration"]))),
            3,
        ),
    )
    return out


# ---- orchestration -----------------------------------------------------------


def server_counters(svc: ServiceProcess) -> dict[str, float]:
    """seqsvc's own counters from its /metrics: calls that had to wait for a step
    reservation (what the double buffer exists to avoid) and reservations made."""
    import urllib.request

    url = f"http://127.0.0.1:{svc.extra_env['IM_SEQSVC_METRICS_PORT']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        for name in ("im_seqsvc_waits", "im_seqsvc_store_writes"):
            if line.startswith(name + "_total "):
                out[name.removeprefix("im_seqsvc_")] = float(line.split()[1])
    return out


def cpu_seconds(svc: ServiceProcess | BareServer) -> float:
    """CPU time (user + system) the process has used so far."""
    assert svc.proc is not None
    with open(f"/proc/{svc.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Stack:
    """The servers of one benchmark run, in a temp dir, all stopped at the end."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-seqsvc-"))
        self.dir.chmod(0o755)
        self.pg = PostgresServer(free_port(), self.dir / "pg")
        self.redis = RedisServer(free_port(), self.dir / "redis")
        self.services: list[ServiceProcess] = []
        self._dbs = 0

    def start(self) -> None:
        self.pg.start()
        self.redis.start()

    def database(self) -> str:
        self._dbs += 1
        return self.pg.create_database(f"bench{self._dbs}")

    def seqsvc(self, **settings: object) -> ServiceProcess:
        port = free_port()
        env = {
            "IM_SEQSVC_DATABASE_URL": self.database(),
            "IM_SEQSVC_PORT": str(port),
            "IM_SEQSVC_METRICS_PORT": str(free_port()),
            "IM_SEQSVC_LOG_LEVEL": "warning",
        }
        env.update({f"IM_SEQSVC_{k.upper()}": str(v) for k, v in settings.items()})
        svc = ServiceProcess("seqsvc", port, env, self.dir / f"seqsvc-{port}.log")
        svc.start()
        self.services.append(svc)
        return svc

    def cluster(self) -> Cluster:
        return Cluster(self, self.database())

    def stop(self) -> None:
        for svc in self.services:
            svc.stop()
        self.redis.stop()
        self.pg.stop()
        if not os.environ.get("IM_KEEP_BENCH_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)


#: As in tests/seqsvc/test_seqsvc_multi.py: a dead owner's sections move after this.
CLUSTER_LEASE_S = 2.0


class Cluster:
    """seqsvc instances sharing one database (the sections split between them),
    each logging its serving windows (IM_SEQSVC_SERVE_LOG). Default settings but
    the lease, which is the tests' (CLUSTER_LEASE_S)."""

    def __init__(self, stack: Stack, dsn: str) -> None:
        self.stack = stack
        self.dsn = dsn
        self.logs = stack.dir / "serve"
        self.logs.mkdir()
        self.procs: dict[str, ServiceProcess] = {}

    def start(self, name: str) -> ServiceProcess:
        proc = self.procs.get(name)
        if proc is not None:
            proc.start()
            return proc
        port = free_port()
        env = {
            "IM_SEQSVC_DATABASE_URL": self.dsn,
            "IM_SEQSVC_PORT": str(port),
            "IM_SEQSVC_METRICS_PORT": str(free_port()),
            "IM_SEQSVC_LOG_LEVEL": "warning",
            "IM_SEQSVC_INSTANCE_ID": name,
            "IM_SEQSVC_LEASE_S": str(CLUSTER_LEASE_S),
            "IM_SEQSVC_SERVE_LOG": str(self.logs / f"{name}.jsonl"),
        }
        proc = ServiceProcess("seqsvc", port, env, self.stack.dir / f"seqsvc-{name}.log")
        proc.start()
        self.stack.services.append(proc)
        self.procs[name] = proc
        return proc

    def live(self) -> list[ServiceProcess]:
        return [p for p in self.procs.values() if p.proc is not None and p.proc.poll() is None]

    def windows(self) -> list[tuple[str, int, float, float]]:
        """(instance, section, from, until), wall clock, from the serve logs (the last
        line of an (instance, section, epoch) holds its final `until`)."""
        merged: dict[tuple[str, int, int], tuple[float, float]] = {}
        for path in self.logs.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                if line.strip():
                    w = json.loads(line)
                    k = (w["instance"], w["section"], w["epoch"])
                    first = merged.get(k, (w["from"], w["until"]))[0]
                    merged[k] = (min(first, w["from"]), w["until"])
        return [(i, sec, f, u) for (i, sec, _), (f, u) in merged.items()]

    def holders_at(self, t: float) -> dict[int, str]:
        return {sec: i for i, sec, f, u in self.windows() if f <= t < u}

    def wait_split(self, names: set[str], sections: int, timeout: float = 60.0) -> float:
        """Waits until every section is served, by exactly the instances `names`;
        returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            held = self.holders_at(time.time())
            if len(held) == sections and set(held.values()) == names:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                counts = {n: list(held.values()).count(n) for n in set(held.values())}
                raise TimeoutError(f"sections not split over {sorted(names)}: {counts}")
            time.sleep(0.05)


def measure_handover(cluster: Cluster, sections: int, rate: float) -> dict[str, Any]:
    """Three instances a, b, c and a routing client calling at `rate`/s (open loop)
    on keys over every section. SIGTERM b; once its sections are served by the
    others, restart b and wait for the three-way split; then kill -9 a. For each,
    the time from the signal to the first value the client got for one of the
    victim's sections from another instance (the new owner), and, from the serve
    logs, when the new owners began serving the first and the last of them."""
    stop_file = cluster.stack.dir / "handover.stop"
    ready_file = cluster.stack.dir / "handover.ready"
    a, b = cluster.procs["a"], cluster.procs["b"]
    worker = start_worker(
        {
            "kind": "handover",
            "address": a.address,
            "rate": rate,
            "sections": sections,
            "stop_file": str(stop_file),
            "ready_file": str(ready_file),
        }
    )
    faults: list[tuple[str, str, float, set[int]]] = []
    try:
        deadline = time.monotonic() + 30
        while not ready_file.exists():
            if worker.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("handover client did not start")
            time.sleep(0.02)
        time.sleep(1.0)
        # SIGTERM: the owner releases its sections on its way out.
        t0 = time.time()
        held = {sec for sec, i in cluster.holders_at(t0).items() if i == "b"}
        b.signal(signal.SIGTERM)
        faults.append(("graceful", b.address, t0, held))
        cluster.wait_split({"a", "c"}, sections)
        b.wait()
        time.sleep(0.5)
        cluster.start("b")
        cluster.wait_split({"a", "b", "c"}, sections)
        time.sleep(1.0)
        # kill -9: nobody releases; the others claim once the leases expire.
        t0 = time.time()
        held = {sec for sec, i in cluster.holders_at(t0).items() if i == "a"}
        a.kill()
        faults.append(("dead", a.address, t0, held))
        cluster.wait_split({"b", "c"}, sections, timeout=CLUSTER_LEASE_S + 30)
        time.sleep(1.0)
    finally:
        stop_file.touch()
        result = finish_worker(worker, "handover")
    seen = [(float(t), str(addr), int(sec)) for t, addr, sec in result.pop("seen")]
    windows = cluster.windows()
    out: dict[str, Any] = {"lease_s": CLUSTER_LEASE_S, "client": result}
    for kind, victim, t0, held in faults:
        first_by_section: dict[int, float] = {}
        for t, address, sec in seen:
            if t > t0 and sec in held and address != victim and sec not in first_by_section:
                first_by_section[sec] = t
        # The serve logs: when each moved section began to be served by another.
        name = "b" if kind == "graceful" else "a"
        served_from = [
            min(f for i, sec2, f, _ in windows if sec2 == sec and i != name and f > t0 - 0.1)
            for sec in held
            if any(sec2 == sec and i != name and f > t0 - 0.1 for i, sec2, f, _ in windows)
        ]
        out[kind] = {
            "sections_moved": len(held),
            "first_value_ms": round((min(first_by_section.values()) - t0) * 1000, 1)
            if first_by_section
            else None,
            "sections_seen": len(first_by_section),
            "serve_log_first_ms": round((min(served_from) - t0) * 1000, 1) if served_from else None,
            "serve_log_last_ms": round((max(served_from) - t0) * 1000, 1) if served_from else None,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per phase")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    parser.add_argument(
        "--routed-generators",
        type=int,
        default=2,
        help="load generator processes sharing the 6,000 calls/s of the routed open loop",
    )
    args = parser.parse_args()
    if args.bare_server:
        import uvloop

        uvloop.run(bare_server(int(args.bare_server)))
        return 0
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0

    d = 1.0 if args.quick else args.duration
    w = 0.3 if args.quick else 1.0
    mem_keys = 100_000 if args.quick else 1_000_000
    load_before = os.getloadavg()
    stack = Stack()
    stack.start()
    rows: dict[str, dict[str, Any]] = {}
    split_s: dict[str, float] = {}
    routed_generators = args.routed_generators
    try:
        svc = stack.seqsvc()
        with __import__("psycopg").connect(stack.pg.conninfo("bench1"), autocommit=True) as c:
            c.execute("CREATE TABLE bench_counter (k int PRIMARY KEY, v bigint NOT NULL)")
            c.execute("INSERT INTO bench_counter SELECT g, 0 FROM generate_series(0, 63) g")
        pg_dsn = stack.pg.conninfo("bench1")
        common = {"warmup": w, "duration": d}

        def phase(name: str, spec: dict[str, Any]) -> None:
            print(f"  running {name} ...", file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            rows[name] = run_worker({**common, **spec})
            rows[name]["loadavg_1m_before"] = round(load, 2)

        phase(
            "redis_incr (64 tasks)", {"kind": "redis", "url": stack.redis.url(), "concurrency": 64}
        )
        phase("pg_update_returning (64 tasks)", {"kind": "pg", "dsn": pg_dsn, "concurrency": 64})
        phase(
            "seq_unary (64 callers)", {"kind": "unary", "address": svc.address, "concurrency": 64}
        )
        phase("seq_unary (8 callers)", {"kind": "unary", "address": svc.address, "concurrency": 8})
        phase("seq_unary (1 caller)", {"kind": "unary", "address": svc.address, "concurrency": 1})
        phase(
            "seq_coalesced (1000 callers)",
            {"kind": "coalesced", "address": svc.address, "concurrency": 1000},
        )
        phase(
            "seq_batch (1000 keys, 4 callers)",
            {"kind": "batch", "address": svc.address, "concurrency": 4, "batch": 1000},
        )

        # Open loop, as WeChat states seqsvr's latency: a rate offered by the clock;
        # the same loops against a bare grpc.aio server are the floor.
        def open_loops(label: str, server: ServiceProcess | BareServer) -> None:
            for rate in (1000, 3000):
                name = f"{label} open loop {rate}/s"
                print(f"  running {name} ...", file=sys.stderr, flush=True)
                rows[name] = run_open_loop(
                    {**common, "duration": 2 * d, "kind": "open_unary",
                     "address": server.address, "rate": rate},
                    1,
                    [server],
                )  # fmt: skip

        open_loops("seq_unary", svc)
        bare = BareServer()
        try:
            open_loops("bare grpc.aio unary", bare)
        finally:
            bare.stop()

        # Several instances on one database, through the routing client.
        cluster = stack.cluster()
        sections = 1024  # the default
        for n, name in enumerate(("a", "b", "c"), start=1):
            cluster.start(name)
            split_s[name] = cluster.wait_split(set(cluster.procs), sections)
            time.sleep(0.5)
            label = f"seq_routed coalesced, {n} instance{'s' if n > 1 else ''}"
            print(f"  running {label} ...", file=sys.stderr, flush=True)
            cpu0 = [cpu_seconds(x) for x in cluster.live()]
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            rows[label] = run_worker(
                {**common, "kind": "coalesced", "address": cluster.procs["a"].address,
                 "concurrency": 1000}
            )  # fmt: skip
            wall = time.perf_counter() - t0
            rows[label]["loadavg_1m_before"] = round(load, 2)
            rows[label]["server_cpu_pct"] = [
                round(100 * (cpu_seconds(x) - c) / wall, 1)
                for x, c in zip(cluster.live(), cpu0, strict=True)
            ]
        name = "seq_unary routed open loop 6000/s, 3 instances"
        print(f"  running {name} ...", file=sys.stderr, flush=True)
        rows[name] = run_open_loop(
            {**common, "duration": 2 * d, "kind": "open_unary",
             "address": cluster.procs["a"].address, "rate": 6000, "routed": True,
             "keys": 10_000, "prefix": "r:"},
            routed_generators,
            cluster.live(),
        )  # fmt: skip
        print("  running handover (SIGTERM, kill -9) ...", file=sys.stderr, flush=True)
        handover = measure_handover(cluster, sections, rate=500)

        step = 500
        bsvc = stack.seqsvc(step=step, sections=1, max_step_factor=1)
        boundary_spec = {
            "kind": "boundary",
            "step": step,
            "window_s": 0.02,
            "concurrency": 8,
            "warmup": w,
            "duration": 2 * d,
        }
        print("  running boundary (double buffer) ...", file=sys.stderr, flush=True)
        boundary = run_worker({**boundary_spec, "address": bsvc.address})
        boundary.update(server_counters(bsvc))
        nsvc = stack.seqsvc(step=step, sections=1, prefetch_ratio=0.001, max_step_factor=1)
        print("  running boundary (no double buffer) ...", file=sys.stderr, flush=True)
        nobuffer = run_worker({**boundary_spec, "address": nsvc.address})
        nobuffer.update(server_counters(nsvc))
        asvc = stack.seqsvc(step=step, sections=1)
        print("  running boundary (double buffer, adaptive step) ...", file=sys.stderr, flush=True)
        adaptive = run_worker({**boundary_spec, "address": asvc.address})
        adaptive.update(server_counters(asvc))

        print("  running memory ...", file=sys.stderr, flush=True)
        msvc = stack.seqsvc(max_keys=max(1000, mem_keys * 2))
        before = rss_bytes(msvc.proc.pid)  # type: ignore[union-attr]
        run_worker({"kind": "fill", "address": msvc.address, "n": mem_keys, "batch": 1000})
        full = rss_bytes(msvc.proc.pid)  # type: ignore[union-attr]
        bounded_max = mem_keys // 10
        bounded = stack.seqsvc(max_keys=bounded_max)
        b_before = rss_bytes(bounded.proc.pid)  # type: ignore[union-attr]
        run_worker({"kind": "fill", "address": bounded.address, "n": mem_keys, "batch": 1000})
        b_after = rss_bytes(bounded.proc.pid)  # type: ignore[union-attr]
    finally:
        stack.stop()

    memory = {
        "keys": mem_keys,
        "rss_growth_mb": round((full - before) / 2**20, 1),
        "bytes_per_key": round((full - before) / mem_keys, 1),
        "bounded_max_keys": bounded_max,
        "bounded_rss_growth_mb": round((b_after - b_before) / 2**20, 1),
    }
    redis = rows["redis_incr (64 tasks)"]
    unary = rows["seq_unary (64 callers)"]
    coalesced = rows["seq_coalesced (1000 callers)"]
    batch = rows["seq_batch (1000 keys, 4 callers)"]
    open3000 = rows["seq_unary open loop 3000/s"]
    bare3000 = rows["bare grpc.aio unary open loop 3000/s"]
    routed6000 = rows["seq_unary routed open loop 6000/s, 3 instances"]
    result = {
        "redis_incr_ids_per_s": redis["ids_per_s"],
        "pg_counter_ids_per_s": rows["pg_update_returning (64 tasks)"]["ids_per_s"],
        "seq_unary_ids_per_s": unary["ids_per_s"],
        "seq_unary_p99_ms": unary["p99_ms"],
        "seq_unary_c1_p99_ms": rows["seq_unary (1 caller)"]["p99_ms"],
        "seq_unary_c8_p99_ms": rows["seq_unary (8 callers)"]["p99_ms"],
        "seq_coalesced_ids_per_s": coalesced["ids_per_s"],
        "seq_coalesced_p99_ms": coalesced["p99_ms"],
        "seq_batch_ids_per_s": batch["ids_per_s"],
        "boundary_p999_ms": boundary["boundary_p999_ms"],
        "steady_p999_ms": boundary["steady_p999_ms"],
        "nobuffer_boundary_p999_ms": nobuffer["boundary_p999_ms"],
        "nobuffer_steady_p999_ms": nobuffer["steady_p999_ms"],
        "boundary_waits": boundary.get("waits"),
        "nobuffer_boundary_waits": nobuffer.get("waits"),
        "adaptive_waits": adaptive.get("waits"),
        "adaptive_p999_ms": adaptive["all_p999_ms"],
        "bytes_per_key": memory["bytes_per_key"],
        "coalesced_vs_redis": round(coalesced["ids_per_s"] / redis["ids_per_s"], 2),
        "seq_unary_p999_ms_at_3000": open3000["p999_ms"],
        "seq_unary_cpu_ms_per_call_at_3000": open3000["server_cpu_ms_per_call"],
        "bare_unary_p999_ms_at_3000": bare3000["p999_ms"],
        "bare_unary_cpu_ms_per_call_at_3000": bare3000["server_cpu_ms_per_call"],
        "seq_unary_p99_ms_at_6000_routed": routed6000["p99_ms"],
        "instances": len(cluster.procs),
        "handover_graceful_ms": handover["graceful"]["first_value_ms"],
        "handover_dead_ms": handover["dead"]["first_value_ms"],
        "routed_ids_per_s_1": rows["seq_routed coalesced, 1 instance"]["ids_per_s"],
        "routed_ids_per_s_2": rows["seq_routed coalesced, 2 instances"]["ids_per_s"],
        "routed_ids_per_s_3": rows["seq_routed coalesced, 3 instances"]["ids_per_s"],
    }
    targets = {
        "coalesced >= 100k ids/s": result["seq_coalesced_ids_per_s"] >= 100_000,
        "coalesced >= 5x redis": result["coalesced_vs_redis"] >= 5,
        "unary p99 <= 2 ms (64 callers)": result["seq_unary_p99_ms"] <= 2.0,
        "boundary p99.9 <= 2x steady": result["boundary_p999_ms"] <= 2 * result["steady_p999_ms"],
        "unary p99.9 <= 3 ms at 3,000/s offered": open3000["p999_ms"] <= 3.0,
        "routed unary p99 <= 2 ms at 6,000/s offered": routed6000["p99_ms"] <= 2.0,
        "instances >= 3": result["instances"] >= 3,
        "graceful handover <= 1,000 ms": (result["handover_graceful_ms"] or 1e9) <= 1000,
        f"dead-owner handover <= lease + 2 s ({(CLUSTER_LEASE_S + 2) * 1000:.0f} ms)": (
            result["handover_dead_ms"] or 1e9
        )
        <= (CLUSTER_LEASE_S + 2) * 1000,
    }

    print()
    print(f"{'phase':48} {'ids/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'p99.9 ms':>9}")
    for name, r in rows.items():
        print(
            f"{name:48} {r['ids_per_s']:>12,.0f} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} "
            f"{r['p999_ms']:>9.3f}"
        )
    print()
    for name, r in rows.items():
        if "offered_per_s" in r:
            print(
                f"{name}: offered {r['offered_per_s']:,.0f}/s by {r['generators']} generator "
                f"process(es), completed {r['completed_per_s']:,.0f}/s, {r['errors']} errors; "
                f"load average {r['loadavg_1m_before']} at its start; "
                f"launch lag p99 {r['lag_p99_ms']} ms; CPU % generators "
                f"{r['generator_cpu_pct']}, servers {r['server_cpu_pct']}"
            )
        elif "server_cpu_pct" in r:
            print(f"{name}: CPU % servers {r['server_cpu_pct']}")
    for kind in ("graceful", "dead"):
        h = handover[kind]
        print(
            f"handover {kind} ({'SIGTERM' if kind == 'graceful' else 'kill -9'}, lease "
            f"{CLUSTER_LEASE_S} s, {h['sections_moved']} sections moved): first value from "
            f"the new owner {h['first_value_ms']} ms after the signal (serve logs: the new "
            f"owners began serving the moved sections {h['serve_log_first_ms']} to "
            f"{h['serve_log_last_ms']} ms after it)"
        )
    c = handover["client"]
    print(
        f"handover client: {c['offered_per_s']:.0f} calls/s offered, {c['calls']} calls, "
        f"{c['errors']} failed after retries, p99 {c['p99_ms']} ms, p99.9 {c['p999_ms']} ms"
    )
    print()
    for label, b in (
        ("double buffer, fixed step", boundary),
        ("no double buffer, fixed step", nobuffer),
        ("double buffer, adaptive step", adaptive),
    ):
        if b is adaptive:  # its ceilings are not every multiple of step: no window split
            print(
                f"{label} (step {step}..{64 * step}, 8 callers): p99.9 "
                f"{b['all_p999_ms']} ms over all calls; calls that waited for a "
                f"reservation: {b.get('waits', 0):.0f} ({b.get('store_writes', 0):.0f} "
                "reservations)"
            )
            continue
        print(
            f"boundary windows ({label}, step {step}, 8 callers, 20 ms windows): "
            f"{b['boundary_windows']}/{b['windows']} windows cross a step; p99.9 "
            f"boundary {b['boundary_p999_ms']} ms vs steady {b['steady_p999_ms']} ms "
            f"(max {b['boundary_max_ms']} vs {b['steady_max_ms']}); calls that waited "
            f"for a reservation: {b.get('waits', 0):.0f} of {b['ids_per_s'] * 2 * d:,.0f} "
            f"({b.get('store_writes', 0):.0f} reservations)"
        )
    print(
        f"memory: {memory['keys']:,} keys -> +{memory['rss_growth_mb']} MB RSS "
        f"({memory['bytes_per_key']} B/key); with max_keys={bounded_max:,}: "
        f"+{memory['bounded_rss_growth_mb']} MB"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )
    for label, ok in targets.items():
        print(f"target {label}: {'met' if ok else 'NOT met'}")

    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # Other processes on the machine skew every number: record how busy it was.
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
        "duration_s": d,
        "phases": rows,
        "boundary": boundary,
        "nobuffer_boundary": nobuffer,
        "adaptive_boundary": adaptive,
        "memory": memory,
        "handover": handover,
        "split_s": split_s,
        "targets": targets,
        "result": result,
    }
    if not args.no_write and not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
