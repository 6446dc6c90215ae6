"""Minimal reproductions of bugs the chaos harness found in other components.

Each was marked `xfail(strict=True)` until the bug was fixed at its root; it now
guards the fix. Found by `python -m chaos` (full run, seed 1); see docs/chaos.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from imclient import Client, ImClientError, Kicked, ReconnectPolicy
from imdev.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture
def regress_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chaos-regress-"))
    path.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def two_gateways(regress_dir: Path) -> AsyncIterator[Stack]:
    # Refresh routes every second (default: every 10 s) so the test is short.
    stack = Stack(
        regress_dir / "stack",
        gateways=2,
        env={"gateway": {"IM_GATEWAY_ROUTE_REFRESH_S": "1"}},
    )
    await asyncio.to_thread(stack.start, 120.0)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.kill)


async def route_of(stack: Stack, user: str, device: str) -> str:
    async with aioredis.Redis.from_url(stack.redis.url()) as r:
        value = await r.hget(f"{stack.redis_prefix}route:{user}", device)
    return value.decode() if value else ""


async def test_a_stale_route_of_a_killed_gateway_does_not_kick_the_devices_new_stream(
    two_gateways: Stack,
) -> None:
    """A stream whose route registration failed (Redis error) used to be kicked at
    the next refresh when a killed gateway's stale route for the same device was
    still live in Redis; the SDK then stopped for good (Kick means do not
    reconnect). The hub now registers such a stream again instead of refreshing."""
    stack = two_gateways
    gw0, gw1 = stack.gateway_addresses
    # Routes name a gateway by its internal (Deliver) address.
    in0, in1 = (f"127.0.0.1:{port}" for port in stack.ports.gateway_internal)
    client = Client(
        [gw1, gw0],  # connects to gw1 first, moves to gw0 when gw1 dies
        stack.mint("alice", "phone"),
        reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.2),
        insecure=True,
    )
    kicked = asyncio.Event()

    async def read() -> None:
        try:
            async for _ in client.messages():
                pass
        except Kicked:
            kicked.set()
        except ImClientError:
            pass

    await client.start()
    reader = asyncio.create_task(read())
    try:
        assert in1 in await route_of(stack, "alice", "phone")
        # Redis stalls (every command blocks) for 3 s, and gw1 dies by kill -9
        # meanwhile: its route for alice/phone stays in Redis (30 s TTL), and
        # gw0's registration of the reconnected stream times out (1 s).
        async with aioredis.Redis.from_url(stack.redis.url()) as r:
            await r.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        await asyncio.to_thread(stack.gateways[1].kill)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not (client.ready and client.address == gw0):
            assert loop.time() < deadline, "the client never moved to gw0"
            await asyncio.sleep(0.05)
        # Within a few refresh rounds after the stall, the route must name gw0
        # and the stream must still be open.
        while in0 not in await route_of(stack, "alice", "phone") and not kicked.is_set():
            assert loop.time() < deadline, "the route never moved to gw0"
            await asyncio.sleep(0.2)
        # Two more refresh rounds: a wrong kick would have happened by now.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(kicked.wait(), 2.5)
        # Checked while the stream is open: closing it removes its route.
        route_while_open = await route_of(stack, "alice", "phone")
    finally:
        await client.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert not kicked.is_set(), "the live stream was kicked because of a dead gateway's route"
    assert in0 in route_while_open
