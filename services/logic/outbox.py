"""The transactional outbox after the commit (I4).

A send commits its outbox row with the message and publishes the trigger itself
right after the commit. `OutboxCleaner` then deletes the published rows in batches
(one statement for many sends, off the send's path). `OutboxRelay` publishes what a
crash, a NATS outage or a publish timeout left behind. A row published twice (the
send and the relay, or the relay after a crash before the delete) is harmless: the
Nats-Msg-Id dedups it inside JetStream's window, and a trigger is idempotent anyway.
"""

from __future__ import annotations

import asyncio
import logging

from im.logic.v1 import logic_pb2
from logic import repo
from logic.events import TriggerPublisher
from logic.rounds import run_rounds
from logic.store import Database
from logic.telemetry import Telemetry, ids

log = logging.getLogger(__name__)


class OutboxCleaner:
    """Deletes published outbox rows in batches. A row that is never deleted (the
    process died, the database failed) is republished by the relay later."""

    def __init__(self, db: Database, *, batch: int, delay_s: float) -> None:
        self._db = db
        self._batch = batch
        self._delay = delay_s
        self._pending: list[int] = []
        self._wake = asyncio.Event()

    def discard(self, msg_id: int) -> None:
        """Schedules the deletion of a published row. Never blocks."""
        self._pending.append(msg_id)
        self._wake.set()

    async def run(self) -> None:
        """Background loop; flushes what is pending when cancelled."""
        try:
            while True:
                await self._wake.wait()
                if self._delay and len(self._pending) < self._batch:
                    await asyncio.sleep(self._delay)
                self._wake.clear()
                await self.flush()
        finally:
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        while self._pending:
            ids, self._pending = self._pending[: self._batch], self._pending[self._batch :]
            try:
                async with self._db.pool.connection(timeout=2.0) as conn:
                    await repo.delete_outbox(conn, ids)
            except Exception as exc:
                log.warning(
                    "could not delete published outbox rows; the relay will republish them",
                    extra={"rows": len(ids), "error": repr(exc)},
                )
                return


class OutboxRelay:
    """Publishes outbox rows older than `min_age_s` and deletes them. Several logic
    processes may run it: rows are claimed with FOR UPDATE SKIP LOCKED."""

    def __init__(
        self,
        db: Database,
        publisher: TriggerPublisher,
        *,
        interval_s: float,
        min_age_s: float,
        batch: int,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._db = db
        self._tel = telemetry or Telemetry()
        self._publisher = publisher
        self._interval = interval_s
        self._min_age = min_age_s
        self._batch = batch

    async def run(self) -> None:
        await run_rounds(self.relay_once, self._batch, self._interval, "outbox relay")

    async def relay_once(self) -> int:
        """One round; returns the number of rows published and deleted."""
        if not self._publisher.connected:
            return 0
        done: list[int] = []
        async with self._db.pool.connection() as conn, conn.transaction():
            rows = await repo.claim_outbox_tx(conn, self._min_age, self._batch)
            if not rows:
                return 0
            # A span only for rounds that found work: an idle relay traces nothing.
            with self._tel.tracer.start_as_current_span(
                "logic.outbox.relay", attributes={"im.rows": len(rows)}
            ) as span:
                for msg_id, conv, conv_seq in rows:
                    trigger = logic_pb2.MessageCommitted(
                        conversation_id=conv, msg_id=msg_id, conv_seq=conv_seq
                    )
                    if not await self._publisher.publish(trigger, str(msg_id), "relay"):
                        break
                    done.append(msg_id)
                if done:
                    await repo.delete_outbox(conn, done)
                span.set_attributes({"im.published": len(done), "im.msg_ids": ids(done)})
        if done:
            log.info(
                "outbox relay published leftovers",
                extra={"rows": len(done), "msg_ids": ids(done)},
            )
        return len(done)
