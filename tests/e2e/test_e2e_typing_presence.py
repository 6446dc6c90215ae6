"""Typing and presence on the real stack (issue 15, the ephemeral half): two
gateways, raw frames over Gateway.Connect, nothing but the protocol.

- typing reaches the other members' devices on both gateways (the other one by
  GatewayInternal.Signal), never the typer's own devices;
- a typing flood gets FrameError RATE_LIMITED and the stream goes on (a message
  sent after it is still stored and pushed);
- a non-member's typing and a stranger's presence are refused;
- a subscriber sees a peer online at once, then offline with a last seen when the
  peer disconnects;
- last: a gateway killed with SIGKILL leaves its routes in Redis; a subscriber on
  the other gateway sees its user offline within the route TTL + the poll interval.

Everything runs on one module stack with a short route TTL (ROUTE_TTL_S).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_support import uid

from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imdev.stack import Stack

pytestmark = pytest.mark.slow

ROUTE_TTL_S = 3.0
POLL_S = 0.5
#: Scheduling slack on a loaded 2-core machine (process wake-ups, gRPC).
SLACK_S = 1.5
Code = gateway_pb2.FrameErrorCode
ONLINE = gateway_pb2.PresenceState.PRESENCE_STATE_ONLINE
OFFLINE = gateway_pb2.PresenceState.PRESENCE_STATE_OFFLINE


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="imeph-"))
    workdir.chmod(0o755)
    s = Stack(
        workdir,
        gateways=2,
        env={
            "gateway": {
                "IM_GATEWAY_ROUTE_TTL_S": str(ROUTE_TTL_S),
                "IM_GATEWAY_PRESENCE_POLL_S": str(POLL_S),
            }
        },
    )
    try:
        s.start()
    except BaseException:
        s.kill()
        raise
    yield s
    s.kill()
    if not os.environ.get("IM_KEEP_TEST_DIRS"):
        shutil.rmtree(workdir, ignore_errors=True)


class Stream:
    """One raw Connect stream; server frames are collected by a reader task."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.metadata = [("authorization", f"Bearer {token}")]
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.call = self.stub.Connect(metadata=self.metadata)
        self.frames: list[gateway_pb2.ServerFrame] = []
        self.ended = False
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.client_id = 0

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                self.frames.append(frame)
                self._changed.set()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        self.ended = True
        self._changed.set()

    def of(self, kind: str) -> list[Any]:
        return [getattr(f, kind) for f in self.frames if f.WhichOneof("frame") == kind]

    async def wait(self, what: str, condition: Any, timeout: float = 10.0) -> Any:
        """Waits until condition() is truthy (checked on every new frame); returns it."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                kinds = [f.WhichOneof("frame") for f in self.frames]
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; got {kinds}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))
            except TimeoutError:
                pass

    async def welcome(self) -> gateway_pb2.Welcome:
        welcomes = await self.wait("Welcome", lambda: self.of("welcome"))
        return welcomes[0]

    async def write(self, frame: gateway_pb2.ClientFrame) -> None:
        await self.call.write(frame)

    async def typing(self, conversation: str, typing: bool = True) -> None:
        await self.write(
            gateway_pb2.ClientFrame(
                typing=gateway_pb2.Typing(conversation_id=conversation, typing=typing)
            )
        )

    async def send(self, conversation: str, body: bytes) -> None:
        self.client_id += 1
        await self.write(
            gateway_pb2.ClientFrame(
                send=gateway_pb2.Send(
                    client_id=self.client_id,
                    client_msg_id=uuid.uuid4().hex,
                    conversation_id=conversation,
                    body=body,
                    content_type=common_pb2.CONTENT_TYPE_TEXT,
                )
            )
        )

    async def subscribe(self, *users: str) -> None:
        await self.write(
            gateway_pb2.ClientFrame(
                subscribe_presence=gateway_pb2.SubscribePresence(user_ids=list(users))
            )
        )

    def presences(self, user: str) -> list[gateway_pb2.Presence]:
        return [p for u in self.of("presence") for p in u.presences if p.user_id == user]

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()


class Devices:
    """The streams a test opened, closed at its end."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.streams: list[Stream] = []

    async def open(self, user: str, device: str = "d1", gateway: int = 0) -> Stream:
        stream = Stream(self.stack.gateway_addresses[gateway], self.stack.mint(user, device))
        self.streams.append(stream)
        await stream.welcome()
        return stream

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.streams), return_exceptions=True)


