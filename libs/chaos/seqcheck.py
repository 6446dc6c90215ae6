"""I6 under the chaos faults: seqsvc never hands out a value twice for a key nor
goes back, across its own kills and restarts, section moves between instances,
PostgreSQL failovers and cuts.

Two checks:

- `SeqProbe`: while the faults run, a few tasks call seqsvc directly (the routing
  client, given one instance's address, as logic is) for their own probe keys,
  one call at a time per key, and keep every value answered. Per key, each value
  must be above the one before: a repeat or a step back is a violation. This sees
  what seqsvc hands out, including what logic's I1 guard would refuse before it
  reaches the store.
- `store_order_violations`: the store after the run. Per conversation the
  messages' conv_seq, and per sender the messages' sender_seq (both from seqsvc),
  must strictly increase in msg_id order: both are allocated under the lock that
  also orders the inserts (msg_id is assigned in insert order), so a value that
  went back shows as a step down. Uniqueness is the schema's (UNIQUE
  (conversation_id, conv_seq), PRIMARY KEY (user_id, seq)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import psycopg

log = logging.getLogger(__name__)


@dataclass
class ProbeKey:
    key: str
    values: list[int] = field(default_factory=list)
    errors: int = 0


@dataclass
class SeqProbeReport:
    keys: int
    values: int
    errors: int
    #: Values not above the value before for their key (repeats or steps back).
    repeats: int
    examples: list[str]

    def result(self) -> dict[str, object]:
        return {"seqsvc_values": self.values, "seqsvc_repeats": self.repeats}


def repeats_of(values: list[int]) -> list[tuple[int, int, int]]:
    """(index, value before, value) for each value not above the one before."""
    return [
        (i, values[i - 1], values[i]) for i in range(1, len(values)) if values[i] <= values[i - 1]
    ]


class SeqProbe:
    """Calls seqsvc `Next` for `keys` keys, one call at a time per key, with a
    pause of `pause_s` between calls, until stopped. Failed calls (a fault in
    progress) are counted and retried; they are not violations."""

    def __init__(
        self, address: str, keys: int = 4, pause_s: float = 0.05, prefix: str = "chaosprobe"
    ) -> None:
        self.address = address
        self.keys = [ProbeKey(f"{prefix}:{i}") for i in range(keys)]
        self.pause_s = pause_s
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        from seqsvc.client import SeqClient

        client = await self._stack.enter_async_context(
            SeqClient(
                self.address,
                deadline_s=2.0,
                max_retries=3,
                channel_options=[
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ],
            )
        )
        self._tasks = [asyncio.create_task(self._run(client, k)) for k in self.keys]

    async def _run(self, client: object, k: ProbeKey) -> None:
        from seqsvc.client import SeqClient

        assert isinstance(client, SeqClient)
        while not self._stop.is_set():
            try:
                k.values.append(await client.next(k.key))
            except Exception as exc:  # a fault in progress: seqsvc answers again later
                k.errors += 1
                log.debug("seqsvc probe call failed: %r", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.2)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.pause_s)

    async def stop(self) -> SeqProbeReport:
        """Stops the calls (waits for the ones in flight) and judges the values."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stack.aclose()
        return self.report()

    def report(self) -> SeqProbeReport:
        examples: list[str] = []
        repeats = 0
        for k in self.keys:
            bad = repeats_of(k.values)
            repeats += len(bad)
            examples += [f"{k.key}: {after} after {before} (call {i})" for i, before, after in bad]
        return SeqProbeReport(
            keys=len(self.keys),
            values=sum(len(k.values) for k in self.keys),
            errors=sum(k.errors for k in self.keys),
            repeats=repeats,
            examples=examples[:20],
        )


STORE_ORDER_SQL = """
SELECT 'conv_seq', conversation_id, msg_id, prev, conv_seq FROM (
    SELECT conversation_id, msg_id, conv_seq,
           lag(conv_seq) OVER (PARTITION BY conversation_id ORDER BY msg_id) AS prev
    FROM messages) t
WHERE prev IS NOT NULL AND conv_seq <= prev
UNION ALL
SELECT 'sender_seq', sender_id, msg_id, prev, sender_seq FROM (
    SELECT sender_id, msg_id, sender_seq,
           lag(sender_seq) OVER (PARTITION BY sender_id ORDER BY msg_id) AS prev
    FROM messages) t
WHERE prev IS NOT NULL AND sender_seq <= prev
LIMIT 100
"""


def store_order_violations(database_url: str, timeout_s: float = 60.0) -> list[str]:
    """The store's seqsvc values that are not strictly increasing in msg_id order
    (see the module docstring); empty when all is well. Retries the connection
    until `timeout_s` (the database may be restarting after the faults)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(database_url, connect_timeout=5) as conn:
                rows = conn.execute(STORE_ORDER_SQL).fetchall()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return [
        f"{what} of {owner}: {value} at msg_id {msg_id} after {prev}"
        for what, owner, msg_id, prev, value in rows
    ]
