"""The SendAck and the trigger publish (issue 19, `IM_LOGIC_ACK_BEFORE_PUBLISH`).

The outbox row makes a committed message's trigger durable (I4), so the answer
need not wait for JetStream to confirm the publish: with the switch on, a send
is answered as soon as its transaction commits, and the trigger still reaches
JetStream (or the outbox relay publishes it). Shown with nats-server stopped
(SIGSTOP): a publish then waits for its whole timeout.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
from logic_support import FanoutDriver, LogicClient, table_counts, wait_for

from imdev.servers import NatsServer, ServiceProcess

PUBLISH_TIMEOUT_S = 6.0


@pytest.mark.parametrize("ack_before_publish", [True, False])
async def test_a_send_is_answered_without_waiting_for_its_publish(
    spawn: Callable[..., ServiceProcess],
    logic_env: dict[str, str],
    nats_factory: Callable[[], NatsServer],
    key_prefix: str,
    subject_prefix: str,
    pg_dsn: str,
    ack_before_publish: bool,
) -> None:
    nats = nats_factory()
    proc = spawn(
        "logic",
        {
            **logic_env,
            "IM_LOGIC_NATS_URL": nats.url(),
            "IM_LOGIC_PUBLISH_TIMEOUT_S": str(PUBLISH_TIMEOUT_S),
            "IM_LOGIC_ACK_BEFORE_PUBLISH": "1" if ack_before_publish else "0",
            "IM_LOGIC_OUTBOX_RELAY_INTERVAL_S": "0.2",
            "IM_LOGIC_OUTBOX_RELAY_MIN_AGE_S": "1",
        },
    )
    client = LogicClient(proc.address)
    first = await client.send("ann", "d:ann:ben", b"before")  # connected, stream created
    nats.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        ack = await client.send("ann", "d:ann:ben", b"while JetStream does not answer")
        took = time.monotonic() - started
    finally:
        nats.signal(signal.SIGCONT)
    if ack_before_publish:
        assert took < PUBLISH_TIMEOUT_S / 2, f"the ACK waited {took:.2f} s for the publish"
    else:
        assert took >= PUBLISH_TIMEOUT_S * 0.9, took
    # Either way the trigger reaches JetStream and the message is fanned out.
    async with FanoutDriver(nats.url(), key_prefix, subject_prefix, [proc.address]):

        async def fanned_out() -> bool:
            timeline = [m.msg_id for _, m in await client.timeline("ben")]
            return timeline == [first.msg_id, ack.msg_id]

        await wait_for(fanned_out, timeout=30, what="both messages in ben's timeline")

    async def outbox_empty() -> bool:
        return (await table_counts(pg_dsn))["outbox"] == 0

    await wait_for(outbox_empty, timeout=30, what="outbox drained")
    await client.close()
