"""logic's backlog gauges (outbox, pending fan-outs) against a real PostgreSQL:
they read what the tables hold, and stay bounded by their cap."""

from __future__ import annotations

from imcommon.config import load_settings
from imcommon.metrics import Metrics
from logic import repo
from logic.config import Settings
from logic.store import open_database
from logic.telemetry import BacklogSampler, Telemetry


def gauge(metrics: Metrics, name: str) -> float:
    got = metrics.registry.get_sample_value(name)
    assert got is not None, name
    return got


async def test_backlog_gauges_follow_the_outbox_and_pending_fanouts(pg_dsn: str) -> None:
    await repo.migrate(pg_dsn)
    settings = load_settings(
        Settings,
        {
            "IM_LOGIC_DATABASE_URL": pg_dsn,
            "IM_LOGIC_SEQSVC_ADDRESS": "127.0.0.1:1",
            "IM_LOGIC_NATS_URL": "nats://127.0.0.1:1",
        },
    )
    metrics = Metrics("logic")
    async with open_database(settings) as db:
        sampler = BacklogSampler(db, Telemetry(metrics), interval_s=1)
        await sampler.sample_once()
        empty = [
            "im_logic_outbox_rows",
            "im_logic_outbox_oldest_age_seconds",
            "im_logic_fanout_pending_conversations",
            "im_logic_fanout_overdue_conversations",
            "im_logic_fanout_overdue_seconds",
            "im_logic_fanout_repairing_conversations",
        ]
        assert {name: gauge(metrics, name) for name in empty} == dict.fromkeys(empty, 0.0)

        async with db.pool.connection() as conn:
            # Three unpublished triggers, the oldest 30 s old; two conversations
            # not fanned out: one 10 s past its repair time and repaired once, one
            # not due yet.
            await conn.execute(
                """
                INSERT INTO outbox (msg_id, conversation_id, conv_seq, created_at) VALUES
                    (1, 'd:a:b', 1, now() - interval '30 seconds'),
                    (2, 'd:a:b', 2, now() - interval '20 seconds'),
                    (3, 'd:a:c', 1, now())
                """
            )
            await conn.execute(
                """
                INSERT INTO fanout_pending
                    (conversation_id, upto_conv_seq, upto_msg_id, attempts, repair_at) VALUES
                    ('d:a:b', 2, 2, 1, now() - interval '10 seconds'),
                    ('d:a:c', 1, 3, 0, now() + interval '60 seconds')
                """
            )
        await sampler.sample_once()

    assert gauge(metrics, "im_logic_outbox_rows") == 3
    assert 29 <= gauge(metrics, "im_logic_outbox_oldest_age_seconds") < 120
    assert gauge(metrics, "im_logic_fanout_pending_conversations") == 2
    assert gauge(metrics, "im_logic_fanout_overdue_conversations") == 1
    assert 9 <= gauge(metrics, "im_logic_fanout_overdue_seconds") < 100
    assert gauge(metrics, "im_logic_fanout_repairing_conversations") == 1


async def test_backlog_counts_stop_at_the_cap(pg_dsn: str) -> None:
    await repo.migrate(pg_dsn)
    settings = load_settings(Settings, {"IM_LOGIC_DATABASE_URL": pg_dsn})
    async with open_database(settings) as db, db.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO outbox (msg_id, conversation_id, conv_seq) "
            "SELECT i, 'd:a:b', i FROM generate_series(1, 50) AS i"
        )
        stats = await repo.backlog_stats(conn, cap=20)
    assert stats.outbox_rows == 20
