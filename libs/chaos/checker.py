"""The checker: reads what every client device was handed and what every sender
was told, and lists every way the promise was broken.

Pure: no I/O, no clock. Input is the run's record (`History`): per-device
histories in the order the SDK handed messages to the application, every send
attempted (with its SendAck, if one arrived), and the conversations' members.
Output is a `Report` whose `violations` name each broken guarantee precisely
enough to find it in the logs (kind, user, device, conversation, msg_id,
client_msg_id).

What it verifies (design.md, "The promise"):

- no loss: every message that got a SendAck is on every device of every member
  of its conversation, the sender's own devices included; a message that did not
  get an ACK but reached some device was committed, so it must reach them all too
  (I4: nothing committed is stranded);
- no duplicates: no device is handed one msg_id twice, and no (sender,
  client_msg_id) is stored under two msg_ids, acked or not;
- order: one sender's messages in a conversation carry conv_seqs in send order
  (same SDK session: call order; any device: ack-before-send causality), and
  every device is handed them in that order; every device is handed the other
  members' messages of a conversation in conv_seq order; every device is handed
  its user's timeline in strictly increasing seq; devices agree on each
  message's conv_seq and on each user's seq -> msg_id;
- nothing invented: every handed message was sent by someone, into the
  conversation and with the body it was sent with, and only to members.

Conversation events (EDIT, RECALL, READ, ...; common.proto MessageKind) are
timeline entries with their own conv_seq. They are held to the exactly-once
rules above (no loss, no duplicates, nothing invented, timeline seq order) on
every timeline they belong to (`recipients`: a READ goes to its reader and, in
a direct conversation, to the peer; a RECALL to every member). The sender and
conversation order rules look at chat messages (kind MESSAGE) only: a user's
timeline is in commit order, its own events are written at once and the
others' later by fan-out, so conv_seq need not grow across kinds there. A READ
at or below the reader's position is answered with msg_id 0 (nothing stored):
such an ACK names no message. Beyond that:

- read positions never go back: per (timeline, conversation, reader) the READ
  entries handed, in seq order, carry strictly increasing target_conv_seqs; a
  ListConversations answer never reports a read_conv_seq below one an earlier
  answer reported (answered before it was requested) nor below a READ ACKed
  before it was requested (a stored READ's target, a no-op READ's answered
  position); a READ whose target is at or below a position ACKed before it
  was first attempted is a no-op (msg_id 0), and a no-op READ's ACK names a
  position at or above its target (`Kind.READ_REGRESSION`);
- unread counts match the timeline: in each final (quiescent) ListConversations
  answer, a conversation's unread_count is the number of chat messages in the
  user's server timeline (`TIMELINE_DEVICE`) of that conversation sent by
  others, not recalled, with conv_seq above read_conv_seq (the workload's
  groups never change members, so every member joined before any message)
  (`Kind.UNREAD_MISMATCH`);
- a recalled body is never served after the recall's ACK (`Kind.RECALLED_BODY`),
  precisely: (1) no Sync or History response (`Served`) requested after the
  first ACK of a stored RECALL, on the workload's clock, contains a non-empty
  body for the recalled message (the end-of-run audit is such a Sync, so this
  also covers the server's final state); (2) no device is handed, and no raw
  observer is pushed, the recalled message with a non-empty body at a seq
  above the seq of the RECALL entry in that user's timeline (as that device or
  observer got the RECALL entry). A device applies its timeline in seq order
  and drops what is at or below its cursor, so this is "no push carries the
  body after the device has received (applied) the RECALL entry", and so no
  device's final state (its entries replayed in seq order, a RECALL clearing
  its target) shows the body. A push with the body may still ARRIVE after the
  recall's ACK, even after the RECALL entry's push: fan-out read the body
  before the recall committed, or the pusher retransmits that entry; it is
  then an entry below the RECALL's seq (applied before it, or a duplicate) and
  allowed. A device that never gets the RECALL entry is reported LOST for it,
  not here. A recalled message may be handed with an empty body (a sync after
  the recall): that is not CORRUPTED.
"""

from __future__ import annotations

import bisect
import enum
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


class Kind(enum.StrEnum):
    """Kinds of violation. The values are what the report prints."""

    LOST = "lost"  # an acked message missing on a device that must have it
    PARTIAL = "partial"  # an unacked message on some member devices but not all
    DUPLICATE_DELIVERY = "duplicate_delivery"  # one msg_id handed twice to a device
    DUPLICATE_MESSAGE = "duplicate_message"  # one (sender, client_msg_id), two msg_ids
    SENDER_ORDER = "sender_order"  # a sender's messages out of send order
    CONVERSATION_ORDER = "conversation_order"  # a device handed a conversation out of order
    TIMELINE_ORDER = "timeline_order"  # a device handed its timeline out of seq order
    CONV_SEQ_MISMATCH = "conv_seq_mismatch"  # devices/ACK disagree on a conv_seq
    TIMELINE_MISMATCH = "timeline_mismatch"  # devices/ACK disagree on a user's seq
    PHANTOM = "phantom"  # handed a message nobody sent
    CORRUPTED = "corrupted"  # a message differs from what was sent
    MISDELIVERED = "misdelivered"  # handed to a user who is not a member (or recipient)
    RECALLED_BODY = "recalled_body"  # a recalled body served or pushed after the recall
    READ_REGRESSION = "read_regression"  # a read position went back
    UNREAD_MISMATCH = "unread_mismatch"  # an unread count that does not match the timeline


