"""The WebSocket framing on the real stack: the same protocol rules as the gRPC
stream (one implementation), so a WebSocket device and a gRPC device talk to each
other with the same guarantees. The WebSocket device here speaks raw frames and
nothing more (no SDK)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from e2e_support import uid
from rawclient import RawDevice
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from im.common.v1 import common_pb2 as cpb
from im.gateway.v1 import gateway_pb2
from imdev.stack import Stack


class WsDevice:
    """A device on the WebSocket framing: Hello, then frames; records pushes and
    ACKs them cumulatively; sends with client_id order; unary calls by id."""

    def __init__(self, sock: ClientConnection) -> None:
        self.sock = sock
        self.welcome: gateway_pb2.Welcome | None = None
        self.pushes: dict[int, cpb.Message] = {}
        self.acks: dict[int, asyncio.Future[gateway_pb2.ServerFrame]] = {}
        self.responses: dict[int, asyncio.Future[gateway_pb2.UnaryResponse]] = {}
        self.frames: list[str] = []
        self.delivered = 0
        self.next_client_id = 1
        self.next_call = 1
        self.changed = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.sending: list[asyncio.Future[None]] = []

    async def start(self, token: str) -> gateway_pb2.Welcome:
        await self.sock.send(
            gateway_pb2.ClientFrame(hello=gateway_pb2.Hello(token=token)).SerializeToString()
        )
        first = gateway_pb2.ServerFrame.FromString(await self.sock.recv())  # type: ignore[arg-type]
        assert first.WhichOneof("frame") == "welcome", first
        self.welcome = first.welcome
        self.delivered = first.welcome.head_seq
        self.reader = asyncio.create_task(self._read())
        return first.welcome

    async def _read(self) -> None:
        try:
            async for data in self.sock:
                frame = gateway_pb2.ServerFrame.FromString(data)  # type: ignore[arg-type]
                kind = frame.WhichOneof("frame") or ""
                self.frames.append(kind)
                if kind == "push":
                    self.pushes.setdefault(frame.push.seq, frame.push.message)
                    while self.delivered + 1 in self.pushes:
                        self.delivered += 1
                    await self.sock.send(
                        gateway_pb2.ClientFrame(
                            deliver_ack=gateway_pb2.DeliverAck(seq=self.delivered)
                        ).SerializeToString()
                    )
                elif kind in ("send_ack", "send_error"):
                    cid = getattr(frame, kind).client_id
                    fut = self.acks.pop(cid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
                elif kind == "response":
                    rfut = self.responses.pop(frame.response.id, None)
                    if rfut is not None:
                        rfut.set_result(frame.response)
                self.changed.set()
        except ConnectionClosed:
            pass

    def submit(self, conv: str, body: bytes) -> asyncio.Future[gateway_pb2.ServerFrame]:
        cid = self.next_client_id
        self.next_client_id += 1
        fut: asyncio.Future[gateway_pb2.ServerFrame] = asyncio.get_running_loop().create_future()
        self.acks[cid] = fut
        frame = gateway_pb2.ClientFrame(
            send=gateway_pb2.Send(
                client_id=cid,
                client_msg_id=str(uuid.uuid4()),
                conversation_id=conv,
                body=body,
                content_type=cpb.CONTENT_TYPE_TEXT,
            )
        )
        # Sent in order: websockets writes each send() whole, in call order.
        self.sending.append(asyncio.ensure_future(self.sock.send(frame.SerializeToString())))
        return fut

    async def call(self, method: str, request: object, response_cls: type) -> object:
        call_id = self.next_call
        self.next_call += 1
        fut: asyncio.Future[gateway_pb2.UnaryResponse] = asyncio.get_running_loop().create_future()
        self.responses[call_id] = fut
        await self.sock.send(
            gateway_pb2.ClientFrame(
                request=gateway_pb2.UnaryRequest(
                    id=call_id,
                    method=method,
                    payload=request.SerializeToString(),  # type: ignore[attr-defined]
                )
            ).SerializeToString()
        )
        resp = await asyncio.wait_for(fut, 10)
        if resp.code:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == resp.code)),
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                resp.message,
            )
        return response_cls.FromString(resp.payload)

    async def wait_pushes(self, count: int, timeout: float) -> bool:
        async def until() -> None:
            while len(self.pushes) < count:
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            return False
        return True


@pytest.fixture
async def ws_pair(stack: Stack) -> AsyncIterator[tuple[str, str, WsDevice]]:
    a, b = uid("wsa"), uid("wsb")
    async with connect(stack.ws_urls[0]) as sock:
        dev = WsDevice(sock)
        welcome = await dev.start(stack.mint(a, "web1"))
        assert (welcome.user_id, welcome.device_id) == (a, "web1")
        yield a, b, dev


async def test_websocket_and_grpc_devices_chat(
    stack: Stack, ws_pair: tuple[str, str, WsDevice]
) -> None:
    a, b, ws = ws_pair
    conv = f"d:{min(a, b)}:{max(a, b)}"
    async with RawDevice(stack.gateway_addresses[0], stack.mint(b, "b1"), name="b") as grpc_b:
        # WebSocket -> gRPC: 50 pipelined sends, ACKed in order, delivered once each.
        futures = [ws.submit(conv, f"m{i:03}".encode()) for i in range(50)]
        acks = [(await asyncio.wait_for(f, 20)).send_ack for f in futures]
        assert [x.client_id for x in acks] == list(range(1, 51))
        assert [x.conv_seq for x in acks] == sorted(x.conv_seq for x in acks)
        assert await grpc_b.wait_for_count(50, 20), grpc_b.describe()
        assert [e.body for e in grpc_b.entries] == [f"m{i:03}".encode() for i in range(50)]
        # The WebSocket device's own other pushes: its messages fanned out to it.
        assert await ws.wait_pushes(50, 20)
        # Unary calls on the socket: Sync, ListConversations, History.
        page = await ws.call(
            "Sync", gateway_pb2.SyncRequest(after_seq=0, limit=500), gateway_pb2.SyncResponse
        )
        assert [e.message.body for e in page.entries] == [f"m{i:03}".encode() for i in range(50)]  # type: ignore[attr-defined]
        convs = await ws.call(
            "ListConversations",
            gateway_pb2.ListConversationsRequest(),
            gateway_pb2.ListConversationsResponse,
        )
        assert [c.conversation_id for c in convs.conversations] == [conv]  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ws.call(
                "History",
                gateway_pb2.HistoryRequest(conversation_id="g:nope"),
                gateway_pb2.HistoryResponse,
            )
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)


async def test_a_second_socket_of_the_device_kicks_the_first(stack: Stack) -> None:
    user = uid("wsk")
    async with connect(stack.ws_urls[0]) as first_sock:
        first = WsDevice(first_sock)
        await first.start(stack.mint(user, "same"))
        async with connect(stack.ws_urls[0]) as second_sock:
            second = WsDevice(second_sock)
            await second.start(stack.mint(user, "same"))
            assert first.reader is not None
            await asyncio.wait_for(first.reader, 10)
            assert "kick" in first.frames
            assert first_sock.close_code == 4001


async def _churn_one(url: str, token: str, how: int) -> None:
    """Opens a socket and drops it without a closing handshake: after the TCP
    connect only (0), after the WebSocket handshake (1), after the Hello (2)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    if how == 0:
        _, writer = await asyncio.open_connection(host, int(port))
        writer.transport.abort()
        return
    sock = await connect(url, close_timeout=0.1)
    if how == 2:
        await sock.send(
            gateway_pb2.ClientFrame(hello=gateway_pb2.Hello(token=token)).SerializeToString()
        )
        await sock.recv()
    sock.transport.abort()


