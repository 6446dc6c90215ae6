"""GetHeads: the head of each user's timeline, read from PostgreSQL (the gateways'
liveness checks, I9)."""

from __future__ import annotations

import grpc
import pytest
from logic_support import LogicClient

from im.logic.v1 import logic_pb2 as pb


async def heads(client: LogicClient, users: list[str]) -> list[int]:
    resp = await client.stub.GetHeads(pb.GetHeadsRequest(user_ids=users), timeout=10)
    return list(resp.heads)


async def test_heads_follow_the_timelines(client: LogicClient) -> None:
    assert await heads(client, []) == []
    assert await heads(client, ["nobody", "nobody2"]) == [0, 0]

    ack = await client.send("ha", "d:ha:hb", b"one", client_msg_id="h-1")
    # The sender's own row is committed with the send; the peer's only by fan-out.
    assert await heads(client, ["hb", "ha", "nobody"]) == [0, ack.seq, 0]
    await client.fanout_all("d:ha:hb")
    bob = await client.timeline("hb")
    assert await heads(client, ["hb", "ha"]) == [bob[-1][0], ack.seq]

    second = await client.send("ha", "d:ha:hb", b"two", client_msg_id="h-2")
    await client.fanout_all("d:ha:hb")
    bob = await client.timeline("hb")
    # Repeats keep their positions: one value per requested id, in order.
    assert await heads(client, ["ha", "hb", "ha"]) == [second.seq, bob[-1][0], second.seq]


@pytest.mark.parametrize(
    ("users", "needle"),
    [(["ok", "not a valid id!"], "not a valid user id"), (["u"] * 1001, "at most 1000")],
)
async def test_bad_requests_are_invalid_argument(
    client: LogicClient, users: list[str], needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await heads(client, users)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")
