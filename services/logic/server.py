"""Wiring of logic: settings -> migrations -> database, seqsvc, NATS -> domain
objects -> gRPC servicer and background loops (outbox cleaner and relay, repair,
retention).

`python -m logic` applies the migrations (component "logic"), then serves.
`python -m logic migrate` only applies them; `python -m logic new-store-epoch`
gives the database a new store epoch (docs/protocol.md, "Receiving", step 6);
`python -m logic restore-fence` is the step between a restore and the first start
(docs/lifecycle.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

import psycopg

from imcommon.config import ConfigError
from imcommon.server import Runtime
from imcommon.server import main as serve_main
from imcommon.telemetry import internal_channel
from imcommon.tls import ChannelTLS
from logic import repo
from logic.config import Settings
from logic.conversations import Conversations
from logic.events import TriggerPublisher
from logic.fanout import Fanout
from logic.faults import Faults
from logic.groups import Groups
from logic.outbox import OutboxCleaner, OutboxRelay
from logic.reads import Reader
from logic.repair import Repairer
from logic.retention import Pruner, RetentionPolicy, policy_from_days
from logic.send import Sender
from logic.seq import SeqClientSource
from logic.servicer import SERVICE_NAME, LogicServicer, add_to_server
from logic.state import StateWriter
from logic.store import open_database
from logic.telemetry import BacklogSampler, Telemetry
from seqsvc.client import SeqClient
from seqsvc.repo import LeaseHeld, raise_floor

log = logging.getLogger(__name__)


class StartupFailed(Exception):
    """logic cannot start (PostgreSQL stayed unreachable); exit status 1."""


class StartupAborted(Exception):
    """SIGTERM arrived while logic was still starting; exit status 0."""


async def migrate_at_start(settings: Settings, stop: asyncio.Event) -> None:
    """Applies the migrations, retrying while PostgreSQL is unreachable (it may be
    restarting too) for up to db_startup_wait_s. Not SERVING meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.db_startup_wait_s
    delay = 0.2
    while True:
        try:
            applied = await repo.migrate(settings.database_url)
        except psycopg.OperationalError as exc:
            detail = str(exc).strip().splitlines()[0][:200]
            if loop.time() + delay > deadline:
                raise StartupFailed(
                    f"PostgreSQL unreachable for {settings.db_startup_wait_s}s: {detail}"
                ) from None
            log.warning("PostgreSQL not reachable yet; retrying", extra={"error": detail})
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, 5.0)
                continue
            raise StartupAborted() from None
        if applied:
            log.info("migrations applied", extra={"applied": applied})
        return


