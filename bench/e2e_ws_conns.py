"""WebSocket device holder processes for bench/e2e_ws.py: thousands of raw
WebSocket devices per process, idle or opened and dropped.

The WebSocket sibling of bench/e2e_conns.py. Each device is its own TCP
connection to the gateway's WebSocket listener with the handshake, the
`ClientFrame{hello{token}}` and the Welcome read; then it idles and only answers
the gateway's pings (a device that did not would be closed with 1011 after the
ping timeout). The client side is websockets' sans-I/O `ClientProtocol` on a
plain asyncio.Protocol: no task and no stream reader per socket, so one process
holds thousands at a few KB each and the gateway is what gets measured.

`churn` opens devices and drops them without a closing handshake (the transport
aborted: what a phone losing its network looks like to the gateway), paced at a
rate over the tokens given, in four kinds by position (i % 4): dropped after the
TCP connect, after the WebSocket handshake (no Hello), and after the Welcome
(two of four: the full path, a Connection and a route created and removed).

Commands over the pipe (one reply each): `open` {tokens, concurrency} -> {opened,
failed, errors, open_s, close_codes}; `check` -> {alive, held, close_codes};
`churn` {tokens, rate, concurrency, start_at} -> {churned, by_kind, failed,
errors, started_at, ended_at}; `close` -> {closed}.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import SEND_EOF, State
from websockets.uri import parse_uri

from im.gateway.v1 import gateway_pb2

log = logging.getLogger("bench.e2e.ws_conns")

#: How far a churned device gets before it is dropped, by i % 4.
CHURN_KINDS = ("tcp", "handshake", "welcome", "welcome")


class WsDevice(asyncio.Protocol):
    """One raw WebSocket device: handshake, Hello, Welcome; then pongs only.

    `ready` resolves when the device got as far as `until` ("tcp", "handshake"
    or "welcome"), or fails with the reason it did not."""

    __slots__ = ("close_code", "holder", "proto", "ready", "token", "transport", "until")

    def __init__(self, holder: WsHolder, token: str, until: str = "welcome") -> None:
        self.holder = holder
        self.token = token
        self.until = until
        self.proto = ClientProtocol(parse_uri(holder.url), max_size=1 << 20)
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.until == "tcp":
            self._done()
            return
        self.proto.send_request(self.proto.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Response):
                if event.status_code != 101 or self.proto.state is not State.OPEN:
                    self._fail(f"handshake: HTTP {event.status_code}")
                elif self.until == "handshake":
                    self._done()
                else:
                    hello = gateway_pb2.ClientFrame(hello=gateway_pb2.Hello(token=self.token))
                    self.proto.send_binary(hello.SerializeToString())
            elif isinstance(event, Frame):
                self._on_frame(event)
        self._flush()

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            close = Close.parse(frame.data) if frame.data else Close(CloseCode.NO_STATUS_RCVD, "")
            self.close_code = close.code
            self._fail(f"closed by the gateway: {close.code} {close.reason}")
        elif frame.opcode is Opcode.BINARY and not self.ready.done():
            first = gateway_pb2.ServerFrame.FromString(bytes(frame.data))
            if first.WhichOneof("frame") == "welcome":
                self._done()
            else:
                self._fail(f"first frame was {first.WhichOneof('frame')}, not a Welcome")
        # Anything else after the Welcome (pushes, heads) is ignored: idle devices.

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data in self.proto.data_to_send():
            if data is SEND_EOF or data == SEND_EOF:
                transport.close()
                return
            transport.write(data)

    def _done(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))

    def connection_lost(self, exc: Exception | None) -> None:
        self.holder.lost(self)
        self._fail(f"connection lost: {exc or 'EOF'}")

    def drop(self) -> None:
        """Gone without a closing handshake (no close frame, no FIN wait)."""
        if self.transport is not None:
            self.transport.abort()


class WsHolder:
    def __init__(self, url: str) -> None:
        self.url = url
        uri = parse_uri(url)
        self.host, self.port = uri.host, uri.port
        self.devices: set[WsDevice] = set()
        #: Close codes the gateway sent to held devices (not to churned ones).
        self.close_codes: Counter[int] = Counter()

    def lost(self, device: WsDevice) -> None:
        if device in self.devices:
            self.devices.discard(device)
            self.close_codes[device.close_code or 1006] += 1

    async def _connect(self, token: str, until: str, timeout: float) -> WsDevice:
        loop = asyncio.get_running_loop()
        device = WsDevice(self, token, until)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: device, self.host, self.port), timeout
            )
            await asyncio.wait_for(asyncio.shield(device.ready), timeout)
        except BaseException:
            device.drop()
            if not device.ready.done():
                device.ready.cancel()
            elif not device.ready.cancelled():
                device.ready.exception()  # retrieved: no "never retrieved" warning
            raise
        return device

    async def open(self, args: dict[str, Any]) -> dict[str, Any]:
        sem = asyncio.Semaphore(int(args["concurrency"]))
        errors: list[str] = []
        t0 = time.monotonic()

        async def one(token: str) -> None:
            async with sem:
                try:
                    device = await self._connect(token, "welcome", 60.0)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                self.devices.add(device)

        await asyncio.gather(*(one(t) for t in args["tokens"]))
        return {
            "opened": len(self.devices),
            "failed": len(errors),
            "errors": errors[:5],
            "open_s": time.monotonic() - t0,
            "close_codes": dict(self.close_codes),
        }

    async def churn(self, args: dict[str, Any]) -> dict[str, Any]:
        """Opens a device per token at `rate`/s from `start_at` (at most
        `concurrency` at once), each dropped as soon as it got as far as its kind."""
        tokens: list[str] = args["tokens"]
        rate = float(args["rate"])
        sem = asyncio.Semaphore(int(args["concurrency"]))
        start = float(args["start_at"])
        offset = int(args.get("offset", 0))
        by_kind: Counter[str] = Counter()
        errors: list[str] = []
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        t0 = time.monotonic()

        async def one(i: int, token: str) -> None:
            kind = CHURN_KINDS[(offset + i) % len(CHURN_KINDS)]
            try:
                device = await self._connect(token, kind, 30.0)
            except Exception as exc:
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                return
            finally:
                sem.release()
            device.drop()
            by_kind[kind] += 1

        tasks = []
        for i, token in enumerate(tokens):
            due = t0 + i / rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            await sem.acquire()
            tasks.append(loop.create_task(one(i, token)))
        await asyncio.gather(*tasks)
        return {
            "churned": sum(by_kind.values()),
            "by_kind": dict(by_kind),
            "failed": len(errors),
            "errors": errors[:5],
            "started_at": t0,
            "ended_at": time.monotonic(),
        }

    async def close(self) -> int:
        devices, self.devices = list(self.devices), set()
        for device in devices:
            device.drop()
        await asyncio.sleep(0.1)  # let connection_lost run
        return len(devices)


async def _serve(conn: Connection, url: str) -> None:
    holder = WsHolder(url)
    loop = asyncio.get_running_loop()
    while True:
        command, args = await loop.run_in_executor(None, conn.recv)
        try:
            if command == "open":
                reply = await holder.open(args)
            elif command == "churn":
                reply = await holder.churn(args)
            elif command == "check":
                reply = {
                    "alive": len(holder.devices),
                    "held": len(holder.devices),
                    "close_codes": dict(holder.close_codes),
                }
            elif command == "close":
                conn.send({"closed": await holder.close()})
                return
            else:
                reply = {"error": f"unknown command {command}"}
        except Exception as exc:
            log.exception("WebSocket holder: %s failed", command)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send(reply)


def ws_conns_main(conn: Connection, url: str, name: str) -> None:
    """Process entry point. Raises its own file-descriptor limit to the hard one:
    every device is a socket."""
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(_serve(conn, url))
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(_serve(conn, url))
