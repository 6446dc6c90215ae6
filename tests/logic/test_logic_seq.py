"""A seqsvc that hands out a lower value than one already committed: logic's own
check (the production code path) refuses it, and nothing is written (I1, I5).

The domain objects run in the test process, on the real database, with the real
seqsvc behind a wrapper that subtracts from the values of chosen keys, and are
served over a real in-process gRPC server so the status code is checked too."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import pytest
from logic_support import LogicClient, query, table_counts

from imcommon.config import load_settings
from imcommon.server import EXCLUSIVE_PORT
from imdev.servers import NatsServer, ServiceProcess
from logic import repo
from logic.config import Settings
from logic.conversations import Conversations
from logic.errors import SequenceRegression
from logic.events import TriggerPublisher
from logic.fanout import Fanout
from logic.faults import Faults
from logic.groups import Groups
from logic.outbox import OutboxCleaner
from logic.reads import Reader
from logic.send import Sender, SendRequest
from logic.seq import SeqClientSource
from logic.servicer import LogicServicer, add_to_server
from logic.store import open_database
from seqsvc.client import SeqClient


class RewindingSeq:
    """The real seqsvc's values, minus `rewind[key]` for the keys the test picks."""

    def __init__(self, inner: SeqClientSource) -> None:
        self.inner = inner
        self.rewind: dict[str, int] = {}

    async def next_batch(self, keys: Sequence[str]) -> list[int]:
        values = await self.inner.next_batch(keys)
        return [v - self.rewind.get(k, 0) for k, v in zip(keys, values, strict=True)]


@dataclass
class InProcess:
    seq: RewindingSeq
    client: LogicClient
    make_sender: Callable[[Faults], Sender]
    fanout: Fanout


@pytest.fixture
async def app(
    pg_dsn: str, seqsvc: ServiceProcess, nats_server: NatsServer, key_prefix: str
) -> AsyncIterator[InProcess]:
    settings = load_settings(
        Settings,
        {
            "IM_LOGIC_DATABASE_URL": pg_dsn,
            "IM_LOGIC_SEQSVC_ADDRESS": seqsvc.address,
            "IM_LOGIC_NATS_URL": nats_server.url(),
        },
    )
    await repo.migrate(pg_dsn)
    async with (
        open_database(settings) as db,
        SeqClient(seqsvc.address) as seq_client,
        TriggerPublisher(nats_server.url(), key_prefix, key_prefix.lower()) as publisher,
    ):
        seq = RewindingSeq(SeqClientSource(seq_client))
        cleaner = OutboxCleaner(db, batch=100, delay_s=0)

        def make_sender(faults: Faults) -> Sender:
            return Sender(
                db,
                seq,
                publisher,
                cleaner,
                max_body_bytes=1024,
                repair_after_s=60,
                faults=faults,
            )

        fanout = Fanout(
            db,
            seq,
            default_messages=100,
            max_messages=100,
            max_rows=100,
            max_response_bytes=1 << 20,
            repair_after_s=60,
            faults=Faults(),
        )
        reader = Reader(
            db,
            sync_default_limit=100,
            sync_max_limit=100,
            history_default_limit=100,
            history_max_limit=100,
            max_response_bytes=1 << 20,
        )
        groups = Groups(db, max_group_size=10, max_name_chars=10, faults=Faults())
        server = grpc.aio.server(options=[EXCLUSIVE_PORT])
        conversations = Conversations(
            db, unread_cap=100, default_page=100, max_page=100, receipts_max_page=100
        )
        add_to_server(
            LogicServicer(make_sender(Faults()), fanout, reader, groups, conversations), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = LogicClient(f"127.0.0.1:{port}")
        try:
            yield InProcess(seq, client, make_sender, fanout)
        finally:
            await client.close()
            await server.stop(None)


def request(cmid: str) -> SendRequest:
    return SendRequest("alice", "d1", cmid, "d:alice:bob", 1, b"x")


async def test_lower_user_seq_is_refused_and_nothing_written(app: InProcess, pg_dsn: str) -> None:
    first = await app.client.send("alice", "d:alice:bob", client_msg_id="ok-1")
    before = await table_counts(pg_dsn)

    app.seq.rewind["u:alice"] = 10**12
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await app.client.send("alice", "d:alice:bob", client_msg_id="bad-1")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "not above the last committed" in (err.value.details() or "")
    assert await table_counts(pg_dsn) == before

    # The same for conv_seq.
    app.seq.rewind = {"c:d:alice:bob": 10**12}
    with pytest.raises(SequenceRegression, match="conv_seq"):
        await app.make_sender(Faults()).send(request("bad-2"))
    assert await table_counts(pg_dsn) == before

    # It is this check that refuses: with it switched off the value is stored.
    app.seq.rewind = {"u:alice": 10**12}
    ack = await app.make_sender(Faults(skip_seq_check=True)).send(request("bad-3"))
    assert ack.seq < first.seq


async def test_lower_seq_in_fanout_is_refused_and_nothing_written(
    app: InProcess, pg_dsn: str
) -> None:
    ack = await app.client.send("alice", "d:alice:bob", client_msg_id="f-1")
    await app.fanout.fanout("d:alice:bob")  # bob gets a first row
    await app.client.send("alice", "d:alice:bob", client_msg_id="f-2")
    before = await table_counts(pg_dsn)

    app.seq.rewind["u:bob"] = 10**12
    with pytest.raises(SequenceRegression, match="u:bob"):
        await app.fanout.fanout("d:alice:bob")
    assert await table_counts(pg_dsn) == before
    watermark = await query(
        pg_dsn, "SELECT watermark FROM fanout_state WHERE conversation_id = 'd:alice:bob'"
    )
    assert watermark == [(ack.conv_seq,)]

    app.seq.rewind = {}
    result = await app.fanout.fanout("d:alice:bob")
    assert [d.user_id for d in result.deliveries] == ["alice", "bob"]
    bob = await app.client.timeline("bob")
    assert len(bob) == 2 and bob[0][0] < bob[1][0]
