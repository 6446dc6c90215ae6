"""SeqClient against a real seqsvc process: coalescing, retries, errors, close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from imdev.servers import ServiceProcess, free_port
from seqsvc.client import SeqClient, SeqInvalidArgument, SeqUnavailable

Spawn = Callable[..., ServiceProcess]


def env(dsn: str, **settings: object) -> dict[str, str]:
    out = {
        "IM_SEQSVC_DATABASE_URL": dsn,
        "IM_SEQSVC_SECTIONS": "8",
        "IM_SEQSVC_LOG_LEVEL": "warning",
    }
    out.update({f"IM_SEQSVC_{k.upper()}": str(v) for k, v in settings.items()})
    return out


async def test_concurrent_next_calls_are_coalesced_each_gets_its_own(
    pg_dsn: str, spawn: Spawn
) -> None:
    svc = spawn("seqsvc", env(pg_dsn))
    async with SeqClient(svc.address, max_batch=256, coalesce_window_ms=1.0) as seq:
        keys = [f"k{i % 10}" for i in range(2000)]
        values = await asyncio.gather(*(seq.next(k) for k in keys))
        assert seq.batches_sent <= 2000 // 256 + 4 * 2  # not one RPC per call
        per_key: dict[str, list[int]] = {}
        for key, value in zip(keys, values, strict=True):
            per_key.setdefault(key, []).append(value)
        for key, got in per_key.items():
            assert len(set(got)) == len(got) == 200, key
        # A single caller's successive calls keep increasing across batches.
        last = 0
        for _ in range(300):
            v = await seq.next("solo")
            assert v > last
            last = v
        assert await seq.current("solo") == last
        first, end = await seq.reserve("solo", 10)
        assert first == last + 1 and end == first + 9


async def test_retries_unavailable_until_the_service_is_back(pg_dsn: str, spawn: Spawn) -> None:
    svc = spawn("seqsvc", env(pg_dsn))
    async with SeqClient(
        svc.address, max_retries=1000, backoff_base_s=0.01, backoff_max_s=0.1, deadline_s=1.0
    ) as seq:
        before = await seq.next("k")
        svc.kill()
        pending = asyncio.create_task(seq.next("k"))
        batch = asyncio.create_task(seq.next_batch(["k", "k"]))
        await asyncio.sleep(0.2)  # the calls are now failing and backing off
        assert not pending.done() and not batch.done()
        await asyncio.to_thread(svc.start)
        after = await asyncio.wait_for(pending, 30)
        a, b = await asyncio.wait_for(batch, 30)
        assert after > before and b > a > before


async def test_gives_up_with_seq_unavailable_and_rejects_bad_input_locally() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    async with SeqClient(nobody, max_retries=2, backoff_base_s=0.01, deadline_s=0.5) as seq:
        started = time.monotonic()
        with pytest.raises(SeqUnavailable):
            await seq.next("k")
        with pytest.raises(SeqUnavailable):
            await seq.reserve("k", 3)
        assert time.monotonic() - started < 5
        for bad in ("", "x" * 129, "\udc80"):
            with pytest.raises(SeqInvalidArgument):
                await seq.next(bad)
        with pytest.raises(SeqInvalidArgument):
            await seq.reserve("k", 0)
        with pytest.raises(ValueError):  # SeqInvalidArgument is a ValueError
            await seq.next_batch(["ok", ""])


async def test_close_fails_queued_calls_and_is_idempotent() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    seq = SeqClient(nobody, max_retries=100, backoff_base_s=0.05, coalesce_window_ms=50)
    seq.open()
    calls = [asyncio.create_task(seq.next("k")) for _ in range(5)]
    await asyncio.sleep(0)
    await seq.close()
    await seq.close()
    for call in calls:
        with pytest.raises(SeqUnavailable):
            await call


async def test_channel_factory_makes_the_channel(pg_dsn: str, spawn: Spawn) -> None:
    import grpc

    svc = spawn("seqsvc", env(pg_dsn))
    made: list[tuple[str, list[tuple[str, object]]]] = []

    def factory(address: str, options: list[tuple[str, object]]) -> grpc.aio.Channel:
        made.append((address, options))
        return grpc.aio.insecure_channel(address, options=options)

    async with SeqClient(svc.address, channel_factory=factory) as seq:
        assert await seq.next("k") >= 1
    assert [a for a, _ in made] == [svc.address]
    assert ("grpc.keepalive_time_ms", 30_000) in made[0][1]
