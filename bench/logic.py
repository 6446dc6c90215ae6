"""Benchmark of logic against the real store: SendMessage/s and fan-out rows/s.

Starts its own PostgreSQL (fsync on by default: every send is one durable commit),
NATS JetStream, seqsvc and logic on free ports in a temp dir, then measures:

- send_spread: `--concurrency` clients, each sending into its own direct
  conversation (no lock contention): commits/s of independent sends;
- send_one_group: the same clients all sending into one group (every send takes
  that conversation's lock, so sends to it serialise);
- fanout_group: a `--group-size`-member group with `--group-messages` pending
  messages fanned out by one caller calling Fanout until has_more is false (what
  the pusher does for one conversation), rows/s;
- fanout_direct: the pending messages of many direct conversations fanned out by
  `--concurrency` concurrent callers, rows/s.

For each phase it also reports the CPU seconds used by each process (logic,
PostgreSQL, seqsvc, nats-server, this load generator), which shows what limits the
numbers on this machine. Prints a table, writes bench/results/logic.json, and ends
with `RESULT {json}`.

    python bench/logic.py [--duration 10] [--concurrency 64] [--logics 1] [--no-fsync]
    python bench/logic.py --sends-only --env IM_LOGIC_SEND_BATCH_MAX=1   # no group commit

Send phases also report PostgreSQL commits and WAL fsyncs per send
(pg_stat_database, pg_stat_wal) and `foreign_cores`: CPU used on the machine by
processes outside the benchmark during the phase (/proc/stat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for sub in ("services", "libs", "gen"):
    sys.path.insert(0, str(ROOT / sub))

import grpc  # noqa: E402
import psycopg  # noqa: E402

from im.common.v1 import common_pb2  # noqa: E402
from im.logic.v1 import logic_pb2 as pb  # noqa: E402
from im.logic.v1 import logic_pb2_grpc as pb_grpc  # noqa: E402
from imdev.servers import (  # noqa: E402
    Managed,
    NatsServer,
    PostgresServer,
    ServiceProcess,
    free_port,
)

RESULTS = ROOT / "bench" / "results" / "logic.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting --------------------------------------------------------------------


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(entry.name))
    return out


class CpuMeter:
    """CPU seconds per process group, between start() and stop()."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, float]] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        return {name: {p: _cpu_of(p) for p in pids()} for name, pids in self.groups.items()}

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        out = {}
        for name, pids in end.items():
            before = self._start.get(name, {})
            out[name] = round(sum(v - before.get(p, 0.0) for p, v in pids.items()), 2)
        return out


def _busy_jiffies() -> float:
    """CPU seconds all processes on the machine used (the cpu line of /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK


class PgCounters:
    """Commits and WAL fsyncs of the bench database between start() and stop()."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._start: tuple[int, int] = (0, 0)

    async def _read(self) -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = "
                "current_database()), (SELECT wal_sync FROM pg_stat_wal)"
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

    async def start(self) -> None:
        self._start = await self._read()

    async def stop(self) -> dict[str, int]:
        end = await self._read()
        return {"commits": end[0] - self._start[0], "wal_fsyncs": end[1] - self._start[1]}


# -- the stack -------------------------------------------------------------------------


