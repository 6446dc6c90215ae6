"""Publishing MessageCommitted triggers to JetStream (the fast path to pusher).

Best effort by design: PostgreSQL holds the truth (the outbox row, the pending
fan-out mark), so a failed publish only delays delivery. `publish()` therefore
returns False instead of raising, and never waits longer than its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from im.logic.v1 import logic_pb2
from imcommon.jetstream import ensure_stream, stream_config, subject_for
from logic.telemetry import Telemetry

log = logging.getLogger(__name__)

NATS_MSG_ID = "Nats-Msg-Id"


class TriggerPublisher:
    """One NATS connection, (re)established in the background.

    logic starts and serves while NATS is down; the connection is retried until it
    succeeds, after which nats-py reconnects by itself. The stream is (re)created
    on connect and whenever a publish finds no stream (a nats-server whose store
    was wiped comes back without it).
    """

    def __init__(
        self,
        url: str,
        stream: str,
        subject_prefix: str,
        *,
        replicas: int = 1,
        timeout_s: float = 1.0,
        retry_s: float = 1.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._servers = [u.strip() for u in url.split(",") if u.strip()]
        self._stream = stream
        self._prefix = subject_prefix
        self._config = stream_config(stream, subject_prefix, replicas=replicas)
        self._timeout = timeout_s
        self._retry = retry_s
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._ensure_lock = asyncio.Lock()
        self._closed = False
        self._tel = telemetry or Telemetry()

    async def __aenter__(self) -> TriggerPublisher:
        self._task = asyncio.create_task(self._connect_loop(), name="logic-nats-connect")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops connecting and closes the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    @property
    def connected(self) -> bool:
        return self._js is not None and self._nc is not None and self._nc.is_connected

    def subject(self, conversation_id: str) -> str:
        return subject_for(self._prefix, conversation_id)

    async def publish(
        self, trigger: logic_pb2.MessageCommitted, msg_id: str, source: str = "send"
    ) -> bool:
        """Publishes one trigger with header Nats-Msg-Id = msg_id (JetStream drops a
        repeat within its duplicate window) and the current trace context (W3C
        traceparent), so the pusher's consume span continues this trace. True once
        JetStream has stored it. `source` (send, relay, repair) labels the metric."""
        subject = self.subject(trigger.conversation_id)
        with self._tel.tracer.start_as_current_span(
            "jetstream.publish",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "send",
                "messaging.destination.name": subject,
                "messaging.message.id": msg_id,
                "im.msg_id": trigger.msg_id,
                "im.conversation_id": trigger.conversation_id,
                "im.conv_seq": trigger.conv_seq,
                "im.publish_source": source,
            },
        ) as span:
            ok = await self._publish(trigger, subject, msg_id)
            self._tel.publishes.labels(source, "ok" if ok else "failed").inc()
            if not ok:
                span.set_status(Status(StatusCode.ERROR, "not published; the outbox relay retries"))
            return ok

    async def _publish(
        self, trigger: logic_pb2.MessageCommitted, subject: str, msg_id: str
    ) -> bool:
        js = self._js
        if js is None or not self.connected:
            return False
        payload = trigger.SerializeToString()
        headers = {NATS_MSG_ID: msg_id}
        propagate.inject(headers)
        for attempt in range(2):
            try:
                await js.publish(
                    subject,
                    payload,
                    timeout=self._timeout,
                    stream=self._stream,
                    headers=headers,
                )
                return True
            except NoStreamResponseError:
                if attempt == 0 and await self._ensure_stream():
                    continue
                return False
            except Exception as exc:
                log.info(
                    "trigger not published",
                    extra={
                        "conversation_id": trigger.conversation_id,
                        "msg_id": trigger.msg_id,
                        "error": repr(exc),
                    },
                )
                return False
        return False

    async def _ensure_stream(self) -> bool:
        js = self._js
        if js is None:
            return False
        async with self._ensure_lock:
            try:
                await ensure_stream(js, self._config)
                return True
            except Exception as exc:
                log.warning("cannot create the JetStream stream", extra={"error": repr(exc)})
                return False

    async def _connect_loop(self) -> None:
        while not self._closed:
            try:
                nc = await nats.connect(
                    servers=self._servers,
                    name="logic",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
            except Exception as exc:
                log.warning("cannot connect to NATS; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(self._retry)
                continue
            self._nc = nc
            self._js = nc.jetstream(timeout=self._timeout)
            await self._ensure_stream()
            log.info("connected to NATS", extra={"stream": self._stream})
            return

    async def _on_error(self, exc: Any) -> None:
        log.debug("NATS error", extra={"error": repr(exc)})

    async def _on_disconnected(self) -> None:
        log.warning("disconnected from NATS")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")
        await self._ensure_stream()
