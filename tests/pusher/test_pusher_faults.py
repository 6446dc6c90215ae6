"""The pusher's TEST-ONLY crash switch (IM_PUSHER_TEST_FAULT_CRASH_BEFORE_DELIVER)
against a real pusher process, a real nats-server and Redis, with a scripted logic
and a recording gateway in this process: it exits 86 at the N-th fan-out whose
commit returned deliveries, before pushing any of that fan-out's entries; fan-outs
that returned nothing do not count; with 0 it never fires. Both calls are covered:
Fanout (one conversation per batch) and FanoutBatch (two conversations lingering
into one batch)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import nats
import pytest
import redis.asyncio as aioredis

from gateway.routes import RouteTable
from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_internal_pb2, gateway_internal_pb2_grpc
from im.logic.v1 import logic_pb2, logic_pb2_grpc
from imcommon.jetstream import stream_config, subject_for
from imcommon.server import EXCLUSIVE_PORT
from imdev.servers import NatsServer, RedisServer, ServiceProcess
from pusher.faults import CRASH_EXIT_CODE

USER, DEVICE = "bob", "phone"
WRITTEN = gateway_internal_pb2.DeliveryStatus.DELIVERY_STATUS_WRITTEN


@dataclass
class ScriptedLogic(logic_pb2_grpc.LogicServicer):
    """Fanout and FanoutBatch hand out, per conversation, the entries the test
    queued for it (each once), and record which RPC was called."""

    queued: dict[str, list[logic_pb2.FanoutDelivery]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    seq: int = 0

    def queue(self, conv: str) -> int:
        """Queues one new entry of `conv` for USER; returns its seq."""
        self.seq += 1
        message = common_pb2.Message(msg_id=self.seq, conversation_id=conv, body=b"m")
        self.queued.setdefault(conv, []).append(
            logic_pb2.FanoutDelivery(user_id=USER, seq=self.seq, message=message)
        )
        return self.seq

    def _take(self, conv: str) -> list[logic_pb2.FanoutDelivery]:
        return self.queued.pop(conv, [])

    async def Fanout(
        self, request: logic_pb2.FanoutRequest, context: grpc.aio.ServicerContext
    ) -> logic_pb2.FanoutResponse:
        self.calls.append("Fanout")
        return logic_pb2.FanoutResponse(deliveries=self._take(request.conversation_id))

    async def FanoutBatch(
        self, request: logic_pb2.FanoutBatchRequest, context: grpc.aio.ServicerContext
    ) -> logic_pb2.FanoutBatchResponse:
        self.calls.append("FanoutBatch")
        return logic_pb2.FanoutBatchResponse(
            results=[
                logic_pb2.FanoutBatchResult(conversation_id=c, deliveries=self._take(c))
                for c in request.conversation_ids
            ]
        )


@dataclass
class RecordingGateway(gateway_internal_pb2_grpc.GatewayInternalServicer):
    """Accepts every Deliver (WRITTEN) and records the seqs pushed."""

    seqs: list[int] = field(default_factory=list)

    async def Deliver(
        self, request: gateway_internal_pb2.DeliverRequest, context: grpc.aio.ServicerContext
    ) -> gateway_internal_pb2.DeliverResponse:
        self.seqs.extend(d.seq for d in request.deliveries)
        return gateway_internal_pb2.DeliverResponse(statuses=[WRITTEN] * len(request.deliveries))


@dataclass
class Rig:
    logic: ScriptedLogic
    gateway: RecordingGateway
    logic_address: str
    gateway_address: str


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    logic, gateway = ScriptedLogic(), RecordingGateway()
    server = grpc.aio.server(options=[EXCLUSIVE_PORT])
    logic_pb2_grpc.add_LogicServicer_to_server(logic, server)
    logic_port = server.add_insecure_port("127.0.0.1:0")
    gw_server = grpc.aio.server(options=[EXCLUSIVE_PORT])
    gateway_internal_pb2_grpc.add_GatewayInternalServicer_to_server(gateway, gw_server)
    gw_port = gw_server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await gw_server.start()
    yield Rig(logic, gateway, f"127.0.0.1:{logic_port}", f"127.0.0.1:{gw_port}")
    await server.stop(None)
    await gw_server.stop(None)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("rpc", ["Fanout", "FanoutBatch"])
@pytest.mark.parametrize("crash_at", [0, 2])
async def test_crash_before_deliver_fires_at_the_nth_fanout_with_deliveries(
    spawn: Callable[..., ServiceProcess],
    nats_server: NatsServer,
    redis_server: RedisServer,
    key_prefix: str,
    rig: Rig,
    rpc: str,
    crash_at: int,
) -> None:
    stream, prefix = f"S_{key_prefix}", f"p.{key_prefix}"
    redis = aioredis.from_url(redis_server.url())
    await RouteTable(redis, f"{key_prefix}:", ttl_s=600).register(
        USER, DEVICE, "conn-1", rig.gateway_address
    )
    await redis.aclose()
    nc = await nats.connect(nats_server.url())
    js = nc.jetstream()
    await js.add_stream(stream_config(stream, prefix))
    env = {
        "IM_PUSHER_NATS_URL": nats_server.url(),
        "IM_PUSHER_NATS_STREAM": stream,
        "IM_PUSHER_NATS_SUBJECT_PREFIX": prefix,
        "IM_PUSHER_REDIS_URL": redis_server.url(),
        "IM_PUSHER_REDIS_PREFIX": f"{key_prefix}:",
        "IM_PUSHER_LOGIC_ADDRESS": rig.logic_address,
        "IM_PUSHER_RETRANSMIT_SCHEDULE_MS": "60000",  # one Deliver per entry
        "IM_PUSHER_TEST_FAULT_CRASH_BEFORE_DELIVER": str(crash_at),
        # FanoutBatch: both conversations of a step wait for each other (also
        # the first, which an idle pusher would otherwise send at once).
        "IM_PUSHER_FANOUT_LINGER_MS": "1000" if rpc == "FanoutBatch" else "0",
        "IM_PUSHER_FANOUT_LINGER_WHEN_IDLE": "1",
    }
    proc = spawn("pusher", env)
    convs = ["d:a:bob", "d:bob:c"] if rpc == "FanoutBatch" else ["d:a:bob"]

    async def step(with_deliveries: bool) -> list[int]:
        """Triggers every conversation of `convs` once; the fan-out returns one new
        entry per conversation if `with_deliveries`. Returns their seqs."""
        seqs = [rig.logic.queue(c) for c in convs] if with_deliveries else []
        before = len(rig.logic.calls)
        for conv in convs:
            trigger = logic_pb2.MessageCommitted(conversation_id=conv, msg_id=1, conv_seq=1)
            await js.publish(subject_for(prefix, conv), trigger.SerializeToString())
        await wait_until(
            lambda: len(rig.logic.calls) > before or not proc.running(), f"a {rpc} call"
        )
        return seqs

    async def settled() -> bool:
        """Every trigger published so far is acked (the fan-out call finished)."""
        info = await js.consumer_info(stream, "pusher")
        return info.num_pending == 0 and info.num_ack_pending == 0

    async def wait_settled() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await settled():
            assert proc.running(), f"pusher exited with {proc.proc and proc.proc.poll()}"
            assert loop.time() < deadline, "timed out waiting for the triggers to be acked"
            await asyncio.sleep(0.05)

    try:
        first = await step(with_deliveries=True)  # the 1st fan-out with deliveries
        await wait_until(lambda: rig.gateway.seqs == first, f"Deliver of {first}")
        await wait_settled()
        await step(with_deliveries=False)  # returns nothing: does not count
        await step(with_deliveries=False)
        await wait_settled()
        assert rig.gateway.seqs == first and proc.running()
        second = await step(with_deliveries=True)  # the 2nd: crashes if crash_at == 2
        if crash_at:
            assert await asyncio.to_thread(proc.wait, 10) == CRASH_EXIT_CODE
            # Committed (handed out by logic), never pushed.
            assert rig.gateway.seqs == first
        else:
            await wait_until(lambda: rig.gateway.seqs == first + second, f"Deliver of {second}")
            for _ in range(3):
                await step(with_deliveries=True)
            await wait_until(lambda: len(rig.gateway.seqs) == 5 * len(convs), "every Deliver")
            assert proc.running()
        assert set(rig.logic.calls) == {rpc}, rig.logic.calls
    finally:
        await nc.close()
