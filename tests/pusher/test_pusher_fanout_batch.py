"""The pusher fans out many conversations per FanoutBatch call, end to end: the
triggers of 40 conversations (one sender, 40 recipients, so the conversations
share a user) are settled by a few calls, every message reaches every online
device exactly once, a poison trigger among them is terminated alone; live
traffic keeps each conversation's order; the same with batching switched off
(the one-Fanout-per-conversation pusher of before), and against a logic that
does not know FanoutBatch (UNIMPLEMENTED: the pusher falls back to Fanout).

The triggers are piled up while the pusher is stopped, so when it starts they
arrive in one fetch and the batch sizes do not depend on this machine's speed.
The stacks retransmit only after 20 s, so in a healthy run no push repeats and
the counts are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from gwkit import (
    LOGIC_READY,
    NEEDS_LOGIC,
    SECRET,
    RawStream,
    ack_frame,
    direct,
    metric,
    send_frame,
    token_for,
    unique_users,
    wait_for,
)

from im.logic.v1 import logic_pb2
from imcommon.jetstream import stream_config, subject_for
from imcommon.server import EXCLUSIVE_PORT
from imdev.servers import free_port

FANOUT = "/im.logic.v1.Logic/Fanout"
FANOUT_BATCH = "/im.logic.v1.Logic/FanoutBatch"
N = 40  # conversations per round


def _stack(prefix: str, pusher_env: dict[str, str]) -> Iterator[Any]:
    if not LOGIC_READY:
        pytest.skip(NEEDS_LOGIC)
    from imdev.stack import Stack

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)
    pusher_port, logic_port = free_port(), free_port()
    stack = Stack(
        workdir,
        gateways=1,
        token_secret=SECRET,
        env={
            "pusher": {
                "IM_PUSHER_RETRANSMIT_SCHEDULE_MS": "20000",
                "IM_PUSHER_MAX_ATTEMPTS": "3",
                "IM_PUSHER_METRICS_PORT": str(pusher_port),
                "IM_PUSHER_REDELIVERY_BACKOFF_S": "0.2",
                **pusher_env,
            },
            # No repair re-triggers while the pusher is stopped (the counts stay exact).
            "logic": {"IM_LOGIC_METRICS_PORT": str(logic_port), "IM_LOGIC_REPAIR_AFTER_S": "60"},
            # The devices ACK only at the end of a round, so the gateway's catch-ups
            # (liveness) would repeat the pushes: the counts here are the pusher's.
            "gateway": {"IM_GATEWAY_LIVENESS_S": "0"},
        },
    )
    stack.pusher_metrics_port = pusher_port  # type: ignore[attr-defined]
    stack.logic_metrics_port = logic_port  # type: ignore[attr-defined]
    try:
        stack.start()
        yield stack
    finally:
        stack.kill()
        if not os.environ.get("IM_KEEP_TEST_DIRS"):
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def batching_stack() -> Iterator[Any]:
    """The pusher with its default batching (64 conversations, 2 ms linger)."""
    yield from _stack("imfob-", {})


@pytest.fixture(scope="module")
def unbatched_stack() -> Iterator[Any]:
    """The pusher with batching switched off: one Fanout call per conversation."""
    yield from _stack(
        "imfou-",
        {"IM_PUSHER_FANOUT_BATCH_CONVERSATIONS": "1", "IM_PUSHER_FANOUT_LINGER_MS": "0"},
    )


def pushes(stream: RawStream) -> list[Any]:
    return [f.push for f in stream.frames if f.WhichOneof("frame") == "push"]


class Round:
    """One sender device and N recipient devices online on the stack's gateway."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        tag = unique_users(1)[0]
        self.sender_id, self.recipients = tag, [f"{tag}r{i:02d}" for i in range(N)]
        gw = stack.gateway_addresses[0]
        self.sender = RawStream(gw, token_for(self.sender_id, "phone"))
        self.devices = {r: RawStream(gw, token_for(r, "phone")) for r in self.recipients}
        self.client_id = 0
        self.acks: list[Any] = []

    @property
    def convs(self) -> list[str]:
        return [direct(self.sender_id, r) for r in self.recipients]

    async def __aenter__(self) -> Round:
        for s in [self.sender, *self.devices.values()]:
            await s.welcome()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in [self.sender, *self.devices.values()]:
            await s.close()

    async def send_each(self) -> None:
        """One message to every recipient, in windows under the send window."""
        for start in range(0, N, 32):
            chunk = self.convs[start : start + 32]
            for conv in chunk:
                self.client_id += 1
                await self.sender.write(send_frame(self.client_id, conv, body=b"m"))
            for _ in chunk:
                self.acks.append(await self.sender.next_of("send_ack", timeout=30))

    async def all_delivered_exactly_once(self) -> None:
        """Waits until every recipient device has each of its messages and the
        sender's device its own rows; then checks nothing came twice, each
        conversation in send order, and ACKs everything."""
        per_recipient = len(self.acks) // N

        def complete() -> bool:
            return all(len(pushes(d)) >= per_recipient for d in self.devices.values()) and (
                len(pushes(self.sender)) >= len(self.acks)
            )

        await wait_for(complete, timeout=60, what="every push at every device")
        sent = {a.msg_id for a in self.acks}
        for user, d in self.devices.items():
            got = pushes(d)
            assert len(got) == per_recipient, f"{user}: {len(got)} pushes"
            assert len({p.seq for p in got}) == len(got), f"{user}: a seq pushed twice"
            assert {p.message.msg_id for p in got} <= sent
            conv_seqs = [p.message.conv_seq for p in got]
            assert conv_seqs == sorted(conv_seqs), f"{user}: out of conversation order"
        own = Counter(p.message.msg_id for p in pushes(self.sender))
        assert own == dict.fromkeys(sent, 1)
        for s in [self.sender, *self.devices.values()]:
            for p in pushes(s):
                await s.write(ack_frame(p.seq))


