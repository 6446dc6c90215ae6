"""Benchmark of the data-lifecycle pruner (logic/retention.py) under send load.

    .venv/bin/python bench/prune.py                     # 2 cohorts of 1,000,000 rows
    .venv/bin/python bench/prune.py --rows 200000 --off-s 15   # a smoke-sized run

Starts a stack (`imdev.stack.Stack`: PostgreSQL with fsync on, Redis, NATS
JetStream, seqsvc, one logic, one pusher; no gateway: the load goes to logic's
SendMessage, and the pusher fans every message out, so PostgreSQL sees the whole
write path), then COPYs two cohorts of old data into logic's store, each
`--rows` rows (a quarter messages, half timeline rows, a quarter dedup keys with
UUIDv7 ids of the message's time), cohort A 100 days old, cohort B 50 days old,
in direct conversations of users that the live load does not use.

A steady open-loop load of `--rate` SendMessage/s (default 300; latency measured
from each send's intended start, so a stall counts in full) runs through four
phases; logic is restarted with other settings between them:

1. off: no pruning, `--off-s` seconds;
2. on: retention 75 days (cohort A expires), until the pruner has deleted all of
   cohort A (or `--max-on-s`);
3. vacuum: an explicit VACUUM of the pruned tables, under the same load (the dead
   rows are the rest of a prune's cost; autovacuum would do it anyway, in the
   middle of the next phase);
4. off again;
5. on: retention 25 days (cohort B expires), until it is deleted;
6. vacuum.

For each phase: the send latency (p50/p99/p999/max), the sends that failed, and
`foreign_cores` (CPU used meanwhile by processes outside the benchmark: the
machine is shared, read every latency with it);
for the "on" phases, rows deleted per table and rows/s over the time the pruner
was deleting (first to last increase of `im_logic_pruned_rows_total`), with the
send latency over that window. Writes bench/results/prune.json and prints
`RESULT {json}` last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
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
from imclient.ids import uuid7  # noqa: E402
from imdev.servers import free_port  # noqa: E402
from imdev.stack import Stack, StackPorts  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "prune.json"
DAY_MS = 86_400_000
USERS_PER_COHORT = 10_000
LIVE_PAIRS = 100
BODY = b"x" * 100

OFF_ENV = {"IM_LOGIC_RETENTION_DEDUP_DAYS": "0", "IM_LOGIC_RETENTION_OUTBOX_S": "0"}


def on_env(days: int, extra: dict[str, str]) -> dict[str, str]:
    return {
        "IM_LOGIC_RETENTION_TIMELINE_DAYS": str(days),
        "IM_LOGIC_RETENTION_MESSAGES_DAYS": str(days),
        "IM_LOGIC_RETENTION_DEDUP_DAYS": str(days),
        "IM_LOGIC_RETENTION_OUTBOX_S": "600",
        "IM_LOGIC_RETENTION_MARGIN_S": "60",
        # Start the passes at once (the default spaces them an hour apart); batch
        # size and the pause between batches stay at their defaults.
        "IM_LOGIC_RETENTION_PASS_INTERVAL_S": "0",
        "IM_LOGIC_RETENTION_INTERVAL_S": "1",
        **extra,
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- what else the machine is doing -------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    """CPU seconds every process on the machine has used (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def _ours(stack: Stack) -> list[int]:
    """This benchmark and the stack's processes (PostgreSQL's backends included)."""
    roots = {p.pid for p in [*stack.infra, *stack.services] if p.pid} | {os.getpid()}
    out = set(roots)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid in roots:
                out.add(int(entry.name))
    return sorted(out)


class Foreign:
    """Cores used by processes outside the benchmark during a phase: other work
    on the machine, which every latency number must be read with."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.t0 = time.monotonic()
        self.pids = _ours(stack)
        self.busy0, self.ours0 = _busy_s(), _cpu_s(self.pids)

    def cores(self) -> float:
        pids = sorted(set(self.pids) | set(_ours(self.stack)))
        elapsed = time.monotonic() - self.t0
        foreign = (_busy_s() - self.busy0) - (_cpu_s(pids) - self.ours0)
        return round(max(0.0, foreign) / elapsed, 2) if elapsed else 0.0


# -- the old data ------------------------------------------------------------------------


async def load_cohort(dsn: str, name: str, rows: int, age_days: int, first_msg_id: int) -> int:
    """COPYs one cohort; returns its message count. Users `<name>u<nnnnn>` in
    pairs, one direct conversation per pair; every user's seq equals the
    conversation's conv_seq (each user is in exactly one conversation)."""
    n = rows // 4
    convs = USERS_PER_COHORT // 2
    t0 = int(time.time() * 1000) - age_days * DAY_MS
    pairs = [(f"{name}u{2 * p:05d}", f"{name}u{2 * p + 1:05d}") for p in range(convs)]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.cursor() as cur:
            async with cur.copy(
                "COPY messages (msg_id, conversation_id, conv_seq, sender_id, sender_device_id,"
                " client_msg_id, sender_seq, content_type, body, server_time_ms) FROM STDIN"
            ) as copy:
                for i in range(n):
                    a, b = pairs[i % convs]
                    k = i // convs + 1
                    sender = a if k % 2 else b
                    t = t0 + i
                    await copy.write_row(
                        (
                            first_msg_id + i,
                            f"d:{a}:{b}",
                            k,
                            sender,
                            "bench",
                            uuid7(t),
                            k,
                            1,
                            BODY,
                            t,
                        )
                    )
            async with cur.copy("COPY timeline (user_id, seq, msg_id) FROM STDIN") as copy:
                for i in range(n):
                    a, b = pairs[i % convs]
                    k = i // convs + 1
                    await copy.write_row((a, k, first_msg_id + i))
                    await copy.write_row((b, k, first_msg_id + i))
            # The dedup keys are the messages' own (sender, client_msg_id).
            await cur.execute(
                "INSERT INTO send_dedup (sender_id, client_msg_id, msg_id) "
                "SELECT sender_id, client_msg_id, msg_id FROM messages "
                "WHERE msg_id >= %s AND msg_id < %s",
                (first_msg_id, first_msg_id + n),
            )
            await cur.execute(
                "INSERT INTO fanout_state (conversation_id, watermark) "
                "SELECT conversation_id, max(conv_seq) FROM messages "
                "WHERE msg_id >= %s AND msg_id < %s GROUP BY conversation_id",
                (first_msg_id, first_msg_id + n),
            )
        await conn.commit()
    return n


async def load(dsn: str, rows: int) -> dict[str, int]:
    a = await load_cohort(dsn, "a", rows, 100, 1)
    b = await load_cohort(dsn, "b", rows, 50, a + 1)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('messages', 'msg_id'), %s)", (a + b,)
        )
        await conn.execute("VACUUM ANALYZE")
    return {"a": a, "b": b}


