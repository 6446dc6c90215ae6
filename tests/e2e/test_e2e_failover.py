"""Gateway failures under traffic, on a private stack with two gateways: a
gateway killed with -9 (its clients must find the other one), then a gateway
stopped with SIGTERM (its clients get GoAway and move). No message is lost,
duplicated or reordered, for the sender or the recipient."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import pytest
from e2e_support import Inbox, assert_exactly_once_in_order, uid, wait_until

from imclient import Client, SendResult, direct_conversation_id
from imdev.servers import ServiceProcess
from imdev.stack import Stack


async def send_with_fault(
    client: Client, conv: str, bodies: list[str], after_acks: int, fault: Callable[[], None]
) -> list[SendResult]:
    """Submits every body at once and runs `fault` when the `after_acks`-th ACK
    arrives, while the rest are in flight."""
    acked = 0

    def on_ack(_: object) -> None:
        nonlocal acked
        acked += 1
        if acked == after_acks:
            fault()

    futures = [client.submit(conv, b) for b in bodies]
    for f in futures:
        f.add_done_callback(on_ack)
    async with asyncio.timeout(60):
        results = await asyncio.gather(*futures)
    assert [r.conv_seq for r in results] == sorted(r.conv_seq for r in results)
    assert len({r.msg_id for r in results}) == len(results)
    return results


def terminate(proc: ServiceProcess) -> None:
    proc.signal(signal.SIGTERM)  # GoAway to every client, then exit


@pytest.mark.slow
async def test_gateway_kill_9_and_sigterm_mid_traffic(
    stack_factory: Callable[..., Stack],
) -> None:
    stack = stack_factory(gateways=2)
    g0, g1 = stack.gateway_addresses
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    bodies = [f"failover-{i:04d}" for i in range(600)]
    async with (
        Client([g0, g1], stack.mint(alice, "a1"), insecure=True) as a,
        Client([g0, g1], stack.mint(bob, "b1"), insecure=True) as b,
    ):
        assert (a.address, b.address) == (g0, g0)  # both start on the first gateway
        inbox = Inbox(b, "bob/b1")

        # 1. kill -9 of g0 after 100 of 300 ACKs: both clients move to g1.
        await send_with_fault(a, conv, bodies[:300], 100, stack.gateways[0].kill)
        await inbox.wait_for(300, timeout=60, conversation_id=conv)
        assert (a.address, b.address) == (g1, g1)
        assert a.stats.connects == 2 and b.stats.connects == 2

        # 2. g0 comes back; g1 is stopped (SIGTERM: GoAway) after 100 more ACKs.
        await asyncio.to_thread(stack.gateways[0].start)
        await send_with_fault(a, conv, bodies[300:], 100, lambda: terminate(stack.gateways[1]))
        await inbox.wait_for(600, timeout=60, conversation_id=conv)
        await wait_until(
            lambda: (a.address, b.address) == (g0, g0),
            15,
            lambda: f"both clients on {g0} (a on {a.address}, b on {b.address})",
        )
        assert_exactly_once_in_order(inbox, conv, bodies)
        await inbox.close()
    await asyncio.to_thread(stack.gateways[1].wait, 30)