@pytest.fixture
async def devices(stack: Stack) -> Any:
    d = Devices(stack)
    yield d
    await d.close()


async def create_group(stream: Stream, *others: str) -> str:
    resp = await stream.stub.CreateGroup(
        gateway_pb2.CreateGroupRequest(name="team", member_ids=list(others)),
        metadata=stream.metadata,
        timeout=10,
    )
    return str(resp.conversation.conversation_id)


async def quiet(stream: Stream, kind: str, seconds: float) -> None:
    """Asserts that no frame of `kind` arrives within `seconds` (used only after the
    positive case of the same test was observed, so the fan-out has run)."""
    before = len(stream.of(kind))
    await asyncio.sleep(seconds)
    assert len(stream.of(kind)) == before, f"unexpected {kind}: {stream.of(kind)[before:]}"


async def test_typing_reaches_the_other_members_on_both_gateways_never_the_typer(
    devices: Devices,
) -> None:
    alice, bob, carol = uid("alice"), uid("bob"), uid("carol")
    alice_phone = await devices.open(alice, "phone", gateway=0)
    alice_laptop = await devices.open(alice, "laptop", gateway=1)
    bob_phone = await devices.open(bob, "phone", gateway=1)  # remote: by Signal
    carol_phone = await devices.open(carol, "phone", gateway=0)  # local
    group = await create_group(alice_phone, bob, carol)

    await alice_phone.typing(group, True)
    for receiver in (bob_phone, carol_phone):
        [notice] = await receiver.wait("a TypingNotice", lambda r=receiver: r.of("typing"))
        assert (notice.conversation_id, notice.user_id, notice.device_id, notice.typing) == (
            group,
            alice,
            "phone",
            True,
        )
        assert notice.expires_in_ms == 6000
    await quiet(alice_laptop, "typing", 0.5)
    assert alice_phone.of("typing") == [] and alice_phone.of("frame_error") == []

    await alice_phone.typing(group, False)  # "stopped" passes the min interval
    await bob_phone.wait(
        "typing=false", lambda: [n for n in bob_phone.of("typing") if not n.typing]
    )


async def test_a_typing_flood_is_rate_limited_and_the_stream_goes_on(devices: Devices) -> None:
    alice, bob = uid("alice"), uid("bob")
    alice_phone = await devices.open(alice, "phone", gateway=0)
    bob_phone = await devices.open(bob, "phone", gateway=1)
    group = await create_group(alice_phone, bob)

    for i in range(40):
        await alice_phone.typing(group, i % 2 == 0)
    errors = await alice_phone.wait(
        "RATE_LIMITED FrameErrors",
        lambda: [
            e for e in alice_phone.of("frame_error") if len(alice_phone.of("frame_error")) >= 20
        ],
    )
    assert {(e.frame, e.code) for e in errors} == {("typing", Code.FRAME_ERROR_CODE_RATE_LIMITED)}
    # The burst (10) passed, at most a few more refilled meanwhile; the rest refused.
    await bob_phone.wait("the burst's notices", lambda: len(bob_phone.of("typing")) >= 10)
    assert len(bob_phone.of("typing")) < 20

    await alice_phone.send(group, b"after the flood")
    [ack] = await alice_phone.wait("SendAck", lambda: alice_phone.of("send_ack"))
    assert ack.msg_id > 0 and not alice_phone.ended
    await bob_phone.wait(
        "the message",
        lambda: [p for p in bob_phone.of("push") if p.message.body == b"after the flood"],
    )


async def test_a_non_members_typing_is_refused(devices: Devices) -> None:
    alice, bob, mallory = uid("alice"), uid("bob"), uid("mallory")
    alice_phone = await devices.open(alice, "phone", gateway=0)
    bob_phone = await devices.open(bob, "phone", gateway=1)
    mallory_phone = await devices.open(mallory, "phone", gateway=0)
    group = await create_group(alice_phone, bob)
    direct = f"d:{min(alice, bob)}:{max(alice, bob)}"

    await mallory_phone.typing(group)
    await mallory_phone.typing(direct)
    errors = await mallory_phone.wait(
        "two FrameErrors",
        lambda: len(mallory_phone.of("frame_error")) >= 2 and mallory_phone.of("frame_error"),
    )
    assert [(e.frame, e.code) for e in errors] == [
        ("typing", Code.FRAME_ERROR_CODE_PERMISSION_DENIED)
    ] * 2
    await alice_phone.typing(group)  # a member's goes through (and shows the path works)
    await bob_phone.wait("alice's notice", lambda: bob_phone.of("typing"))
    assert [n.user_id for n in bob_phone.of("typing")] == [alice]


