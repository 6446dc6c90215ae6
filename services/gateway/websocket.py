"""The device protocol on WebSocket: a second framing of the same stream.

Browsers cannot open a gRPC bidirectional stream, so the gateway also listens for
WebSocket connections (`IM_GATEWAY_WS_PORT`, path `/v1/connect`). Each binary
message is one ClientFrame (client -> gateway) or ServerFrame (gateway -> client):
the same protobufs as the gRPC stream. After the handshake the first message must
be `ClientFrame{hello{token}}` (the token never travels in a URL); the gateway then
runs the very same `GatewayServicer.Connect` as for a gRPC stream (auth identity,
client_id order, send window, ACKs, pushes, heads, Kick, GoAway: one
implementation of the rules), with this socket as its stream context. Unary calls
(Sync, History, groups, ...) travel on the same socket as `UnaryRequest` frames
answered by `UnaryResponse` with the same id, served by the same servicer methods:
one connection and one authentication per device, no CORS, and the request shapes
of the gRPC API (docs/protocol.md, "WebSocket").

The framing is websockets' sans-I/O protocol (`websockets.server.ServerProtocol`:
handshake, Origin check, masking, fragments, size limit, ping/pong, closing
handshake) on a plain asyncio.Protocol. No task exists per connection until the
Hello (then exactly one, the Connect handler, which waits in `read()` like the gRPC
path's handler), and unary calls get a task only while they run. One sweep task
per gateway sends the pings and closes silent sockets. This keeps an idle socket
near the cost of the Connection itself (docs/benchmarks.md, "WebSocket").

A peer that stops reading costs a bounded amount: the Connection's writer (and
every unary answer) waits while more than 64 KiB wait in the transport, pushes
that find the Connection's queue full are refused (gateway/connection.py), and
the socket is not read while more than 1 MiB of answers wait. The sweep ends a
socket whose writes made no progress for the ping timeout ("not reading", 1011),
even one that keeps sending. Both timeouts fail the connection (RFC 6455 7.1.7):
the close frame, then the TCP close at once, without waiting for a close frame
back (a stuck or dead peer sends none); a peer that reads it sees 1011, not 1006.

Close codes (each refusal has its own):

| code | when |
| --- | --- |
| 1000 | the client closed, or the stream ended normally |
| 1001 | GoAway: the gateway is shutting down (the frame says when to reconnect) |
| 1002 | WebSocket protocol error (websockets) |
| 1003 | a text message: only binary protobuf frames are accepted |
| 1007 | a message that is not a ClientFrame, or a Hello after the first message |
| 1009 | a message larger than IM_GATEWAY_WS_MAX_MESSAGE_BYTES |
| 1011 | "ping timeout", "not reading" (IM_GATEWAY_WS_PING_TIMEOUT_S), or an internal error |
| 1013 | the gateway is shutting down (at Hello, or no Hello yet when it stops) |
| 4001 | Kick: another connection of the same device replaced this one |
| 4400 | the stream ended with INVALID_ARGUMENT |
| 4401 | no Hello first, no Hello in time, or a bad token |

A handshake on another path gets HTTP 404; one from a browser Origin not in
IM_GATEWAY_WS_ORIGINS gets HTTP 403 (cross-site WebSocket hijacking).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol
from websockets.typing import Origin

from gateway.auth import Identity, TokenError, verify_token
from gateway.connection import MalformedFrame, parse_client_frame
from gateway.servicer import GatewayServicer, identity_var
from im.gateway.v1 import gateway_pb2
from imcommon.metrics import Metrics

log = logging.getLogger(__name__)

PATH = "/v1/connect"

#: gRPC status -> close code when the Connect handler ends with an error.
_CLOSE_FOR_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 4400,
    grpc.StatusCode.UNAUTHENTICATED: 4401,
    grpc.StatusCode.UNAVAILABLE: 1013,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 1009,
}
#: How long a closing socket may take to finish the closing handshake (or to
#: write what is left in its buffer before a failed connection's TCP close).
_CLOSE_TIMEOUT_S = 2.0
#: Above this many bytes in the transport's buffer, writes wait (pause_writing).
_WRITE_LIMIT = 64 * 1024
#: Above this many, the socket is not read until the buffer drains: only answers
#: that do not wait for room (refused unary calls, pings) can grow it this far, so
#: a peer that sends requests without reading the answers cannot grow it further.
_READ_PAUSE_BYTES = 1024 * 1024
#: The handler's inbox: reading pauses at this many frames, resumes at half.
_INBOX_MAX = 256


class WsAbort(Exception):
    """`context.abort()` on the socket: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _UnaryContext:
    """The part of grpc.aio.ServicerContext the unary servicer methods use."""

    __slots__ = ()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise WsAbort(code, details)

    def invocation_metadata(self) -> tuple[()]:
        return ()


