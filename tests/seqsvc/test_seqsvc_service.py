"""seqsvc as a real process on a real PostgreSQL: load, kill -9, database outages,
small steps, bad input, standby takeover, the migrate command."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import psycopg
import pytest

from im.seqsvc.v1 import seqsvc_pb2 as pb
from im.seqsvc.v1 import seqsvc_pb2_grpc as pb_grpc
from imdev.servers import ROOT, PostgresServer, ServiceProcess, free_port, health_status
from seqsvc.client import SeqClient, SeqError, SeqInvalidArgument

Spawn = Callable[..., ServiceProcess]


def env(dsn: str, **settings: object) -> dict[str, str]:
    out = {
        "IM_SEQSVC_DATABASE_URL": dsn,
        "IM_SEQSVC_SECTIONS": "16",
        "IM_SEQSVC_LOG_LEVEL": "warning",
    }
    out.update({f"IM_SEQSVC_{k.upper()}": str(v) for k, v in settings.items()})
    return out


async def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)


def check_increasing(values: list[int], where: str) -> None:
    for a, b in itertools.pairwise(values):
        assert b > a, f"{where}: {b} after {a}"


async def test_50_callers_100k_values_unique_and_increasing(pg_dsn: str, spawn: Spawn) -> None:
    """50 callers, 100k values over 1k keys, a small step so that many step boundaries
    are crossed: per key every value is unique, and each caller sees its values for
    a key strictly increase."""
    svc = spawn("seqsvc", env(pg_dsn, step=50))
    keys = [f"u:{i}" for i in range(1000)]
    by_key: dict[str, list[int]] = defaultdict(list)

    async with SeqClient(svc.address) as seq:

        async def caller(n: int) -> int:
            rnd = random.Random(n)
            mine: dict[str, list[int]] = defaultdict(list)
            count = 0
            while count < 2000:
                if n % 2:  # coalesced single calls
                    key = rnd.choice(keys)
                    got = [(key, await seq.next(key))]
                else:  # batches with repeated keys
                    batch = [rnd.choice(keys[:50]) for _ in range(40)] + rnd.sample(keys, 60)
                    got = list(zip(batch, await seq.next_batch(batch), strict=True))
                for key, value in got:
                    mine[key].append(value)
                    by_key[key].append(value)
                count += len(got)
            for key, values in mine.items():
                check_increasing(values, f"caller {n} key {key}")
            return count

        counts = await asyncio.gather(*(caller(n) for n in range(50)))
        assert sum(counts) >= 100_000
        assert seq.batches_sent < 50_000  # the 50k single calls were coalesced

    assert len(by_key) == 1000
    for key, values in by_key.items():
        assert len(values) == len(set(values)), f"duplicate value for {key}"


async def test_kill9_rounds_never_go_back(pg_dsn: str, spawn: Spawn) -> None:
    """20 rounds of load, kill -9 at a random moment, restart: every value after a
    restart is above every value handed out before it, per key."""
    svc = spawn("seqsvc", env(pg_dsn, step=200, sections=8))
    keys = [f"c:{i}" for i in range(40)]
    highest: dict[str, int] = {}
    rng = random.Random(7)
    for round_ in range(20):
        got: dict[str, list[int]] = defaultdict(list)
        async with SeqClient(svc.address, max_retries=0, deadline_s=2.0) as seq:
            stop = asyncio.Event()

            async def caller(n: int, seq: SeqClient = seq, stop: asyncio.Event = stop) -> None:
                r = random.Random(n * 1000 + round_)  # noqa: B023
                mine: dict[str, list[int]] = defaultdict(list)
                while not stop.is_set():
                    key = r.choice(keys)
                    try:
                        if n % 3 == 0:
                            first, last = await seq.reserve(key, 7)
                            values = list(range(first, last + 1))
                        else:
                            values = [await seq.next(key)]
                    except SeqError:
                        break
                    mine[key].extend(values)
                    got[key].extend(values)  # noqa: B023
                for key, values in mine.items():
                    check_increasing(values, f"round {round_} caller {n} key {key}")  # noqa: B023

            tasks = [asyncio.create_task(caller(n)) for n in range(12)]
            await wait_for(lambda: got, 10, "first values of the round")  # noqa: B023
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # the random moment of the kill
            svc.kill()
            stop.set()
            await asyncio.gather(*tasks)
        for key, values in got.items():
            assert min(values) > highest.get(key, 0), f"round {round_}: {key} went back"
            highest[key] = max(values)
        svc.start()


def _ceilings(datadir: Path, dbname: str) -> dict[int, int]:
    """The persisted max_seq rows of a stopped cluster, read through a second
    postmaster on the same data directory (so seqsvc cannot reach it meanwhile)."""
    reader = PostgresServer(free_port(), datadir, log_path=datadir.with_suffix(".reader.log"))
    reader.start()
    try:
        with psycopg.connect(reader.conninfo(dbname)) as conn:
            rows = conn.execute("SELECT section, max_seq FROM seqsvc_sections").fetchall()
    finally:
        reader.stop()
    return {int(s): int(m) for s, m in rows}


async def test_postgres_stopped_under_load(
    postgres_factory: Callable[..., PostgresServer], spawn: Spawn
) -> None:
    """With PostgreSQL stopped, seqsvc serves from its committed headroom and never
    beyond (checked against the table), answers UNAVAILABLE once the headroom is
    gone, and recovers by itself when PostgreSQL is back."""
    pg = postgres_factory()
    dsn = pg.create_database("seq")
    sections = 4
    svc = spawn(
        "seqsvc",
        env(
            dsn,
            step=300,
            sections=sections,
            lease_s=120,
            store_timeout_s=0.5,
            wait_timeout_s=0.5,
            retry_max_s=0.2,
        ),
    )
    keys = [f"k{i}" for i in range(12)]
    served: list[tuple[str, int, bool]] = []  # key, value, asked after the stop
    codes: set[grpc.StatusCode] = set()
    stopped = asyncio.Event()
    unavailable_streak = 0

    async with grpc.aio.insecure_channel(svc.address) as channel:
        stub = pb_grpc.SeqServiceStub(channel)

        async def load_until_exhausted(n: int) -> None:
            nonlocal unavailable_streak
            r = random.Random(n)
            while unavailable_streak < 200:
                key = r.choice(keys)
                after_stop = stopped.is_set()
                try:
                    resp = await stub.Next(pb.NextRequest(key=key), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    codes.add(exc.code())
                    if stopped.is_set():
                        unavailable_streak += 1
                    continue
                served.append((key, resp.value, after_stop))
                if stopped.is_set():
                    unavailable_streak = 0

        tasks = [asyncio.create_task(load_until_exhausted(n)) for n in range(8)]
        await wait_for(lambda: len(served) > 500, 10, "initial load")
        await asyncio.to_thread(pg.stop)
        stopped.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

        assert codes == {grpc.StatusCode.UNAVAILABLE}
        assert any(after for _, _, after in served), "nothing served from headroom"
        ceilings = await asyncio.to_thread(_ceilings, pg.datadir, "seq")
        for key, value, _ in served:
            section = zlib.crc32(key.encode()) % sections
            assert value <= ceilings[section], f"{key}={value} above max_seq {ceilings[section]}"

        await asyncio.to_thread(pg.start)
        highest: dict[str, int] = defaultdict(int)
        for key, value, _ in served:
            highest[key] = max(highest[key], value)

        async def recovered() -> bool:
            try:
                await stub.Next(pb.NextRequest(key=keys[0]), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return True

        await wait_for(recovered, 30, "service after PostgreSQL restart")
        for key in keys:
            resp = await stub.Next(pb.NextRequest(key=key), timeout=2)
            assert resp.value > highest[key]


async def test_step_10_with_1000_concurrent_callers(pg_dsn: str, spawn: Spawn) -> None:
    """Tiny step, heavy concurrency (Leaf's "both segments not ready"): no errors,
    no duplicates, per-caller order."""
    # A fixed step (no adaptive growth): the hardest case for the double buffer.
    svc = spawn("seqsvc", env(pg_dsn, step=10, sections=4, max_step_factor=1))
    keys = [f"hot{i}" for i in range(20)]
    by_key: dict[str, list[int]] = defaultdict(list)
    errors: list[str] = []
    async with grpc.aio.insecure_channel(svc.address) as channel:
        stub = pb_grpc.SeqServiceStub(channel)

        async def caller(n: int) -> None:
            key = keys[n % len(keys)]
            mine = []
            for _ in range(5):
                try:
                    resp = await stub.Next(pb.NextRequest(key=key), timeout=20)
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    return
                mine.append(resp.value)
                by_key[key].append(resp.value)
            check_increasing(mine, f"caller {n}")

        await asyncio.gather(*(caller(n) for n in range(1000)))
    assert errors == []
    assert sum(len(v) for v in by_key.values()) == 5000
    for key, values in by_key.items():
        assert len(values) == len(set(values)), f"duplicate in {key}"


async def test_bad_input_is_invalid_argument_and_harmless(pg_dsn: str, spawn: Spawn) -> None:
    metrics_port = free_port()
    svc = spawn("seqsvc", env(pg_dsn, max_batch=100, max_reserve=1000, metrics_port=metrics_port))
    async with grpc.aio.insecure_channel(svc.address) as channel:
        stub = pb_grpc.SeqServiceStub(channel)
        before = (await stub.Next(pb.NextRequest(key="ok"))).value

        async def refused(call: object, *needles: str) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call  # type: ignore[misc]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for needle in needles:
                assert needle in (info.value.details() or ""), info.value.details()

        await refused(stub.Next(pb.NextRequest(key="")), "empty")
        await refused(stub.Next(pb.NextRequest(key="x" * 129)), "129 bytes", "128")
        await refused(stub.Current(pb.CurrentRequest(key="é" * 65)), "130 bytes")
        await refused(stub.NextBatch(pb.NextBatchRequest(keys=["ok"] * 101)), "limit is 100")
        await refused(stub.NextBatch(pb.NextBatchRequest(keys=["ok", "ok", ""])), "keys[2]")
        for count in (0, -3, 1001):
            await refused(stub.Reserve(pb.ReserveRequest(key="ok", count=count)), "count")
        raw = channel.unary_unary(
            "/im.seqsvc.v1.SeqService/Next",
            request_serializer=None,
            response_deserializer=pb.NextResponse.FromString,
        )
        await refused(raw(b"\x0a\x02\xff\xfe"), "UTF-8")  # field 1, 2 bytes, not UTF-8

        # Nothing was advanced or broken by any of it.
        assert (await stub.Next(pb.NextRequest(key="ok"))).value == before + 1
        assert (await stub.Next(pb.NextRequest(key="é" * 64))).value >= 1
    assert health_status(svc.address) == 1  # SERVING
    async with SeqClient(svc.address) as seq:
        with pytest.raises(SeqInvalidArgument):
            await seq.next("")
        with pytest.raises(SeqInvalidArgument):
            await seq.next_batch(["ok"] * 101)
        assert await seq.next("ok") == before + 2  # coalesced batch unaffected
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert "im_seqsvc_serving 1.0" in text
    assert "im_seqsvc_keys_in_memory 2.0" in text  # "ok" and "é" * 64: nothing refused


async def test_second_instance_takes_half_then_all_after_kill_and_at_once_after_sigterm(
    pg_dsn: str, spawn: Spawn
) -> None:
    """Two instances split the sections (the first releases half to the second); a
    killed one's sections go to the other once their leases expire; a SIGTERM
    hands them over at once. Values for a key continue above across every move."""
    a = spawn("seqsvc", env(pg_dsn, instance_id="a", lease_s=2))
    keys = [f"k{i}" for i in range(32)]
    async with SeqClient(a.address) as seq:
        before = await seq.next_batch(keys)
    # b's lease is long: handing over from b within a few seconds proves the release.
    b = spawn("seqsvc", env(pg_dsn, instance_id="b", lease_s=30))

    async def owners(via: ServiceProcess) -> set[str]:
        async with SeqClient(via.address) as seq:
            _, table = await seq.routing()
        return set(table.values())

    await wait_for(_eq(owners, a, {a.address, b.address}), 10, "both instances serve")
    async with SeqClient(a.address) as seq:
        middle = await seq.next_batch(keys)
    assert all(m > x for m, x in zip(middle, before, strict=True))
    killed_at = time.monotonic()
    a.kill()
    await wait_for(_eq(owners, b, {b.address}), 15, "b serves every section")
    assert time.monotonic() - killed_at >= 0.5  # it waited for a's leases to lapse
    async with SeqClient(b.address) as seq:
        after = await seq.next_batch(keys)
    assert all(x > m for x, m in zip(after, middle, strict=True))
    a.launch()
    await asyncio.to_thread(a.wait_ready, 15)
    await wait_for(_eq(owners, b, {a.address, b.address}), 10, "a back with its share")
    stopped_at = time.monotonic()
    b.stop()
    await wait_for(_eq(owners, a, {a.address}), 15, "a serves every section")
    assert time.monotonic() - stopped_at < 10  # far less than b's 30 s lease
    async with SeqClient(a.address) as seq:
        last = await seq.next_batch(keys)
    assert all(x > y for x, y in zip(last, after, strict=True))


def _eq(
    owners: Callable[[ServiceProcess], Awaitable[set[str]]], via: ServiceProcess, want: set[str]
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return await owners(via) == want
        except SeqError:
            return False

    return check


def test_migrate_command_and_config_errors(pg_dsn: str) -> None:
    pythonpath = os.pathsep.join(str(ROOT / d) for d in ("services", "libs", "gen"))
    base = {**os.environ, "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "seqsvc", "migrate"]
    run = subprocess.run(
        cmd, env={**base, "IM_SEQSVC_DATABASE_URL": pg_dsn}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "0001_sections" in run.stdout
    again = subprocess.run(
        cmd, env={**base, "IM_SEQSVC_DATABASE_URL": pg_dsn}, capture_output=True, text=True
    )
    assert again.returncode == 0 and "up to date" in again.stdout
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM seqsvc_sections").fetchone() == (0,)
    base.pop("IM_SEQSVC_DATABASE_URL", None)
    missing = subprocess.run(cmd, env=base, capture_output=True, text=True)
    assert missing.returncode == 2
    assert "IM_SEQSVC_DATABASE_URL" in missing.stderr
    bad = subprocess.run(
        cmd, env={**base, "IM_SEQSVC_DATABASE_URL": pg_dsn, "IM_SEQSVC_STEP": "0"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "IM_SEQSVC_STEP" in bad.stderr


async def test_stalled_owner_loses_its_sections_and_rejoins_under_new_epochs(
    pg_dsn: str, spawn: Spawn
) -> None:
    """An owner stopped past its lease (as a long stall would) loses its sections
    to the other instance, which claims them under new epochs. When it wakes up, its
    conditional writes and renewals fail for them, so it serves none of them; it
    stays up, rejoins and claims a share again. Values continue above."""
    a = spawn("seqsvc", env(pg_dsn, instance_id="a", lease_s=1, step=20))
    keys = [f"k{i}" for i in range(32)]
    async with SeqClient(a.address, max_retries=0) as seq:
        before = await seq.next_batch(keys)
    epochs = _epochs(pg_dsn)
    a.signal(signal.SIGSTOP)
    try:
        b = spawn("seqsvc", env(pg_dsn, instance_id="b", lease_s=1, step=20))
        await wait_for(lambda: _owners(pg_dsn) == {"b"}, 15, "b holds every section")
    finally:
        a.signal(signal.SIGCONT)
    assert all(_epochs(pg_dsn)[s] > e for s, e in epochs.items())
    await wait_for(lambda: _owners(pg_dsn) == {"a", "b"}, 15, "a rejoined")
    assert a.running()
    async with SeqClient(b.address) as seq:
        after = await seq.next_batch(keys)
    assert all(x > y for x, y in zip(after, before, strict=True))


def _epochs(dsn: str) -> dict[int, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT section, epoch FROM seqsvc_sections").fetchall()
    return {int(s): int(e) for s, e in rows}


def _owners(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT DISTINCT owner FROM seqsvc_sections WHERE lease_until > now()"
        ).fetchall()
    return {str(r[0]) for r in rows}


async def test_starts_when_postgres_comes_up_later(
    postgres_factory: Callable[..., PostgresServer], spawn: Spawn
) -> None:
    """Started while PostgreSQL is down, seqsvc answers nothing on its port (it
    cannot own any section yet), retries, and serves once PostgreSQL is up."""
    pg = postgres_factory()
    dsn = pg.create_database("late")
    await asyncio.to_thread(pg.stop)
    svc = spawn("seqsvc", env(dsn, retry_max_s=0.2), wait=False)
    await asyncio.sleep(1.0)  # long enough to have failed several attempts
    assert svc.running()
    with pytest.raises(grpc.RpcError):
        health_status(svc.address)
    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(svc.wait_ready, 30)
    async with SeqClient(svc.address) as seq:
        assert await seq.next("k") >= 1


async def test_health_follows_the_lease(
    postgres_factory: Callable[..., PostgresServer], spawn: Spawn
) -> None:
    """While seqsvc cannot renew its lease on the sections (PostgreSQL down past the
    lease), every call gets UNAVAILABLE, so its health says NOT_SERVING (a readiness
    probe takes it out of the Service, an alert can fire); once the lease is renewed
    it says SERVING again."""
    pg = postgres_factory()
    dsn = pg.create_database("seq")
    svc = spawn("seqsvc", env(dsn, lease_s=2, store_timeout_s=0.5, retry_max_s=0.2))
    serving, not_serving = 1, 2  # grpc.health.v1 HealthCheckResponse.ServingStatus
    service = "im.seqsvc.v1.SeqService"
    assert health_status(svc.address, service) == serving

    await asyncio.to_thread(pg.stop)
    await wait_for(lambda: health_status(svc.address, service) == not_serving, 20, "NOT_SERVING")
    assert health_status(svc.address) == not_serving  # the server as a whole too
    async with grpc.aio.insecure_channel(svc.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.SeqServiceStub(channel).Next(pb.NextRequest(key="k"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    await asyncio.to_thread(pg.start)
    await wait_for(lambda: health_status(svc.address, service) == serving, 30, "SERVING again")
    assert health_status(svc.address) == serving
