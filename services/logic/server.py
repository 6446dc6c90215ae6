"""Wiring of logic: settings -> migrations -> database, seqsvc, NATS -> domain
objects -> gRPC servicer and background loops (outbox cleaner and relay, repair).

`python -m logic` applies the migrations (component "logic"), then serves.
`python -m logic migrate` only applies them; `python -m logic new-store-epoch`
gives the database a new store epoch (docs/protocol.md, "Receiving", step 6).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import psycopg

from imcommon.config import ConfigError
from imcommon.server import Runtime
from imcommon.server import main as serve_main
from imcommon.telemetry import internal_channel
from imcommon.tls import ChannelTLS
from logic import repo
from logic.config import Settings
from logic.events import TriggerPublisher
from logic.fanout import Fanout
from logic.faults import Faults
from logic.groups import Groups
from logic.outbox import OutboxCleaner, OutboxRelay
from logic.reads import Reader
from logic.repair import Repairer
from logic.send import Sender
from logic.seq import SeqClientSource
from logic.servicer import SERVICE_NAME, LogicServicer, add_to_server
from logic.store import open_database
from logic.telemetry import BacklogSampler, Telemetry
from seqsvc.client import SeqClient

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
    cleaner = OutboxCleaner(
        db, batch=settings.outbox_delete_batch, delay_s=settings.outbox_delete_delay_ms / 1000
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
        LogicServicer(sender, fanout, reader, groups, settings.send_messages_max_items),
        runtime.server,
    )
    runtime.expose(SERVICE_NAME)


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


def main(argv: list[str] | None = None) -> int:
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
