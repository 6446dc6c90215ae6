"""Presence without the stack: the state read from real routes in Redis (online,
offline, last seen after a clean disconnect and after routes expired), the
visibility rule, subscriptions and the poller (with in-memory stand-ins for logic's
SharedUsers), and GatewayInternal.Signal's validation on an in-process gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis
from gwkit import SECRET, RawStream, token_for, wait_for
from redis.exceptions import ConnectionError as RedisConnectionError
from test_gateway_typing import FakeStream

from gateway.config import Settings
from gateway.connection import Connection
from gateway.ephemeral import Refused
from gateway.hub import Hub
from gateway.presence import OFFLINE, ONLINE, PresenceService, PresenceStore, State
from gateway.routes import RouteTable
from gateway.servicer import GatewayInternalServicer, GatewayServicer, add_authenticated_gateway
from gateway.upstream import LogicClient, Peers
from im.gateway.v1 import gateway_internal_pb2, gateway_internal_pb2_grpc, gateway_pb2
from imcommon.metrics import Metrics
from imcommon.server import server_options
from imdev.servers import RedisServer, free_port

Code = gateway_pb2.FrameErrorCode


# -- the state in Redis ---------------------------------------------------------------


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url())
    yield client
    await client.aclose()


async def test_online_while_a_route_is_live_then_last_seen_at_the_disconnect(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    prefix = f"{key_prefix}:"
    routes = RouteTable(redis, prefix, ttl_s=30)
    store = PresenceStore(redis, prefix)
    assert await store.read(["alice"]) == {"alice": State(False, 0)}  # never seen

    await routes.register("alice", "phone", "c1", "gw:1")
    await routes.register("alice", "laptop", "c2", "gw:1")
    state = (await store.read(["alice"]))["alice"]
    assert state.online and abs(state.last_seen_ms - time.time() * 1000) < 5000

    await routes.unregister("alice", "phone", "c1")
    assert (await store.read(["alice"]))["alice"].online  # the laptop is still there
    before = int(time.time() * 1000)
    await routes.unregister("alice", "laptop", "c2")
    state = (await store.read(["alice"]))["alice"]
    assert not state.online
    assert before - 1000 <= state.last_seen_ms <= int(time.time() * 1000) + 1000


async def test_a_dead_gateways_route_reads_offline_after_its_ttl_last_seen_its_last_refresh(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """Nobody removes the route (its gateway was killed): it is offline once the
    route's TTL passed, and last seen is the route's last write. Another device's
    route, written later with a long TTL and removed, keeps the user's route hash
    alive: only the dead route's own expiry can tell."""
    prefix = f"{key_prefix}:"
    routes = RouteTable(redis, prefix, ttl_s=0.5)
    store = PresenceStore(redis, prefix)
    await routes.register("bob", "phone", "c1", "gw:dead")
    long_lived = RouteTable(redis, prefix, ttl_s=30)
    await long_lived.register("bob", "laptop", "c2", "gw:live")
    await long_lived.unregister("bob", "laptop", "c2")
    written = int(time.time() * 1000)
    assert await redis.pttl(routes.key("bob")) > 10_000
    assert (await store.read(["bob"]))["bob"].online
    state = await wait_for(
        lambda: _offline(store, "bob"), timeout=3, interval=0.05, what="bob offline"
    )
    assert abs(state.last_seen_ms - written) < 1000
    assert time.time() * 1000 - written < 0.5 * 1000 + 1500  # within TTL (+ slack)


async def _offline(store: PresenceStore, user: str) -> State | None:
    state = (await store.read([user]))[user]
    return None if state.online else state


