"""Online delivery (I9): how long an acked message took to reach each device that
stayed connected, with the time faults were in progress taken out.

Pure: no I/O, no clock. Input is what the run recorded, on one monotonic clock:
every acked message with the time its first SendAck arrived; per device, the
windows during which it was connected (one per connection) and the first time
each msg_id reached it, tagged with the window it arrived in; every server
fault as a span (start, end).

For each acked message and each device of each member of its conversation whose
connection was open when the message was acked (a *pair*):

- received in that same connection: the online delivery time is
  `receipt - max(ack, end of the last fault in progress at any moment between
  the ack and the receipt)`, never below 0 (a push can beat the SendAck to the
  sender);
- not received while that connection lasted to the end of the run: the pair is
  `never` delivered; its time is counted up to the end of the run (a lower
  bound), with every fault after the ack taken out;
- the connection ended before the message arrived: not judged (the device went
  offline; what it gets after reconnecting is a sync, not an online delivery).
- its entry is at or below the Welcome head of that connection: not judged
  (the commit came before the Welcome, only its SendAck after; a client gets
  such an entry from its sync on connect, and a raw observer never syncs).

A pair is late (`online_late`) when its time is above `liveness_s` or it never
arrived.

Raw observers take a seq gap as a hole after a while and acknowledge past it
(`observer.py`). A pair that never arrived because its seq lay in such a hole is
judged only if the hole was skipped after the pair was due, i.e. at least
`liveness_s` after max(ack, end of the faults in progress between the ack and
the skip); otherwise the observer gave up on it before the server had to
deliver it, and it counts as `skipped` (not judged).

Per fault kind (for the table in docs/chaos.md): a fault counts for a pair when
it was in progress at some moment between the ack and the receipt (for a pair
never received: the `liveness_s` after the ack), or ended less than
`liveness_s` before the ack, since what a fault breaks can outlast its span
(routes missing after a Redis flush until the gateways register them again).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

#: Per-kind key of pairs no fault counts for: the normal path.
NO_FAULT = "none"


@dataclass(frozen=True)
class Window:
    """One connection of a device: from its Welcome to the end of its stream
    (None: still open at the end of the run). `head_seq` is the Welcome's
    timeline head when the device does not sync (a raw observer); 0 otherwise."""

    start: float
    end: float | None = None
    head_seq: int = 0

    def holds(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t <= self.end)


@dataclass(frozen=True)
class Receipt:
    """The first arrival of a msg_id on a device. `window` indexes the device's
    windows; None when the arrival could not be tied to one connection."""

    at: float
    window: int | None


@dataclass(frozen=True)
class Skip:
    """A raw observer took the seqs strictly between `after_seq` and `upto_seq`
    as a hole at `at`, during connection `window`, and acknowledged past them."""

    window: int
    after_seq: int
    upto_seq: int
    at: float


@dataclass
class DeviceTrack:
    user_id: str
    device_id: str
    observer: bool = False
    windows: list[Window] = field(default_factory=list)  # in start order, disjoint
    receipts: dict[int, Receipt] = field(default_factory=dict)
    skips: list[Skip] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.user_id}/{self.device_id}"


@dataclass(frozen=True)
class AckedMessage:
    msg_id: int
    conversation_id: str
    acked_at: float  # the first SendAck of the message
    # Whose timelines it belongs to when not every member's (a READ: its reader
    # and, in a direct conversation, the peer); None: the conversation's members.
    recipients: frozenset[str] | None = None


@dataclass(frozen=True)
class FaultSpan:
    kind: str
    start: float
    end: float


@dataclass(frozen=True)
class Pair:
    """One judged (message, device) pair."""

    msg_id: int
    conversation_id: str
    user_id: str
    device_id: str
    observer: bool
    acked_at: float
    base: float  # max(ack, end of the last fault in progress in the pair's window)
    received_at: float | None  # None: never, in a connection open to the end
    delay_s: float
    kinds: tuple[str, ...]  # fault kinds that count for the pair (module docs)

    @property
    def never(self) -> bool:
        return self.received_at is None

    def to_json(self, t0: float = 0.0) -> dict[str, object]:
        return {
            "msg_id": self.msg_id,
            "conversation_id": self.conversation_id,
            "device": f"{self.user_id}/{self.device_id}",
            "observer": self.observer,
            "acked_at": round(self.acked_at - t0, 3),
            "base": round(self.base - t0, 3),
            "received_at": None if self.received_at is None else round(self.received_at - t0, 3),
            "delay_s": round(self.delay_s, 3),
            "kinds": list(self.kinds),
        }


@dataclass
class OnlineReport:
    liveness_s: float
    pairs: int = 0  # judged pairs
    observer_pairs: int = 0  # of which on raw observers
    received: int = 0
    late: list[Pair] = field(default_factory=list)  # over the bound, or never
    never: int = 0
    skipped: int = 0  # not judged: an observer skipped past them before they were due
    max_delay_s: float = 0.0
    max_by_kind: dict[str, float] = field(default_factory=dict)
    pairs_by_kind: dict[str, int] = field(default_factory=dict)
    late_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def online_late(self) -> int:
        return len(self.late)

    def to_json(self, t0: float = 0.0, limit: int = 500) -> dict[str, object]:
        return {
            "liveness_s": self.liveness_s,
            "pairs": self.pairs,
            "observer_pairs": self.observer_pairs,
            "received": self.received,
            "online_late": self.online_late,
            "never": self.never,
            "skipped": self.skipped,
            "max_online_delivery_s": round(self.max_delay_s, 3),
            "max_by_kind": {k: round(v, 3) for k, v in sorted(self.max_by_kind.items())},
            "pairs_by_kind": dict(sorted(self.pairs_by_kind.items())),
            "late_by_kind": dict(sorted(self.late_by_kind.items())),
            "late": [p.to_json(t0) for p in self.late[:limit]],
        }


class _Faults:
    """Fault spans indexed by start, to find those overlapping an interval."""

    def __init__(self, spans: Iterable[FaultSpan]) -> None:
        self.spans = sorted(spans, key=lambda s: s.start)
        self.starts = [s.start for s in self.spans]
        self.longest = max((s.end - s.start for s in self.spans), default=0.0)

    def overlapping(self, a: float, b: float, reach: float = 0.0) -> list[FaultSpan]:
        """Spans in progress at some moment of [a, b], or that ended less than
        `reach` before `a`."""
        out = []
        i = bisect.bisect_right(self.starts, b)
        while i > 0:
            i -= 1
            s = self.spans[i]
            if s.start < a - reach - self.longest:
                break
            if s.end + reach >= a:
                out.append(s)
        return out

    def base(self, ack: float, until: float) -> float:
        """max(ack, end of the last fault in progress in [ack, until])."""
        return max([ack, *(s.end for s in self.overlapping(ack, max(ack, until)))])


def _window_at(windows: Sequence[Window], starts: Sequence[float], t: float) -> int | None:
    i = bisect.bisect_right(starts, t) - 1
    if i >= 0 and windows[i].holds(t):
        return i
    return None


def measure(
    messages: Iterable[AckedMessage],
    members: Mapping[str, Iterable[str]],
    devices: Iterable[DeviceTrack],
    faults: Iterable[FaultSpan],
    end: float,
    liveness_s: float,
    seq_of: Mapping[tuple[str, int], int] | None = None,
) -> OnlineReport:
    """Judges every pair (see the module docs). `end` is the end of the run
    (the end of quiesce); `seq_of` maps (user, msg_id) to the entry's seq in
    that user's timeline (the audit), needed only to tell the pairs an
    observer skipped."""
    report = OnlineReport(liveness_s)
    index = _Faults(faults)
    by_user: dict[str, list[DeviceTrack]] = {}
    for dev in devices:
        by_user.setdefault(dev.user_id, []).append(dev)
    starts = {id(dev): [w.start for w in dev.windows] for devs in by_user.values() for dev in devs}
    seq_of = seq_of or {}
    for m in sorted(messages, key=lambda m: (m.acked_at, m.msg_id)):
        users = m.recipients if m.recipients is not None else members.get(m.conversation_id, ())
        for user in sorted(users):
            for dev in by_user.get(user, ()):
                seq = seq_of.get((user, m.msg_id))
                pair = _judge(m, dev, starts[id(dev)], index, end, liveness_s, seq)
                if pair is SKIPPED:
                    report.skipped += 1
                elif isinstance(pair, Pair):
                    _count(report, pair, liveness_s)
    return report


#: `_judge`'s answer for a pair an observer skipped past before it was due.
SKIPPED = object()


def _judge(
    m: AckedMessage,
    dev: DeviceTrack,
    starts: Sequence[float],
    index: _Faults,
    end: float,
    liveness_s: float,
    seq: int | None,
) -> Pair | object | None:
    """The pair (m, dev) judged, SKIPPED, or None when it is not a pair."""
    w = _window_at(dev.windows, starts, m.acked_at)
    if w is None:
        return None  # not connected when the message was acked
    window = dev.windows[w]
    if seq is not None and seq <= window.head_seq:
        # Committed before the Welcome was written (its SendAck came later): the
        # client's sync on connect fetches it, which an observer never does.
        return None
    receipt = dev.receipts.get(m.msg_id)
    received: float | None
    if receipt is not None:
        if receipt.window != w:
            # Had it before this connection, or got it in a later one (by a
            # sync): either way not an online delivery of this connection.
            return None
        received = stop = receipt.at
    elif window.end is None:
        received, stop = None, end
    else:
        return None  # the connection ended first: what comes later is a sync
    if received is None and dev.observer and seq is not None:
        for sk in dev.skips:
            in_hole = sk.window == w and sk.after_seq < seq < sk.upto_seq
            if in_hole and sk.at < index.base(m.acked_at, sk.at) + liveness_s:
                return SKIPPED
    base = index.base(m.acked_at, stop)
    kinds_until = stop if received is not None else m.acked_at + liveness_s
    kinds = {s.kind for s in index.overlapping(m.acked_at, kinds_until, reach=liveness_s)}
    return Pair(
        m.msg_id,
        m.conversation_id,
        dev.user_id,
        dev.device_id,
        dev.observer,
        m.acked_at,
        base,
        received,
        max(0.0, stop - base),
        tuple(sorted(kinds)),
    )


def _count(report: OnlineReport, pair: Pair, liveness_s: float) -> None:
    report.pairs += 1
    report.observer_pairs += pair.observer
    late = pair.never or pair.delay_s > liveness_s
    if pair.never:
        report.never += 1
    else:
        report.received += 1
    if late:
        report.late.append(pair)
    report.max_delay_s = max(report.max_delay_s, pair.delay_s)
    for kind in pair.kinds or (NO_FAULT,):
        report.max_by_kind[kind] = max(report.max_by_kind.get(kind, 0.0), pair.delay_s)
        report.pairs_by_kind[kind] = report.pairs_by_kind.get(kind, 0) + 1
        if late:
            report.late_by_kind[kind] = report.late_by_kind.get(kind, 0) + 1