LOSS_KINDS = frozenset({Kind.LOST, Kind.PARTIAL})
DUPLICATE_KINDS = frozenset({Kind.DUPLICATE_DELIVERY, Kind.DUPLICATE_MESSAGE})
ORDER_KINDS = frozenset(
    {
        Kind.SENDER_ORDER,
        Kind.CONVERSATION_ORDER,
        Kind.TIMELINE_ORDER,
        Kind.CONV_SEQ_MISMATCH,
        Kind.TIMELINE_MISMATCH,
    }
)


#: The device id under which a user's server timeline (Sync from 0 at the end of
#: the run) is checked like one more device of that user.
TIMELINE_DEVICE = "~timeline"


class EntryKind(enum.IntEnum):
    """What a timeline entry is: common.proto MessageKind, same numbers. UNKNOWN
    (0) in a `Delivered` means the source did not say (a record without kinds):
    the send record of its (sender, client_msg_id) decides."""

    UNKNOWN = 0
    MESSAGE = 1
    EDIT = 2
    RECALL = 3
    READ = 4
    DELIVERED = 5
    DELETE_FOR_ME = 6


def is_direct(conversation_id: str) -> bool:
    """Direct conversation ids are `d:<lo>:<hi>` (imclient.direct_conversation_id)."""
    return conversation_id.startswith("d:")


def recipients(
    kind: int, conversation_id: str, sender_id: str, members: frozenset[str]
) -> frozenset[str]:
    """The users whose timelines get an entry of this kind (logic's fan-out by
    kind): chat messages, edits and recalls every member; a READ or DELIVERED
    its sender and, in a direct conversation, the peer; a DELETE_FOR_ME its
    sender only."""
    if kind in (EntryKind.READ, EntryKind.DELIVERED) and is_direct(conversation_id):
        return members
    if kind in (EntryKind.READ, EntryKind.DELIVERED, EntryKind.DELETE_FOR_ME):
        return frozenset({sender_id}) & members
    return members


@dataclass(frozen=True)
class Delivered:
    """One timeline entry as a device was handed it (or a raw observer pushed it,
    or a Sync/History response served it)."""

    msg_id: int
    conversation_id: str
    sender_id: str
    client_msg_id: str
    conv_seq: int
    seq: int  # the receiving user's timeline position (0 from History)
    body: bytes | None = None  # None: not recorded, not compared
    kind: int = EntryKind.UNKNOWN
    target_conv_seq: int = 0  # 0: not recorded (the send record says)
    recalled: bool = False


@dataclass
class DeviceHistory:
    """Everything one device was handed, in order, across all its SDK sessions
    (a client "process restart" continues the same device's history)."""

    user_id: str
    device_id: str
    entries: list[Delivered] = field(default_factory=list)


@dataclass(frozen=True)
class Ack:
    msg_id: int
    seq: int
    conv_seq: int


@dataclass(frozen=True)
class SendRecord:
    """One send the workload attempted.

    `session` names the SDK client instance that made the call and `index` the
    call's position in that session: the SDK promises that the sends of one
    session are stored in call order. `attempted_at`/`acked_at` are monotonic
    times from one clock: a send that started after another send of the same
    user was acked must come after it, whatever device or session made them.
    """

    sender_id: str
    device_id: str
    client_msg_id: str
    conversation_id: str
    session: str
    index: int
    attempted_at: float
    acked_at: float | None = None
    ack: Ack | None = None
    body: bytes | None = None
    kind: int = EntryKind.MESSAGE
    target_conv_seq: int = 0  # EDIT/RECALL/DELETE_FOR_ME: the target; READ: the position

    @property
    def acked(self) -> bool:
        return self.ack is not None

    @property
    def stored(self) -> bool:
        """Acked as a stored message (a no-op READ's ACK has msg_id 0)."""
        return self.ack is not None and self.ack.msg_id != 0

    @property
    def noop(self) -> bool:
        """Acked as a no-op: a READ/DELIVERED at or below the current position."""
        return self.ack is not None and self.ack.msg_id == 0


@dataclass(frozen=True)
class Served:
    """One Sync or History response: what it served, and when (workload clock)
    it was requested."""

    user_id: str
    source: str  # e.g. "History d:u00:u01", "Sync from 0 (audit)"
    requested_at: float
    entries: Sequence[Delivered]


@dataclass(frozen=True)
class PushLog:
    """Every push one raw observer received, in arrival order, repeats included."""

    user_id: str
    device_id: str
    pushes: Sequence[Delivered]


@dataclass(frozen=True)
class Position:
    read_conv_seq: int
    unread_count: int


@dataclass(frozen=True)
class ConversationsAnswer:
    """One ListConversations answer (every page) to one user: per conversation its
    read position and unread count, with when it was requested and answered
    (workload clock). `final`: taken at quiescence (no send in flight, every
    device caught up), so its unread counts must match the timelines."""

    user_id: str
    requested_at: float
    answered_at: float
    positions: Mapping[str, Position]
    final: bool = False


