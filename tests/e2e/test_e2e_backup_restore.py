"""Backup and restore, as docs/operations.md ("Backup and restore") tells an
operator to do it, against a running stack with SDK clients that stay up
throughout:

1. a stack whose seqsvc has a database of its own (`seq`, as in a deployment
   with separate stores), a small fixed seqsvc step (so ceilings move often);
2. traffic (two direct conversations and a group); `pg_dump` of seqsvc's
   database under load, more traffic, `pg_dump` of logic's database under load,
   more traffic (lost by the restore: acknowledged after the backup);
3. the stack stops; a FRESH PostgreSQL (new cluster, same port) gets both dumps
   (pg_restore); a seqsvc started on them now WOULD hand out values at or below
   stored ones (its backup is older than logic's);
4. `python -m logic restore-fence`; the stack starts again on the same ports with
   fresh Redis and NATS; the same clients reconnect, sync and go on.

Checks: everything acknowledged before logic's backup began is in the restored
store once and every device has it exactly once; no device gets any message
twice; the clients' new sends get seqs, conv_seqs and msg_ids above everything
any device saw before (new msg_ids are not dropped as already seen), and reach
every member.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from e2e_support import Inbox, uid, wait_until

from imclient import Client, SendResult, direct_conversation_id
from imdev.servers import ROOT, PostgresServer, pg_bindir
from imdev.stack import Stack, StackPorts
from seqsvc.client import SeqClient

pytestmark = pytest.mark.slow

SEQ_DB = "seq"
MARGIN = 1_000_000


@dataclass
class Sent:
    sender: str
    conversation: str
    text: str
    result: SendResult
    acked_at: float  # time.monotonic()


def make_stack(workdir: Path, ports: StackPorts, token_secret: str | None = None) -> Stack:
    seq_url = f"host=127.0.0.1 port={ports.postgres} user=postgres dbname={SEQ_DB}"
    return Stack(
        workdir,
        ports=ports,
        token_secret=token_secret,
        env={
            "seqsvc": {
                "IM_SEQSVC_DATABASE_URL": seq_url,
                "IM_SEQSVC_STEP": "20",
                "IM_SEQSVC_MAX_STEP_FACTOR": "1",
            },
            # The restored store's leftovers (fan-outs pending at backup time) are
            # repaired quickly.
            "logic": {"IM_LOGIC_REPAIR_AFTER_S": "2"},
        },
    )


def start_services(stack: Stack, with_postgres: bool) -> None:
    """What Stack.start does, with seqsvc's own database created first."""
    servers = stack.infra if with_postgres else [stack.redis, stack.nats]
    for server in servers:
        server.start(60)
    if with_postgres:
        for name in (stack.database, SEQ_DB):
            stack.postgres.create_database(name)
    stack.seqsvc.start(60)
    for proc in [*stack.logics, *stack.pushers, *stack.gateways]:
        proc.start(60)


@pytest.fixture
def workdirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    if not os.environ.get("IM_KEEP_TEST_DIRS"):
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def new_workdir(made: list[Path]) -> Path:
    path = Path(tempfile.mkdtemp(prefix="imrestore-"))
    path.chmod(0o755)
    made.append(path)
    return path


def pg_tool(tool: str, postgres: PostgresServer, *args: str) -> None:
    connect = ["-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres"]
    subprocess.run(
        [str(pg_bindir() / tool), *connect, *args], check=True, capture_output=True, timeout=300
    )


def dump(postgres: PostgresServer, db: str, path: Path) -> None:
    """pg_dump -Fc: one consistent snapshot, taken at its start."""
    pg_tool("pg_dump", postgres, "-Fc", "-f", str(path), db)


def restore(postgres: PostgresServer, db: str, path: Path) -> None:
    pg_tool("pg_restore", postgres, "--exit-on-error", "-d", db, str(path))


def restore_fence(database_url: str, seqsvc_database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "logic", "restore-fence", "--margin", str(MARGIN)],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("services", "libs", "gen")),
            "IM_LOGIC_DATABASE_URL": database_url,
            "IM_SEQSVC_DATABASE_URL": seqsvc_database_url,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


