"""The cluster topology (imdev.cluster.ClusterStack): three NATS nodes with the
stream at three replicas, PostgreSQL primary plus a synchronous standby, services
on multi-host URLs. Two short runs across the faults that only a cluster has:

- the PostgreSQL primary killed with -9 while sends are in flight, the standby
  promoted, the old primary rebuilt as the new standby: every send is ACKed in
  the end, no ACKed message is lost, duplicated or reordered, the services found
  the new primary without a restart, and the deposed node refuses to start as a
  primary;
- the JetStream stream leader killed with -9 mid-traffic: a new leader takes
  over and every message reaches the recipient, pushed, exactly once, in order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from e2e_support import Inbox, assert_exactly_once_in_order, uid

from imclient import Client, SendResult, direct_conversation_id
from imdev.cluster import ClusterStack, primary_of


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterStack]:
    workdir = Path(tempfile.mkdtemp(prefix="imcluster-"))
    workdir.chmod(0o755)
    s = ClusterStack(workdir, gateways=1, logics=1, pushers=1)
    try:
        s.start(120)
    except BaseException:
        s.kill()
        raise
    yield s
    s.kill()
    if not os.environ.get("IM_KEEP_TEST_DIRS"):
        shutil.rmtree(workdir, ignore_errors=True)


def test_cluster_is_replicated(cluster: ClusterStack) -> None:
    """The topology is what it claims: a synchronous standby streams from the
    primary, the stream has a leader among three replicas, URLs name all nodes."""
    primary = cluster.primary_node
    assert cluster.primary_node.sync_standbys() == [cluster.standby.node_name]
    assert cluster.standby.in_recovery() and not primary.in_recovery()
    assert "target_session_attrs=read-write" in cluster.database_url
    assert len(cluster.nats_url.split(",")) == 3
    logic_env = cluster.logics[0].extra_env
    assert logic_env["IM_LOGIC_NATS_REPLICAS"] == "3"
    assert logic_env["IM_LOGIC_DATABASE_URL"] == cluster.database_url
    with psycopg.connect(primary.conninfo(), autocommit=True) as conn:
        row = conn.execute("SHOW synchronous_commit").fetchone()
    assert row == ("on",)


async def _send_all(client: Client, conv: str, bodies: list[str]) -> list[SendResult]:
    futures = [client.submit(conv, b) for b in bodies]
    async with asyncio.timeout(90):
        return list(await asyncio.gather(*futures))


async def test_postgres_failover_loses_no_acked_message(cluster: ClusterStack) -> None:
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    before = [f"before-{i:03d}" for i in range(30)]
    during = [f"during-{i:03d}" for i in range(30)]
    after = [f"after-{i:03d}" for i in range(10)]
    async with (
        Client(cluster.gateway_addresses, cluster.mint(alice, "a1"), insecure=True) as a,
        Client(cluster.gateway_addresses, cluster.mint(bob, "b1"), insecure=True) as b,
    ):
        inbox = Inbox(b, "bob")
        acked = await _send_all(a, conv, before)
        old = cluster.primary_node
        in_flight = [a.submit(conv, body) for body in during]
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill_primary)
        new = await asyncio.to_thread(cluster.promote_standby)
        await asyncio.to_thread(cluster.rebuild_deposed)
        async with asyncio.timeout(90):
            acked += await asyncio.gather(*in_flight)
        first_after = time.monotonic() - killed_at
        acked += await _send_all(a, conv, after)
        await inbox.wait_for(len(before) + len(during) + len(after), 30, conv)
        assert_exactly_once_in_order(inbox, conv, [*before, *during, *after])
        # The sender's ACKs: one per message, conv_seq strictly in send order.
        assert [r.conv_seq for r in acked] == sorted({r.conv_seq for r in acked})
    # Writes go to the promoted node; the old one is its streaming standby.
    assert primary_of(cluster.database_url) == new.port
    assert old.in_recovery() and cluster.primary_node.sync_standbys() == [old.node_name]
    # No service was restarted to get there.
    assert all(p.running() for p in cluster.services)
    assert first_after < 60, f"failover took {first_after:.1f}s"


def test_deposed_primary_never_starts_as_primary(tmp_path: Path) -> None:
    """A node killed as primary refuses to start until rebuilt as a standby."""
    from imdev.servers import PostgresNode

    node = PostgresNode("pgx", 0, tmp_path / "pgx")
    node.deposed = True
    with pytest.raises(RuntimeError, match="deposed"):
        node.prepare()


async def test_nats_stream_leader_kill_mid_traffic(cluster: ClusterStack) -> None:
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    first = [f"first-{i:03d}" for i in range(20)]
    second = [f"second-{i:03d}" for i in range(40)]
    async with (
        Client(cluster.gateway_addresses, cluster.mint(alice, "a1"), insecure=True) as a,
        Client(cluster.gateway_addresses, cluster.mint(bob, "b1"), insecure=True) as b,
    ):
        inbox = Inbox(b, "bob")
        await _send_all(a, conv, first)
        await inbox.wait_for(len(first), 30, conv)
        leader = await asyncio.to_thread(cluster.stream_leader)
        assert leader is not None, "the stream has no leader"
        victim = cluster.nats_nodes[leader]
        in_flight = [a.submit(conv, body) for body in second]
        await asyncio.to_thread(victim.kill)
        async with asyncio.timeout(60):
            await asyncio.gather(*in_flight)
        # Delivered with the old leader still dead: the other two carry on.
        await inbox.wait_for(len(first) + len(second), 30, conv)
        new_leader = await asyncio.to_thread(cluster.stream_leader)
        assert new_leader is not None and new_leader != leader
        await asyncio.to_thread(victim.start, 60.0)
        assert_exactly_once_in_order(inbox, conv, [*first, *second])