@dataclass
class History:
    devices: list[DeviceHistory]
    sends: list[SendRecord]
    members: Mapping[str, Iterable[str]]  # conversation_id -> user ids (fixed for the run)
    served: list[Served] = field(default_factory=list)
    pushes: list[PushLog] = field(default_factory=list)
    conversations: list[ConversationsAnswer] = field(default_factory=list)


@dataclass(frozen=True)
class Violation:
    kind: Kind
    detail: str
    user_id: str = ""
    device_id: str = ""
    conversation_id: str = ""
    msg_id: int = 0
    client_msg_id: str = ""

    def __str__(self) -> str:
        where = " ".join(
            f"{k}={v}"
            for k, v in (
                ("user", self.user_id),
                ("device", self.device_id),
                ("conv", self.conversation_id),
                ("msg_id", self.msg_id),
                ("client_msg_id", self.client_msg_id),
            )
            if v
        )
        return f"[{self.kind.value}] {self.detail} ({where})"


@dataclass
class Report:
    sent: int = 0  # sends attempted
    acked: int = 0  # sends that got a SendAck
    acked_messages: int = 0  # distinct chat messages (sender, client_msg_id) with a SendAck
    committed: int = 0  # distinct messages known to exist (acked or seen on a device)
    delivered: int = 0  # (message, device) pairs handed at least once
    expected: int = 0  # (message, device) pairs that must be handed
    events: int = 0  # distinct stored events (not chat messages) with a SendAck
    reads: int = 0  # distinct READs acked as stored
    noop_reads: int = 0  # READs acked as no-ops (at or below the position)
    recalls: int = 0  # distinct RECALLs acked
    violations: list[Violation] = field(default_factory=list)

    def count(self, kinds: Iterable[Kind]) -> int:
        wanted = set(kinds)
        return sum(1 for v in self.violations if v.kind in wanted)

    @property
    def lost(self) -> int:
        return self.count(LOSS_KINDS)

    @property
    def duplicated(self) -> int:
        return self.count(DUPLICATE_KINDS)

    @property
    def reordered(self) -> int:
        return self.count(ORDER_KINDS)

    @property
    def recall_violations(self) -> int:
        return self.count({Kind.RECALLED_BODY})

    @property
    def read_regressions(self) -> int:
        return self.count({Kind.READ_REGRESSION})

    @property
    def unread_mismatches(self) -> int:
        return self.count({Kind.UNREAD_MISMATCH})

    def by_kind(self) -> dict[str, int]:
        counts = Counter(v.kind.value for v in self.violations)
        return dict(sorted(counts.items()))

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class _Known:
    """What the run knows about one stored message."""

    msg_id: int
    conversation_id: str
    sender_id: str
    client_msg_id: str
    conv_seq: int
    kind: int = EntryKind.MESSAGE


class _Kinds:
    """Every entry's kind and target, from the entry itself or else from the
    send record of its (sender, client_msg_id)."""

    def __init__(self, records: Mapping[tuple[str, str], list[SendRecord]]) -> None:
        self.records = records

    def kind(self, e: Delivered) -> int:
        if e.kind:
            return e.kind
        recs = self.records.get((e.sender_id, e.client_msg_id))
        return recs[0].kind if recs else EntryKind.MESSAGE

    def target(self, e: Delivered) -> int:
        if e.target_conv_seq:
            return e.target_conv_seq
        recs = self.records.get((e.sender_id, e.client_msg_id))
        return recs[0].target_conv_seq if recs else 0


def check(history: History) -> Report:
    """Every violation in `history`; an empty `violations` list means the run kept
    the promise."""
    report = Report(
        sent=len(history.sends),
        acked=sum(1 for s in history.sends if s.acked),
        acked_messages=len(
            {
                (s.sender_id, s.client_msg_id)
                for s in history.sends
                if s.acked and s.kind == EntryKind.MESSAGE
            }
        ),
        events=len(
            {
                (s.sender_id, s.client_msg_id)
                for s in history.sends
                if s.stored and s.kind != EntryKind.MESSAGE
            }
        ),
        reads=len(
            {
                (s.sender_id, s.client_msg_id)
                for s in history.sends
                if s.stored and s.kind == EntryKind.READ
            }
        ),
        noop_reads=sum(1 for s in history.sends if s.noop and s.kind == EntryKind.READ),
        recalls=len(
            {
                (s.sender_id, s.client_msg_id)
                for s in history.sends
                if s.stored and s.kind == EntryKind.RECALL
            }
        ),
    )
    out = report.violations
    members = {conv: frozenset(users) for conv, users in history.members.items()}
    devices_of: dict[str, list[DeviceHistory]] = defaultdict(list)
    for dev in history.devices:
        devices_of[dev.user_id].append(dev)

    records: dict[tuple[str, str], list[SendRecord]] = defaultdict(list)
    for rec in history.sends:
        records[(rec.sender_id, rec.client_msg_id)].append(rec)

    kinds = _Kinds(records)
    known = _identify_messages(history, records, kinds, out)
    report.committed = len(known)
    recalled = _recalls(history, kinds)

    _check_devices(history, members, records, kinds, recalled, out)
    _check_timelines(history, devices_of, out)
    _check_sender_order(history, out)
    report.delivered, report.expected = _check_presence(history, members, devices_of, known, out)
    _check_recalled_bodies(history, kinds, recalled, out)
    _check_read_positions(history, kinds, out)
    _check_unread_counts(history, kinds, recalled, out)
    return report


