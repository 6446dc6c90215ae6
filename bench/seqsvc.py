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
- seqsvc memory per key with 1M keys in memory, and with max_keys bounding it.

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
import subprocess
import sys
import tempfile
import time
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


WORKERS = {
    "redis": w_redis,
    "pg": w_pg,
    "unary": w_unary,
    "coalesced": w_coalesced,
    "batch": w_batch,
    "boundary": w_boundary,
    "fill": w_fill,
}


def worker_main(spec: dict[str, Any]) -> None:
    import uvloop

    result = uvloop.run(WORKERS[spec["kind"]](spec))
    print(json.dumps(result))


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


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

    def stop(self) -> None:
        for svc in self.services:
            svc.stop()
        self.redis.stop()
        self.pg.stop()
        if not os.environ.get("IM_KEEP_BENCH_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per phase")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = parser.parse_args()
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
    try:
        svc = stack.seqsvc()
        with __import__("psycopg").connect(stack.pg.conninfo("bench1"), autocommit=True) as c:
            c.execute("CREATE TABLE bench_counter (k int PRIMARY KEY, v bigint NOT NULL)")
            c.execute("INSERT INTO bench_counter SELECT g, 0 FROM generate_series(0, 63) g")
        pg_dsn = stack.pg.conninfo("bench1")
        common = {"warmup": w, "duration": d}

        def phase(name: str, spec: dict[str, Any]) -> None:
            print(f"  running {name} ...", file=sys.stderr, flush=True)
            rows[name] = run_worker({**common, **spec})

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
    }
    targets = {
        "coalesced >= 100k ids/s": result["seq_coalesced_ids_per_s"] >= 100_000,
        "coalesced >= 5x redis": result["coalesced_vs_redis"] >= 5,
        "unary p99 <= 2 ms (64 callers)": result["seq_unary_p99_ms"] <= 2.0,
        "boundary p99.9 <= 2x steady": result["boundary_p999_ms"] <= 2 * result["steady_p999_ms"],
    }

    print()
    print(f"{'phase':36} {'ids/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'p99.9 ms':>9}")
    for name, r in rows.items():
        print(
            f"{name:36} {r['ids_per_s']:>12,.0f} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} "
            f"{r['p999_ms']:>9.3f}"
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
