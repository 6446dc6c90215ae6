"""The WebSocket framing (gateway/websocket.py) in isolation: the handshake's
refusals, the Hello, close codes for bad input, unary calls on the socket,
flow control, ping timeouts. The servicer is a small stand-in recording what the
socket hands it; tests/e2e/test_e2e_websocket.py runs the real stack."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.servicer import current_identity
from gateway.websocket import WsGateway, WsSettings
from im.gateway.v1 import gateway_pb2
from imclient.tokens import mint_token
from imcommon.metrics import Metrics

SECRET = "test-secret-0123456789abcdef"


class Servicer:
    """Connect: Welcome, then echo every Ping as a Pong (until EOF); a Send with
    client_id 99 ends the stream with INVALID_ARGUMENT; a Send with client_id 98
    writes a Kick and returns. Sync answers with the caller's id in the head."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.ended = asyncio.Event()

    async def Connect(self, _requests: Any, context: Any) -> None:
        me = current_identity()
        self.opened.append(me.user_id)
        try:
            await context.write(
                gateway_pb2.ServerFrame(welcome=gateway_pb2.Welcome(user_id=me.user_id))
            )
            while True:
                frame = await context.read()
                if frame is grpc.aio.EOF:
                    return
                kind = frame.WhichOneof("frame")
                if kind == "ping":
                    await context.write(
                        gateway_pb2.ServerFrame(pong=gateway_pb2.Pong(nonce=frame.ping.nonce))
                    )
                elif kind == "send" and frame.send.client_id == 99:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad send")
                elif kind == "send" and frame.send.client_id == 98:
                    await context.write(
                        gateway_pb2.ServerFrame(kick=gateway_pb2.Kick(reason="replaced"))
                    )
                    return
        finally:
            self.ended.set()

    async def Sync(self, request: gateway_pb2.SyncRequest, context: Any) -> Any:
        if request.after_seq < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "after_seq < 0")
        if request.after_seq == 7:
            await asyncio.sleep(0.5)
        return gateway_pb2.SyncResponse(store_epoch=current_identity().user_id)


@pytest.fixture
async def ws() -> AsyncIterator[tuple[WsGateway, Servicer, str]]:
    servicer = Servicer()
    gw = WsGateway(
        servicer,  # type: ignore[arg-type]
        SECRET,
        WsSettings(
            origins=["https://chat.example"],
            max_message_bytes=4096,
            hello_timeout_s=0.5,
            ping_interval_s=0.4,
            ping_timeout_s=0.4,
            max_unary_in_flight=2,
        ),
        Metrics("gateway"),
    )
    port = await gw.start("127.0.0.1", 0)
    yield gw, servicer, f"ws://127.0.0.1:{port}/v1/connect"
    await gw.stop()


def token(user: str = "alice") -> str:
    return mint_token(SECRET, user, "d1", 60)


def hello(tok: str) -> bytes:
    return gateway_pb2.ClientFrame(hello=gateway_pb2.Hello(token=tok)).SerializeToString()


async def closed_with(url: str, *messages: bytes | str, **kw: Any) -> int:
    async with connect(url, **kw) as sock:
        for m in messages:
            await sock.send(m)
        with pytest.raises(ConnectionClosed) as err:
            while True:
                await asyncio.wait_for(sock.recv(), 5)
    assert err.value.rcvd is not None
    return err.value.rcvd.code


async def test_hello_welcome_and_frames(ws: tuple[WsGateway, Servicer, str]) -> None:
    _, servicer, url = ws
    async with connect(url) as sock:
        await sock.send(hello(token("alice")))
        first = gateway_pb2.ServerFrame.FromString(await sock.recv())  # type: ignore[arg-type]
        assert first.welcome.user_id == "alice"
        ping = gateway_pb2.ClientFrame(ping=gateway_pb2.Ping(nonce=5)).SerializeToString()
        await sock.send(ping)
        pong = gateway_pb2.ServerFrame.FromString(await sock.recv())  # type: ignore[arg-type]
        assert pong.pong.nonce == 5
    await asyncio.wait_for(servicer.ended.wait(), 5)  # the handler saw EOF


async def test_refusals_have_their_close_codes(ws: tuple[WsGateway, Servicer, str]) -> None:
    _, _, url = ws
    assert await closed_with(url, hello("not a token")) == 4401
    assert await closed_with(url, b"\x08\x01") == 4401  # first message not a Hello
    assert await closed_with(url) == 4401  # no Hello in time
    assert await closed_with(url, hello(token()), "text") == 1003
    assert await closed_with(url, hello(token()), b"\xff\xff\xff") == 1007
    assert await closed_with(url, hello(token()), b"\x00" * 5000) == 1009
    assert await closed_with(url, hello(token()), hello(token())) == 1007
    send99 = gateway_pb2.ClientFrame(send=gateway_pb2.Send(client_id=99)).SerializeToString()
    assert await closed_with(url, hello(token()), send99) == 4400
    send98 = gateway_pb2.ClientFrame(send=gateway_pb2.Send(client_id=98)).SerializeToString()
    assert await closed_with(url, hello(token()), send98) == 4001
    expired = token("bob") + "x"
    assert await closed_with(url, hello(expired)) == 4401