def _identify_messages(
    history: History,
    records: Mapping[tuple[str, str], list[SendRecord]],
    kinds: _Kinds,
    out: list[Violation],
) -> dict[int, _Known]:
    """msg_id -> the message, from ACKs and deliveries; reports two msg_ids for one
    (sender, client_msg_id) and devices or ACKs that disagree on a message."""
    known: dict[int, _Known] = {}
    seen_by: dict[int, str] = {}
    ids_of_key: dict[tuple[str, str], set[int]] = defaultdict(set)

    def learn(k: _Known, source: str, dev: DeviceHistory | None) -> None:
        ids_of_key[(k.sender_id, k.client_msg_id)].add(k.msg_id)
        prev = known.get(k.msg_id)
        if prev is None:
            known[k.msg_id] = k
            seen_by[k.msg_id] = source
            return
        if prev == k:
            return
        user, device = (dev.user_id, dev.device_id) if dev else ("", "")
        if prev.conv_seq != k.conv_seq and (
            prev.conversation_id,
            prev.sender_id,
            prev.client_msg_id,
        ) == (k.conversation_id, k.sender_id, k.client_msg_id):
            out.append(
                Violation(
                    Kind.CONV_SEQ_MISMATCH,
                    f"conv_seq {k.conv_seq} at {source}, {prev.conv_seq} at {seen_by[k.msg_id]}",
                    user,
                    device,
                    k.conversation_id,
                    k.msg_id,
                    k.client_msg_id,
                )
            )
        else:
            out.append(
                Violation(
                    Kind.CORRUPTED,
                    f"msg_id names different messages: {k} at {source}, {prev} at "
                    f"{seen_by[k.msg_id]}",
                    user,
                    device,
                    k.conversation_id,
                    k.msg_id,
                    k.client_msg_id,
                )
            )

    for recs in records.values():
        for rec in recs:
            if rec.ack is not None and rec.stored:
                learn(
                    _Known(
                        rec.ack.msg_id,
                        rec.conversation_id,
                        rec.sender_id,
                        rec.client_msg_id,
                        rec.ack.conv_seq,
                        rec.kind,
                    ),
                    f"SendAck to {rec.sender_id}/{rec.device_id}",
                    None,
                )
    for dev in history.devices:
        for e in dev.entries:
            learn(
                _Known(
                    e.msg_id,
                    e.conversation_id,
                    e.sender_id,
                    e.client_msg_id,
                    e.conv_seq,
                    kinds.kind(e),
                ),
                f"device {dev.user_id}/{dev.device_id}",
                dev,
            )

    for (sender, cmid), ids in sorted(ids_of_key.items()):
        if len(ids) > 1:
            recs = records.get((sender, cmid), [])
            out.append(
                Violation(
                    Kind.DUPLICATE_MESSAGE,
                    f"one send stored as {len(ids)} messages: msg_ids {sorted(ids)}"
                    f" ({'acked' if any(r.acked for r in recs) else 'never acked'})",
                    sender,
                    "",
                    known[min(ids)].conversation_id,
                    min(ids),
                    cmid,
                )
            )

    # One conversation position holds one message.
    slot: dict[tuple[str, int], int] = {}
    for k in sorted(known.values(), key=lambda k: k.msg_id):
        other = slot.setdefault((k.conversation_id, k.conv_seq), k.msg_id)
        if other != k.msg_id:
            out.append(
                Violation(
                    Kind.CONV_SEQ_MISMATCH,
                    f"conv_seq {k.conv_seq} held by two messages: {other} and {k.msg_id}",
                    k.sender_id,
                    "",
                    k.conversation_id,
                    k.msg_id,
                    k.client_msg_id,
                )
            )
    return known


def _seen(kind: Kind, dev: DeviceHistory, e: Delivered, detail: str) -> Violation:
    return Violation(
        kind, detail, dev.user_id, dev.device_id, e.conversation_id, e.msg_id, e.client_msg_id
    )


