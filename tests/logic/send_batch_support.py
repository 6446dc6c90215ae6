"""Helpers of the group-commit tests: logic's metrics, and a committer held inside
a transaction so that the sends arriving meanwhile form one known batch."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
import psycopg
from logic_support import LogicClient, wait_for

from im.logic.v1 import logic_pb2 as pb
from imdev.servers import free_port
from logic.ids import LOCK_CONV_SEND, lock_key

BLOCK_CONV = "d:block:er"
#: Tags the helpers' own statements, which pg_stat_statements counts leave out.
PROBE = "/* test-probe */ "


def metric(port: int, name: str) -> float:
    """One sample of logic's Prometheus endpoint (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def queued(port: int) -> int:
    return int(await asyncio.to_thread(metric, port, "im_logic_send_queued"))


async def batches(port: int) -> int:
    return int(await asyncio.to_thread(metric, port, "im_logic_send_batch_size_count"))


async def published(port: int) -> int:
    name = 'im_logic_publishes_total{result="ok",source="send"}'
    return int(await asyncio.to_thread(metric, port, name))


@asynccontextmanager
async def blocked_committer(
    dsn: str, client: LogicClient, metrics_port: int, conv: str = BLOCK_CONV
) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """Holds `conv`'s send lock and sends one message into it, so the committer sits
    in a transaction waiting for the lock. Yields `until_queued(n)`: waits until n
    sends are queued behind it. Leaving the block releases the lock (the blocked
    send then finishes alone, the queued ones form the next batch) and waits for
    the blocked send's answer, whatever it is."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            PROBE + "SELECT pg_advisory_lock(%s, %s)", (LOCK_CONV_SEND, lock_key(conv))
        )
        blocker = asyncio.create_task(outcome(client.send("block", conv, b"blocker")))

        async def waiting() -> bool:
            cur = await conn.execute(
                PROBE + "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            row = await cur.fetchone()
            return row is not None and row[0] >= 1

        await wait_for(waiting, what="the committer waits for the held lock")

        async def until_queued(n: int) -> None:
            async def enough() -> bool:
                return await queued(metrics_port) >= n

            await wait_for(enough, what=f"{n} sends queued")

        try:
            yield until_queued
        finally:
            with contextlib.suppress(psycopg.OperationalError):  # PostgreSQL stopped
                await conn.execute(
                    PROBE + "SELECT pg_advisory_unlock(%s, %s)", (LOCK_CONV_SEND, lock_key(conv))
                )
            await blocker


async def outcome(
    call: Awaitable[pb.SendMessageResponse],
) -> pb.SendMessageResponse | grpc.StatusCode:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()


def with_metrics(env: dict[str, str], **extra: str) -> tuple[dict[str, str], int]:
    port = free_port()
    return {
        **env,
        "IM_LOGIC_METRICS_PORT": str(port),
        "IM_LOGIC_METRICS_SAMPLE_S": "3600",
        **extra,
    }, port
