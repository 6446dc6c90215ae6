"""chaos.seqcheck: the seqsvc probe's judgement (a value not above the one before
for its key) and the store check (conv_seq per conversation and sender_seq per
sender strictly increasing in msg_id order), against logic's real schema."""

from __future__ import annotations

import asyncio

import psycopg

from chaos.seqcheck import SeqProbe, repeats_of, store_order_violations
from logic import repo


def test_a_repeat_or_a_step_back_is_found() -> None:
    assert repeats_of([1, 2, 5, 9]) == []
    assert repeats_of([1, 2, 2, 3]) == [(2, 2, 2)]
    assert repeats_of([10, 11, 4]) == [(2, 11, 4)]


def test_the_probe_report_counts_repeats_per_key() -> None:
    probe = SeqProbe("127.0.0.1:1", keys=2)
    probe.keys[0].values = [1, 2, 3]
    probe.keys[1].values = [7, 8, 8, 5]
    report = probe.report()
    assert (report.values, report.repeats) == (7, 2)
    assert report.examples == [
        "chaosprobe:1: 8 after 8 (call 2)",
        "chaosprobe:1: 5 after 8 (call 3)",
    ]


def _insert(conn: psycopg.Connection, conv: str, conv_seq: int, sender: str, seq: int) -> None:
    conn.execute(
        "INSERT INTO messages (conversation_id, conv_seq, sender_id, sender_device_id, "
        "client_msg_id, sender_seq, content_type, body, server_time_ms) "
        "VALUES (%s, %s, %s, 'd1', gen_random_uuid()::text, %s, 1, '', 0)",
        (conv, conv_seq, sender, seq),
    )


def test_the_store_check_finds_seqsvc_values_out_of_msg_id_order(pg_dsn: str) -> None:
    asyncio.run(repo.migrate(pg_dsn))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _insert(conn, "d:a:b", 1, "a", 1)
        _insert(conn, "d:a:b", 2, "b", 1)
        _insert(conn, "d:a:c", 1, "a", 5)
        assert store_order_violations(pg_dsn) == []
        # seqsvc went back for the conversation, and for a's timeline.
        _insert(conn, "d:a:c", 3, "a", 7)
        _insert(conn, "d:a:c", 2, "a", 6)
    found = store_order_violations(pg_dsn)
    assert len(found) == 2, found
    assert found[0].startswith("conv_seq of d:a:c: 2 at msg_id")
    assert found[1].startswith("sender_seq of a: 6 at msg_id")