def _check_devices(
    history: History,
    members: Mapping[str, frozenset[str]],
    records: Mapping[tuple[str, str], list[SendRecord]],
    kinds: _Kinds,
    recalled: Mapping[tuple[str, int], float | None],
    out: list[Violation],
) -> None:
    """Per device: duplicates, phantoms, bodies, recipients, and the order it was
    handed things in (sender and conversation order: chat messages only)."""
    for dev in history.devices:
        u = dev.user_id
        times: Counter[int] = Counter()
        last_seq: Delivered | None = None
        last_by_conv: dict[str, Delivered] = {}
        last_by_sender: dict[tuple[str, str], Delivered] = {}
        for e in dev.entries:
            times[e.msg_id] += 1
            if times[e.msg_id] == 2:
                out.append(_seen(Kind.DUPLICATE_DELIVERY, dev, e, f"handed twice (seq {e.seq})"))
            if times[e.msg_id] > 1:
                continue  # order checks only look at first deliveries

            recs = records.get((e.sender_id, e.client_msg_id))
            if not recs:
                out.append(
                    _seen(
                        Kind.PHANTOM,
                        dev,
                        e,
                        f"no send of client_msg_id {e.client_msg_id!r} by {e.sender_id}",
                    )
                )
            else:
                rec = recs[0]
                if rec.conversation_id != e.conversation_id:
                    out.append(
                        _seen(
                            Kind.CORRUPTED,
                            dev,
                            e,
                            f"sent to {rec.conversation_id}, handed in {e.conversation_id}",
                        )
                    )
                elif (
                    rec.body is not None
                    and e.body is not None
                    and rec.body != e.body
                    and not (e.body == b"" and (e.conversation_id, e.conv_seq) in recalled)
                ):
                    out.append(_seen(Kind.CORRUPTED, dev, e, "body differs from the body sent"))
            kind = kinds.kind(e)
            conv_members = members.get(e.conversation_id, frozenset())
            if u not in conv_members:
                out.append(
                    _seen(Kind.MISDELIVERED, dev, e, f"{u} is not a member of {e.conversation_id}")
                )
            elif u not in recipients(kind, e.conversation_id, e.sender_id, conv_members):
                out.append(
                    _seen(
                        Kind.MISDELIVERED,
                        dev,
                        e,
                        f"a {_kind_name(kind)} of {e.sender_id} is not for {u}'s timeline",
                    )
                )

            if last_seq is not None and e.seq <= last_seq.seq:
                out.append(
                    _seen(
                        Kind.TIMELINE_ORDER,
                        dev,
                        e,
                        f"seq {e.seq} handed after seq {last_seq.seq} (msg_id {last_seq.msg_id})",
                    )
                )
            last_seq = e
            if kind != EntryKind.MESSAGE:
                continue  # events: exactly once and in seq order, checked above

            skey = (e.sender_id, e.conversation_id)
            prev = last_by_sender.get(skey)
            if prev is not None and e.conv_seq <= prev.conv_seq:
                out.append(
                    _seen(
                        Kind.SENDER_ORDER,
                        dev,
                        e,
                        f"{e.sender_id}'s conv_seq {e.conv_seq} handed after its conv_seq "
                        f"{prev.conv_seq} (msg_id {prev.msg_id})",
                    )
                )
            last_by_sender[skey] = e

            # The user's own messages enter its timeline when sent, others' when
            # fanned out in conv_seq order; so only others' are checked here.
            if e.sender_id != u:
                prev = last_by_conv.get(e.conversation_id)
                if prev is not None and e.conv_seq <= prev.conv_seq:
                    out.append(
                        _seen(
                            Kind.CONVERSATION_ORDER,
                            dev,
                            e,
                            f"conv_seq {e.conv_seq} handed after conv_seq {prev.conv_seq} "
                            f"(msg_id {prev.msg_id})",
                        )
                    )
                last_by_conv[e.conversation_id] = e


def _check_timelines(
    history: History,
    devices_of: Mapping[str, list[DeviceHistory]],
    out: list[Violation],
) -> None:
    """One timeline per user: all its devices, and its SendAcks, agree on seq <-> msg_id."""
    for user, devs in devices_of.items():
        at_seq: dict[int, tuple[int, str]] = {}
        seq_of: dict[int, tuple[int, str]] = {}
        sources: list[tuple[str, Iterable[tuple[int, int, str, str]]]] = []
        for dev in devs:
            sources.append(
                (
                    f"device {user}/{dev.device_id}",
                    ((e.seq, e.msg_id, e.conversation_id, e.client_msg_id) for e in dev.entries),
                )
            )
        sources.append(
            (
                f"SendAcks of {user}",
                (
                    (s.ack.seq, s.ack.msg_id, s.conversation_id, s.client_msg_id)
                    for s in history.sends
                    if s.sender_id == user and s.ack is not None and s.stored
                ),
            )
        )
        for source, rows in sources:
            for seq, msg_id, conv, cmid in rows:
                other = at_seq.setdefault(seq, (msg_id, source))
                if other[0] != msg_id:
                    out.append(
                        Violation(
                            Kind.TIMELINE_MISMATCH,
                            f"seq {seq} is msg_id {msg_id} at {source} but msg_id {other[0]} "
                            f"at {other[1]}",
                            user,
                            "",
                            conv,
                            msg_id,
                            cmid,
                        )
                    )
                before = seq_of.setdefault(msg_id, (seq, source))
                if before[0] != seq:
                    out.append(
                        Violation(
                            Kind.TIMELINE_MISMATCH,
                            f"at seq {seq} at {source} but seq {before[0]} at {before[1]}",
                            user,
                            "",
                            conv,
                            msg_id,
                            cmid,
                        )
                    )


