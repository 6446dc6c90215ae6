"""The repair loop (I8): PostgreSQL is the truth, JetStream only the fast path.

Every send marks its conversation in `fanout_pending` (same transaction); a Fanout
that catches up clears the mark. A mark still there `repair_after_s` after it was
set means the trigger was lost (JetStream lost its store, a publish and the relay
both failed, the pusher is down or far behind). This loop claims such marks
(FOR UPDATE SKIP LOCKED, so several logic processes split them and never repeat
each other's work), moves their next repair time back exponentially, and:

- re-publishes a MessageCommitted trigger with a Nats-Msg-Id unique to this repair
  attempt, so the pusher fans out AND pushes to the online devices as usual;
- fans out into the timelines itself when JetStream cannot take the trigger, or
  after `direct_after` triggers did not help (the pusher is down): the messages are
  then in every timeline and devices get them on their next sync, though not pushed.
"""

from __future__ import annotations

import logging
import uuid

from im.logic.v1 import logic_pb2
from logic import repo
from logic.events import TriggerPublisher
from logic.fanout import Fanout
from logic.rounds import run_rounds
from logic.store import Database
from logic.telemetry import Telemetry

log = logging.getLogger(__name__)

#: Bound on the Fanout calls of one direct repair (each is one page).
MAX_DIRECT_ROUNDS = 1000


class Repairer:
    def __init__(
        self,
        db: Database,
        publisher: TriggerPublisher,
        fanout: Fanout,
        *,
        interval_s: float,
        after_s: float,
        max_backoff_s: float,
        direct_after: int,
        batch: int,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._db = db
        self._tel = telemetry or Telemetry()
        self._publisher = publisher
        self._fanout = fanout
        self._interval = interval_s
        self._after = after_s
        self._max_backoff = max_backoff_s
        self._direct_after = direct_after
        self._batch = batch

    async def run(self) -> None:
        await run_rounds(self.repair_once, self._batch, self._interval, "repair")

    async def repair_once(self) -> int:
        """One round; returns the number of conversations claimed."""
        with self._db.errors():
            async with self._db.pool.connection() as conn:
                claims = await repo.claim_repairs(conn, self._batch, self._after, self._max_backoff)
        for claim in claims:
            await self._repair(claim)
        return len(claims)

    async def _repair(self, claim: repo.RepairClaim) -> None:
        """One claimed conversation, in a span of its own (a new trace: the sends
        that left it behind are long finished; msg_id names the newest of them)."""
        with self._tel.tracer.start_as_current_span(
            "logic.repair",
            attributes={
                "im.conversation_id": claim.conversation_id,
                "im.msg_id": claim.upto_msg_id,
                "im.conv_seq": claim.upto_conv_seq,
                "im.attempt": claim.attempts,
            },
        ) as span:
            action = await self._repair_claim(claim)
            span.set_attribute("im.repair_action", action)
        self._tel.repairs.labels(action).inc()

    async def _repair_claim(self, claim: repo.RepairClaim) -> str:
        """Re-triggers or fans out directly; returns the action taken."""
        extra = {
            "conversation_id": claim.conversation_id,
            "msg_id": claim.upto_msg_id,
            "upto_conv_seq": claim.upto_conv_seq,
            "attempt": claim.attempts,
        }
        if claim.attempts <= self._direct_after:
            trigger = logic_pb2.MessageCommitted(
                conversation_id=claim.conversation_id,
                msg_id=claim.upto_msg_id,
                conv_seq=claim.upto_conv_seq,
            )
            if await self._publisher.publish(trigger, f"repair-{uuid.uuid4().hex}", "repair"):
                # A first repair usually means the pusher is behind; later ones that
                # the trigger was lost again or nobody consumes.
                level = logging.INFO if claim.attempts == 1 else logging.WARNING
                log.log(level, "fan-out overdue; trigger re-published", extra=extra)
                return "republished"
        log.warning("fan-out overdue; fanning out directly", extra=extra)
        try:
            for _ in range(MAX_DIRECT_ROUNDS):
                result = await self._fanout.fanout(claim.conversation_id)
                if not result.has_more:
                    break
        except Exception as exc:
            # The claim's backoff brings the conversation back; nothing is lost.
            log.warning("direct fan-out failed", extra={**extra, "error": repr(exc)})
            return "direct_failed"
        return "direct"