async def test_handshake_refusals(ws: tuple[WsGateway, Servicer, str]) -> None:
    _, _, url = ws
    with pytest.raises(InvalidStatus) as err:
        async with connect(url.replace("/v1/connect", "/other")):
            pass
    assert err.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as err:
        async with connect(url, origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    assert err.value.response.status_code == 403
    async with connect(url, origin="https://chat.example") as sock:  # type: ignore[arg-type]
        await sock.send(hello(token()))
        assert gateway_pb2.ServerFrame.FromString(await sock.recv()).welcome  # type: ignore[arg-type]


async def test_unary_calls_on_the_socket(ws: tuple[WsGateway, Servicer, str]) -> None:
    _, _, url = ws

    def call(call_id: int, method: str, payload: bytes) -> bytes:
        return gateway_pb2.ClientFrame(
            request=gateway_pb2.UnaryRequest(id=call_id, method=method, payload=payload)
        ).SerializeToString()

    async with connect(url) as sock:
        await sock.send(hello(token("carol")))
        await sock.recv()  # Welcome
        await sock.send(call(1, "Sync", gateway_pb2.SyncRequest().SerializeToString()))
        await sock.send(call(2, "Nope", b""))
        await sock.send(call(3, "Sync", b"\xff\xff"))
        await sock.send(call(4, "Sync", gateway_pb2.SyncRequest(after_seq=-1).SerializeToString()))
        got = {}
        for _ in range(4):
            r = gateway_pb2.ServerFrame.FromString(await sock.recv()).response  # type: ignore[arg-type]
            got[r.id] = r
        assert got[1].code == 0
        assert gateway_pb2.SyncResponse.FromString(got[1].payload).store_epoch == "carol"
        assert got[2].code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert got[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert (got[4].code, got[4].message) == (
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            "after_seq < 0",
        )
        # More calls in flight than allowed: the extra one is refused at once.
        slow = gateway_pb2.SyncRequest(after_seq=7).SerializeToString()
        for i in (10, 11, 12):
            await sock.send(call(i, "Sync", slow))
        first = gateway_pb2.ServerFrame.FromString(await sock.recv()).response  # type: ignore[arg-type]
        assert (first.id, first.code) == (12, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


async def test_a_silent_peer_is_dropped(ws: tuple[WsGateway, Servicer, str]) -> None:
    gw, servicer, url = ws
    # A client that never answers pings (websockets' own keepalive off, and it
    # stops reading): the gateway's sweep drops it.
    async with connect(url, ping_interval=None, close_timeout=0.2) as sock:
        await sock.send(hello(token("dave")))
        await sock.recv()
        sock.transport.pause_reading()  # type: ignore[attr-defined]
        await asyncio.wait_for(servicer.ended.wait(), 5)
    assert not gw.sockets


async def test_a_closed_socket_is_freed_at_once_not_by_the_cyclic_gc(
    ws: tuple[WsGateway, Servicer, str],
) -> None:
    """websockets' protocol object sits in reference cycles: the frame of its parser
    generator holds it, and after an unclean close so does the traceback of the
    parser's (or the handshake's) exception. Left to the cyclic GC, the framing
    state of a dropped socket waits for a full collection, which comes seldom
    while many objects live; under a churn of 10,000 drops that garbage took some
    2,000 sockets' worth of pymalloc arenas, which stayed mapped after it was
    collected (docs/benchmarks.md, "Churn"). The socket breaks the cycles when its
    connection is lost, so reference counting frees it then: here with the cyclic
    GC off, at every stage a socket can be dropped at, and after a clean close."""
    gw, _, url = ws
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    loop = asyncio.get_running_loop()

    async def new_socket(known: set[Any]) -> weakref.ref[Any]:
        deadline = loop.time() + 5
        while not set(gw.sockets) - known:
            assert loop.time() < deadline, "the gateway never saw the socket"
            await asyncio.sleep(0.01)
        (sock,) = set(gw.sockets) - known
        return weakref.ref(sock.proto)

    async def freed(ref: weakref.ref[Any]) -> bool:
        deadline = loop.time() + 5
        while ref() is not None:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    gc.collect()
    gc.disable()
    try:
        for stage in ("tcp", "handshake", "welcome", "clean close"):
            known = set(gw.sockets)
            if stage == "tcp":
                _, writer = await asyncio.open_connection(host, int(port))
                ref = await new_socket(known)
                writer.transport.abort()
            else:
                sock = await connect(url, close_timeout=0.5)
                ref = await new_socket(known)
                if stage != "handshake":
                    await sock.send(hello(token(f"gc-{stage[:5]}")))
                    await sock.recv()
                if stage == "clean close":
                    await sock.close()
                else:
                    sock.transport.abort()
            assert await freed(ref), f"{stage}: {gc.get_referrers(ref())}"
    finally:
        gc.enable()
