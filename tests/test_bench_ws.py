"""The WebSocket devices of bench/e2e_ws.py against the gateway's WebSocket
framing (gateway/websocket.py) with a stand-in servicer: the idle holders open,
hold and drop devices, the churn leaves nothing behind in the gateway, and the
load generator's device sends in client_id order and gets its pushes once. The
bench itself is `make bench`; this checks its devices speak the protocol."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.servicer import current_identity
from gateway.websocket import WsGateway, WsSettings
from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_pb2
from imclient.tokens import mint_token
from imcommon.metrics import Metrics

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
# At the END of the path: bench/logic.py must not hide the `logic` package from
# the tests that import it later in this process. bench/e2e.py, which e2e_ws
# imports, shares its name with tests/e2e: a regular module found anywhere on the
# path wins over a namespace package, but one already imported during collection
# would shadow it. Drop that one.
if getattr(sys.modules.get("e2e"), "__file__", "") is None:
    del sys.modules["e2e"]
import e2e_ws
import e2e_ws_conns

SECRET = "test-secret-0123456789abcdef"


class Servicer:
    """Connect: a Welcome; each Send gets a SendAck and comes back as a Push
    (seq = client_id), like a device's own message fanned out to it."""

    def __init__(self) -> None:
        self.open = 0

    async def Connect(self, _requests: Any, context: Any) -> None:
        me = current_identity()
        self.open += 1
        try:
            await context.write(
                gateway_pb2.ServerFrame(
                    welcome=gateway_pb2.Welcome(user_id=me.user_id, send_window=4)
                )
            )
            while (frame := await context.read()) is not grpc.aio.EOF:
                if frame.WhichOneof("frame") != "send":
                    continue
                send = frame.send
                await context.write(
                    gateway_pb2.ServerFrame(
                        send_ack=gateway_pb2.SendAck(
                            client_id=send.client_id, conv_seq=send.client_id
                        )
                    )
                )
                message = common_pb2.Message(
                    conversation_id=send.conversation_id, sender_id=me.user_id, body=send.body
                )
                await context.write(
                    gateway_pb2.ServerFrame(
                        push=gateway_pb2.Push(seq=send.client_id, message=message)
                    )
                )
        finally:
            self.open -= 1


@pytest.fixture
async def ws() -> AsyncIterator[tuple[WsGateway, Servicer, str]]:
    servicer = Servicer()
    gw = WsGateway(
        servicer,  # type: ignore[arg-type]
        SECRET,
        WsSettings(
            origins=None,
            max_message_bytes=4096,
            hello_timeout_s=5,
            ping_interval_s=30,
            ping_timeout_s=30,
            max_unary_in_flight=2,
        ),
        Metrics("gateway"),
    )
    port = await gw.start("127.0.0.1", 0)
    yield gw, servicer, f"ws://127.0.0.1:{port}/v1/connect"
    await gw.stop()


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_holder_opens_holds_and_churn_leaves_nothing(
    ws: tuple[WsGateway, Servicer, str],
) -> None:
    gw, servicer, url = ws
    holder = e2e_ws_conns.WsHolder(url)
    opened = await holder.open(
        {"tokens": [mint_token(SECRET, f"u{i}", "d1", 60) for i in range(20)], "concurrency": 5}
    )
    assert (opened["opened"], opened["failed"]) == (20, 0), opened
    await until(lambda: servicer.open == 20 and len(gw.sockets) == 20)

    churned = await holder.churn(
        {
            "tokens": [mint_token(SECRET, f"c{i}", "d1", 60) for i in range(16)],
            "rate": 1000.0,
            "concurrency": 4,
            "start_at": time.monotonic(),
        }
    )
    assert churned["churned"] == 16 and churned["failed"] == 0, churned
    assert churned["by_kind"] == {"tcp": 4, "handshake": 4, "welcome": 8}
    # Every dropped device is gone from the gateway; the held ones are untouched.
    await until(lambda: servicer.open == 20 and len(gw.sockets) == 20)
    assert len(holder.devices) == 20 and not holder.close_codes

    assert await holder.close() == 20
    await until(lambda: servicer.open == 0 and not gw.sockets)


async def test_a_bad_token_is_an_open_failure_with_its_close_code(
    ws: tuple[WsGateway, Servicer, str],
) -> None:
    _gw, _servicer, url = ws
    holder = e2e_ws_conns.WsHolder(url)
    opened = await holder.open({"tokens": ["not-a-token"], "concurrency": 1})
    assert opened["opened"] == 0 and opened["failed"] == 1
    assert "4401" in opened["errors"][0]


async def test_load_device_sends_in_order_and_gets_each_push_once(
    ws: tuple[WsGateway, Servicer, str],
) -> None:
    _gw, _servicer, url = ws
    got: list[bytes] = []
    client = e2e_ws.WsClient(url, mint_token(SECRET, "s", "d1", 60), lambda m: got.append(m.body))
    await client.start()
    try:
        # More than the send window of 4: the rest wait for ACKs, in order.
        futures = [client.submit("d:r:s", f"m{i}".encode()) for i in range(10)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
        assert [r.conv_seq for r in results] == list(range(1, 11))
        await until(lambda: len(got) == 10)
        assert got == [f"m{i}".encode() for i in range(10)]
        assert client.pending_sends == 0 and client.delivered == 10
    finally:
        await client.close()
