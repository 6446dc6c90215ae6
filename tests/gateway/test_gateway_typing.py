"""The typing relay without the stack: its limits, its checks and its fan-out,
with in-memory stand-ins for logic's GetMembers, the routes, the hub and the
other gateways (the same Protocols the real ones implement), and a hand-driven
clock. The real stack is tests/e2e/test_e2e_typing_presence.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from gateway.config import Settings
from gateway.connection import Connection
from gateway.ephemeral import PERMISSION_DENIED, Refused
from gateway.routes import Route
from gateway.typing_relay import TypingRelay
from im.gateway.v1 import gateway_pb2
from imcommon.metrics import Metrics

HERE = "10.0.0.1:9000"
Code = gateway_pb2.FrameErrorCode


@dataclass(eq=False)
class FakeStream:
    """What the relay uses of a Connection: key, typing_state, signal, frame_error."""

    key: tuple[str, str]
    typing_state: Any = None
    presence_state: Any = None
    closing: bool = False
    frames: list[gateway_pb2.ServerFrame] = field(default_factory=list)

    def signal(self, frame: gateway_pb2.ServerFrame) -> bool:
        if self.closing:
            return False
        self.frames.append(frame)
        return True

    def frame_error(self, frame: str, code: int, reason: str) -> bool:
        return self.signal(
            gateway_pb2.ServerFrame(
                frame_error=gateway_pb2.FrameError(frame=frame, code=code, reason=reason)  # type: ignore[arg-type]
            )
        )

    def log_extra(self) -> dict[str, object]:
        return {"user_id": self.key[0], "device_id": self.key[1]}

    def of(self, kind: str) -> list[Any]:
        return [getattr(f, kind) for f in self.frames if f.WhichOneof("frame") == kind]


class FakeMembers:
    def __init__(self, conversations: dict[str, list[str]]) -> None:
        self.conversations = conversations
        self.calls: list[tuple[str, str]] = []

    async def members(self, user_id: str, conversation_id: str) -> Sequence[str]:
        self.calls.append((user_id, conversation_id))
        members = self.conversations.get(conversation_id, [])
        if user_id not in members:
            raise Refused(PERMISSION_DENIED, "not a member of the conversation")
        return list(members)


class FakeRoutes:
    def __init__(self) -> None:
        self.routes: dict[str, list[Route]] = {}
        self.lookups = 0

    async def lookup_many(self, user_ids: list[str]) -> dict[str, list[Route]]:
        self.lookups += 1
        return {u: self.routes[u] for u in user_ids if u in self.routes}


class FakeHub:
    def __init__(self) -> None:
        self.streams: dict[str, list[FakeStream]] = {}

    def add(self, user: str, device: str) -> FakeStream:
        stream = FakeStream((user, device))
        self.streams.setdefault(user, []).append(stream)
        return stream

    def devices(self, user_id: str) -> list[Connection]:
        return cast(list[Connection], self.streams.get(user_id, []))


class FakePeers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]], gateway_pb2.ServerFrame]] = []

    async def signal(
        self,
        address: str,
        targets: list[tuple[str, str]],
        frame: gateway_pb2.ServerFrame,
        timeout_s: float,
    ) -> int | None:
        self.calls.append((address, targets, frame))
        return len(targets)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    relay: TypingRelay
    members: FakeMembers
    routes: FakeRoutes
    hub: FakeHub
    peers: FakePeers
    clock: Clock

    def typing(self, stream: FakeStream, conversation: str, typing: bool = True) -> None:
        self.relay.on_typing(
            cast(Connection, stream),
            gateway_pb2.Typing(conversation_id=conversation, typing=typing),
        )

    async def settle(self) -> None:
        """Lets every fan-out started so far finish."""
        for _ in range(20):
            await asyncio.sleep(0)
        tasks = list(self.relay._tasks)
        if tasks:
            await asyncio.gather(*tasks)


def rig(**settings: Any) -> Rig:
    members = FakeMembers({"g1": ["alice", "bob", "carol"], "g2": ["alice", "bob"]})
    routes, hub, peers, clock = FakeRoutes(), FakeHub(), FakePeers(), Clock()
    relay = TypingRelay(
        Settings(**settings),
        members,
        routes,
        hub,
        peers,
        lambda: HERE,
        Metrics("typing-test"),
        clock=clock,
    )
    return Rig(relay, members, routes, hub, peers, clock)


def errors(stream: FakeStream) -> list[tuple[int, str]]:
    return [(e.code, e.reason) for e in stream.of("frame_error")]


async def test_notice_reaches_other_members_here_and_elsewhere_never_the_typer() -> None:
    r = rig(typing_expires_ms=4000)
    typer = FakeStream(("alice", "phone"))
    alice_laptop = r.hub.add("alice", "laptop")  # the typer's own other device: nothing
    bob = r.hub.add("bob", "phone")
    r.routes.routes = {
        "alice": [Route("laptop", "c0", HERE), Route("tablet", "c9", "gw2:1")],
        "bob": [Route("phone", "c1", HERE)],
        "carol": [Route("phone", "c2", "gw2:1"), Route("desk", "c3", "gw3:1")],
    }
    r.typing(typer, "g1")
    await r.settle()

    notices = bob.of("typing")
    assert [(n.conversation_id, n.user_id, n.device_id, n.typing) for n in notices] == [
        ("g1", "alice", "phone", True)
    ]
    assert notices[0].expires_in_ms == 4000
    assert alice_laptop.frames == [] and typer.frames == []
    # One Signal per other gateway, only carol's devices (alice's tablet is hers).
    calls = sorted((address, targets) for address, targets, _ in r.peers.calls)
    assert calls == [("gw2:1", [("carol", "phone")]), ("gw3:1", [("carol", "desk")])]
    assert all(f.typing == notices[0] for _, _, f in r.peers.calls)


async def test_a_repeat_within_the_min_interval_is_rate_limited_a_change_is_not() -> None:
    r = rig(typing_min_interval_ms=1000)
    typer = FakeStream(("alice", "phone"))
    bob = r.hub.add("bob", "phone")

    r.typing(typer, "g2", True)
    r.typing(typer, "g2", True)  # repeat at once: refused
    r.typing(typer, "g2", False)  # "stopped": a change, passes
    await r.settle()
    assert [n.typing for n in bob.of("typing")] == [True, False]
    assert [c for c, _ in errors(typer)] == [Code.FRAME_ERROR_CODE_RATE_LIMITED]
    assert "1000 ms" in errors(typer)[0][1]

    r.clock.now += 0.5
    r.typing(typer, "g2", False)  # same state 0.5 s later: refused
    r.clock.now += 0.6
    r.typing(typer, "g2", False)  # 1.1 s after the last forwarded one: passes
    await r.settle()
    assert [n.typing for n in bob.of("typing")] == [True, False, False]
    assert len(errors(typer)) == 2


async def test_a_flood_over_many_conversations_hits_the_bucket() -> None:
    r = rig(typing_rate_per_s=2, typing_burst=3)
    r.members.conversations.update({f"c{i}": ["alice", "bob"] for i in range(10)})
    typer = FakeStream(("alice", "phone"))
    bob = r.hub.add("bob", "phone")
    for i in range(10):
        r.typing(typer, f"c{i}")
    await r.settle()
    assert len(bob.of("typing")) == 3
    codes = [c for c, _ in errors(typer)]
    assert codes == [Code.FRAME_ERROR_CODE_RATE_LIMITED] * 7
    r.clock.now += 1.0  # two tokens back
    r.typing(typer, "c0", False)
    r.typing(typer, "c1", False)
    r.typing(typer, "c2", False)
    await r.settle()
    assert len(bob.of("typing")) == 5
    assert len(errors(typer)) == 8


@pytest.mark.parametrize("conversation", ["", "x" * 201])
async def test_a_bad_conversation_id_is_invalid(conversation: str) -> None:
    r = rig()
    typer = FakeStream(("alice", "phone"))
    r.typing(typer, conversation)
    await r.settle()
    assert [c for c, _ in errors(typer)] == [Code.FRAME_ERROR_CODE_INVALID_ARGUMENT]
    assert r.members.calls == []


async def test_a_non_member_is_refused_and_nothing_is_sent() -> None:
    r = rig()
    mallory = FakeStream(("mallory", "phone"))
    bob = r.hub.add("bob", "phone")
    r.typing(mallory, "g1")
    await r.settle()
    assert [c for c, _ in errors(mallory)] == [Code.FRAME_ERROR_CODE_PERMISSION_DENIED]
    assert bob.frames == [] and r.peers.calls == [] and r.routes.lookups == 0


async def test_groups_above_the_member_limit_are_refused() -> None:
    r = rig(typing_max_members=3)
    r.members.conversations["big"] = ["alice", "bob", "carol", "dave"]
    typer = FakeStream(("alice", "phone"))
    bob = r.hub.add("bob", "phone")
    r.typing(typer, "big")
    r.typing(typer, "g1")  # 3 members: relayed
    await r.settle()
    [(code, reason)] = errors(typer)
    assert code == Code.FRAME_ERROR_CODE_INVALID_ARGUMENT
    assert "at most 3 members" in reason and "has 4" in reason
    assert [n.conversation_id for n in bob.of("typing")] == ["g1"]


async def test_members_are_cached_and_a_new_member_is_asked_for_again() -> None:
    r = rig(typing_members_cache_s=5, typing_min_interval_ms=0)
    alice = FakeStream(("alice", "phone"))
    r.typing(alice, "g2", True)
    r.typing(alice, "g2", False)
    await r.settle()
    assert r.members.calls == [("alice", "g2")]  # the second came from the cache

    r.members.conversations["g2"].append("dave")  # added after the cache was filled
    dave = FakeStream(("dave", "phone"))
    r.typing(dave, "g2")
    await r.settle()
    assert errors(dave) == []
    assert r.members.calls[-1] == ("dave", "g2")

    r.clock.now += 6  # expired: asked again
    r.typing(alice, "g2", True)
    await r.settle()
    assert r.members.calls[-1] == ("alice", "g2") and len(r.members.calls) == 3


async def test_redis_down_still_reaches_local_streams_without_an_error() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    r = rig()

    async def down(user_ids: list[str]) -> dict[str, list[Route]]:
        raise RedisConnectionError("down")

    r.routes.lookup_many = down  # type: ignore[method-assign]
    typer = FakeStream(("alice", "phone"))
    bob = r.hub.add("bob", "phone")
    r.typing(typer, "g2")
    await r.settle()
    assert len(bob.of("typing")) == 1
    assert errors(typer) == []
