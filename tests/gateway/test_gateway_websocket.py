"""The WebSocket framing (gateway/websocket.py) in isolation: the handshake's
refusals, the Hello, close codes for bad input, unary calls on the socket,
flow control, ping timeouts. The servicer is a small stand-in recording what the
socket hands it; test_gateway_websocket_process.py runs a real gateway process
(pushes to a socket that stops reading, GoAway), tests/e2e/test_e2e_websocket.py
the real stack."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from gateway.servicer import current_identity
from gateway.websocket import WsGateway, WsSettings
from im.gateway.v1 import gateway_pb2
from imclient.tokens import mint_token
from imcommon.metrics import Metrics

SECRET = "test-secret-0123456789abcdef"


class Servicer:
    """Connect: Welcome, then echo every Ping as a Pong (until EOF); a Send with
    client_id 99 ends the stream with INVALID_ARGUMENT; a Send with client_id 98
    writes a Kick and returns; a Ping with a nonce from 1000 is a marker, only
    recorded. Sync answers with the caller's id in the head (after_seq 8: a 32
    KiB one)."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.ended = asyncio.Event()
        self.marks: list[int] = []
        self.syncs = 0

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
                if kind == "ping" and frame.ping.nonce >= 1000:
                    self.marks.append(frame.ping.nonce)
                elif kind == "ping":
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
        self.syncs += 1
        if request.after_seq == 8:
            return gateway_pb2.SyncResponse(store_epoch="e" * 32 * 1024)
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
    async with asyncio.timeout(5):
        while gw.sockets:
            await asyncio.sleep(0.02)


class DeafClient:
    """A WebSocket client on websockets' sans-I/O protocol that reads and parses
    everything the gateway sends but writes nothing after its Hello: it never
    answers a ping (websockets prepares the pong; it is never sent), like a client
    whose event loop is stuck while its TCP stack still receives."""

    def __init__(
        self, proto: ClientProtocol, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proto = proto
        self.reader = reader
        self.writer = writer
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, url: str, rcvbuf: int = 0) -> DeafClient:
        """Connects; `rcvbuf`: a small receive buffer, so what the client leaves
        unread backs up to the gateway sooner."""
        uri = parse_uri(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        client = cls(ClientProtocol(uri), reader, writer)
        client.proto.send_request(client.proto.connect())
        client._write_out()
        while True:
            events = await client._receive()
            if any(isinstance(e, Response) for e in events):
                return client

    def _write_out(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self.writer.write(data)

    async def _receive(self) -> list[object]:
        data = await asyncio.wait_for(self.reader.read(65536), 10)
        if data:
            self.proto.receive_data(data)
        else:
            self.proto.receive_eof()
        events = self.proto.events_received()
        self.frames += [e for e in events if isinstance(e, Frame)]
        self.proto.data_to_send()  # pongs and the close echo: never sent
        return events

    def send_binary(self, data: bytes) -> None:
        self.proto.send_binary(data)
        self._write_out()

    async def read_frames(self, count: int, timeout: float = 10) -> list[Frame]:
        async with asyncio.timeout(timeout):
            while len(self.frames) < count:
                await self._receive()
        return self.frames

    def stop_reading(self) -> None:
        self.writer.transport.pause_reading()

    async def read_until_eof(self, timeout: float) -> list[Frame]:
        """Every frame received until the gateway closed the TCP connection."""
        async with asyncio.timeout(timeout):
            while not self.reader.at_eof():
                await self._receive()
        return self.frames

    def abort(self) -> None:
        self.writer.transport.abort()


async def test_a_peer_that_stops_answering_pings_sees_1011(
    ws: tuple[WsGateway, Servicer, str],
) -> None:
    """The ping timeout fails the connection (RFC 6455 7.1.7): a close frame with
    1011, then the gateway closes the TCP connection without waiting for a close
    frame back (a stuck peer would never send one). A stuck but connected client
    thus learns why (1011), not just that the connection broke (1006)."""
    gw, servicer, url = ws
    client = await DeafClient.open(url)
    try:
        client.send_binary(hello(token("erin")))
        frames = await client.read_until_eof(timeout=10)
    finally:
        client.abort()
    kinds = [f.opcode for f in frames]
    assert kinds[0] is Opcode.BINARY  # the Welcome
    assert Opcode.PING in kinds  # pinged first, never answered
    assert kinds[-1] is Opcode.CLOSE, kinds
    close = Close.parse(frames[-1].data)
    assert (close.code, close.reason) == (1011, "ping timeout")
    await asyncio.wait_for(servicer.ended.wait(), 5)
    async with asyncio.timeout(5):
        while gw.sockets:
            await asyncio.sleep(0.02)


async def test_answers_a_client_does_not_read_wait_for_room(
    ws: tuple[WsGateway, Servicer, str],
) -> None:
    """A client that keeps calling but stops reading the answers: an answer waits
    (its call still counted in flight) while more than 64 KiB are unread, calls
    beyond the limit (2 here) are refused at once, so what the gateway holds for
    the socket stays bounded. (Before, every answer went into the transport's
    buffer: 300 answers of 32 KiB, about 10 MB, minus what the kernel took.)"""
    gw, servicer, url = ws
    client = await DeafClient.open(url, rcvbuf=16 * 1024)
    try:
        client.send_binary(hello(token("fay")))
        await client.read_frames(1)  # the Welcome
        client.stop_reading()
        big = gateway_pb2.SyncRequest(after_seq=8).SerializeToString()
        for i in range(1, 301):
            client.send_binary(
                gateway_pb2.ClientFrame(
                    request=gateway_pb2.UnaryRequest(id=i, method="Sync", payload=big)
                ).SerializeToString()
            )
            # One call at a time: frames are handled in order, and the call's
            # task runs before the handler sees the marker that follows it.
            client.send_binary(
                gateway_pb2.ClientFrame(ping=gateway_pb2.Ping(nonce=1000 + i)).SerializeToString()
            )
            async with asyncio.timeout(10):
                while 1000 + i not in servicer.marks:
                    await asyncio.sleep(0)
        (sock,) = gw.sockets
        assert sock.transport is not None
        buffered = sock.transport.get_write_buffer_size()
        answer = 32 * 1024 + 64
        # Over the limit by one answer at most, two answers waiting, the refusals.
        assert buffered <= 64 * 1024 + answer + 300 * 200, buffered
        assert servicer.syncs < 300
    finally:
        client.abort()


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