_UNARY_CONTEXT = _UnaryContext()


def _unary_methods() -> dict[str, type[Any]]:
    """Request class of each unary method of service Gateway, by name."""
    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    return {
        m.name: message_factory.GetMessageClass(m.input_type)
        for m in service.methods
        if not m.client_streaming and not m.server_streaming
    }


class WsSettings:
    """What the WebSocket listener needs from the gateway's settings."""

    __slots__ = (
        "hello_timeout_s",
        "max_message_bytes",
        "max_unary_in_flight",
        "origins",
        "ping_interval_s",
        "ping_timeout_s",
    )

    def __init__(
        self,
        *,
        origins: list[str] | None,
        max_message_bytes: int,
        hello_timeout_s: float,
        ping_interval_s: float,
        ping_timeout_s: float,
        max_unary_in_flight: int,
    ) -> None:
        #: Allowed Origin header values (None: any origin, development only).
        #: Clients that send no Origin (not browsers) are always allowed.
        self.origins = origins
        self.max_message_bytes = max_message_bytes
        self.hello_timeout_s = hello_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.max_unary_in_flight = max_unary_in_flight


class WsGateway:
    """The WebSocket listener: accepts sockets, authenticates their Hello, and
    runs the gRPC servicer's Connect and unary methods over them."""

    def __init__(
        self,
        servicer: GatewayServicer,
        secret: str,
        settings: WsSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.servicer = servicer
        self.secret = secret
        self.settings = settings
        self.clock = clock
        self.methods = _unary_methods()
        self.sockets: set[WsSocket] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        origins: list[Origin | None] | None = None
        if settings.origins is not None:
            origins = [Origin(o) for o in settings.origins] + [None]
        self.origins = origins
        self.open_gauge = metrics.gauge("gateway_ws_connections", "Open WebSocket sockets")
        self.closes = metrics.counter(
            "gateway_ws_closes", "WebSocket sockets closed by the gateway, by close code", ["code"]
        )

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listens; returns the bound port (port 0: a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: WsSocket(self), host, port, ssl=tls, reuse_address=True
        )
        self._sweeper = loop.create_task(self._sweep(), name="ws-ping-sweep")
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("serving WebSocket", extra={"port": bound, "path": PATH})
        return bound

    async def stop(self) -> None:
        """Stops accepting. Open sockets got GoAway from the hub's shutdown before
        this (they are Connections like any other) and closed with 1001; any still
        open close with 1001 now, and those that never sent a Hello with 1013 (at
        Hello, the gateway is shutting down)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for sock in list(self.sockets):
            if sock.identity is None:
                sock.close(1013, "gateway shutting down; connect to another")
            else:
                sock.close(1001, "gateway shutting down")

    async def _sweep(self) -> None:
        """Pings sockets that were silent for a ping interval. Fails (1011) those
        silent for the ping timeout after that (a dead or stuck peer), and those
        whose writes made no progress for the ping timeout (a peer that stopped
        reading; it may still be sending)."""
        interval = self.settings.ping_interval_s
        timeout = self.settings.ping_timeout_s
        while True:
            await asyncio.sleep(min(interval, timeout) / 2)
            now = self.clock()
            for sock in list(self.sockets):
                stalled = sock.stalled_since
                if stalled is not None and now - stalled > timeout:
                    sock.close(1011, "not reading", fail=True)
                    continue
                silent = now - sock.last_heard
                if silent > interval + timeout:
                    sock.close(1011, "ping timeout", fail=True)
                elif silent > interval:
                    sock.ping()


class WsSocket(asyncio.Protocol):
    """One WebSocket connection: the framing, and the stream context its Connect
    handler reads from and writes to."""

    __slots__ = (
        "_closed",
        "_ctx",
        "_fragments",
        "_handler",
        "_hello_timer",
        "_inbox",
        "_inbox_full",
        "_last_kind",
        "_paused",
        "_reader",
        "_reading_paused",
        "_too_much_unread",
        "_unary",
        "gateway",
        "identity",
        "last_heard",
        "proto",
        "stalled_since",
        "transport",
    )

    def __init__(self, gateway: WsGateway) -> None:
        self.gateway = gateway
        self.proto = ServerProtocol(
            origins=gateway.origins, max_size=gateway.settings.max_message_bytes
        )
        self.transport: asyncio.Transport | None = None
        self.last_heard = gateway.clock()
        self.identity: Identity | None = None
        self._closed = False
        self._fragments: list[bytes] | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._handler: asyncio.Task[None] | None = None
        self._ctx: contextvars.Context | None = None
        # Created on demand: frames for the handler not read yet, the handler's
        # pending read, the writer waiting for the transport to drain, unary calls.
        self._inbox: deque[gateway_pb2.ClientFrame] | None = None
        self._reader: asyncio.Future[None] | None = None
        self._paused: asyncio.Future[None] | None = None
        self._unary: set[asyncio.Task[None]] | None = None
        #: The kind of the last control frame written (Kick, GoAway): the close code.
        self._last_kind = ""
        #: When writes last stopped for a full buffer (None: they are flowing).
        self.stalled_since: float | None = None
        # Why reading is paused: the handler is behind, or the peer has more than
        # _READ_PAUSE_BYTES unread; and whether the transport's reading is paused.
        self._inbox_full = False
        self._too_much_unread = False
        self._reading_paused = False

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses; same methods.)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_WRITE_LIMIT)
        self.gateway.sockets.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(
            self.gateway.settings.hello_timeout_s, self._no_hello
        )

    def data_received(self, data: bytes) -> None:
        self.last_heard = self.gateway.clock()
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Request):
                self._on_handshake(event)
            elif isinstance(event, Frame):
                self._on_frame(event)
        self._flush()

    def eof_received(self) -> bool:
        self.proto.receive_eof()
        self._flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.gateway.sockets.discard(self)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self.identity is not None:
            self.gateway.open_gauge.dec()
        self._wake_reader()
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._release_framing()

    def _release_framing(self) -> None:
        """Breaks the reference cycles websockets' protocol object sits in, so that
        reference counting frees it now. Its parser generator's frame holds the
        protocol, and after an unclean close (every dropped device) so does the
        traceback of `parser_exc` or `handshake_exc`. Left to the cyclic GC, the
        framing state (some 3 KiB and a dozen objects per socket) of dropped
        sockets waits for a full collection, which comes seldom while many objects
        live: 10,000 drops left about 2,000 sockets' worth uncollected and took 6-7
        pymalloc arenas more, still mapped once collected (docs/benchmarks.md,
        "Churn"). Nothing feeds the protocol once the connection is lost."""
        proto = self.proto
        proto.parser.close()
        proto.parser_exc = None
        proto.handshake_exc = None

    def pause_writing(self) -> None:
        if self._paused is None or self._paused.done():
            self._paused = asyncio.get_running_loop().create_future()
            self.stalled_since = self.gateway.clock()

    def resume_writing(self) -> None:
        self.stalled_since = None
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        if self._too_much_unread:
            self._too_much_unread = False
            self._update_reading()

    def _update_reading(self) -> None:
        """Reads unless the handler is behind or the peer leaves too much unread."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self._inbox_full or self._too_much_unread
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # -- the framing -------------------------------------------------------------

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data in self.proto.data_to_send():
            if data is SEND_EOF or data == SEND_EOF:
                # After what is buffered: a FIN (the peer may still answer), or
                # where there is no half-close (TLS) the whole close.
                self._close_soon()
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
                return
            transport.write(data)
        if self.proto.close_expected():
            self._close_soon()
        paused = self._paused
        if (
            paused is not None
            and not paused.done()
            and not self._too_much_unread
            and transport.get_write_buffer_size() > _READ_PAUSE_BYTES
        ):
            self._too_much_unread = True
            self._update_reading()

    def _close_soon(self) -> None:
        """Drops the connection if it is still open after _CLOSE_TIMEOUT_S (a peer
        that neither reads the rest nor closes)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            asyncio.get_running_loop().call_later(_CLOSE_TIMEOUT_S, transport.abort)

    def _on_handshake(self, request: Request) -> None:
        path = request.path.split("?", 1)[0]
        if path != PATH:
            response = self.proto.reject(404, f"WebSocket endpoint is {PATH}\n")
        elif self.gateway.closing:
            response = self.proto.reject(503, "gateway is shutting down; connect to another\n")
        else:
            # Origin (a browser's page) is checked here against the allowed list.
            response = self.proto.accept(request)
        self.proto.send_response(response)

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.PING, Opcode.PONG, Opcode.CLOSE):
            return  # answered by websockets itself
        if frame.opcode is Opcode.TEXT or (frame.opcode is Opcode.CONT and self._fragments is None):
            self.close(1003, "binary messages only: one im.gateway.v1.ClientFrame each")
            return
        if not frame.fin:
            if self._fragments is None:
                self._fragments = []
            self._fragments.append(bytes(frame.data))
            return
        if self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            data = b"".join(self._fragments)
            self._fragments = None
        else:
            data = bytes(frame.data)
        self._on_message(data)

    def _on_message(self, data: bytes) -> None:
        if self._closed:
            return
        parsed = parse_client_frame(data)
        if isinstance(parsed, MalformedFrame):
            self.close(1007, f"not an im.gateway.v1.ClientFrame: {parsed.error}"[:120])
            return
        kind = parsed.WhichOneof("frame")
        if self.identity is None:
            if kind != "hello":
                self.close(4401, "the first message must be ClientFrame.hello with the token")
            else:
                self._on_hello(parsed.hello.token)
            return
        if kind == "hello":
            self.close(1007, "Hello is only the first message")
        elif kind == "request":
            self._on_request(parsed.request)
        else:
            if self._inbox is None:
                self._inbox = deque()
            self._inbox.append(parsed)
            if len(self._inbox) >= _INBOX_MAX and not self._inbox_full:
                # The handler is behind (a send waits for room): stop reading
                # until it catches up, as a gRPC stream's flow control would.
                self._inbox_full = True
                self._update_reading()
            self._wake_reader()

    def _on_hello(self, token: str) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        try:
            identity = verify_token(self.gateway.secret, token, time.time())
        except TokenError as exc:
            self.close(4401, str(exc)[:120])
            return
        self.identity = identity
        self.gateway.open_gauge.inc()
        ctx = contextvars.copy_context()
        ctx.run(identity_var.set, identity)
        self._ctx = ctx
        self._handler = asyncio.get_running_loop().create_task(
            self._serve(), name=f"ws-connect-{identity.user_id}", context=ctx
        )

    def _no_hello(self) -> None:
        self._hello_timer = None
        if self.identity is None:
            self.close(4401, f"no Hello within {self.gateway.settings.hello_timeout_s:g} s")

    def ping(self) -> None:
        if self.proto.state is State.OPEN:
            self.proto.send_ping(b"")
            self._flush()

    def close(self, code: int, reason: str, fail: bool = False) -> None:
        """Starts the closing handshake with `code`: the peer answers with its close
        frame, then the TCP connection closes (dropped after _CLOSE_TIMEOUT_S if it
        does not). `fail`: fails the connection instead (RFC 6455 7.1.7), for a
        peer that is not expected to answer (ping timeout, not reading): the close
        frame, then the TCP close without waiting for an answer, so a peer that
        reads it learns the code. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.gateway.closes.labels(str(code)).inc()
        self._wake_reader()
        if self.proto.state is not State.OPEN:
            if self.transport is not None:
                self.transport.abort()
            return
        if fail:
            self.proto.fail(code, reason)
        else:
            self.proto.send_close(code, reason)
        self._flush()

    # -- the stream context of the Connect handler ------------------------------

    async def _serve(self) -> None:
        """Runs the servicer's Connect with this socket as its context."""
        code, reason = 1000, ""
        try:
            await self.gateway.servicer.Connect(None, self)
            last = self._last_kind
            if last == "kick":
                code, reason = 4001, "kicked: another connection of this device"
            elif last == "go_away":
                code, reason = 1001, "gateway shutting down"
        except WsAbort as exc:
            code, reason = _CLOSE_FOR_STATUS.get(exc.code, 1011), exc.details
        except asyncio.CancelledError:
            code, reason = 1011, "cancelled"
            raise
        except Exception:
            log.exception("WebSocket stream failed")
            code, reason = 1011, "internal error"
        finally:
            self.close(code, reason[:120])

    async def read(self) -> Any:
        """The next ClientFrame for the handler; grpc.aio.EOF once the socket is
        closing or gone."""
        while True:
            inbox = self._inbox
            if inbox:
                frame = inbox.popleft()
                if self._inbox_full and len(inbox) <= _INBOX_MAX // 2:
                    self._inbox_full = False
                    self._update_reading()
                return frame
            if self._closed:
                return grpc.aio.EOF
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    async def _writable(self) -> None:
        """Returns once the transport's buffer is below _WRITE_LIMIT, or the
        connection is gone."""
        paused = self._paused
        if paused is not None and not paused.done():
            await paused

    async def write(self, message: gateway_pb2.ServerFrame) -> None:
        """Sends one ServerFrame; waits while the transport's buffer is full (a
        slow reader); raises once the socket is closing."""
        await self._writable()
        if self._closed or self.proto.state is not State.OPEN:
            raise ConnectionError("WebSocket is closed")
        kind = message.WhichOneof("frame")
        if kind in ("kick", "go_away"):
            self._last_kind = kind
        self.proto.send_binary(message.SerializeToString())
        self._flush()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise WsAbort(code, details)

    def invocation_metadata(self) -> tuple[()]:
        return ()

    # -- unary calls on the socket ----------------------------------------------

    def _on_request(self, request: gateway_pb2.UnaryRequest) -> None:
        """Checks the call at once (method, payload, calls in flight); only a
        valid call gets a task, for as long as it runs."""
        cls = self.gateway.methods.get(request.method)
        if cls is None:
            self._respond(
                request.id,
                grpc.StatusCode.UNIMPLEMENTED,
                f"no unary method {request.method!r}; one of {sorted(self.gateway.methods)}",
            )
            return
        message = cls()
        try:
            message.ParseFromString(request.payload)
        except DecodeError as exc:
            self._respond(
                request.id,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"payload is not a {cls.DESCRIPTOR.full_name} ({exc or 'undecodable'})",
            )
            return
        running = self._unary
        if running is not None and len(running) >= self.gateway.settings.max_unary_in_flight:
            self._respond(
                request.id,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self.gateway.settings.max_unary_in_flight} calls in flight "
                "on this socket; wait for answers",
            )
            return
        if running is None:
            running = self._unary = set()
        task = asyncio.get_running_loop().create_task(
            self._call(request.id, request.method, message), context=self._ctx
        )
        running.add(task)
        task.add_done_callback(running.discard)

    async def _call(self, call_id: int, method: str, message: Any) -> None:
        """Runs one unary call; its answer waits for room like the stream's frames
        (and keeps the call counted in flight meanwhile), so a peer that does not
        read cannot pile answers up in the transport's buffer."""
        try:
            result = await getattr(self.gateway.servicer, method)(message, _UNARY_CONTEXT)
            response = gateway_pb2.UnaryResponse(id=call_id, payload=result.SerializeToString())
        except WsAbort as exc:
            response = _refusal(call_id, exc.code, exc.details)
        except Exception:
            log.exception("WebSocket unary call failed", extra={"method": method})
            response = _refusal(call_id, grpc.StatusCode.INTERNAL, "internal error in the gateway")
        await self._writable()
        self._send_response(response)

    def _respond(self, call_id: int, code: grpc.StatusCode, message: str) -> None:
        self._send_response(_refusal(call_id, code, message))

    def _send_response(self, response: gateway_pb2.UnaryResponse) -> None:
        if self._closed or self.proto.state is not State.OPEN:
            return
        self.proto.send_binary(gateway_pb2.ServerFrame(response=response).SerializeToString())
        self._flush()


def _refusal(call_id: int, code: grpc.StatusCode, message: str) -> gateway_pb2.UnaryResponse:
    return gateway_pb2.UnaryResponse(id=call_id, code=code.value[0], message=message)