def _established(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local port is `port`, from
    /proc/net/tcp (the gateway's side of its sockets on that port)."""
    count = 0
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "01":
            count += 1
    return count


async def test_sockets_opened_and_dropped_leave_nothing_behind(stack: Stack) -> None:
    """600 sockets opened and dropped at every stage, 50 at a time, while a gRPC
    device receives: it gets every message, and the gateway ends with no socket
    (and no route) of theirs."""
    a, b = uid("churn-a"), uid("churn-b")
    conv = f"d:{min(a, b)}:{max(a, b)}"
    url = stack.ws_urls[0]
    tokens = [stack.mint(uid("churner"), "w") for _ in range(200)]
    async with (
        RawDevice(stack.gateway_addresses[0], stack.mint(b, "b1"), name="b") as receiver,
        connect(url) as sender_sock,
    ):
        sender = WsDevice(sender_sock)
        await sender.start(stack.mint(a, "web"))
        sem = asyncio.Semaphore(50)

        async def churn(i: int) -> None:
            async with sem:
                await _churn_one(url, tokens[i % len(tokens)], i % 3)

        churning = asyncio.gather(*(churn(i) for i in range(600)))
        acks = [sender.submit(conv, f"c{i}".encode()) for i in range(30)]
        await churning
        for f in acks:
            assert (await asyncio.wait_for(f, 20)).WhichOneof("frame") == "send_ack"
        assert await receiver.wait_for_count(30, 20), receiver.describe()
        assert [e.body for e in receiver.entries] == [f"c{i}".encode() for i in range(30)]
        # Only the sender's socket is left once the gateway saw every drop.
        ws_port = stack.ports.gateway_ws[0]
        deadline = asyncio.get_running_loop().time() + 10
        while _established(ws_port) != 1:
            assert asyncio.get_running_loop().time() < deadline, _established(ws_port)
            await asyncio.sleep(0.2)
