"""Data lifecycle: the pruner that deletes what the retention settings let go.

Four kinds of rows, each deleted in small batches of short transactions (at most
`batch_rows` rows each, `SET LOCAL lock_timeout`), never holding a lock a send,
a fan-out or a sync waits for:

- timeline rows whose message is older than `timeline_s` (+ `margin_s`). A pass
  visits every user in user_id order (a loose index scan) and deletes, per user,
  the rows below a msg_id cutoff taken when the pass started (msg_ids rise with
  time: `repo.msg_id_at`). The same statement raises the user's `timeline_floor`
  to the highest seq it deleted, so I1 still sees the user's last committed seq
  when every row is gone, and Sync can tell a cursor below it that entries were
  deleted (`pruned_through_seq`). Fan-out writes no row for a message older than
  `timeline_s` (fanout.py), and the pruner's cutoff is `margin_s` older still, so
  no row below a completed pass's cutoff can appear after the pass visited its user.
- messages older than `messages_s`, below the cutoff of the last completed
  timeline pass (so no timeline row names them), fanned out (conv_seq at or below
  the conversation's watermark: a pending fan-out still needs them), and not their
  conversation's newest (its conv_seq is the floor of I5's check and of
  membership boundaries). A pass scans msg_id upward; it starts again from 0 at
  the next pass, so messages skipped for now (the newest of an idle conversation,
  a fan-out still pending) are looked at again later.
- dedup keys (the dedup window, `dedup_s`): only keys whose client_msg_id is a
  canonical UUIDv7 made before now - `dedup_s` - `margin_s`. Such ids sort by time,
  so a sender's old keys are one index range. A send whose UUIDv7 id is older than
  `dedup_s` and has no key is refused (send.py), so a resend of a message whose key
  was deleted is never stored twice; an id of another form has no age and its key
  is kept forever.
- outbox rows older than `outbox_s` whose conversation is fanned out past them.

Several logic processes may run a pruner: each batch locks the one progress row
(`retention_state`) with SKIP LOCKED, so at most one batch runs at a time and a
pruner that finds it locked skips that round. Passes start at most every
`pass_interval_s`; while there is work, a pause after each batch keeps the time
spent pruning at most `busy_share` of the wall time, in short bursts
(bench/prune.py measures what that costs the sends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from logic import repo
from logic.ids import uuid7_prefix
from logic.store import Database
from logic.telemetry import Telemetry

log = logging.getLogger(__name__)

DAY_S = 86_400.0
#: lock_timeout of a pruning transaction: it gives up (and tries again next round)
#: rather than queue behind anything.
LOCK_TIMEOUT_MS = 1000
#: statement_timeout of a pruning transaction's statements.
STATEMENT_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind of row is kept, in seconds (0: forever)."""

    timeline_s: float = 0.0
    messages_s: float = 0.0
    dedup_s: float = 0.0
    outbox_s: float = 0.0
    margin_s: float = 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.timeline_s or self.messages_s or self.dedup_s or self.outbox_s)


@dataclass
class Round:
    """What one round did: rows deleted per table, and whether work remains."""

    deleted: dict[str, int] = field(default_factory=dict)
    more: bool = False
    started: set[str] = field(default_factory=set)  # kinds that started a pass

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