def _check_sender_order(history: History, out: list[Violation]) -> None:
    """Acked chat messages of one sender into one conversation keep their send order.

    A message may have several records: a resend after a client restart, or a
    deliberate repeat (same client_msg_id). Its send order is its FIRST attempt's;
    later records are answered from the stored message. Two rules:

    - within one SDK session, in call order: a message's first attempt gets a
      conv_seq above every message acked earlier in that session (the SDK sends
      a session's messages in call order and the gateway stores them in order);
    - causality, across sessions and devices: a message first attempted after
      another one's ACK arrived gets a higher conv_seq.
    """
    sends = [s for s in history.sends if s.kind == EntryKind.MESSAGE]
    by_key: dict[tuple[str, str], list[SendRecord]] = defaultdict(list)
    for s in sends:
        by_key[(s.sender_id, s.client_msg_id)].append(s)
    first: dict[tuple[str, str], SendRecord] = {
        key: min(recs, key=lambda r: (r.attempted_at, r.index)) for key, recs in by_key.items()
    }

    sessions: dict[str, list[SendRecord]] = defaultdict(list)
    for s in sends:
        sessions[s.session].append(s)
    for session, recs in sessions.items():
        recs.sort(key=lambda r: r.index)
        high: dict[str, SendRecord] = {}  # conversation -> acked record with top conv_seq
        for r in recs:
            if r.ack is None:
                continue
            top = high.get(r.conversation_id)
            if (
                top is not None
                and first[(r.sender_id, r.client_msg_id)] is r
                and r.ack.conv_seq <= _conv_seq(top)
            ):
                out.append(
                    Violation(
                        Kind.SENDER_ORDER,
                        f"send #{r.index} of session {session} got conv_seq {r.ack.conv_seq}, "
                        f"not above send #{top.index} ({top.client_msg_id}, conv_seq "
                        f"{_conv_seq(top)})",
                        r.sender_id,
                        r.device_id,
                        r.conversation_id,
                        r.ack.msg_id,
                        r.client_msg_id,
                    )
                )
            if top is None or r.ack.conv_seq > _conv_seq(top):
                high[r.conversation_id] = r

    # Causality, one entry per message: (first attempt, first ACK, conv_seq).
    groups: dict[tuple[str, str], list[tuple[float, float, int, SendRecord]]] = defaultdict(list)
    msg_ids: dict[str, int] = {}
    for key, recs in by_key.items():
        acked = [r for r in recs if r.ack is not None and r.acked_at is not None]
        if not acked:
            continue
        f = first[key]
        msg_ids[f.client_msg_id] = _msg_id(acked[0])
        groups[(f.sender_id, f.conversation_id)].append(
            (
                f.attempted_at,
                min(r.acked_at for r in acked if r.acked_at is not None),
                _conv_seq(acked[0]),
                f,
            )
        )
    for (sender, conv), msgs in groups.items():
        by_ack = sorted(msgs, key=lambda m: m[1])
        ack_times = [m[1] for m in by_ack]
        best: list[tuple[float, float, int, SendRecord]] = []  # running max of conv_seq
        for m in by_ack:
            best.append(m if not best or m[2] > best[-1][2] else best[-1])
        for attempted, _, conv_seq, f in msgs:
            n = bisect.bisect_left(ack_times, attempted)
            if n == 0:
                continue
            _, _, top_seq, top = best[n - 1]
            if top is not f and top_seq >= conv_seq and top.session != f.session:
                out.append(
                    Violation(
                        Kind.SENDER_ORDER,
                        f"first sent after {top.client_msg_id} (conv_seq {top_seq}) was acked, "
                        f"yet got conv_seq {conv_seq}",
                        sender,
                        f.device_id,
                        conv,
                        msg_ids[f.client_msg_id],
                        f.client_msg_id,
                    )
                )


def _conv_seq(s: SendRecord) -> int:
    return s.ack.conv_seq if s.ack is not None else 0


def _msg_id(s: SendRecord) -> int:
    return s.ack.msg_id if s.ack is not None else 0


def _check_presence(
    history: History,
    members: Mapping[str, frozenset[str]],
    devices_of: Mapping[str, list[DeviceHistory]],
    known: Mapping[int, _Known],
    out: list[Violation],
) -> tuple[int, int]:
    """Every known message or event on every device of every user whose timeline
    it belongs to. Returns (delivered, expected) pair counts."""
    acked_ids = {s.ack.msg_id for s in history.sends if s.ack is not None and s.stored}
    have: dict[tuple[str, str], set[int]] = {
        (dev.user_id, dev.device_id): {e.msg_id for e in dev.entries} for dev in history.devices
    }
    delivered = expected = 0
    for k in sorted(known.values(), key=lambda k: k.msg_id):
        acked = k.msg_id in acked_ids
        conv_members = members.get(k.conversation_id, frozenset())
        for user in sorted(recipients(k.kind, k.conversation_id, k.sender_id, conv_members)):
            for dev in devices_of.get(user, []):
                expected += 1
                if k.msg_id in have[(user, dev.device_id)]:
                    delivered += 1
                    continue
                out.append(
                    Violation(
                        Kind.LOST if acked else Kind.PARTIAL,
                        f"{_kind_name(k.kind)} conv_seq {k.conv_seq} from {k.sender_id} never "
                        "handed" + ("" if acked else " (not acked, but committed: seen elsewhere)"),
                        user,
                        dev.device_id,
                        k.conversation_id,
                        k.msg_id,
                        k.client_msg_id,
                    )
                )
    return delivered, expected


