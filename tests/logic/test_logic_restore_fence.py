"""The restore fence (`python -m logic restore-fence`): after a restore in which
seqsvc's store is older than logic's (its max_seq below seqs logic stored),
seqsvc WOULD hand out values at or below stored ones; logic's I1/I5 checks refuse
them (nothing written) rather than corrupt a timeline; and after the fence every
new seq, conv_seq and msg_id is above everything stored.

seqsvc's "older backup" is its sections table as it was earlier in the test,
written back while seqsvc is stopped (what restoring that backup would do to
those rows). tests/e2e/test_e2e_backup_restore.py does the same with pg_dump and
a fresh PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import grpc
import psycopg
import pytest
from logic_support import LogicClient, query

from im.logic.v1 import logic_pb2 as pb
from imdev.servers import ROOT, ServiceProcess
from seqsvc.client import SeqClient

MARGIN = 1_000_000


@pytest.fixture
def seqsvc(spawn: Callable[..., ServiceProcess], pg_dsn: str) -> ServiceProcess:
    """A seqsvc with a tiny fixed step, so that a few sends move a section's
    max_seq past what an older backup of it holds."""
    return spawn(
        "seqsvc",
        {
            "IM_SEQSVC_DATABASE_URL": pg_dsn,
            "IM_SEQSVC_STEP": "10",
            "IM_SEQSVC_MAX_STEP_FACTOR": "1",
        },
    )


def restore_fence(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "logic", "restore-fence", "--margin", str(MARGIN), *args],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("services", "libs", "gen")),
            "IM_LOGIC_DATABASE_URL": dsn,
            "IM_SEQSVC_DATABASE_URL": dsn,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


async def stored_max(dsn: str) -> tuple[int, int, int]:
    """(ann's highest seq, the conversation's highest conv_seq, the highest msg_id)."""
    rows = await query(
        dsn,
        "SELECT (SELECT max(seq) FROM timeline WHERE user_id = 'ann'), "
        "(SELECT max(conv_seq) FROM messages), (SELECT max(msg_id) FROM messages)",
    )
    return int(rows[0][0]), int(rows[0][1]), int(rows[0][2])


async def send_error(client: LogicClient, body: bytes) -> grpc.aio.AioRpcError:
    """The error of a send from ann, once logic has reconnected to seqsvc (a send
    is retried with the same id while it is UNAVAILABLE)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            await client.send("ann", "d:ann:ben", body, client_msg_id="one-id", timeout=15)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                return exc
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the send was stored")


async def send_retrying(client: LogicClient, body: bytes) -> pb.SendMessageResponse:
    """A send from ann, retried with the same id while logic reconnects to seqsvc."""
    cmid = uuid.uuid4().hex
    deadline = time.monotonic() + 20
    while True:
        try:
            return await client.send("ann", "d:ann:ben", body, client_msg_id=cmid, timeout=15)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_restore_from_an_older_seqsvc_backup_needs_the_fence(
    pg_dsn: str, seqsvc: ServiceProcess, client: LogicClient
) -> None:
    for _ in range(3):
        await client.send("ann", "d:ann:ben")
    with psycopg.connect(pg_dsn) as conn:  # seqsvc's backup, taken now
        backup = conn.execute("SELECT section, max_seq FROM seqsvc_sections").fetchall()
    for _ in range(40):  # more traffic: ann's section's max_seq moves on
        await client.send("ann", "d:ann:ben")
    seq_before, conv_before, msg_before = await stored_max(pg_dsn)

    # Restore seqsvc's older backup (logic's store stays as it is) and start it.
    seqsvc.stop()
    with psycopg.connect(pg_dsn) as conn:
        for section, max_seq in backup:
            conn.execute(
                "UPDATE seqsvc_sections SET max_seq = %s WHERE section = %s", (max_seq, section)
            )
    seqsvc.start()

    # seqsvc now hands out values at or below stored ones...
    async with SeqClient(seqsvc.address) as seq:
        assert await seq.next("u:ann") <= seq_before
    # ... and logic refuses them: INTERNAL, nothing written (I1/I5's check).
    err = await send_error(client, b"refused")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "not above the last committed" in (err.details() or "")
    assert await stored_max(pg_dsn) == (seq_before, conv_before, msg_before)
    assert await query(pg_dsn, "SELECT count(*) FROM messages WHERE body = 'refused'") == [(0,)]

    # The fence is refused while seqsvc runs (it could not reach its memory).
    refused = restore_fence(pg_dsn)
    assert refused.returncode == 1 and "holds the lease" in refused.stderr

    # With seqsvc stopped, the fence; then every new value is above the stored ones.
    seqsvc.stop()
    dry = restore_fence(pg_dsn, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f'"highest_stored_seq": {max(seq_before, conv_before)}' in dry.stdout
    done = restore_fence(pg_dsn)
    assert done.returncode == 0, done.stderr
    seqsvc.start()
    ack = await send_retrying(client, b"after the fence")
    assert ack.seq > seq_before + MARGIN
    assert ack.conv_seq > conv_before + MARGIN
    assert ack.msg_id > msg_before + MARGIN
    deliveries = await client.fanout_all("d:ann:ben")
    assert {d.user_id for d in deliveries if d.message.msg_id == ack.msg_id} == {"ann", "ben"}