@contextlib.asynccontextmanager
async def pusher_stopped(stack: Any, **env: str) -> AsyncIterator[None]:
    """The pusher is stopped inside the block (triggers pile up in JetStream) and
    started, with `env` changes, after it."""
    proc = stack.pushers[0]
    await asyncio.to_thread(proc.stop)
    old = dict(proc.extra_env)
    proc.extra_env.update(env)
    try:
        yield
    finally:
        await asyncio.to_thread(proc.start)
        proc.extra_env = old


async def publish_poison(stack: Any) -> None:
    nc = await nats.connect(stack.nats.url())
    try:
        js = nc.jetstream()
        bad = logic_pb2.MessageCommitted(conversation_id="not-a-conversation", msg_id=1)
        await js.publish(
            subject_for(stack.subject_prefix, bad.conversation_id),
            bad.SerializeToString(),
            stream=stream_config(stack.stream, stack.subject_prefix).name,
        )
    finally:
        await nc.close()


async def consumer_drained(stack: Any) -> None:
    nc = await nats.connect(stack.nats.url())
    try:
        js = nc.jetstream()
        stream = stream_config(stack.stream, stack.subject_prefix).name

        async def drained() -> bool:
            info = await js.consumer_info(stream, "pusher")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await wait_for(drained, timeout=30, what="every trigger settled")
    finally:
        await nc.close()


def rpcs(port: int, method: str, code: str = "OK") -> float:
    return metric(port, "im_rpc_server_handled_total", method=method, code=code)


async def test_many_conversations_share_few_fanout_batch_calls(batching_stack: Any) -> None:
    stack = batching_stack
    pport, lport = stack.pusher_metrics_port, stack.logic_metrics_port
    async with Round(stack) as r:
        async with pusher_stopped(stack):
            await r.send_each()
            await publish_poison(stack)
            logic_before = rpcs(lport, FANOUT_BATCH), rpcs(lport, FANOUT)
        await r.all_delivered_exactly_once()
        await consumer_drained(stack)
        # A fresh pusher process: its counters cover exactly these triggers.
        calls = metric(pport, "im_pusher_fanout_batch_calls_total", result="OK")
        convs = metric(pport, "im_pusher_fanout_batch_conversations_total")
        assert 1 <= calls <= N / 8, calls  # 40 conversations, a few calls
        assert convs >= N
        assert metric(pport, "im_pusher_fanout_calls_total") <= 2  # a lone trigger at most
        assert metric(pport, "im_pusher_triggers_total", outcome="terminated") == 1
        assert metric(pport, "im_pusher_triggers_total", outcome="ack") == N
        assert rpcs(lport, FANOUT_BATCH) - logic_before[0] == calls
        assert rpcs(lport, FANOUT) - logic_before[1] <= 2
        assert metric(pport, "im_pusher_pushes_total", kind="retransmit") == 0

        # Live traffic: 3 more messages per conversation while the pusher runs.
        for _ in range(3):
            await r.send_each()
        await r.all_delivered_exactly_once()
        await consumer_drained(stack)


async def test_a_logic_without_fanout_batch_gets_fanout_calls(batching_stack: Any) -> None:
    """A stand-in for an older logic: it forwards Fanout to the real logic and
    knows nothing else (FanoutBatch is UNIMPLEMENTED)."""
    stack = batching_stack
    logic = grpc.aio.insecure_channel(stack.logics[0].address)
    forward = logic.unary_unary(FANOUT)

    async def fanout(request: bytes, context: Any) -> bytes:
        return await forward(request, timeout=10)

    server = grpc.aio.server(options=[EXCLUSIVE_PORT])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "im.logic.v1.Logic", {"Fanout": grpc.unary_unary_rpc_method_handler(fanout)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pport = stack.pusher_metrics_port
    try:
        async with Round(stack) as r:
            async with pusher_stopped(stack, IM_PUSHER_LOGIC_ADDRESS=f"127.0.0.1:{port}"):
                await r.send_each()
            await r.all_delivered_exactly_once()
            await consumer_drained(stack)
            unimplemented = metric(
                pport, "im_pusher_fanout_batch_calls_total", result="UNIMPLEMENTED"
            )
            assert unimplemented == 1  # asked once, then never again
            assert metric(pport, "im_pusher_fanout_batch_calls_total", result="OK") == 0
            assert metric(pport, "im_pusher_fanout_calls_total", result="OK") >= N
            assert metric(pport, "im_pusher_triggers_total", outcome="ack") == N
    finally:
        await server.stop(None)
        await logic.close()
        # Back to the real logic for the other tests of this module.
        async with pusher_stopped(stack):
            pass


async def test_batching_switched_off_is_one_fanout_per_conversation(
    unbatched_stack: Any,
) -> None:
    stack = unbatched_stack
    pport = stack.pusher_metrics_port
    async with Round(stack) as r:
        async with pusher_stopped(stack):
            await r.send_each()
            await publish_poison(stack)
        await r.all_delivered_exactly_once()
        await consumer_drained(stack)
        assert metric(pport, "im_pusher_fanout_batch_calls_total") == 0
        assert metric(pport, "im_pusher_fanout_calls_total", result="OK") == N
        assert metric(pport, "im_pusher_triggers_total", outcome="terminated") == 1
        assert metric(pport, "im_pusher_triggers_total", outcome="ack") == N
        for _ in range(2):
            await r.send_each()
        await r.all_delivered_exactly_once()
        await consumer_drained(stack)
        assert metric(pport, "im_pusher_fanout_batch_calls_total") == 0