def _kind_name(kind: int) -> str:
    try:
        return EntryKind(kind).name
    except ValueError:
        return f"kind {kind}"


def _recalls(history: History, kinds: _Kinds) -> dict[tuple[str, int], float | None]:
    """(conversation, conv_seq) of every message a committed RECALL names -> the
    first ACK time of such a RECALL (None: committed, seen on a device, never
    acked)."""
    out: dict[tuple[str, int], float | None] = {}
    for s in history.sends:
        if s.kind == EntryKind.RECALL and s.stored and s.acked_at is not None:
            key = (s.conversation_id, s.target_conv_seq)
            prev = out.get(key)
            out[key] = s.acked_at if prev is None else min(prev, s.acked_at)
    for dev in history.devices:
        for e in dev.entries:
            if kinds.kind(e) == EntryKind.RECALL:
                out.setdefault((e.conversation_id, kinds.target(e)), None)
    return out


def _check_recalled_bodies(
    history: History,
    kinds: _Kinds,
    recalled: Mapping[tuple[str, int], float | None],
    out: list[Violation],
) -> None:
    """A recalled body is never served after the recall's ACK (module docs: the
    Sync/History rule, and the rule for what devices and observers get after
    the RECALL entry)."""
    for served in history.served:
        for e in served.entries:
            at = recalled.get((e.conversation_id, e.conv_seq))
            if (
                at is not None
                and at < served.requested_at
                and e.body
                and kinds.kind(e) == EntryKind.MESSAGE
            ):
                out.append(
                    Violation(
                        Kind.RECALLED_BODY,
                        f"{served.source} requested at +{served.requested_at:.3f}s served the body "
                        f"of conv_seq {e.conv_seq}, recalled (ACK) at +{at:.3f}s",
                        served.user_id,
                        "",
                        e.conversation_id,
                        e.msg_id,
                        e.client_msg_id,
                    )
                )
    logs: list[tuple[str, str, str, Sequence[Delivered]]] = [
        ("handed", d.user_id, d.device_id, d.entries) for d in history.devices
    ] + [("pushed", p.user_id, p.device_id, p.pushes) for p in history.pushes]
    for how, user, device, entries in logs:
        gone: dict[tuple[str, int], Delivered] = {}  # recalled target -> the RECALL entry
        for e in entries:
            if kinds.kind(e) == EntryKind.RECALL:
                key = (e.conversation_id, kinds.target(e))
                if key not in gone or e.seq < gone[key].seq:
                    gone[key] = e
        reported: set[tuple[int, int]] = set()
        for e in entries:
            recall = gone.get((e.conversation_id, e.conv_seq))
            if (
                recall is not None
                and e.body
                and e.seq > recall.seq
                and kinds.kind(e) == EntryKind.MESSAGE
                and (e.msg_id, e.seq) not in reported
            ):
                reported.add((e.msg_id, e.seq))
                out.append(
                    Violation(
                        Kind.RECALLED_BODY,
                        f"{how} with its body at seq {e.seq}, above the RECALL entry "
                        f"(seq {recall.seq}, msg_id {recall.msg_id}): applied after the recall",
                        user,
                        device,
                        e.conversation_id,
                        e.msg_id,
                        e.client_msg_id,
                    )
                )


