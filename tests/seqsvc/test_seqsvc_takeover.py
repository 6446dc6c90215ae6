"""Same-id takeover of the lease (issue 13): a second seqsvc started by mistake
beside a live one, with its port or its instance id, must exit and leave the live
one serving, unfenced; a restart after kill -9 still takes over quickly where it
can prove its predecessor gone (same listening address), and otherwise waits for
the lease to expire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from test_seqsvc_service import env

from imdev.servers import ServiceProcess, health_status
from seqsvc.client import SeqClient

Spawn = Callable[..., ServiceProcess]
SERVING = 1  # grpc.health.v1 HealthCheckResponse.SERVING


def lease_row(dsn: str) -> tuple[int, str]:
    """(epoch, owner) of the lease on the sections."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT epoch, owner FROM seqsvc_owner").fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


async def keeps_serving(svc: ServiceProcess, seq: SeqClient, last: int, for_s: float) -> int:
    """Calls Next("k") on `svc` for `for_s` seconds (the caller makes that longer
    than the lease, so several renewals happen meanwhile): every call succeeds with a
    value above the one before, health stays SERVING and the process keeps running.
    Returns the last value."""
    deadline = time.monotonic() + for_s
    calls = 0
    while time.monotonic() < deadline:
        value = await seq.next("k")
        assert value > last, f"{value} after {last}"
        last = value
        assert await asyncio.to_thread(health_status, svc.address) == SERVING
        calls += 1
    assert svc.running()
    assert calls > 10
    return last


async def exit_code_and_log(proc: ServiceProcess, timeout: float) -> tuple[int, str]:
    try:
        code = await asyncio.to_thread(proc.wait, timeout)
    finally:
        proc.kill()  # only if it is still running past the timeout
    return code, proc.log_path.read_text(errors="replace")


async def test_second_instance_on_the_port_of_a_live_one_exits_and_the_first_keeps_serving(
    pg_dsn: str, spawn: Spawn, workdir: Path
) -> None:
    """Same port, hence the same default instance id (hostname:port): the second
    process cannot listen, so it must exit before it touches the lease."""
    settings = env(pg_dsn, lease_s=2, standby_poll_s=0.1)
    a = spawn("seqsvc", settings)
    async with SeqClient(a.address, max_retries=0) as seq:
        last = await seq.next("k")
        held = lease_row(pg_dsn)
        b = ServiceProcess(
            "seqsvc",
            a.port,
            {**settings, "IM_SEQSVC_PORT": str(a.port)},
            workdir / f"seqsvc-same-port-{a.port}.log",
        )
        b.launch(check_port=False)
        code, log = await exit_code_and_log(b, 30)
        assert code != 0, log
        # Past two lease lengths: a stale or stolen lease would have fenced `a`.
        await keeps_serving(a, seq, last, for_s=5)
        assert f"cannot listen on 127.0.0.1:{a.port}" in log, log
    assert lease_row(pg_dsn) == held  # same epoch: nobody took the sections


async def test_second_instance_with_the_id_of_a_live_one_exits_and_the_first_keeps_serving(
    pg_dsn: str, spawn: Spawn
) -> None:
    """Same explicit instance id, another port: the second process can listen, but
    must not take over a lease that its live twin keeps renewing; it says why and
    exits."""
    settings = env(pg_dsn, instance_id="twin", lease_s=2, standby_poll_s=0.1)
    a = spawn("seqsvc", settings)
    async with SeqClient(a.address, max_retries=0) as seq:
        last = await seq.next("k")
        held = lease_row(pg_dsn)
        b = spawn("seqsvc", settings, wait=False)  # its own free port
        code, log = await exit_code_and_log(b, 30)
        assert code != 0, log
        await keeps_serving(a, seq, last, for_s=5)
        assert "instance id 'twin' is in use by another live process" in log, log
    assert lease_row(pg_dsn) == held


async def test_restart_after_kill_is_quick_on_its_own_address_and_waits_elsewhere(
    pg_dsn: str, spawn: Spawn
) -> None:
    """The trade-off: after kill -9, a restart with the same id on the same address
    proves its predecessor gone (it holds the predecessor's listening port) and
    takes over at once; a restart with the same id on another port cannot prove it,
    so it waits for the old lease to expire. Values stay above everything before."""
    a = spawn("seqsvc", env(pg_dsn, instance_id="x", lease_s=30))
    async with SeqClient(a.address) as seq:
        before = await seq.next_batch(["k"] * 5)
    a.kill()
    a.extra_env["IM_SEQSVC_LEASE_S"] = "3"  # shorter for the second half
    restarted_at = time.monotonic()
    await asyncio.to_thread(a.start, 25)
    assert time.monotonic() - restarted_at < 15  # far less than the 30 s lease
    async with SeqClient(a.address) as seq:
        middle = await seq.next_batch(["k"] * 5)
    assert min(middle) > max(before)

    a.kill()
    killed_at = time.monotonic()
    elsewhere = spawn("seqsvc", env(pg_dsn, instance_id="x", lease_s=3))
    # The 3 s lease was renewed at most 0.75 s before the kill.
    assert time.monotonic() - killed_at >= 1.5
    async with SeqClient(elsewhere.address) as seq:
        assert min(await seq.next_batch(["k"] * 5)) > max(middle)
