"""Helpers for the logic tests: a thin async client, a stand-in for the pusher's
fan-out loop (a real JetStream pull consumer that calls Fanout), and waiting on
conditions with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import nats
import psycopg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from im.common.v1 import common_pb2
from im.logic.v1 import logic_pb2 as pb
from im.logic.v1 import logic_pb2_grpc as pb_grpc
from imcommon.jetstream import ensure_stream, stream_config

TEXT = common_pb2.CONTENT_TYPE_TEXT


async def wait_for(
    cond: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.05)


class LogicClient:
    """grpc.aio stub of one logic process, plus shortcuts."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.LogicStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def send(
        self,
        sender: str,
        conversation: str,
        body: bytes = b"hello",
        client_msg_id: str | None = None,
        device: str = "d1",
        timeout: float = 10.0,
    ) -> pb.SendMessageResponse:
        return await self.stub.SendMessage(
            pb.SendMessageRequest(
                sender_id=sender,
                sender_device_id=device,
                client_msg_id=client_msg_id or uuid.uuid4().hex,
                conversation_id=conversation,
                content_type=TEXT,
                body=body,
            ),
            timeout=timeout,
        )

    async def timeline(self, user: str, page: int = 0) -> list[tuple[int, common_pb2.Message]]:
        """The user's whole timeline, paging with has_more."""
        out: list[tuple[int, common_pb2.Message]] = []
        after = 0
        while True:
            resp = await self.stub.SyncMessages(
                pb.SyncMessagesRequest(user_id=user, after_seq=after, limit=page), timeout=10
            )
            out.extend((e.seq, e.message) for e in resp.entries)
            if resp.entries:
                after = resp.entries[-1].seq
            if not resp.has_more:
                return out

    async def fanout_all(self, conversation: str) -> list[pb.FanoutDelivery]:
        deliveries: list[pb.FanoutDelivery] = []
        while True:
            resp = await self.stub.Fanout(
                pb.FanoutRequest(conversation_id=conversation), timeout=30
            )
            deliveries.extend(resp.deliveries)
            if not resp.has_more:
                return deliveries


class FanoutDriver:
    """What the pusher does with the stream, minus the push: a durable pull consumer
    that calls Fanout for every trigger until has_more is false, then acks. Records
    every delivery and every trigger it saw."""

    def __init__(
        self, nats_url: str, stream: str, subject_prefix: str, logic_addresses: list[str]
    ) -> None:
        self.nats_url = nats_url
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.clients = [LogicClient(a) for a in logic_addresses]
        self.deliveries: list[pb.FanoutDelivery] = []
        self.triggers: list[tuple[pb.MessageCommitted, dict[str, str]]] = []
        self.errors: list[BaseException] = []
        self._task: asyncio.Task[None] | None = None
        self._nc: Any = None

    async def __aenter__(self) -> FanoutDriver:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        for c in self.clients:
            await c.close()

    async def _run(self) -> None:
        turn = 0
        while True:
            try:
                self._nc = nc = await nats.connect(
                    self.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2
                )
                js = nc.jetstream()
                await ensure_stream(js, stream_config(self.stream, self.subject_prefix))
                sub = await js.pull_subscribe(
                    f"{self.subject_prefix}.>",
                    durable="test-driver",
                    stream=self.stream,
                    config=ConsumerConfig(
                        ack_policy=AckPolicy.EXPLICIT,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_wait=10,
                    ),
                )
                while True:
                    try:
                        msgs = await sub.fetch(50, timeout=0.5)
                    except (TimeoutError, nats.errors.TimeoutError):
                        continue
                    # One Fanout loop per conversation of the batch, concurrently (a
                    # trigger only says "this conversation has news"); ack after.
                    convs: list[str] = []
                    for msg in msgs:
                        trigger = pb.MessageCommitted.FromString(msg.data)
                        self.triggers.append((trigger, dict(msg.headers or {})))
                        if trigger.conversation_id not in convs:
                            convs.append(trigger.conversation_id)
                    calls = []
                    for conv in convs:
                        calls.append(self.clients[turn % len(self.clients)].fanout_all(conv))
                        turn += 1
                    for result in await asyncio.gather(*calls):
                        self.deliveries.extend(result)
                    for msg in msgs:
                        await msg.ack()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS restarted, stream wiped: start over
                self.errors.append(exc)
                if self._nc is not None:
                    with contextlib.suppress(Exception):
                        await self._nc.close()
                await asyncio.sleep(0.2)


async def table_counts(dsn: str) -> dict[str, int]:
    tables = [
        "messages",
        "send_dedup",
        "timeline",
        "outbox",
        "fanout_pending",
        "fanout_state",
        "conversations",
        "members",
        "users",
        "devices",
    ]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        out = {}
        for t in tables:
            cur = await conn.execute(f"SELECT count(*) FROM {t}")
            row = await cur.fetchone()
            assert row is not None
            out[t] = int(row[0])
        return out


async def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(sql, params)
        return list(await cur.fetchall())
