"""Raw-frame clients for the gateway tests: no SDK, every frame explicit.

A RawStream reads its server frames in a background task into a queue, so a test
waits for a frame (or the end of the stream) with a deadline instead of sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from gateway.auth import mint_token
from im.common.v1 import common_pb2
from im.gateway.v1 import (
    gateway_internal_pb2,
    gateway_internal_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)

SECRET = "test-secret-0123456789abcdef0123456789"
ROOT = Path(__file__).resolve().parents[2]
LOGIC_READY = (ROOT / "services" / "logic" / "server.py").exists() and (
    ROOT / "services" / "seqsvc" / "server.py"
).exists()
NEEDS_LOGIC = "services/logic/server.py does not exist yet (logic is being built in parallel)"

Frame = gateway_pb2.ServerFrame


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def token_for(user: str, device: str = "d1", ttl_s: int = 600, secret: str = SECRET) -> str:
    return mint_token(secret, user, device, ttl_s)


def expired_token(user: str, device: str = "d1", secret: str = SECRET) -> str:
    """A correctly signed token whose expiry has passed (mint_token cannot make one)."""
    payload = json.dumps({"sub": user, "dev": device, "exp": int(time.time()) - 10}).encode()
    head = "v1." + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    sig = hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest()
    return head + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def send_frame(
    client_id: int, conversation: str, body: bytes = b"hello", client_msg_id: str | None = None
) -> gateway_pb2.ClientFrame:
    return gateway_pb2.ClientFrame(
        send=gateway_pb2.Send(
            client_id=client_id,
            client_msg_id=client_msg_id or uuid.uuid4().hex,
            conversation_id=conversation,
            body=body,
            content_type=common_pb2.CONTENT_TYPE_TEXT,
        )
    )


def ack_frame(seq: int) -> gateway_pb2.ClientFrame:
    return gateway_pb2.ClientFrame(deliver_ack=gateway_pb2.DeliverAck(seq=seq))


def ping_frame(nonce: int) -> gateway_pb2.ClientFrame:
    return gateway_pb2.ClientFrame(ping=gateway_pb2.Ping(nonce=nonce))


class StreamEnded(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class RawStream:
    """One Connect stream. `frames` collects everything the server sent."""

    def __init__(self, address: str, token: str | None, read: bool = True) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        metadata = bearer(token) if token is not None else None
        self.call = self.stub.Connect(metadata=metadata)
        self.queue: asyncio.Queue[Frame | StreamEnded] = asyncio.Queue()
        self.frames: list[Frame] = []
        self.ended: StreamEnded | None = None
        self._reader: asyncio.Task[None] | None = None
        if read:
            self.start_reading()

    def start_reading(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                self.frames.append(frame)
                self.queue.put_nowait(frame)
        except grpc.aio.AioRpcError:
            pass
        code = await self.call.code()
        details = await self.call.details()
        self.ended = StreamEnded(code, details or "")
        self.queue.put_nowait(self.ended)

    async def write(self, frame: gateway_pb2.ClientFrame) -> None:
        await self.call.write(frame)

    async def next(self, timeout: float = 10.0) -> Frame:
        """The next server frame; raises StreamEnded if the stream ended instead."""
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, StreamEnded):
            self.queue.put_nowait(item)
            raise item
        return item

    async def next_of(self, kind: str, timeout: float = 10.0) -> Any:
        """The next frame of one kind (e.g. "send_ack"), skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.next(max(0.01, deadline - time.monotonic()))
            if frame.WhichOneof("frame") == kind:
                return getattr(frame, kind)

    async def welcome(self, timeout: float = 10.0) -> gateway_pb2.Welcome:
        frame = await self.next(timeout)
        assert frame.WhichOneof("frame") == "welcome", frame
        return frame.welcome

    async def end(self, timeout: float = 10.0) -> StreamEnded:
        """Waits until the stream ended (skipping frames); returns its status."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.next(max(0.01, deadline - time.monotonic()))
            except StreamEnded as ended:
                return ended

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()


async def deliver(
    address: str, deliveries: list[tuple[str, str, int, bytes]], ack_to: str = ""
) -> list[int]:
    """Calls GatewayInternal.Deliver like a pusher would; returns the statuses."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_internal_pb2_grpc.GatewayInternalStub(channel)
        resp = await stub.Deliver(
            gateway_internal_pb2.DeliverRequest(
                deliveries=[
                    gateway_internal_pb2.Delivery(
                        user_id=u,
                        device_id=d,
                        seq=seq,
                        message=common_pb2.Message(msg_id=seq, body=body, conversation_id="d:x:y"),
                    )
                    for u, d, seq, body in deliveries
                ],
                ack_to=ack_to,
            ),
            timeout=10,
        )
        return list(resp.statuses)


async def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Polls `condition` (sync or async) until truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(interval)


def scrape(port: int) -> dict[str, float]:
    """Prometheus text from a metrics port, as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric(port: int, name: str, **labels: str) -> float:
    """Sum of one metric's samples whose labels include `labels`."""
    total = 0.0
    for key, value in scrape(port).items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def unique_users(n: int) -> list[str]:
    """n fresh user ids, in ascending order (so d:<a>:<b> is users[0], users[1])."""
    tag = uuid.uuid4().hex[:8]
    return [f"{chr(ord('a') + i)}{tag}" for i in range(n)]


def direct(a: str, b: str) -> str:
    return f"d:{min(a, b)}:{max(a, b)}"


#: Pusher settings of the delivery stacks: quick retransmits so tests are short.
PUSHER_ENV = {
    "IM_PUSHER_RETRANSMIT_SCHEDULE_MS": "400",
    "IM_PUSHER_MAX_ATTEMPTS": "4",
    "IM_PUSHER_WHEEL_TICK_MS": "20",
    "IM_PUSHER_REDELIVERY_BACKOFF_S": "0.2,0.5",
}


def start_stack(gateways: int = 2, gateway_env: dict[str, str] | None = None) -> Any:
    """The whole system (imdev.stack.Stack) with the test token secret, quick
    retransmits, and the pusher's metrics on `stack.pusher_metrics_port`."""
    import shutil
    import tempfile

    from imdev.servers import free_port
    from imdev.stack import Stack

    workdir = Path(tempfile.mkdtemp(prefix="imgw-"))
    workdir.chmod(0o755)
    metrics_port = free_port()
    stack = Stack(
        workdir,
        gateways=gateways,
        token_secret=SECRET,
        env={
            "pusher": {**PUSHER_ENV, "IM_PUSHER_METRICS_PORT": str(metrics_port)},
            "gateway": dict(gateway_env or {}),
        },
    )
    stack.pusher_metrics_port = metrics_port  # type: ignore[attr-defined]
    stack.cleanup = lambda: shutil.rmtree(workdir, ignore_errors=True)  # type: ignore[attr-defined]
    try:
        stack.start()
    except BaseException:
        stack.kill()
        raise
    return stack