class Pruner:
    def __init__(
        self,
        db: Database,
        policy: RetentionPolicy,
        *,
        batch_rows: int = 2000,
        batch_users: int = 200,
        interval_s: float = 60.0,
        pass_interval_s: float = 3600.0,
        pause_s: float = 0.02,
        busy_share: float = 1.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._db = db
        self._policy = policy
        self._tel = telemetry or Telemetry()
        self._rows = batch_rows
        self._users = batch_users
        self._interval = interval_s
        self._pass_interval = pass_interval_s
        self._pause = pause_s
        self._idle_per_busy = 1 / busy_share - 1

    async def run(self) -> None:
        """Background loop: while there is work, one batch at a time, each
        followed by a pause that keeps the time spent in batches at most
        `busy_share` of the wall time (and at least `pause_s`): short bursts,
        spread out, rather than one long one; when idle, a round every
        `interval_s`. A failed batch is logged and retried after the interval;
        only cancellation ends the loop."""
        if not self._policy.enabled:
            return
        while True:
            more = False
            for table, step in self._steps():
                started = time.monotonic()
                try:
                    _, busy, _ = await self._run_step(table, step, True)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("pruning batch failed", extra={"table": table, "error": repr(exc)})
                    busy = False
                more = more or busy
                if busy:
                    took = time.monotonic() - started
                    await asyncio.sleep(max(self._pause, took * self._idle_per_busy))
            if not more:
                await asyncio.sleep(self._interval)

    def _steps(self) -> list[tuple[str, Callable[[bool], Awaitable[tuple[int, bool, bool]]]]]:
        """The kinds the policy prunes, in order: timeline before messages (a
        message pass waits for the end of a timeline pass)."""
        p = self._policy
        steps: list[tuple[str, Callable[[bool], Awaitable[tuple[int, bool, bool]]]]] = []
        if p.timeline_s:
            steps.append(("timeline", self._timeline_batch))
        if p.messages_s:
            steps.append(("messages", self._messages_batch))
        if p.dedup_s:
            steps.append(("send_dedup", self._dedup_batch))
        if p.outbox_s:
            steps.append(("outbox", self._outbox_batch))
        return steps

    async def _run_step(
        self, table: str, step: Callable[[bool], Awaitable[tuple[int, bool, bool]]], may: bool
    ) -> tuple[int, bool, bool]:
        """One batch of one kind, in its span, counted."""
        with self._db.errors(), self._tel.db(f"prune_{table}") as span:
            deleted, more, started = await step(may)
            span.set_attributes({"im.rows": deleted, "im.more": more})
        if deleted:
            self._tel.pruned_rows.labels(table).inc(deleted)
        return deleted, more, started

    async def prune_once(self, may_start: set[str] | None = None) -> Round:
        """One batch of each kind of row the policy prunes (each its own
        transaction), in the order timeline, messages, send_dedup, outbox.
        `may_start` names the kinds that may start a new pass (None: all; a pass
        also waits for its interval); a started pass always goes on. Returns what
        was deleted; `more`: some kind has work left right now; `started`: the
        kinds that started a pass."""
        out = Round()
        for table, step in self._steps():
            deleted, more, started = await self._run_step(
                table, step, may_start is None or table in may_start
            )
            if started:
                out.started.add(table)
            out.deleted[table] = deleted
            out.more = out.more or more
        if out.total:
            log.debug("pruned", extra={"rows": out.deleted})
        return out

    async def prune_until_idle(self, max_rounds: int = 1_000_000) -> dict[str, int]:
        """Rounds back to back (no pauses) until none has work left, each kind
        starting at most one new pass (if due): what has expired by now is
        deleted when this returns. For tests, tools and benchmarks."""
        total: dict[str, int] = {}
        may_start = {"timeline", "messages", "send_dedup", "outbox"}
        for _ in range(max_rounds):
            done = await self.prune_once(may_start)
            may_start -= done.started
            for table, n in done.deleted.items():
                total[table] = total.get(table, 0) + n
            if not done.more:
                return total
        raise RuntimeError(f"pruning still had work after {max_rounds} rounds")

    # -- one batch of each kind -------------------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[repo.Conn]:
        async with self._db.pool.connection() as conn, conn.transaction():
            await conn.execute(
                f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}; "
                f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"
            )
            yield conn

    # Each returns (rows deleted, work left now, started a pass).

    async def _timeline_batch(self, may_start: bool) -> tuple[int, bool, bool]:
        async with self._transaction() as conn:
            st = await repo.lock_retention_state_tx(conn, self._pass_interval)
            if st is None:
                return 0, False, False  # another pruner is at work
            cutoff, after, started = st.tl_cutoff, st.tl_after, False
            if after is None:
                if not (may_start and st.tl_due):
                    return 0, False, False
                keep_ms = (self._policy.timeline_s + self._policy.margin_s) * 1000
                cutoff = await repo.msg_id_at(conn, st.now_ms - int(keep_ms))
                if cutoff <= st.tl_done:  # nothing newly expired since the last pass
                    await repo.save_retention_state_tx(conn, finished=("tl",))
                    return 0, False, True
                after, started = "", True
                log.info("timeline pruning pass started", extra={"msg_id_below": cutoff})
            users = await repo.next_timeline_users_tx(conn, after, self._users)
            if not users:
                await repo.save_retention_state_tx(
                    conn, tl_cutoff=cutoff, tl_done=cutoff, tl_after=None, finished=("tl",)
                )
                self._tel.prune_passes.labels("timeline").inc()
                log.info("timeline pruning pass done", extra={"msg_id_below": cutoff})
                return 0, False, started
            deleted = await repo.prune_timeline_tx(conn, users, cutoff, self._rows)
            # A full batch may have left rows of these users: visit them again.
            if deleted < self._rows:
                after = users[-1]
            await repo.save_retention_state_tx(conn, tl_cutoff=cutoff, tl_after=after)
            return deleted, True, started

    async def _messages_batch(self, may_start: bool) -> tuple[int, bool, bool]:
        async with self._transaction() as conn:
            st = await repo.lock_retention_state_tx(conn, self._pass_interval)
            if st is None:
                return 0, False, False
            bound, after, started = st.msg_bound, st.msg_after, False
            if after is None:
                # Not while a timeline pass runs: its end moves the bound up.
                if not (may_start and st.msg_due) or st.tl_after is not None:
                    return 0, False, False
                keep_ms = self._policy.messages_s * 1000
                bound = min(await repo.msg_id_at(conn, st.now_ms - int(keep_ms)), st.tl_done)
                if bound <= st.msg_bound:  # nothing newly expired: skipped ones wait
                    await repo.save_retention_state_tx(conn, finished=("msg",))
                    return 0, False, True
                after, started = 0, True
            deleted, last = await repo.prune_messages_tx(conn, after, bound, self._rows)
            if last is None:
                await repo.save_retention_state_tx(
                    conn, msg_bound=bound, msg_after=None, finished=("msg",)
                )
                self._tel.prune_passes.labels("messages").inc()
                return deleted, False, started
            await repo.save_retention_state_tx(conn, msg_bound=bound, msg_after=last)
            return deleted, True, started

    async def _dedup_batch(self, may_start: bool) -> tuple[int, bool, bool]:
        async with self._transaction() as conn:
            st = await repo.lock_retention_state_tx(conn, self._pass_interval)
            if st is None:
                return 0, False, False
            after, started = st.dedup_after, False
            if after is None:
                if not (may_start and st.dedup_due):
                    return 0, False, False
                after, started = "", True
            senders = await repo.next_dedup_senders_tx(conn, after, self._users)
            if not senders:
                await repo.save_retention_state_tx(conn, dedup_after=None, finished=("dedup",))
                self._tel.prune_passes.labels("send_dedup").inc()
                return 0, False, started
            keep_ms = (self._policy.dedup_s + self._policy.margin_s) * 1000
            below = uuid7_prefix(st.now_ms - int(keep_ms))
            deleted = await repo.prune_dedup_tx(conn, senders, below, self._rows)
            if deleted < self._rows:
                after = senders[-1]
            await repo.save_retention_state_tx(conn, dedup_after=after)
            return deleted, True, started

    async def _outbox_batch(self, may_start: bool) -> tuple[int, bool, bool]:
        if not may_start:  # outbox batches need no pass: "start" = take one
            return 0, False, False
        async with self._transaction() as conn:
            deleted = await repo.prune_outbox_tx(conn, self._policy.outbox_s, self._rows)
            full = deleted >= self._rows
            return deleted, full, not full


def policy_from_days(
    *,
    timeline_days: float,
    messages_days: float,
    dedup_days: float,
    outbox_s: float,
    margin_s: float,
) -> RetentionPolicy:
    return RetentionPolicy(
        timeline_s=timeline_days * DAY_S,
        messages_s=messages_days * DAY_S,
        dedup_s=dedup_days * DAY_S,
        outbox_s=outbox_s,
        margin_s=margin_s,
    )
