"""The WebSocket listener of a real gateway process (no logic; pushes come from
GatewayInternal.Deliver calls made the way a pusher makes them), where the real
write path runs: the Connection's capped outbound queue, the socket's 64 KiB
write limit, the ping sweep, and SIGTERM.

- A device that stops reading while pushes flow: the gateway accepts a bounded
  amount for it (then answers NOT_CONNECTED), ends it with 1011 once it made no
  write progress for the ping timeout, and another device on the same gateway
  gets every push promptly meanwhile.
- Shutdown: GoAway then close 1001 on an open socket; a Hello during the
  shutdown gets 1013.

And, on a Connection alone, the one frame that did not respect the outbound
queue's limit: the Pong, for a client that keeps pinging but does not read.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable

import pytest
from gwkit import deliver, metric, ping_frame, token_for
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from gateway.auth import Identity
from gateway.config import Settings
from gateway.connection import Connection
from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_internal_pb2, gateway_pb2
from imdev.servers import ServiceProcess, free_port

WRITTEN = gateway_internal_pb2.DeliveryStatus.DELIVERY_STATUS_WRITTEN
NOT_CONNECTED = gateway_internal_pb2.DeliveryStatus.DELIVERY_STATUS_NOT_CONNECTED
#: The socket's write buffer limit (gateway/websocket.py): above it, writes wait.
WRITE_LIMIT = 64 * 1024


def hello(user: str) -> bytes:
    return gateway_pb2.ClientFrame(
        hello=gateway_pb2.Hello(token=token_for(user))
    ).SerializeToString()


def push_frame_bytes(seq: int, body: bytes) -> int:
    """Bytes of the WebSocket message carrying the Push that gwkit.deliver makes."""
    frame = gateway_pb2.ServerFrame(
        push=gateway_pb2.Push(
            seq=seq,
            message=common_pb2.Message(msg_id=seq, body=body, conversation_id="d:x:y"),
        )
    )
    size = frame.ByteSize()
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


class _Wire(asyncio.Protocol):
    """Bytes received, kept until the client parses them; reading can be paused."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.received = 0
        self.eof = False
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received += len(data)
        self.changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.changed.set()