async def test_the_presence_of_a_stranger_is_refused(devices: Devices) -> None:
    alice, bob, mallory = uid("alice"), uid("bob"), uid("mallory")
    alice_phone = await devices.open(alice, "phone", gateway=0)
    await devices.open(bob, "phone", gateway=1)
    await devices.open(mallory, "phone", gateway=1)
    await create_group(alice_phone, bob)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alice_phone.stub.GetPresence(
            gateway_pb2.GetPresenceRequest(user_ids=[bob, mallory]),
            metadata=alice_phone.metadata,
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert mallory in (err.value.details() or "") and bob not in (err.value.details() or "")

    resp = await alice_phone.stub.GetPresence(
        gateway_pb2.GetPresenceRequest(user_ids=[bob, alice]),
        metadata=alice_phone.metadata,
        timeout=10,
    )
    assert [(p.user_id, p.state) for p in resp.presences] == [(bob, ONLINE), (alice, ONLINE)]

    await alice_phone.subscribe(bob, mallory)
    [error] = await alice_phone.wait("a FrameError", lambda: alice_phone.of("frame_error"))
    assert (error.frame, error.code) == (
        "subscribe_presence",
        Code.FRAME_ERROR_CODE_PERMISSION_DENIED,
    )
    await quiet(alice_phone, "presence", POLL_S * 2)  # nothing subscribed, bob included


async def test_subscribe_shows_online_then_offline_with_last_seen(devices: Devices) -> None:
    alice, bob = uid("alice"), uid("bob")
    alice_phone = await devices.open(alice, "phone", gateway=0)
    bob_phone = await devices.open(bob, "phone", gateway=1)
    await create_group(alice_phone, bob)

    await alice_phone.subscribe(bob)
    [now] = await alice_phone.wait("bob's state", lambda: alice_phone.presences(bob))
    assert now.state == ONLINE

    closed_ms = int(time.time() * 1000)
    started = time.monotonic()
    await bob_phone.close()
    [*_, gone] = await alice_phone.wait(
        "bob offline",
        lambda: (
            [p for p in alice_phone.presences(bob) if p.state == OFFLINE]
            and alice_phone.presences(bob)
        ),
        timeout=POLL_S + SLACK_S + 2,
    )
    assert gone.state == OFFLINE
    assert closed_ms - 1000 <= gone.last_seen_ms <= int(time.time() * 1000) + 1000
    assert time.monotonic() - started < POLL_S + SLACK_S + 2


async def test_a_killed_gateways_user_is_shown_offline_within_ttl_and_a_poll(
    stack: Stack, devices: Devices
) -> None:
    """SIGKILL: nobody removes bob's route; it expires by its TTL. (Last in the
    module: it leaves gateway 1 restarted.)"""
    alice, bob = uid("alice"), uid("bob")
    alice_phone = await devices.open(alice, "phone", gateway=0)
    await devices.open(bob, "phone", gateway=1)
    await create_group(alice_phone, bob)
    await alice_phone.subscribe(bob)
    [now] = await alice_phone.wait("bob's state", lambda: alice_phone.presences(bob))
    assert now.state == ONLINE

    killed_ms = int(time.time() * 1000)
    killed = time.monotonic()
    stack.gateways[1].kill()
    try:
        bound = ROUTE_TTL_S + POLL_S + SLACK_S
        offline = await alice_phone.wait(
            "bob offline",
            lambda: [p for p in alice_phone.presences(bob) if p.state == OFFLINE],
            timeout=bound,
        )
        took = time.monotonic() - killed
        assert took <= bound, took
        # Last seen: the route's last refresh (every TTL/3) before the kill.
        last_seen = offline[-1].last_seen_ms
        assert killed_ms - ROUTE_TTL_S / 3 * 1000 - 1000 <= last_seen <= killed_ms + 500
        # Shown online until then: the dead route counted while it was live.
        assert [p.state for p in alice_phone.presences(bob)] == [ONLINE, OFFLINE]
    finally:
        stack.gateways[1].start()