class Traffic:
    """Senders that keep submitting while it runs; every ACK is recorded."""

    def __init__(self, lanes: list[tuple[Client, str, str]]) -> None:
        self.lanes = lanes  # (client, sender, conversation)
        self.sent: list[Sent] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._n = 0

    def start(self) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._lane(*lane)) for lane in self.lanes]

    async def _lane(self, client: Client, sender: str, conv: str) -> None:
        while not self._stop.is_set():
            self._n += 1
            text = f"{sender}-{self._n:05d}"
            result = await client.send(conv, text)
            self.sent.append(Sent(sender, conv, text, result, time.monotonic()))
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stops submitting; returns when every submitted message is acknowledged."""
        self._stop.set()
        async with asyncio.timeout(120):
            await asyncio.gather(*self._tasks)

    async def run_for(self, count: int) -> None:
        target = len(self.sent) + count
        await wait_until(lambda: len(self.sent) >= target, 120, f"{count} more ACKs")


async def test_backup_under_load_restore_into_a_fresh_cluster_clients_go_on(
    workdirs: list[Path],
) -> None:
    ports = StackPorts.free(gateways=1, logics=1, pushers=1)
    first = make_stack(new_workdir(workdirs), ports)
    second: Stack | None = None
    backups = new_workdir(workdirs)
    try:
        await asyncio.to_thread(start_services, first, True)
        gw = first.gateway_addresses
        ann, ben, cyd = uid("ann"), uid("ben"), uid("cyd")
        clients = {
            u: Client(gw, first.mint(u, "d1"), connect_timeout_s=60, insecure=True)
            for u in (ann, ben, cyd)
        }
        for c in clients.values():
            await c.start()
        inboxes = {u: Inbox(c, u) for u, c in clients.items()}
        group = (await clients[ann].create_group("team", [ben, cyd])).conversation_id
        ab, bc = direct_conversation_id(ann, ben), direct_conversation_id(ben, cyd)
        members = {ab: {ann, ben}, bc: {ben, cyd}, group: {ann, ben, cyd}}
        traffic = Traffic(
            [
                (clients[ann], ann, ab),
                (clients[ben], ben, ab),
                (clients[ben], ben, bc),
                (clients[cyd], cyd, group),
            ]
        )

        # Backups under load: seqsvc's first, logic's later (separate stores,
        # separate schedules: seqsvc's is the older one).
        traffic.start()
        await traffic.run_for(80)
        await asyncio.to_thread(dump, first.postgres, SEQ_DB, backups / "seq.dump")
        await traffic.run_for(120)
        logic_backup_at = time.monotonic()
        await asyncio.to_thread(dump, first.postgres, first.database, backups / "im.dump")
        await traffic.run_for(80)  # lost by the restore: after the backup
        await traffic.stop()
        for user, inbox in inboxes.items():
            expected = [s for s in traffic.sent if user in members[s.conversation]]
            await inbox.wait_for(len(expected), 60)
        seen_before = [m for inbox in inboxes.values() for m in inbox.messages]
        top_seq = max(m.seq for m in seen_before)
        top_conv_seq = max(m.conv_seq for m in seen_before)
        top_msg_id = max(m.msg_id for m in seen_before)
        kept = [s for s in traffic.sent if s.acked_at < logic_backup_at]

        # Disaster: the stack goes; the clients stay up and keep trying.
        await asyncio.to_thread(first.stop)

        # A fresh PostgreSQL cluster on the same port gets both backups.
        second = make_stack(new_workdir(workdirs), ports, first.token_secret)
        await asyncio.to_thread(second.postgres.start, 60)
        for db in (second.database, SEQ_DB):
            second.postgres.create_database(db)
        await asyncio.to_thread(restore, second.postgres, SEQ_DB, backups / "seq.dump")
        await asyncio.to_thread(restore, second.postgres, second.database, backups / "im.dump")
        with psycopg.connect(second.database_url) as conn:
            row = conn.execute(
                "SELECT max(seq) FROM timeline WHERE user_id = %s", (ann,)
            ).fetchone()
            assert row is not None
            ann_stored = int(row[0])
        # Without the fence, seqsvc would go back below what logic stored.
        await asyncio.to_thread(second.seqsvc.start, 60)
        async with SeqClient(second.seqsvc.address) as seq:
            assert await seq.next(f"u:{ann}") <= ann_stored
        await asyncio.to_thread(second.seqsvc.stop)

        fence = await asyncio.to_thread(
            restore_fence,
            second.database_url,
            second.seqsvc.extra_env["IM_SEQSVC_DATABASE_URL"],
        )
        assert fence.returncode == 0, fence.stderr
        await asyncio.to_thread(start_services, second, False)

        # Everything acknowledged before logic's backup is there, once.
        with psycopg.connect(second.database_url) as conn:
            stored = dict(
                conn.execute(
                    "SELECT client_msg_id, count(*) FROM messages GROUP BY client_msg_id"
                ).fetchall()
            )
        for s in kept:
            assert stored.get(s.result.client_msg_id) == 1, s
        # What was acknowledged after the backup is gone (that is what a backup
        # is); devices saw it, msg_ids and seqs included, before the disaster.
        lost = [s for s in traffic.sent if s.result.client_msg_id not in stored]
        assert lost and all(s.acked_at >= logic_backup_at for s in lost)
        assert max(s.result.msg_id for s in lost) == top_msg_id

        # The same clients reconnect, sync, and go on: new messages in every
        # conversation, which every member gets.
        for c in clients.values():
            await c.wait_ready(90)
        after = [
            await clients[ann].send(ab, "after-ann"),
            await clients[ben].send(bc, "after-ben"),
            await clients[cyd].send(group, "after-cyd"),
        ]
        for r in after:
            assert r.seq > top_seq and r.conv_seq > top_conv_seq and r.msg_id > top_msg_id
        for user, inbox in inboxes.items():
            want = {
                r.client_msg_id
                for r, conv in zip(after, (ab, bc, group), strict=True)
                if user in members[conv]
            }
            await wait_until(
                lambda inbox=inbox, want=want: want <= {m.client_msg_id for m in inbox.messages},
                60,
                f"{user} to get the messages sent after the restore",
            )
        for user, inbox in inboxes.items():
            msgs = inbox.messages
            ids = [m.client_msg_id for m in msgs]
            assert len(ids) == len(set(ids)), f"{user}: a message twice"
            assert len({m.msg_id for m in msgs}) == len(msgs), f"{user}: a msg_id twice"
            have = set(ids)
            for s in kept:
                if user in members[s.conversation]:
                    assert s.result.client_msg_id in have, (user, s)
        for inbox in inboxes.values():
            await inbox.close()
        for c in clients.values():
            await c.close()
    finally:
        first.kill()
        if second is not None:
            second.kill()