async def test_the_store_reloads_its_script_after_a_script_flush(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    store = PresenceStore(redis, f"{key_prefix}:")
    await RouteTable(redis, f"{key_prefix}:", ttl_s=30).register("carol", "d", "c", "gw:1")
    await redis.script_flush()
    assert (await store.read(["carol", "carol", "nobody"])).keys() == {"carol", "nobody"}
    assert (await store.read(["carol"]))["carol"].online


# -- visibility, subscriptions, the poller ---------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.states: dict[str, State] = {}
        self.down = False
        self.reads: list[list[str]] = []

    async def read(self, user_ids: Sequence[str]) -> dict[str, State]:
        if self.down:
            raise RedisConnectionError("down")
        self.reads.append(list(user_ids))
        return {u: self.states.get(u, State(False, 0)) for u in user_ids}


class FakeVisibility:
    def __init__(self, shared: dict[str, set[str]]) -> None:
        self.shared_with = shared
        self.calls = 0

    async def shared(self, user_id: str, user_ids: Sequence[str]) -> set[str]:
        self.calls += 1
        return {u for u in user_ids if u in self.shared_with.get(user_id, set())}


def service(**settings: Any) -> tuple[PresenceService, FakeStore, FakeVisibility]:
    store = FakeStore()
    visibility = FakeVisibility({"alice": {"bob", "carol"}})
    return (
        PresenceService(Settings(**settings), store, visibility, Metrics("presence-test")),
        store,
        visibility,
    )


def subscribe(
    svc: PresenceService, stream: FakeStream, users: list[str], unsubscribe: bool = False
) -> None:
    svc.on_subscribe(
        cast(Connection, stream),
        gateway_pb2.SubscribePresence(user_ids=users, unsubscribe=unsubscribe),
    )


async def settled(stream: FakeStream) -> None:
    st = stream.presence_state
    while st is not None and st.worker is not None:
        await asyncio.sleep(0)


def updates(stream: FakeStream) -> list[list[tuple[str, int, int]]]:
    return [
        [(p.user_id, p.state, p.last_seen_ms) for p in u.presences] for u in stream.of("presence")
    ]


async def test_get_presence_refuses_any_stranger_and_names_them() -> None:
    svc, store, visibility = service()
    store.states["bob"] = State(True, 123)
    got = await svc.get("alice", ["bob", "alice", "carol"])
    assert [(p.user_id, p.state) for p in got] == [
        ("bob", ONLINE),
        ("alice", OFFLINE),
        ("carol", OFFLINE),
    ]
    with pytest.raises(Refused) as refused:
        await svc.get("alice", ["bob", "mallory", "eve"])
    assert refused.value.status == grpc.StatusCode.PERMISSION_DENIED
    assert "mallory" in refused.value.reason and "eve" in refused.value.reason
    assert "bob" not in refused.value.reason
    reads = len(store.reads)
    calls = visibility.calls
    assert [p.user_id for p in await svc.get("alice", ["alice"])] == ["alice"]
    assert visibility.calls == calls  # asking about oneself needs no check
    assert len(store.reads) == reads + 1


@pytest.mark.parametrize(
    "users, problem",
    [([], "empty"), (["bob"] * 201, "at most 200"), ([""], "empty"), (["x" * 201], "longer")],
)
async def test_get_presence_input_is_checked(users: list[str], problem: str) -> None:
    svc, _, visibility = service()
    with pytest.raises(Refused) as refused:
        await svc.get("alice", users)
    assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in refused.value.reason
    assert visibility.calls == 0


async def test_get_presence_with_redis_down_is_unavailable() -> None:
    svc, store, _ = service()
    store.down = True
    with pytest.raises(Refused) as refused:
        await svc.get("alice", ["bob"])
    assert refused.value.status == grpc.StatusCode.UNAVAILABLE


async def test_subscribe_pushes_now_then_only_changes() -> None:
    svc, store, _ = service()
    store.states = {"bob": State(True, 100), "carol": State(False, 50)}
    alice = FakeStream(("alice", "phone"))
    subscribe(svc, alice, ["bob", "carol"])
    await settled(alice)
    assert updates(alice) == [[("bob", ONLINE, 100), ("carol", OFFLINE, 50)]]

    store.states["bob"] = State(True, 200)  # still online: no update
    assert await svc.poll_once() == 0
    store.states["bob"] = State(False, 190)
    assert await svc.poll_once() == 1
    assert updates(alice)[-1] == [("bob", OFFLINE, 190)]
    store.states["bob"] = State(False, 195)  # online and off again between two polls
    assert await svc.poll_once() == 1
    assert updates(alice)[-1] == [("bob", OFFLINE, 195)]
    assert await svc.poll_once() == 0

    subscribe(svc, alice, ["bob"], unsubscribe=True)
    await settled(alice)
    store.states["bob"] = State(True, 300)
    store.states["carol"] = State(True, 300)
    assert await svc.poll_once() == 1
    assert updates(alice)[-1] == [("carol", ONLINE, 300)]
    assert store.reads[-1] == ["carol"]  # bob is not read any more

    svc.forget(cast(Connection, alice))
    reads = len(store.reads)
    assert await svc.poll_once() == 0
    assert store.reads[-1] == [] or len(store.reads) == reads + 1


async def test_subscribing_to_a_stranger_refuses_the_whole_frame() -> None:
    svc, store, _ = service()
    alice = FakeStream(("alice", "phone"))
    subscribe(svc, alice, ["bob", "mallory"])
    await settled(alice)
    [error] = alice.of("frame_error")
    assert (error.frame, error.code) == (
        "subscribe_presence",
        Code.FRAME_ERROR_CODE_PERMISSION_DENIED,
    )
    assert "mallory" in error.reason
    assert alice.of("presence") == []
    store.states["bob"] = State(True, 1)
    assert await svc.poll_once() == 0  # bob was not subscribed either


async def test_subscriptions_are_bounded_and_frames_rate_limited() -> None:
    svc, _, visibility = service(
        presence_max_subscriptions=2, presence_subscribe_rate_per_s=0.01, presence_subscribe_burst=1
    )
    visibility.shared_with["alice"] = {"bob", "carol", "dave"}
    alice = FakeStream(("alice", "phone"))
    subscribe(svc, alice, ["bob", "carol", "dave"])
    subscribe(svc, alice, ["bob", "carol"])
    await settled(alice)
    subscribe(svc, alice, ["dave"])  # would be a third
    subscribe(svc, alice, ["bob"])  # the bucket is empty
    await settled(alice)
    codes = [e.code for e in alice.of("frame_error")]
    assert codes == [
        Code.FRAME_ERROR_CODE_INVALID_ARGUMENT,
        Code.FRAME_ERROR_CODE_INVALID_ARGUMENT,
        Code.FRAME_ERROR_CODE_RATE_LIMITED,
    ]
    assert len(updates(alice)) == 1


async def test_redis_down_refuses_subscribe_and_skips_polls_until_it_answers() -> None:
    svc, store, _ = service()
    alice = FakeStream(("alice", "phone"))
    subscribe(svc, alice, ["bob"])
    await settled(alice)
    store.down = True
    subscribe(svc, alice, ["carol"])
    await settled(alice)
    assert [e.code for e in alice.of("frame_error")] == [Code.FRAME_ERROR_CODE_UNAVAILABLE]
    store.states["bob"] = State(True, 5)
    assert await svc.poll_once() == 0
    store.down = False
    assert await svc.poll_once() == 1
    assert updates(alice)[-1] == [("bob", ONLINE, 5)]


# -- GatewayInternal.Signal and the stream's frame dispatch ----------------------------


@pytest.fixture
async def gateway(redis_server: RedisServer, key_prefix: str) -> AsyncIterator[str]:
    """Client and internal services in this process on one port; logic unreachable,
    no typing or presence component (frames get FrameError UNAVAILABLE)."""
    settings = Settings(
        token_secret=SECRET,
        redis_url=redis_server.url(),
        redis_prefix=f"{key_prefix}:",
        logic_address=f"127.0.0.1:{free_port()}",
        logic_retry_s=0,
    )
    metrics = Metrics("gateway-test")
    redis = aioredis.from_url(settings.redis_url)
    logic_channel = grpc.aio.insecure_channel(settings.logic_address)
    peers = Peers(metrics, settings.internal_timeout_s)
    hub = Hub(RouteTable(redis, settings.redis_prefix, 30), peers, lambda: address, 10)
    logic = LogicClient(logic_channel, settings.logic_timeout_s, settings.logic_retry_s)
    server = grpc.aio.server(options=server_options(settings))
    add_authenticated_gateway(
        GatewayServicer(settings, hub, logic, peers, metrics), server, settings.token_secret
    )
    gateway_internal_pb2_grpc.add_GatewayInternalServicer_to_server(
        GatewayInternalServicer(hub, metrics), server
    )
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    yield address
    await server.stop(0)
    await peers.close()
    await logic_channel.close()
    await redis.aclose()


async def signal(address: str, request: gateway_internal_pb2.SignalRequest) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_internal_pb2_grpc.GatewayInternalStub(channel)
        return (await stub.Signal(request, timeout=5)).written


def target(user: str, device: str = "") -> gateway_internal_pb2.SignalTarget:
    return gateway_internal_pb2.SignalTarget(user_id=user, device_id=device)


async def test_signal_writes_typing_and_presence_to_the_named_streams_only(gateway: str) -> None:
    phone = RawStream(gateway, token_for("sig-alice", "phone"))
    laptop = RawStream(gateway, token_for("sig-alice", "laptop"))
    bob = RawStream(gateway, token_for("sig-bob", "phone"))
    try:
        for s in (phone, laptop, bob):
            await s.welcome()
        # The streams are attached once their Welcome is out; wait for the routes' hub.
        notice = gateway_pb2.ServerFrame(
            typing=gateway_pb2.TypingNotice(conversation_id="g", user_id="x", typing=True)
        )
        written = await signal(
            gateway,
            gateway_internal_pb2.SignalRequest(
                targets=[target("sig-alice"), target("sig-alice", "phone"), target("nobody")],
                frame=notice,
            ),
        )
        assert written == 2  # each of alice's streams once
        assert (await phone.next_of("typing")).conversation_id == "g"
        assert (await laptop.next_of("typing")).user_id == "x"
        presence = gateway_pb2.ServerFrame(
            presence=gateway_pb2.PresenceUpdate(
                presences=[gateway_pb2.Presence(user_id="x", state=ONLINE)]
            )
        )
        req = gateway_internal_pb2.SignalRequest(
            targets=[target("sig-bob", "phone")], frame=presence
        )
        assert await signal(gateway, req) == 1
        assert (await bob.next_of("presence")).presences[0].user_id == "x"
        assert [f.WhichOneof("frame") for f in bob.frames] == ["welcome", "presence"]
    finally:
        for s in (phone, laptop, bob):
            await s.close()


@pytest.mark.parametrize(
    "frame",
    [
        gateway_pb2.ServerFrame(push=gateway_pb2.Push(seq=1)),
        gateway_pb2.ServerFrame(kick=gateway_pb2.Kick(reason="x")),
        gateway_pb2.ServerFrame(),
    ],
)
async def test_signal_refuses_any_other_frame(gateway: str, frame: gateway_pb2.ServerFrame) -> None:
    stream = RawStream(gateway, token_for("sig-carol", "phone"))
    try:
        await stream.welcome()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await signal(
                gateway,
                gateway_internal_pb2.SignalRequest(targets=[target("sig-carol")], frame=frame),
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "only typing or presence" in (err.value.details() or "")
        with pytest.raises(asyncio.TimeoutError):
            await stream.next(timeout=0.3)
    finally:
        await stream.close()


async def test_ephemeral_frames_without_their_component_get_frame_errors(gateway: str) -> None:
    stream = RawStream(gateway, token_for("sig-dave", "phone"))
    try:
        await stream.welcome()
        await stream.write(
            gateway_pb2.ClientFrame(typing=gateway_pb2.Typing(conversation_id="g", typing=True))
        )
        await stream.write(
            gateway_pb2.ClientFrame(
                subscribe_presence=gateway_pb2.SubscribePresence(user_ids=["x"])
            )
        )
        first = await stream.next_of("frame_error")
        second = await stream.next_of("frame_error")
        assert (first.frame, first.code) == ("typing", Code.FRAME_ERROR_CODE_UNAVAILABLE)
        assert (second.frame, second.code) == (
            "subscribe_presence",
            Code.FRAME_ERROR_CODE_UNAVAILABLE,
        )
        await stream.write(gateway_pb2.ClientFrame(ping=gateway_pb2.Ping(nonce=7)))
        assert (await stream.next_of("pong")).nonce == 7  # the stream goes on
    finally:
        await stream.close()
