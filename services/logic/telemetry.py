"""logic's metrics and spans (docs/operations.md lists every one).

Spans: one per database transaction (`logic.db.<op>`, a CLIENT span with the ids
it touches: msg_id, conversation, user; never a body), one per JetStream publish
(in events.py), one per repair action. Metrics: what was stored, fanned out,
published and repaired, how long each transaction took, and the backlog
(outbox, pending fan-outs) sampled by `BacklogSampler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind

from imcommon.metrics import Metrics
from logic import repo
from logic.store import Database

log = logging.getLogger(__name__)

#: Most ids put in one span attribute list (a page of a big group's fan-out).
MAX_IDS_PER_ATTRIBUTE = 64
#: Backlog counts stop at this many rows (the query stays cheap however big it is).
BACKLOG_COUNT_CAP = 100_000


def ids(values: Any) -> list[Any]:
    """At most MAX_IDS_PER_ATTRIBUTE distinct ids, in first-seen order."""
    out = list(dict.fromkeys(values))
    return out[:MAX_IDS_PER_ATTRIBUTE]


class Telemetry:
    """logic's tracer and metrics. `Telemetry()` (no registry) records into a
    private registry, for domain objects built outside a server (tests)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        m = metrics or Metrics("logic")
        self.tracer = trace.get_tracer("im.logic")
        self.sends = m.counter(
            "logic_sends",
            "Messages SendMessage stored (new) or found stored already (duplicate)",
            ["result"],
        )
        self.fanout_rows = m.counter(
            "logic_fanout_rows",
            "Recipient timeline rows handed out by Fanout: written now, or existing "
            "(an earlier call wrote it: a redelivery or a concurrent trigger)",
            ["result"],
        )
        self.publishes = m.counter(
            "logic_publishes",
            "MessageCommitted triggers published to JetStream, by source (send, relay, "
            "repair) and result (ok, failed)",
            ["source", "result"],
        )
        self.repairs = m.counter(
            "logic_repair_actions",
            "Repair-loop actions on overdue fan-outs: republished (a trigger), direct "
            "(logic fanned out itself), direct_failed",
            ["action"],
        )
        self.db_seconds = m.histogram(
            "logic_db_seconds", "Duration of one database transaction, by operation", ["op"]
        )
        self.outbox_rows = m.gauge(
            "logic_outbox_rows",
            f"Outbox rows not yet published and deleted (sampled; counts stop at "
            f"{BACKLOG_COUNT_CAP})",
        )
        self.outbox_oldest = m.gauge(
            "logic_outbox_oldest_age_seconds", "Age of the oldest outbox row (sampled; 0: empty)"
        )
        self.fanout_pending = m.gauge(
            "logic_fanout_pending_conversations",
            "Conversations with committed messages not yet fanned out (sampled)",
        )
        self.fanout_overdue = m.gauge(
            "logic_fanout_overdue_conversations",
            "Pending fan-outs past their repair time, waiting for the repair loop (sampled)",
        )
        self.fanout_overdue_s = m.gauge(
            "logic_fanout_overdue_seconds",
            "How long the most overdue pending fan-out is past its repair time (sampled; 0: none)",
        )
        self.fanout_repairing = m.gauge(
            "logic_fanout_repairing_conversations",
            "Pending fan-outs the repair loop acted on that are still not caught up (sampled)",
        )
        self.send_batch_size = m.histogram(
            "logic_send_batch_size",
            "Sends per SendMessage transaction (group commit): _count is the number of "
            "send transactions, _sum the sends they carried",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
        )
        self.send_queued = m.gauge(
            "logic_send_queued", "Sends waiting for the committer to take them into a batch"
        )
        self.pruned_rows = m.counter(
            "logic_pruned_rows",
            "Rows the retention pruner deleted, by table (timeline, messages, send_dedup, outbox)",
            ["table"],
        )
        self.prune_passes = m.counter(
            "logic_prune_passes",
            "Retention passes completed (timeline: every user visited; messages: every "
            "expired msg_id looked at; send_dedup: every sender visited)",
            ["kind"],
        )
        self.sample_failures = m.counter(
            "logic_backlog_sample_failures", "Backlog samples that failed (database unreachable)"
        )

    @contextlib.contextmanager
    def db(
        self,
        op: str,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = None,
        context: Context | None = None,
    ) -> Iterator[Span]:
        """A span and a latency observation around one database transaction. A send
        batch passes its parent `context` (the first caller's) and links the spans
        of the other sends it stores."""
        start = time.perf_counter()
        attrs = {"db.system.name": "postgresql", "db.operation.name": op, **(attributes or {})}
        try:
            with self.tracer.start_as_current_span(
                f"logic.db.{op}",
                context=context,
                kind=SpanKind.CLIENT,
                attributes=attrs,
                links=links,
            ) as span:
                yield span
        finally:
            self.db_seconds.labels(op).observe(time.perf_counter() - start)


class BacklogSampler:
    """Sets the backlog gauges from one cheap query every `interval_s` (index
    lookups and capped counts; every logic process samples the same tables)."""

    def __init__(self, db: Database, telemetry: Telemetry, *, interval_s: float) -> None:
        self._db = db
        self._tel = telemetry
        self._interval = interval_s

    async def sample_once(self) -> None:
        async with self._db.pool.connection(timeout=2.0) as conn:
            stats = await repo.backlog_stats(conn, BACKLOG_COUNT_CAP)
        t = self._tel
        t.outbox_rows.set(stats.outbox_rows)
        t.outbox_oldest.set(stats.outbox_oldest_s)
        t.fanout_pending.set(stats.pending)
        t.fanout_overdue.set(stats.overdue)
        t.fanout_overdue_s.set(stats.overdue_s)
        t.fanout_repairing.set(stats.repairing)

    async def run(self) -> None:
        while True:
            try:
                await self.sample_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._tel.sample_failures.inc()
                log.debug("backlog sample failed", extra={"error": repr(exc)})
            await asyncio.sleep(self._interval)