class Stack:
    def __init__(
        self, workdir: Path, logics: int, fsync: bool, logic_env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.logic_env = logic_env or {}
        self.postgres = PostgresServer(
            free_port(),
            workdir / "pg",
            fsync=fsync,
            settings={"max_connections": "300", "shared_buffers": "256MB"},
        )
        self.nats = NatsServer(free_port(), workdir / "nats")
        self.procs: list[Managed] = [self.postgres, self.nats]
        self.seqsvc: ServiceProcess | None = None
        self.logics: list[ServiceProcess] = []
        self.n_logics = logics

    def start(self) -> None:
        self.postgres.start()
        self.nats.start()
        dsn = self.postgres.create_database("im")
        port = free_port()
        self.seqsvc = ServiceProcess(
            "seqsvc",
            port,
            {"IM_SEQSVC_PORT": str(port), "IM_SEQSVC_DATABASE_URL": dsn},
            self.workdir / "seqsvc.log",
        )
        self.seqsvc.start()
        self.procs.append(self.seqsvc)
        for i in range(self.n_logics):
            port = free_port()
            logic = ServiceProcess(
                "logic",
                port,
                {
                    "IM_LOGIC_PORT": str(port),
                    "IM_LOGIC_DATABASE_URL": dsn,
                    "IM_LOGIC_SEQSVC_ADDRESS": self.seqsvc.address,
                    "IM_LOGIC_NATS_URL": self.nats.url(),
                    "IM_LOGIC_DB_POOL_MAX": "40",
                    # No pusher runs here: keep the repair loop out of the numbers.
                    "IM_LOGIC_REPAIR_AFTER_S": "86400",
                    "IM_LOGIC_LOG_LEVEL": "warning",
                    **self.logic_env,
                },
                self.workdir / f"logic-{i}.log",
            )
            logic.start()
            self.logics.append(logic)
            self.procs.append(logic)
        self.dsn = dsn

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=15)

    def meter(self) -> CpuMeter:
        pg_pid = self.postgres.pid or 0
        return CpuMeter(
            {
                "logic": lambda: [p.pid for p in self.logics if p.pid],
                "postgres": lambda: [pg_pid, *_children(pg_pid)],
                "seqsvc": lambda: [self.seqsvc.pid] if self.seqsvc and self.seqsvc.pid else [],
                "nats": lambda: [self.nats.pid] if self.nats.pid else [],
                "bench": lambda: [os.getpid()],
            }
        )


# -- workloads -------------------------------------------------------------------------


def _send(stub: Any, sender: str, conv: str, body: bytes) -> Awaitable[Any]:
    return stub.SendMessage(
        pb.SendMessageRequest(
            sender_id=sender,
            sender_device_id="bench",
            client_msg_id=uuid.uuid4().hex,
            conversation_id=conv,
            content_type=common_pb2.CONTENT_TYPE_TEXT,
            body=body,
        ),
        timeout=30,
    )


def _summary(
    count: int, elapsed: float, latencies: list[float], cpu: dict[str, float]
) -> dict[str, Any]:
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else 0.0

    return {
        "count": count,
        "seconds": round(elapsed, 2),
        "per_second": round(count / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            "p50": pct(0.50),
            "p99": pct(0.99),
            "p999": pct(0.999),
            "max": round(lat[-1] * 1000, 2) if lat else 0.0,
            "mean": round(statistics.fmean(lat) * 1000, 2) if lat else 0.0,
        },
        "cpu_seconds": cpu,
        # CPU per operation is far less sensitive to other load on the machine than
        # the rates: 1000 / logic's figure is what one logic process can do per core.
        "cpu_ms_per_op": {k: round(v * 1000 / count, 3) for k, v in cpu.items()} if count else {},
    }


async def bench_send(
    stubs: list[Any],
    meter: CpuMeter,
    duration: float,
    concurrency: int,
    conv_of: Callable[[int], tuple[str, str]],
    body: bytes,
    pg: PgCounters | None = None,
) -> dict[str, Any]:
    latencies: list[float] = []
    deadline = time.monotonic() + duration

    async def worker(w: int) -> None:
        sender, conv = conv_of(w)
        stub = stubs[w % len(stubs)]
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            await _send(stub, sender, conv, body)
            latencies.append(time.perf_counter() - t0)

    if pg is not None:
        await pg.start()
    busy0 = _busy_jiffies()
    meter.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu = meter.stop()
    busy = _busy_jiffies() - busy0
    out = _summary(len(latencies), elapsed, latencies, cpu)
    # Cores used by processes that are not this benchmark's (other work on the
    # machine): read every number together with it.
    out["foreign_cores"] = round(max(0.0, busy - sum(cpu.values())) / elapsed, 2)
    if pg is not None:
        counts = await pg.stop()
        n = max(1, len(latencies))
        out["postgres"] = {
            **counts,
            "commits_per_send": round(counts["commits"] / n, 3),
            "wal_fsyncs_per_send": round(counts["wal_fsyncs"] / n, 3),
        }
    return out