def _check_read_positions(history: History, kinds: _Kinds, out: list[Violation]) -> None:
    """Read positions never go back (module docs): READ entries in each timeline,
    ListConversations answers against earlier answers and earlier READ ACKs,
    and the READ ACKs themselves."""
    for dev in history.devices:
        seen: set[int] = set()
        last: dict[tuple[str, str], tuple[int, Delivered]] = {}
        for e in dev.entries:
            if e.msg_id in seen or kinds.kind(e) != EntryKind.READ:
                continue
            seen.add(e.msg_id)
            key = (e.conversation_id, e.sender_id)
            target = kinds.target(e)
            prev = last.get(key)
            if prev is not None and target <= prev[0]:
                out.append(
                    _seen(
                        Kind.READ_REGRESSION,
                        dev,
                        e,
                        f"{e.sender_id}'s READ to {target} (seq {e.seq}) handed after its READ "
                        f"to {prev[0]} (seq {prev[1].seq})",
                    )
                )
            last[key] = (max(target, prev[0]) if prev else target, e)

    # Positions known at a time: (when, position, what said so) per (user, conversation).
    known: dict[tuple[str, str], list[tuple[float, int, str]]] = defaultdict(list)
    reads = sorted(
        (s for s in history.sends if s.kind == EntryKind.READ and s.ack and s.acked_at is not None),
        key=lambda s: (s.acked_at or 0.0, s.attempted_at),
    )
    for s in reads:
        assert s.ack is not None and s.acked_at is not None
        position = s.ack.conv_seq if s.noop else s.target_conv_seq
        known[(s.sender_id, s.conversation_id)].append(
            (s.acked_at, position, f"READ {s.client_msg_id} ACKed at +{s.acked_at:.3f}s")
        )
        if s.noop and s.ack.conv_seq < s.target_conv_seq:
            out.append(
                Violation(
                    Kind.READ_REGRESSION,
                    f"a READ to {s.target_conv_seq} was answered as a no-op at position "
                    f"{s.ack.conv_seq}, below its target",
                    s.sender_id,
                    s.device_id,
                    s.conversation_id,
                    0,
                    s.client_msg_id,
                )
            )
    # A READ at or below a position ACKed before it was first attempted stores nothing.
    attempts: dict[tuple[str, str], list[SendRecord]] = defaultdict(list)
    for s in history.sends:
        if s.kind == EntryKind.READ:
            attempts[(s.sender_id, s.client_msg_id)].append(s)
    for recs in attempts.values():
        s = min(recs, key=lambda r: r.attempted_at)
        acked = [r for r in recs if r.stored]
        if not acked:
            continue
        before = [
            (at, pos, what)
            for at, pos, what in known[(s.sender_id, s.conversation_id)]
            if at < s.attempted_at
        ]
        top = max(before, default=None, key=lambda k: k[1])
        if top is not None and s.target_conv_seq <= top[1]:
            ack = acked[0].ack
            assert ack is not None
            out.append(
                Violation(
                    Kind.READ_REGRESSION,
                    f"a READ to {s.target_conv_seq} was stored (conv_seq {ack.conv_seq}) though "
                    f"position {top[1]} was known before it was sent ({top[2]})",
                    s.sender_id,
                    s.device_id,
                    s.conversation_id,
                    ack.msg_id,
                    s.client_msg_id,
                )
            )

    for a in history.conversations:
        for conv, pos in a.positions.items():
            known[(a.user_id, conv)].append(
                (
                    a.answered_at,
                    pos.read_conv_seq,
                    f"ListConversations answered at +{a.answered_at:.3f}s",
                )
            )
    floors: dict[tuple[str, str], tuple[list[float], list[tuple[int, str]]]] = {}
    for key, facts in known.items():
        facts.sort(key=lambda f: f[0])
        running: list[tuple[int, str]] = []
        for _, value, what in facts:
            running.append((value, what) if not running or value > running[-1][0] else running[-1])
        floors[key] = ([f[0] for f in facts], running)
    for a in sorted(history.conversations, key=lambda a: a.requested_at):
        for conv, pos in sorted(a.positions.items()):
            times, running = floors[(a.user_id, conv)]
            n = bisect.bisect_left(times, a.requested_at)
            if n and pos.read_conv_seq < running[n - 1][0]:
                floor, what = running[n - 1]
                out.append(
                    Violation(
                        Kind.READ_REGRESSION,
                        f"ListConversations requested at +{a.requested_at:.3f}s reported "
                        f"read_conv_seq {pos.read_conv_seq}, below {floor} ({what})",
                        a.user_id,
                        "",
                        conv,
                    )
                )


def _check_unread_counts(
    history: History,
    kinds: _Kinds,
    recalled: Mapping[tuple[str, int], float | None],
    out: list[Violation],
) -> None:
    """Each final ListConversations answer's unread counts against the user's
    server timeline (module docs)."""
    timelines = {d.user_id: d for d in history.devices if d.device_id == TIMELINE_DEVICE}
    for a in history.conversations:
        timeline = timelines.get(a.user_id)
        if not a.final or timeline is None:
            continue
        unread: dict[str, set[int]] = defaultdict(set)
        for conv, pos in a.positions.items():
            for e in timeline.entries:
                if (
                    e.conversation_id == conv
                    and e.sender_id != a.user_id
                    and e.conv_seq > pos.read_conv_seq
                    and kinds.kind(e) == EntryKind.MESSAGE
                    and not e.recalled
                    and (conv, e.conv_seq) not in recalled
                ):
                    unread[conv].add(e.msg_id)
            if pos.unread_count != len(unread[conv]):
                out.append(
                    Violation(
                        Kind.UNREAD_MISMATCH,
                        f"unread_count {pos.unread_count} at read_conv_seq {pos.read_conv_seq}, "
                        f"but the timeline holds {len(unread[conv])} unread messages by others",
                        a.user_id,
                        TIMELINE_DEVICE,
                        conv,
                    )
                )


def summarize(report: Report, limit: int = 50) -> list[str]:
    """Human-readable lines: counts by kind, then the first `limit` violations."""
    lines = [f"violations: {len(report.violations)} {report.by_kind()}"]
    lines += [f"  {v}" for v in report.violations[:limit]]
    if len(report.violations) > limit:
        lines.append(f"  ... and {len(report.violations) - limit} more")
    return lines


__all__: Sequence[str] = [
    "TIMELINE_DEVICE",
    "Ack",
    "ConversationsAnswer",
    "Delivered",
    "DeviceHistory",
    "EntryKind",
    "History",
    "Kind",
    "Position",
    "PushLog",
    "Report",
    "SendRecord",
    "Served",
    "Violation",
    "check",
    "recipients",
    "summarize",
]