class RawWs:
    """A WebSocket client (websockets' sans-I/O protocol on a plain socket with a
    small receive buffer, so what it leaves unread backs up to the gateway after a
    few frames). It reads only when told to; while reading it answers like any
    client (pongs, the close echo)."""

    def __init__(self, proto: ClientProtocol, wire: _Wire, sock: socket.socket) -> None:
        self.proto = proto
        self.wire = wire
        self.sock = sock
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, url: str, rcvbuf: int = 16 * 1024) -> RawWs:
        uri = parse_uri(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (uri.host, uri.port))
        _, wire = await loop.create_connection(_Wire, sock=sock)
        client = cls(ClientProtocol(uri), wire, sock)
        client.proto.send_request(client.proto.connect())
        client._write_out()
        async with asyncio.timeout(10):
            while not any(isinstance(e, Response) for e in await client._parse()):
                pass
        return client

    @property
    def port(self) -> int:
        """The client's local port (its TCP connection's other end is the gateway)."""
        port: int = self.sock.getsockname()[1]
        return port

    def _write_out(self) -> None:
        transport = self.wire.transport
        for data in self.proto.data_to_send():
            if data and transport is not None and not transport.is_closing():
                transport.write(data)

    async def _parse(self) -> list[object]:
        """Waits for bytes (or EOF), parses them and answers what needs an answer."""
        wire = self.wire
        while not wire.buffer and not wire.eof:
            wire.changed.clear()
            await wire.changed.wait()
        if wire.buffer:
            data, wire.buffer = bytes(wire.buffer), bytearray()
            self.proto.receive_data(data)
        else:
            self.proto.receive_eof()
        events = self.proto.events_received()
        self.frames += [e for e in events if isinstance(e, Frame)]
        self._write_out()
        return events

    def send(self, data: bytes) -> None:
        self.proto.send_binary(data)
        self._write_out()

    async def welcome(self, user: str) -> None:
        self.send(hello(user))
        async with asyncio.timeout(10):
            while not self.frames:
                await self._parse()
        first = gateway_pb2.ServerFrame.FromString(self.frames[0].data)
        assert first.WhichOneof("frame") == "welcome", first

    def stop_reading(self) -> None:
        assert self.wire.transport is not None
        self.wire.transport.pause_reading()

    async def read_to_the_end(self, timeout: float) -> list[Frame]:
        """Reads again, until the gateway closed the connection; every frame."""
        assert self.wire.transport is not None
        self.wire.transport.resume_reading()
        async with asyncio.timeout(timeout):
            while not (self.wire.eof and not self.wire.buffer):
                await self._parse()
        return self.frames

    def server_frames(self) -> list[gateway_pb2.ServerFrame]:
        return [
            gateway_pb2.ServerFrame.FromString(f.data)
            for f in self.frames
            if f.opcode is Opcode.BINARY
        ]

    def abort(self) -> None:
        if self.wire.transport is not None:
            self.wire.transport.abort()


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int]:
    """(bytes in the kernel's send queue, in its receive queue) of the loopback
    TCP connection from `local_port` to `remote_port`, from /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if (local, remote) == (local_port, remote_port):
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    raise AssertionError(f"no TCP connection {local_port} -> {remote_port}")


class Reader:
    """A device on the websockets client that reads everything: when each push
    arrived, and every frame kind."""

    def __init__(self, sock: ClientConnection) -> None:
        self.sock = sock
        self.arrived: dict[int, float] = {}
        self.kinds: list[str] = []
        self.go_away: gateway_pb2.GoAway | None = None
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self, user: str) -> None:
        await self.sock.send(hello(user))
        first = gateway_pb2.ServerFrame.FromString(await self.sock.recv())  # type: ignore[arg-type]
        assert first.WhichOneof("frame") == "welcome", first
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for data in self.sock:
                frame = gateway_pb2.ServerFrame.FromString(data)  # type: ignore[arg-type]
                kind = frame.WhichOneof("frame") or ""
                self.kinds.append(kind)
                if kind == "push":
                    self.arrived.setdefault(frame.push.seq, time.monotonic())
                elif kind == "go_away":
                    self.go_away = frame.go_away
                self.changed.set()
        except ConnectionClosed:
            pass
        self.changed.set()

    async def wait_push(self, seq: int, timeout: float) -> float:
        """When push `seq` arrived; fails after `timeout`."""
        async with asyncio.timeout(timeout):
            while seq not in self.arrived:
                self.changed.clear()
                await self.changed.wait()
        return self.arrived[seq]


async def test_a_device_that_stops_reading_is_bounded_and_ended_with_1011(
    start_gateway: Callable[..., ServiceProcess],
) -> None:
    """alice stops reading her socket but keeps talking (a Ping every 0.2 s, so
    she is never silent) while pushes of 16 KiB pour in for her and small ones for
    bob on the same gateway. The gateway accepts for alice no more than its
    buffers hold (the kernel's, 64 KiB of the socket's, the outbound queue), then
    refuses her pushes at once (NOT_CONNECTED: the pusher retransmits, she will
    sync); it ends her socket with 1011 once nothing could be written to it for
    the ping timeout; bob gets every push, in order, promptly, throughout."""
    ws_port, metrics_port = free_port(), free_port()
    queue, ping_timeout_s = 32, 2.0
    gw = start_gateway(
        IM_GATEWAY_WS_PORT=str(ws_port),
        IM_GATEWAY_METRICS_PORT=str(metrics_port),
        IM_GATEWAY_OUTBOUND_QUEUE=str(queue),
        IM_GATEWAY_WS_PING_INTERVAL_S="2",
        IM_GATEWAY_WS_PING_TIMEOUT_S=str(ping_timeout_s),
    )
    url = f"ws://127.0.0.1:{ws_port}/v1/connect"
    body = b"s" * 16 * 1024
    async with connect(url) as bob_sock:
        bob = Reader(bob_sock)
        await bob.start("bob")
        alice = await RawWs.open(url)
        pinger: asyncio.Task[None] | None = None
        try:
            await alice.welcome("alice")
            alice.stop_reading()
            read_before = alice.wire.received

            async def keep_pinging() -> None:
                nonce = 0
                while True:
                    nonce += 1
                    alice.send(ping_frame(nonce).SerializeToString())
                    await asyncio.sleep(0.2)

            pinger = asyncio.create_task(keep_pinging())

            def ended() -> bool:
                return metric(metrics_port, "im_gateway_ws_closes_total", code="1011") >= 1

            statuses: list[tuple[int, int]] = []  # (alice's seq, status)
            call_s: list[float] = []
            bob_s: list[float] = []
            accepted_bytes = 0
            kernel_held = read_meanwhile = 0
            alice_seq = bob_seq = 0
            refused_at: float | None = None
            reading: asyncio.Task[list[Frame]] | None = None
            ended_after_s = 0.0
            deadline = time.monotonic() + 30
            after_end = 0
            while after_end < 10:  # ten more rounds once alice is gone
                assert time.monotonic() < deadline, "alice's socket was never ended"
                batch = []
                for _ in range(8):
                    alice_seq += 1
                    batch.append(("alice", "d1", alice_seq, body))
                bob_seq += 1
                batch.append(("bob", "d1", bob_seq, f"b{bob_seq}".encode()))
                started = time.monotonic()
                got = await deliver(gw.address, batch)
                call_s.append(time.monotonic() - started)
                assert got[-1] == WRITTEN, f"bob's push {bob_seq} refused"
                bob_s.append(await bob.wait_push(bob_seq, 5) - started)
                for (_, _, seq, _), status in zip(batch[:-1], got[:-1], strict=True):
                    statuses.append((seq, status))
                    if status == WRITTEN:
                        accepted_bytes += push_frame_bytes(seq, body)
                    elif refused_at is None:
                        refused_at = time.monotonic()
                        # What left the gateway process for alice, the moment it
                        # started refusing: the kernel's queues of her connection,
                        # and what she read before she stopped.
                        gw_tx, _ = tcp_queues(ws_port, alice.port)
                        _, alice_rx = tcp_queues(alice.port, ws_port)
                        kernel_held = gw_tx + alice_rx
                        read_meanwhile = alice.wire.received - read_before
                if reading is None and refused_at is not None and await asyncio.to_thread(ended):
                    ended_after_s = time.monotonic() - refused_at
                    # Alice reads again (while bob's rounds go on): the pushes that
                    # left the gateway's queue, in order, then the close frame, then
                    # the end of the connection.
                    pinger.cancel()
                    reading = asyncio.create_task(alice.read_to_the_end(timeout=10))
                if reading is not None:
                    after_end += 1

            # Refused at once, and from then on: what it held did not grow.
            seqs = [seq for seq, _ in statuses]
            kinds = [status for _, status in statuses]
            first_refused = kinds.index(NOT_CONNECTED)
            assert set(kinds[first_refused:]) == {NOT_CONNECTED}, kinds
            assert kinds[:first_refused] == [WRITTEN] * first_refused
            # Of what it accepted, the gateway process held at most: the socket's
            # write limit plus the frame that went over it, the frame its writer
            # waits to write, and a full queue.
            gateway_held = accepted_bytes - kernel_held - read_meanwhile
            frame = push_frame_bytes(alice_seq, body)
            assert gateway_held <= WRITE_LIMIT + (queue + 2) * frame, (gateway_held, kernel_held)
            # Ended within the ping timeout of its writes stalling (plus a sweep).
            assert ended_after_s < ping_timeout_s + 3, ended_after_s
            # Bob, meanwhile: every push, in order, each soon after its Deliver.
            assert sorted(bob.arrived) == list(range(1, bob_seq + 1))
            assert max(call_s) < 2.0, max(call_s)
            assert max(bob_s) < 2.0, max(bob_s)

            assert reading is not None
            frames = await reading
        finally:
            if pinger is not None:
                pinger.cancel()
            alice.abort()
    pushed = [f.push.seq for f in alice.server_frames() if f.WhichOneof("frame") == "push"]
    assert pushed == seqs[: len(pushed)] and len(pushed) <= first_refused, pushed
    closes = [Close.parse(f.data) for f in frames if f.opcode is Opcode.CLOSE]
    assert [(c.code, c.reason) for c in closes] == [(1011, "not reading")], closes
    # Gone from the gateway: her pushes are refused, her route removed.
    assert (await deliver(gw.address, [("alice", "d1", alice_seq + 1, b"x")])) == [NOT_CONNECTED]


async def test_shutdown_sends_goaway_then_1001_and_a_hello_gets_1013(
    start_gateway: Callable[..., ServiceProcess],
) -> None:
    """SIGTERM: an open socket gets GoAway (with the configured delay) and then
    close 1001. The gateway waits for its streams to end before it stops (here
    one that is not reading holds it open, up to IM_GATEWAY_CLOSE_GRACE_S): a
    Hello meanwhile, on a socket opened before or during the shutdown, gets 1013.
    The stuck socket, reading again, finds its pushes, the GoAway and 1001; a
    socket that never sent a Hello is closed with 1013 when the listener stops."""
    ws_port = free_port()
    gw = start_gateway(
        IM_GATEWAY_WS_PORT=str(ws_port),
        IM_GATEWAY_GOAWAY_RECONNECT_MS="1234",
        IM_GATEWAY_CLOSE_GRACE_S="20",
        IM_GATEWAY_OUTBOUND_QUEUE="8",
        IM_GATEWAY_WS_HELLO_TIMEOUT_S="60",
    )
    url = f"ws://127.0.0.1:{ws_port}/v1/connect"
    stuck = await RawWs.open(url)
    try:
        await stuck.welcome("stuck")
        stuck.stop_reading()
        # Its buffers full and its queue too: its GoAway waits behind them.
        seq = 0
        while True:
            assert seq < 2000, "the stuck socket never refused a push"
            got = await deliver(
                gw.address, [("stuck", "d1", seq + i, b"x" * 32 * 1024) for i in range(1, 9)]
            )
            seq += 8
            if NOT_CONNECTED in got:
                break
        async with (
            connect(url) as open_sock,
            connect(url) as early,
            connect(url, close_timeout=5) as no_hello,
        ):
            reader = Reader(open_sock)
            await reader.start("alice")
            gw.signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                await reader.task  # type: ignore[misc]
            assert reader.go_away is not None and reader.go_away.reconnect_after_ms == 1234
            assert reader.kinds[-1] == "go_away", reader.kinds  # the last frame
            assert open_sock.close_code == 1001
            # Opened before the shutdown, Hello during it.
            assert await closed_with(early, hello("bob")) == 1013
            # Opened during it.
            async with connect(url) as late:
                assert await closed_with(late, hello("carol")) == 1013
            assert gw.running()  # still draining

            frames = await stuck.read_to_the_end(timeout=20)
            kinds = [f.WhichOneof("frame") for f in stuck.server_frames()]
            assert kinds[-1] == "go_away" and set(kinds[1:-1]) == {"push"}, kinds
            closes = [Close.parse(f.data).code for f in frames if f.opcode is Opcode.CLOSE]
            assert closes == [1001]
            assert await closed_with(no_hello) == 1013
        assert await asyncio.to_thread(gw.wait, 20) == 0
    finally:
        stuck.abort()


async def closed_with(sock: ClientConnection, *messages: bytes) -> int:
    """Sends `messages`, reads until the socket closes; the close code received."""
    for m in messages:
        await sock.send(m)
    with pytest.raises(ConnectionClosed) as err:
        while True:
            await asyncio.wait_for(sock.recv(), 20)
    assert err.value.rcvd is not None, err.value
    return err.value.rcvd.code


async def test_pongs_for_a_client_that_does_not_read_stay_within_the_queue() -> None:
    """Liveness answers Pings from its own task (gateway/heads.py), so nothing
    made the Pong wait for room: a client pinging without reading grew its
    Connection's queue without limit. Now a Pong finding the queue full is
    dropped, like the other frames that must not wait."""
    settings = Settings(outbound_queue=4)
    written: list[gateway_pb2.ServerFrame] = []
    never = asyncio.Event()

    class StuckReader:
        async def read(self) -> object:
            await never.wait()
            raise AssertionError("unreachable")

        async def write(self, frame: gateway_pb2.ServerFrame) -> None:
            written.append(frame)
            if len(written) > 1:  # the Welcome went out; then the client stops reading
                await never.wait()

    conn = Connection(
        Identity("alice", "d1", 0),
        settings,
        backend=None,  # type: ignore[arg-type]
        acks=None,  # type: ignore[arg-type]
        on_ping=lambda _conn, _nonce: None,
    )
    run = asyncio.create_task(conn.run(StuckReader()))
    try:
        async with asyncio.timeout(5):
            while not written:
                await asyncio.sleep(0.01)
        # Queued up to the limit (in one go: the writer has not run yet); the rest
        # dropped. The writer then takes one and is stuck writing it: room for one.
        answered = [conn.write_pong(nonce, 7) for nonce in range(1, 101)]
        assert answered == [True] * 4 + [False] * 96
        async with asyncio.timeout(5):
            while len(written) < 2:
                await asyncio.sleep(0.01)
        answered = [conn.write_pong(nonce, 7) for nonce in range(101, 201)]
        assert answered == [True] + [False] * 99
        assert not conn.push(1, common_pb2.Message(msg_id=1), "")
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
