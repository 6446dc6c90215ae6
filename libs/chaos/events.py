"""The workload's conversation events (READ, RECALL) and the unary answers the
checker reads (Sync and History with kind, target_conv_seq and recalled;
ListConversations with read_conv_seq and unread_count), on the raw protocol:
the judge's own view of the wire, independent of the SDK under test. (Written
before the SDK had kinds; sending the events through the SDK devices' own send
path, `Client.mark_read`/`recall`, would also put them under the client faults:
a follow-up.)

`RawGateway` is one user's: generated stubs, plaintext (like the observers),
failing over round the gateway addresses. Events go on a short stream of the
user's device `ev` of their own (a device the checker does not judge): one
Send at a time, client_id 1 on a fresh stream each attempt, retransmitted with
the same client_msg_id after any failure until the deadline, so the server's
dedup turns every retransmit into the original ACK. A stream only lives for one
send, so `ev` adds no pushes to the run beyond those few moments (pushes that
arrive then are ignored: it is nobody's device).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from chaos import checker
from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc

#: The device id the workload's events are sent from.
EVENT_DEVICE = "ev"

#: Codes worth another attempt (the stack is being broken on purpose).
RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class SendRefused(Exception):
    """A SendError that retrying will not change."""

    def __init__(self, error: gateway_pb2.SendError) -> None:
        self.code = gateway_pb2.SendErrorCode.Name(error.code).removeprefix("SEND_ERROR_CODE_")
        super().__init__(f"{self.code}: {error.reason}")
        self.error = error


class _Retry(Exception):
    pass


def delivered(m: common_pb2.Message, seq: int = 0) -> checker.Delivered:
    """A protocol Message as the checker records it (kind and state included)."""
    return checker.Delivered(
        m.msg_id,
        m.conversation_id,
        m.sender_id,
        m.client_msg_id,
        m.conv_seq,
        seq,
        bytes(m.body),
        int(m.kind),
        m.target_conv_seq,
        m.recalled,
    )


class RawGateway:
    """One user's raw calls; `close()` is idempotent."""

    def __init__(
        self,
        user_id: str,
        addresses: Sequence[str],
        token: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.user_id = user_id
        self.addresses = list(addresses)
        self.token = token
        self.clock = clock
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._index = 0
        self._sending = asyncio.Lock()  # one stream of device `ev` at a time
        self.attempts = 0

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close(grace=None)

    def _stub(self) -> tuple[str, gateway_pb2_grpc.GatewayStub]:
        address = self.addresses[self._index % len(self.addresses)]
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return address, gateway_pb2_grpc.GatewayStub(channel)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token()}"),)

    # -- unary ---------------------------------------------------------------------

    async def unary(self, method: str, request: Any, timeout_s: float = 30.0) -> Any:
        """`Gateway.<method>`, retried on the next gateway on a transient failure
        until `timeout_s` has passed (then the last error is raised)."""
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while True:
            _, stub = self._stub()
            try:
                return await getattr(stub, method)(request, metadata=self._metadata(), timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRY_CODES or time.monotonic() > deadline:
                    raise
            self._index += 1
            await asyncio.sleep(delay)  # backoff while the stack is broken
            delay = min(2.0, delay * 2)

    async def list_conversations(self) -> dict[str, checker.Position]:
        """Every page of ListConversations: conversation -> read position, unread."""
        out: dict[str, checker.Position] = {}
        token = ""
        while True:
            resp = await self.unary(
                "ListConversations",
                gateway_pb2.ListConversationsRequest(page_size=500, page_token=token),
            )
            for c in resp.conversations:
                out[c.conversation_id] = checker.Position(c.read_conv_seq, c.unread_count)
            token = resp.next_page_token
            if not token:
                return out

    async def conversations(self, final: bool = False) -> checker.ConversationsAnswer:
        requested = self.clock()
        positions = await self.list_conversations()
        return checker.ConversationsAnswer(self.user_id, requested, self.clock(), positions, final)

    async def sync_all(self) -> list[checker.Delivered]:
        """The user's whole timeline (Sync from 0, every page)."""
        out: list[checker.Delivered] = []
        after = 0
        while True:
            resp = await self.unary("Sync", gateway_pb2.SyncRequest(after_seq=after, limit=500))
            out += [delivered(e.message, e.seq) for e in resp.entries]
            if not resp.has_more or not resp.entries:
                return out
            after = resp.entries[-1].seq

    async def history(
        self, conversation_id: str, before_conv_seq: int, limit: int
    ) -> list[checker.Delivered]:
        resp = await self.unary(
            "History",
            gateway_pb2.HistoryRequest(
                conversation_id=conversation_id, before_conv_seq=before_conv_seq, limit=limit
            ),
        )
        return [delivered(m) for m in resp.messages]

    # -- events on the stream --------------------------------------------------------

    async def send_event(
        self,
        conversation_id: str,
        kind: int,
        target_conv_seq: int,
        client_msg_id: str,
        timeout_s: float,
    ) -> gateway_pb2.SendAck:
        """Sends one event until it is ACKed. Raises SendRefused for a final
        SendError, TimeoutError when `timeout_s` passes first (then it may or
        may not be stored)."""
        send = gateway_pb2.Send(
            client_id=1,
            client_msg_id=client_msg_id,
            conversation_id=conversation_id,
            kind=kind,  # type: ignore[arg-type]
            target_conv_seq=target_conv_seq,
        )
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        async with self._sending:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no SendAck for {client_msg_id} in {timeout_s:g}s")
                self.attempts += 1
                try:
                    return await asyncio.wait_for(self._send_once(send), min(5.0, left))
                except (grpc.aio.AioRpcError, ConnectionError, TimeoutError, _Retry):
                    self._index += 1
                await asyncio.sleep(delay)  # backoff while the stack is broken
                delay = min(2.0, delay * 2)

    async def _send_once(self, send: gateway_pb2.Send) -> gateway_pb2.SendAck:
        _, stub = self._stub()
        call = stub.Connect(metadata=self._metadata())
        try:
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("frame") != "welcome":
                raise ConnectionError("no Welcome")
            await call.write(gateway_pb2.ClientFrame(send=send))
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    raise ConnectionError("stream ended before the SendAck")
                kind = frame.WhichOneof("frame")
                if kind == "send_ack" and frame.send_ack.client_msg_id == send.client_msg_id:
                    ack: gateway_pb2.SendAck = frame.send_ack
                    return ack
                if kind == "send_error" and frame.send_error.client_msg_id == send.client_msg_id:
                    if frame.send_error.retryable:
                        raise _Retry()
                    raise SendRefused(frame.send_error)
                if kind in ("kick", "go_away"):
                    raise ConnectionError(kind)
        finally:
            with contextlib.suppress(Exception):
                call.cancel()