async def build(settings: Settings, runtime: Runtime) -> None:
    settings.require_dependencies()
    faults = Faults.from_settings(settings)
    await migrate_at_start(settings, runtime.stop_requested)

    telemetry = Telemetry(runtime.metrics)
    db = await runtime.stack.enter_async_context(open_database(settings))
    client_tls = ChannelTLS.of(settings.client_tls())
    async with db.pool.connection() as conn:
        store_epoch = await repo.store_epoch(conn)
    log.info("message store opened", extra={"store_epoch": store_epoch})
    seq_client = await runtime.stack.enter_async_context(
        SeqClient(
            settings.seqsvc_address,
            coalesce_window_ms=settings.seqsvc_coalesce_window_ms,
            deadline_s=settings.seqsvc_deadline_s,
            max_retries=settings.seqsvc_max_retries,
            token=settings.seqsvc_token or None,
            # Reconnect within a fraction of a second after a seqsvc restart (the
            # gRPC default backs off up to two minutes).
            channel_options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
            # Trace context and client metrics on every NextBatch: seqsvc's spans
            # join the send's (or the fan-out's) trace.
            channel_factory=lambda address, options: internal_channel(
                address, runtime.metrics, options, tls=client_tls
            ),
        )
    )
    seq = SeqClientSource(seq_client)
    publisher = await runtime.stack.enter_async_context(
        TriggerPublisher(
            settings.nats_url,
            settings.nats_stream,
            settings.nats_subject_prefix,
            replicas=settings.nats_replicas,
            timeout_s=settings.publish_timeout_s,
            telemetry=telemetry,
        )
    )
    retention = retention_policy(settings)
    cleaner = OutboxCleaner(
        db, batch=settings.outbox_delete_batch, delay_s=settings.outbox_delete_delay_ms / 1000
    )
    events = StateWriter(
        db,
        seq,
        publisher,
        cleaner,
        max_body_bytes=settings.max_body_bytes,
        repair_after_s=settings.repair_after_s,
        edit_window_s=settings.edit_window_s,
        recall_window_s=settings.recall_window_s,
        faults=faults,
        telemetry=telemetry,
        dedup_window_s=retention.dedup_s,
    )
    sender = Sender(
        db,
        seq,
        publisher,
        cleaner,
        max_body_bytes=settings.max_body_bytes,
        repair_after_s=settings.repair_after_s,
        faults=faults,
        telemetry=telemetry,
        batch_max=settings.send_batch_max,
        linger_s=settings.send_linger_ms / 1000,
        committers=settings.send_committers,
        dedup_window_s=retention.dedup_s,
        events=events,
        ack_before_publish=settings.ack_before_publish,
    )
    # Unwinds before the pool and the NATS connection close: sends still queued
    # fail UNAVAILABLE, batches being published finish.
    runtime.stack.push_async_callback(sender.close)
    fanout = Fanout(
        db,
        seq,
        default_messages=settings.fanout_default_messages,
        max_messages=settings.fanout_max_messages,
        max_rows=settings.fanout_max_rows,
        max_response_bytes=settings.max_response_bytes,
        repair_after_s=settings.repair_after_s,
        faults=faults,
        telemetry=telemetry,
        max_batch_conversations=settings.fanout_batch_max_conversations,
        timeline_retention_s=retention.timeline_s,
    )
    reader = Reader(
        db,
        sync_default_limit=settings.sync_default_limit,
        sync_max_limit=settings.sync_max_limit,
        history_default_limit=settings.history_default_limit,
        history_max_limit=settings.history_max_limit,
        max_response_bytes=settings.max_response_bytes,
        heads_max_users=settings.heads_max_users,
        telemetry=telemetry,
        store_epoch=store_epoch,
    )
    groups = Groups(
        db,
        max_group_size=settings.max_group_size,
        max_name_chars=settings.max_group_name_chars,
        faults=faults,
        telemetry=telemetry,
    )
    conversations = Conversations(
        db,
        unread_cap=settings.unread_count_cap,
        default_page=settings.conversations_default_page,
        max_page=settings.conversations_max_page,
        receipts_max_page=settings.receipts_max_page,
        telemetry=telemetry,
    )
    relay = OutboxRelay(
        db,
        publisher,
        interval_s=settings.outbox_relay_interval_s,
        min_age_s=settings.outbox_relay_min_age_s,
        batch=settings.outbox_relay_batch,
        telemetry=telemetry,
    )
    repairer = Repairer(
        db,
        publisher,
        fanout,
        interval_s=settings.repair_interval_s,
        after_s=settings.repair_after_s,
        max_backoff_s=settings.repair_max_backoff_s,
        direct_after=settings.repair_direct_after,
        batch=settings.repair_batch,
        telemetry=telemetry,
    )

    loops = [
        runtime.spawn(cleaner.run(), "logic-outbox-cleaner"),
        runtime.spawn(relay.run(), "logic-outbox-relay"),
    ]
    if not faults.skip_repair:
        loops.append(runtime.spawn(repairer.run(), "logic-repair"))
    if retention.enabled:
        pruner = Pruner(
            db,
            retention,
            batch_rows=settings.retention_batch_rows,
            batch_users=settings.retention_batch_users,
            interval_s=settings.retention_interval_s,
            pass_interval_s=settings.retention_pass_interval_s,
            pause_s=settings.retention_batch_pause_ms / 1000,
            busy_share=settings.retention_busy_share,
            telemetry=telemetry,
        )
        loops.append(runtime.spawn(pruner.run(), "logic-retention"))
    if settings.metrics_port:
        sampler = BacklogSampler(db, telemetry, interval_s=settings.metrics_sample_s)
        loops.append(runtime.spawn(sampler.run(), "logic-backlog-sampler"))

    async def stop_loops() -> None:
        # Before the pool and the NATS connection close (the exit stack unwinds in
        # reverse order), so the cleaner's last flush still has a database.
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    runtime.stack.push_async_callback(stop_loops)

    add_to_server(
        LogicServicer(
            sender, fanout, reader, groups, conversations, settings.send_messages_max_items
        ),
        runtime.server,
    )
    runtime.expose(SERVICE_NAME)


def retention_policy(settings: Settings) -> RetentionPolicy:
    return policy_from_days(
        timeline_days=settings.retention_timeline_days,
        messages_days=settings.retention_messages_days,
        dedup_days=settings.retention_dedup_days,
        outbox_s=settings.retention_outbox_s,
        margin_s=settings.retention_margin_s,
    )


def _migrate_command(settings: Settings) -> int:
    if not settings.database_url.strip():
        sys.stderr.write("logic: required setting not set: IM_LOGIC_DATABASE_URL\n")
        return 2
    applied = asyncio.run(repo.migrate(settings.database_url))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def _new_store_epoch_command(settings: Settings) -> int:
    """Gives the database a new store epoch: every device then forgets its cursor
    and resyncs from seq 0 (showing its timeline again). For a restore from a
    backup older than what devices have seen, whose cursors may stand above the
    restored timelines. Restart logic afterwards: it reads the epoch at start."""
    if not settings.database_url.strip():
        sys.stderr.write("logic: required setting not set: IM_LOGIC_DATABASE_URL\n")
        return 2

    async def run() -> tuple[str, str]:
        await repo.migrate(settings.database_url)
        async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
            old = await repo.store_epoch(conn)
            new = await repo.new_store_epoch(conn)
            await conn.commit()
        return old, new

    old, new = asyncio.run(run())
    print(f"store epoch: {old} -> {new}")
    return 0