async def fanout_until_done(stub: Any, conv: str) -> tuple[int, int, list[float]]:
    rows = calls = 0
    latencies = []
    while True:
        t0 = time.perf_counter()
        resp = await stub.Fanout(pb.FanoutRequest(conversation_id=conv), timeout=60)
        latencies.append(time.perf_counter() - t0)
        rows += len(resp.deliveries)
        calls += 1
        if not resp.has_more:
            return rows, calls, latencies


async def bench_fanout_group(
    stubs: list[Any], meter: CpuMeter, members: int, messages: int, body: bytes
) -> dict[str, Any]:
    stub = stubs[0]
    ids = [f"gm{i:05d}" for i in range(members)]
    conv = (
        await stub.CreateGroup(
            pb.CreateGroupRequest(creator_id=ids[0], name="bench", member_ids=ids)
        )
    ).conversation.conversation_id
    await asyncio.gather(*(_send(stub, ids[i % 10], conv, body) for i in range(messages)))
    meter.start()
    t0 = time.perf_counter()
    rows, calls, latencies = await fanout_until_done(stub, conv)
    elapsed = time.perf_counter() - t0
    out = _summary(rows, elapsed, latencies, meter.stop())
    out.update({"members": members, "messages": messages, "fanout_calls": calls})
    out["latency_ms_per_call"] = out.pop("latency_ms")
    return out


async def bench_fanout_direct(
    stubs: list[Any], meter: CpuMeter, convs: int, per_conv: int, concurrency: int, body: bytes
) -> dict[str, Any]:
    pairs = [(f"da{i:05d}", f"db{i:05d}") for i in range(convs)]
    sem = asyncio.Semaphore(concurrency)

    async def send(i: int, n: int) -> None:
        a, b = pairs[i]
        async with sem:
            await _send(stubs[i % len(stubs)], a, f"d:{a}:{b}", body)

    await asyncio.gather(*(send(i, n) for i in range(convs) for n in range(per_conv)))
    queue = list(range(convs))
    total_rows = 0
    latencies: list[float] = []

    async def worker(w: int) -> None:
        nonlocal total_rows
        stub = stubs[w % len(stubs)]
        while queue:
            i = queue.pop()
            a, b = pairs[i]
            rows, _, lat = await fanout_until_done(stub, f"d:{a}:{b}")
            total_rows += rows
            latencies.extend(lat)

    meter.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    out = _summary(total_rows, elapsed, latencies, meter.stop())
    out.update({"conversations": convs, "messages_per_conversation": per_conv})
    out["latency_ms_per_call"] = out.pop("latency_ms")
    return out


def _limits(results: dict[str, Any], cores: int) -> str:
    send = results["send_spread"]
    cpu = send["cpu_seconds"]
    busiest = max(cpu, key=lambda k: cpu[k])
    share = {k: round(v / send["seconds"], 2) for k, v in cpu.items()}
    per_send = send["cpu_ms_per_op"]
    ceiling = round(1000 / max(per_send["logic"], 1e-3))
    return (
        f"{cores} CPU cores shared by every process (and by whatever else runs on the "
        "machine: see load_average_1m_at_end). During send_spread the busiest process "
        f"was {busiest} ({share[busiest]} cores; all: {share}); CPU per send: {per_send} ms, "
        f"so one logic process saturates its core near {ceiling} "
        "sends/s. A send is one PostgreSQL "
        "transaction (5 statements, one commit: with fsync on, commits/s of the disk bound "
        "it; group commit helps with concurrency), one coalesced seqsvc RPC and one "
        "JetStream publish; logic is one Python process (one core at most), so more logic "
        "processes add throughput until PostgreSQL's commits or the cores run out. "
        "send_one_group is bound by the conversation's send lock: sends to one conversation "
        "are serial (lock held from the seqsvc call to the commit). Fan-out rows/s is bound "
        "by per-page work (one transaction of up to 500 rows: user locks, one NextBatch, one "
        "multi-row INSERT) and by building the response in Python."
    )