async def table_rows(dsn: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        out = {}
        for t in ("messages", "timeline", "send_dedup"):
            cur = await conn.execute(f"SELECT count(*) FROM {t}")
            row = await cur.fetchone()
            out[t] = int(row[0]) if row else 0
        return out


# -- the load ----------------------------------------------------------------------------


class Load:
    """Open-loop SendMessage at `rate`/s over LIVE_PAIRS direct conversations."""

    def __init__(self, address: str, rate: float) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.LogicStub(self.channel)
        self.rate = rate
        self.samples: list[tuple[float, float]] = []  # (intended start, latency s)
        self.errors = 0
        self._n = 0

    async def _one(self, intended: float) -> None:
        self._n += 1
        p = self._n % LIVE_PAIRS
        a, b = f"live{2 * p:04d}", f"live{2 * p + 1:04d}"
        sender = a if self._n % 2 else b
        req = pb.SendMessageRequest(
            sender_id=sender,
            sender_device_id="bench",
            client_msg_id=uuid7(),
            conversation_id=f"d:{a}:{b}",
            content_type=common_pb2.CONTENT_TYPE_TEXT,
            body=BODY,
        )
        try:
            await self.stub.SendMessage(req, timeout=30)
        except grpc.aio.AioRpcError:
            self.errors += 1
            return
        self.samples.append((intended, time.monotonic() - intended))

    async def run(self, stop: asyncio.Event) -> None:
        start = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while not stop.is_set():
            intended = start + i / self.rate
            delay = intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one(intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)

    async def close(self) -> None:
        await self.channel.close()


def latency(
    samples: list[tuple[float, float]], lo: float = 0.0, hi: float = 1e18
) -> dict[str, Any]:
    lat = sorted(s for t, s in samples if lo <= t <= hi)
    if not lat:
        return {"sends": 0}

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)

    return {
        "sends": len(lat),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": round(lat[-1] * 1000, 1),
    }


