"""The pusher's JetStream consumer against a real nats-server, without logic
(its address is a port nothing listens on): triggers stay unacked while Fanout
fails, poison is terminated, several pushers share one durable consumer, and a
wiped JetStream store is survived."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import grpc
import nats
import pytest
from gwkit import metric, wait_for
from nats.js import JetStreamContext

from im.logic.v1 import logic_pb2
from im.pusher.v1 import pusher_pb2, pusher_pb2_grpc
from imcommon.jetstream import subject_for
from imdev.servers import NatsServer, RedisServer, ServiceProcess, free_port


def pusher_env(nats_url: str, redis_server: RedisServer, key_prefix: str) -> dict[str, str]:
    return {
        "IM_PUSHER_NATS_URL": nats_url,
        "IM_PUSHER_NATS_STREAM": f"S_{key_prefix}",
        "IM_PUSHER_NATS_SUBJECT_PREFIX": f"p.{key_prefix}",
        "IM_PUSHER_REDIS_URL": redis_server.url(),
        "IM_PUSHER_REDIS_PREFIX": f"{key_prefix}:",
        "IM_PUSHER_LOGIC_ADDRESS": f"127.0.0.1:{free_port()}",
        "IM_PUSHER_LOGIC_TIMEOUT_S": "1",
        "IM_PUSHER_REDELIVERY_BACKOFF_S": "0.2",
        "IM_PUSHER_CONSUMER_CHECK_S": "0.5",
        "IM_PUSHER_FETCH_TIMEOUT_S": "0.5",
        "IM_PUSHER_SHUTDOWN_DEADLINE_S": "10",
    }


def trigger(conversation: str) -> bytes:
    return logic_pb2.MessageCommitted(
        conversation_id=conversation, msg_id=1, conv_seq=1
    ).SerializeToString()


async def consumer_exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.consumer_info(stream, "pusher")
    except Exception:
        return False
    return True


async def test_unacked_while_fanout_fails_and_poison_is_terminated(
    spawn: Callable[..., ServiceProcess],
    nats_server: NatsServer,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    env = pusher_env(nats_server.url(), redis_server, key_prefix)
    metrics_port = free_port()
    env["IM_PUSHER_METRICS_PORT"] = str(metrics_port)
    stream, prefix = env["IM_PUSHER_NATS_STREAM"], env["IM_PUSHER_NATS_SUBJECT_PREFIX"]
    spawn("pusher", env)
    nc = await nats.connect(nats_server.url())
    try:
        js = nc.jetstream()
        await wait_for(lambda: consumer_exists(js, stream), what="durable consumer")
        info = await js.consumer_info(stream, "pusher")
        assert info.config.max_deliver == -1 and info.config.ack_wait == 10.0
        await js.publish(subject_for(prefix, "d:a:b"), trigger("d:a:b"))
        await js.publish(subject_for(prefix, "d:a:c"), b"\xff\xff not a trigger")

        async def retried() -> bool:
            i = await js.consumer_info(stream, "pusher")
            return i.num_redelivered >= 1 and i.delivered.stream_seq == 2

        await wait_for(retried, what="redelivery of the failed trigger")
        info = await js.consumer_info(stream, "pusher")
        # The failed trigger is never acked (Fanout never returned OK)...
        assert info.ack_floor.stream_seq == 0
        # ...the poison one is settled (terminated) at once.
        assert metric(metrics_port, "im_pusher_triggers_total", outcome="terminated") == 1
        assert metric(metrics_port, "im_pusher_triggers_total", outcome="ack") == 0
        assert metric(metrics_port, "im_pusher_triggers_total", outcome="nak") >= 1
    finally:
        await nc.close()


async def test_pushers_share_one_durable_and_survive_a_wiped_store(
    spawn: Callable[..., ServiceProcess],
    nats_factory: Callable[[], NatsServer],
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    server = nats_factory()
    env = pusher_env(server.url(), redis_server, key_prefix)
    stream = env["IM_PUSHER_NATS_STREAM"]
    pushers = [spawn("pusher", env), spawn("pusher", env)]
    nc = await nats.connect(server.url())
    js = nc.jetstream()
    await wait_for(lambda: consumer_exists(js, stream), what="durable consumer")
    names = [c.name async for c in _consumers(js, stream)]
    assert names == ["pusher"]
    await nc.close()

    await asyncio.to_thread(server.stop)
    server.wipe_store()
    await asyncio.to_thread(server.start)
    nc = await nats.connect(server.url())
    try:
        js = nc.jetstream()
        await wait_for(
            lambda: consumer_exists(js, stream), timeout=20, what="consumer recreated after wipe"
        )
        info = await js.consumer_info(stream, "pusher")
        assert info.config.max_deliver == -1
    finally:
        await nc.close()
    for p in pushers:
        assert p.running()


async def _consumers(js: JetStreamContext, stream: str):  # type: ignore[no-untyped-def]
    for c in await js.consumers_info(stream):
        yield c


async def test_ack_delivery_validates_and_sigterm_exits_cleanly(
    spawn: Callable[..., ServiceProcess],
    nats_server: NatsServer,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    proc = spawn("pusher", pusher_env(nats_server.url(), redis_server, key_prefix))
    async with grpc.aio.insecure_channel(proc.address) as channel:
        stub = pusher_pb2_grpc.PusherStub(channel)
        resp = await stub.AckDelivery(
            pusher_pb2.AckDeliveryRequest(user_id="u", device_id="d", seq=5), timeout=5
        )
        assert resp.cancelled == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AckDelivery(pusher_pb2.AckDeliveryRequest(user_id="u", seq=5), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 10) == 0


#: The longest linger the pusher accepts: "at once" and "after the linger" as far
#: apart as the settings allow.
LINGER_MS = 1000


@pytest.mark.parametrize("linger_when_idle", [False, True])
async def test_an_idle_pusher_fans_out_at_once_without_its_linger(
    spawn: Callable[..., ServiceProcess],
    nats_server: NatsServer,
    redis_server: RedisServer,
    key_prefix: str,
    linger_when_idle: bool,
) -> None:
    # The linger gathers conversations into one FanoutBatch while calls are in
    # flight; with nothing in flight there is nothing to wait for
    # (IM_PUSHER_FANOUT_LINGER_WHEN_IDLE=0, issue 19): the first trigger's call
    # leaves at once. Logic does not listen here, so every call fails at once and
    # the trigger is nak'ed: the time to the first nak is the time to the call.
    env = pusher_env(nats_server.url(), redis_server, key_prefix)
    metrics_port = free_port()
    env["IM_PUSHER_METRICS_PORT"] = str(metrics_port)
    env["IM_PUSHER_FANOUT_LINGER_MS"] = str(LINGER_MS)
    env["IM_PUSHER_FANOUT_LINGER_WHEN_IDLE"] = "1" if linger_when_idle else "0"
    stream, prefix = env["IM_PUSHER_NATS_STREAM"], env["IM_PUSHER_NATS_SUBJECT_PREFIX"]
    spawn("pusher", env)
    nc = await nats.connect(nats_server.url())
    try:
        js = nc.jetstream()
        await wait_for(lambda: consumer_exists(js, stream), what="durable consumer")
        await js.publish(subject_for(prefix, "d:a:b"), trigger("d:a:b"))

        async def delivered() -> bool:
            return (await js.consumer_info(stream, "pusher")).delivered.stream_seq == 1

        await wait_for(delivered, what="the trigger fetched")

        def naks() -> float:
            return metric(metrics_port, "im_pusher_triggers_total", outcome="nak")

        if linger_when_idle:
            # Nothing may happen before the linger is over; half of it is checked.
            await asyncio.sleep(LINGER_MS / 2000)
            assert naks() == 0
        else:
            # The call (and its nak) comes at once, well inside the linger.
            await wait_for(lambda: naks() >= 1, timeout=LINGER_MS / 2000, what="the nak")
    finally:
        await nc.close()