#: Default jump of restore-fence above everything stored (see restore_fence).
RESTORE_MARGIN = 1_000_000_000


async def restore_fence(
    database_url: str, seqsvc_database_url: str, margin: int, *, dry_run: bool = False
) -> dict[str, int]:
    """After a restore, before seqsvc and logic serve: every value seqsvc hands
    out next, and every new msg_id, lands above everything stored and `margin`
    beyond, so that

    - I1/I5 hold: seqsvc's own store may come from an older backup than logic's
      (its max_seq below the stored seqs), or from one made with the messages, in
      which case values it handed out after the backup may still sit in clients'
      cursors; the margin must exceed what seqsvc handed out after the backup;
    - no msg_id is reused: devices drop a msg_id they have seen as a duplicate,
      and messages stored after the backup (lost by the restore) had msg_ids
      above the restored sequence.

    Applies logic's migrations (a restored store may predate some), reads logic's
    store, raises seqsvc's floor (`seqsvc.repo.raise_floor`: refused while a
    seqsvc instance is live), then moves the msg_id sequence. Returns what it
    found and set. Run it once per restore (a second run only jumps further)."""
    await repo.migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        highest = await repo.highest_stored_seq(conn)
        out = {"highest_stored_seq": highest, "seqsvc_floor": highest + margin}
        if dry_run:
            return {**out, "highest_msg_id": await repo.last_msg_id(conn)}
        # The same floor for every section, so the section count does not matter
        # (this one is only used to create the rows of an empty seqsvc store).
        before, epoch = await raise_floor(seqsvc_database_url, highest + margin, sections=1024)
        msg_id = await repo.advance_msg_ids(conn, margin)
    return {
        **out,
        "seqsvc_max_seq_before": before,
        "seqsvc_epoch": epoch,
        "next_msg_id": msg_id + 1,
    }


def restore_fence_command(argv: list[str]) -> int:
    """`python -m logic restore-fence`: see `restore_fence`. Exit status 0 done,
    1 refused (a seqsvc instance is live), 2 bad arguments or settings."""
    parser = argparse.ArgumentParser(
        prog="python -m logic restore-fence",
        description="After restoring logic's (and seqsvc's) database, before starting "
        "seqsvc and logic: raise seqsvc's floor and the msg_id sequence above "
        "everything stored, plus a margin. Reads IM_LOGIC_DATABASE_URL.",
    )
    parser.add_argument(
        "--seqsvc-database-url",
        default=os.environ.get("IM_SEQSVC_DATABASE_URL", ""),
        help="seqsvc's database (default: $IM_SEQSVC_DATABASE_URL)",
    )
    parser.add_argument(
        "--margin",
        type=int,
        default=RESTORE_MARGIN,
        help=f"how far above the highest stored value (default {RESTORE_MARGIN:,}): more "
        "than seqsvc handed out, and msg_ids logic assigned, after the backup was taken",
    )
    parser.add_argument("--dry-run", action="store_true", help="only print what it would set")
    args = parser.parse_args(argv)
    if not 0 <= args.margin < 2**60:
        parser.error("--margin must be between 0 and 2**60")
    if not args.seqsvc_database_url.strip() and not args.dry_run:
        parser.error("--seqsvc-database-url (or IM_SEQSVC_DATABASE_URL) is required")
    url = os.environ.get("IM_LOGIC_DATABASE_URL", "")
    if not url.strip():
        sys.stderr.write("logic: required setting not set: IM_LOGIC_DATABASE_URL\n")
        return 2
    try:
        done = asyncio.run(
            restore_fence(url, args.seqsvc_database_url, args.margin, dry_run=args.dry_run)
        )
    except LeaseHeld as exc:
        sys.stderr.write(f"logic restore-fence: refused: {exc}\n")
        return 1
    print("restore-fence: " + json.dumps(done))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["restore-fence"]:
        return restore_fence_command(args[1:])
    try:
        return serve_main(
            "logic",
            Settings,
            build,
            argv=argv,
            commands={"migrate": _migrate_command, "new-store-epoch": _new_store_epoch_command},
        )
    except ConfigError as exc:
        sys.stderr.write(f"logic: {exc}\n")
        return 2
    except StartupFailed as exc:
        sys.stderr.write(f"logic: {exc}\n")
        return 1
    except StartupAborted:
        return 0