def pruned(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    out: dict[str, float] = {}
    for m in re.finditer(rb'im_logic_pruned_rows_total\{table="([a-z_]+)"\} ([0-9.e+]+)', text):
        out[m.group(1).decode()] = float(m.group(2))
    return out


# -- phases ------------------------------------------------------------------------------


async def restart_logic(stack: Stack, env: dict[str, str], metrics_port: int) -> None:
    proc = stack.logics[0]
    for key in [k for k in proc.extra_env if k.startswith("IM_LOGIC_RETENTION_")]:
        del proc.extra_env[key]
    proc.extra_env.update({**env, "IM_LOGIC_METRICS_PORT": str(metrics_port)})
    await asyncio.to_thread(proc.restart, 60)


async def phase_off(stack: Stack, args: argparse.Namespace, port: int) -> dict[str, Any]:
    await restart_logic(stack, OFF_ENV, port)
    load = Load(stack.logics[0].address, args.rate)
    stop = asyncio.Event()
    foreign = Foreign(stack)
    runner = asyncio.create_task(load.run(stop))
    await asyncio.sleep(args.off_s)
    stop.set()
    await runner
    await load.close()
    return {
        "pruning": False,
        "seconds": args.off_s,
        "errors": load.errors,
        **latency(load.samples),
        "foreign_cores": foreign.cores(),
    }


async def phase_on(
    stack: Stack, args: argparse.Namespace, port: int, days: int, expect: dict[str, int]
) -> dict[str, Any]:
    await restart_logic(stack, on_env(days, args.on_env), port)
    load = Load(stack.logics[0].address, args.rate)
    stop = asyncio.Event()
    foreign = Foreign(stack)
    runner = asyncio.create_task(load.run(stop))
    t0 = time.monotonic()
    first = last = None
    totals: dict[str, float] = {}
    while time.monotonic() - t0 < args.max_on_s:
        await asyncio.sleep(1.0)
        now = pruned(port)
        if sum(now.values()) > sum(totals.values()):
            first = first or time.monotonic() - 1.0
            last = time.monotonic()
        totals = now
        if all(totals.get(t, 0) >= n for t, n in expect.items()):
            break
    stop.set()
    await runner
    await load.close()
    window = (last - first) if first and last else 0.0
    rows = int(sum(totals.values()))
    return {
        "pruning": True,
        "retention_days": days,
        "seconds": round(time.monotonic() - t0, 1),
        "errors": load.errors,
        **latency(load.samples),
        "pruned_rows": {k: int(v) for k, v in totals.items()},
        "expected_rows": expect,
        "complete": all(totals.get(t, 0) >= n for t, n in expect.items()),
        "pruning_seconds": round(window, 1),
        "rows_per_second": round(rows / window) if window else None,
        "send_while_pruning": latency(load.samples, first or 0.0, last or 0.0),
        "foreign_cores": foreign.cores(),
    }


async def phase_vacuum(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """VACUUM of the pruned tables under the same load, right after an 'on'
    phase: the dead rows a prune leaves are the other half of its cost (an
    explicit VACUUM takes over from autovacuum, so the next 'off' phase starts
    clean and this cost is measured apart)."""
    load = Load(stack.logics[0].address, args.rate)
    stop = asyncio.Event()
    foreign = Foreign(stack)
    runner = asyncio.create_task(load.run(stop))
    t0 = time.monotonic()
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
        await conn.execute("VACUUM (ANALYZE) timeline, messages, send_dedup, timeline_floor")
    took = time.monotonic() - t0
    stop.set()
    await runner
    await load.close()
    return {
        "pruning": False,
        "vacuum": True,
        "seconds": round(took, 1),
        "errors": load.errors,
        **latency(load.samples),
        "foreign_cores": foreign.cores(),
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stack = Stack(
        workdir,
        gateways=0,
        logics=1,
        pushers=1,
        fsync=True,
        ports=StackPorts.free(0, 1, 1),
        env={"logic": {"IM_LOGIC_LOG_LEVEL": "warning", **OFF_ENV}},
    )
    try:
        log("starting the stack")
        await asyncio.to_thread(stack.start, 120)
        log(f"loading 2 x {args.rows:,} rows (COPY)")
        t = time.monotonic()
        counts = await load(stack.database_url, args.rows)
        loaded = await table_rows(stack.database_url)
        log(f"loaded {loaded} in {time.monotonic() - t:.0f}s")
        port = free_port()
        convs = USERS_PER_COHORT // 2
        phases = []
        for name, days, cohort in (
            ("off", 0, ""),
            ("on", 75, "a"),
            ("off", 0, ""),
            ("on", 25, "b"),
        ):
            log(f"phase {len(phases) + 1}: pruning {name}")
            if name == "off":
                phases.append(await phase_off(stack, args, port))
            else:
                n = counts[cohort]
                expect = {"timeline": 2 * n, "messages": n - convs, "send_dedup": n}
                phases.append(await phase_on(stack, args, port, days, expect))
                log(json.dumps(phases[-1]))
                log(f"phase {len(phases) + 1}: vacuum")
                phases.append(await phase_vacuum(stack, args))
            log(json.dumps(phases[-1]))
        return {
            "config": {
                "rows_per_cohort": args.rows,
                "rate_per_s": args.rate,
                "postgres_fsync": True,
                "cpu_cores": os.cpu_count(),
                "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                "pruning_env_overrides": args.on_env,
            },
            "loaded_rows": loaded,
            "phases": phases,
        }
    finally:
        stack.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per cohort")
    parser.add_argument("--rate", type=float, default=300.0, help="SendMessage/s")
    parser.add_argument("--off-s", type=float, default=60.0, help="length of an 'off' phase")
    parser.add_argument("--max-on-s", type=float, default=600.0, help="longest 'on' phase")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--on-env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="logic setting for the 'on' phases (e.g. IM_LOGIC_RETENTION_BUSY_SHARE=1)",
    )
    args = parser.parse_args()
    args.on_env = dict(kv.split("=", 1) for kv in args.on_env)
    workdir = Path(tempfile.mkdtemp(prefix="imbench-prune-"))
    workdir.chmod(0o755)
    try:
        result = asyncio.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["run_id"] = uuid.uuid4().hex[:8]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {
        "phases": [
            {
                k: p.get(k)
                for k in (
                    "pruning",
                    "vacuum",
                    "p50_ms",
                    "p99_ms",
                    "errors",
                    "rows_per_second",
                    "complete",
                    "foreign_cores",
                )
            }
            for p in result["phases"]
        ]
    }
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