def _config(args: argparse.Namespace, logic_env: dict[str, str]) -> dict[str, Any]:
    return {
        "logics": args.logics,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "body_bytes": args.body_bytes,
        "postgres_fsync": not args.no_fsync,
        "logic_env": logic_env,
        "cpu_cores": os.cpu_count() or 1,
        # Other work on the machine skews every number: check this first.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    logic_env = dict(kv.split("=", 1) for kv in args.env)
    stack = Stack(workdir, args.logics, fsync=not args.no_fsync, logic_env=logic_env)
    try:
        stack.start()
        channels = [grpc.aio.insecure_channel(p.address) for p in stack.logics]
        stubs = [pb_grpc.LogicStub(c) for c in channels]
        meter = stack.meter()
        body = b"x" * args.body_bytes
        # Warm up connections, prepared statements and seqsvc steps.
        await bench_send(stubs, meter, 2, args.concurrency, lambda w: ("w", f"d:w:w{w:04d}"), body)

        pg = PgCounters(stack.dsn)
        results: dict[str, Any] = {}
        results["send_spread"] = await bench_send(
            stubs, meter, args.duration, args.concurrency,
            lambda w: (f"s{w:04d}", f"d:r{w:04d}:s{w:04d}"), body, pg,
        )  # fmt: skip
        if args.sends_only:
            results["config"] = _config(args, logic_env)
            return results
        group = (
            await stubs[0].CreateGroup(
                pb.CreateGroupRequest(
                    creator_id="h0000", member_ids=[f"h{w:04d}" for w in range(args.concurrency)]
                )
            )
        ).conversation.conversation_id
        results["send_one_group"] = await bench_send(
            stubs, meter, args.duration / 2, args.concurrency,
            lambda w: (f"h{w:04d}", group), body, pg,
        )  # fmt: skip
        results["fanout_group"] = await bench_fanout_group(
            stubs, meter, args.group_size, args.group_messages, body
        )
        results["fanout_direct"] = await bench_fanout_direct(
            stubs, meter, args.direct_convs, 10, args.concurrency, body
        )
        for c in channels:
            await c.close()
        async with await psycopg.AsyncConnection.connect(stack.dsn) as conn:
            cur = await conn.execute("SELECT count(*) FROM timeline")
            row = await cur.fetchone()
            results["timeline_rows_total"] = row[0] if row else 0
        cores = os.cpu_count() or 1
        results["config"] = _config(args, logic_env)
        results["limits"] = _limits(results, cores)
        return results
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per send phase")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--logics", type=int, default=1, help="logic processes")
    parser.add_argument("--body-bytes", type=int, default=100)
    parser.add_argument("--group-size", type=int, default=2000)
    parser.add_argument("--group-messages", type=int, default=20)
    parser.add_argument("--direct-convs", type=int, default=300)
    parser.add_argument("--no-fsync", action="store_true", help="PostgreSQL with fsync=off")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra logic setting, repeatable (e.g. IM_LOGIC_SEND_BATCH_MAX=1 for one "
        "transaction per send, the behaviour before group commit)",
    )
    parser.add_argument(
        "--sends-only", action="store_true", help="only the send_spread phase (no fan-out)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS})"
    )
    args = parser.parse_args()
    for kv in args.env:
        if "=" not in kv or not kv.startswith("IM_LOGIC_"):
            parser.error(f"--env {kv!r}: expected IM_LOGIC_<NAME>=<value>")
    # Not pytest's tmp dir: PostgreSQL (as user postgres when we are root) must reach it.
    workdir = Path(tempfile.mkdtemp(prefix="bench-logic-"))
    workdir.chmod(0o755)
    try:
        results = asyncio.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name in ("send_spread", "send_one_group", "fanout_group", "fanout_direct"):
        if name not in results:
            continue
        r = results[name]
        lat = r.get("latency_ms") or r.get("latency_ms_per_call")
        unit = "sends/s" if name.startswith("send") else "rows/s"
        print(
            f"{name:15s} {r['per_second']:>10.1f} {unit:8s} p50 {lat['p50']:>7.2f} ms  "
            f"p99 {lat['p99']:>7.2f} ms  cpu ms/op {r['cpu_ms_per_op']}"
        )
        if "postgres" in r:
            print(f"{'':15s} postgres {r['postgres']}  foreign cores {r['foreign_cores']}")
    if "limits" in results:
        print("limits:", results["limits"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
