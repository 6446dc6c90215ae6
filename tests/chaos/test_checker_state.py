"""The checker's conversation-state rules against hand-made histories: events
held to exactly-once by recipient kind, recalled bodies, read positions and
unread counts. Each rule gets a clean case and a violating one.

`StateModel` extends test_checker's `Model` with events that do what the
server contract says (briefs: conv-state): a READ at or below the reader's
position is a no-op (msg_id 0, conv_seq = the position); a stored event is
written into its sender's timeline at once and into the other recipients' by
fan-out, in conv_seq order; a RECALL clears its target's body from then on.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from test_checker import DEVICES, DIRECT, GROUP, MEMBERS, Model

from chaos.checker import (
    TIMELINE_DEVICE,
    Ack,
    ConversationsAnswer,
    Delivered,
    DeviceHistory,
    EntryKind,
    History,
    Kind,
    Position,
    PushLog,
    SendRecord,
    Served,
    check,
    recipients,
    summarize,
)
from im.common.v1 import common_pb2


class StateModel(Model):
    def __init__(self) -> None:
        super().__init__()
        self.position: dict[tuple[str, str], int] = defaultdict(int)
        self.recalled: set[tuple[str, int]] = set()
        self.now = 0.0

    def tick(self) -> float:
        self.now = float(next(self.clock))
        return self.now

    def event(self, sender: str, conv: str, kind: EntryKind, target: int) -> SendRecord:
        session = f"{sender}/ev"
        self.index[session] += 1
        cmid = f"{sender}-ev-{len(self.sends)}"
        attempted = self.tick()
        if kind == EntryKind.READ and target <= self.position[(sender, conv)]:
            ack = Ack(0, 0, self.position[(sender, conv)])
        else:
            if kind == EntryKind.READ:
                self.position[(sender, conv)] = target
            if kind == EntryKind.RECALL:
                self.recalled.add((conv, target))
            self.conv_seq[conv] += 1
            m = Delivered(
                next(self.msg_ids), conv, sender, cmid, self.conv_seq[conv], 0, b"", kind, target
            )
            self.committed[conv].append(m)
            own = self._append(sender, m)
            ack = Ack(m.msg_id, own.seq, m.conv_seq)
        rec = SendRecord(
            sender,
            "ev",
            cmid,
            conv,
            session,
            self.index[session],
            attempted,
            self.tick(),
            ack,
            b"",
            kind,
            target,
        )
        self.sends.append(rec)
        return rec

    def fanout(self) -> None:
        for conv, msgs in self.committed.items():
            for m in msgs:
                if m.conv_seq <= self.watermark[conv]:
                    continue
                kind = m.kind or EntryKind.MESSAGE
                users = recipients(kind, conv, m.sender_id, frozenset(MEMBERS[conv]))
                for user in sorted(users - {m.sender_id}):
                    self._append(user, m)
                self.watermark[conv] = m.conv_seq

    def served(self, user: str) -> list[Delivered]:
        """The user's timeline as Sync serves it now: recalled bodies empty."""
        out = []
        for e in self.timeline[user]:
            gone = (e.conversation_id, e.conv_seq) in self.recalled
            kind = e.kind or EntryKind.MESSAGE
            out.append(
                dataclasses.replace(e, kind=kind, body=b"" if gone else e.body, recalled=gone)
            )
        return out

    def answer(self, user: str, final: bool = False) -> ConversationsAnswer:
        requested = self.tick()
        positions = {}
        for conv, users in MEMBERS.items():
            if user not in users:
                continue
            read = self.position[(user, conv)]
            unread = sum(
                1
                for m in self.committed[conv]
                if (m.kind or EntryKind.MESSAGE) == EntryKind.MESSAGE
                and m.sender_id != user
                and m.conv_seq > read
                and (conv, m.conv_seq) not in self.recalled
            )
            positions[conv] = Position(read, unread)
        return ConversationsAnswer(user, requested, self.tick(), positions, final)

    def state_history(self) -> History:
        """Devices as a client without kinds would hand them (kind unknown: the send
        records say), each user's served timeline, a final ListConversations
        answer per user."""
        h = self.history()
        for dev in h.devices:
            dev.entries = [dataclasses.replace(e, kind=EntryKind.UNKNOWN) for e in dev.entries]
        at = self.tick()
        for user in DEVICES:
            served = self.served(user)
            h.devices.append(DeviceHistory(user, TIMELINE_DEVICE, served))
            h.served.append(Served(user, "Sync from 0 (audit)", at, served))
            h.conversations.append(self.answer(user, final=True))
        return h


def busy_state() -> tuple[StateModel, SendRecord]:
    """Messages, reads (one of them stale: a no-op) and a recall, fanned out."""
    m = StateModel()
    m.send("alice", DIRECT)
    m.send("bob", DIRECT)
    m.send("carol", GROUP)
    gone = m.send("bob", GROUP)
    m.fanout()
    m.event("alice", DIRECT, EntryKind.READ, 2)
    m.event("alice", GROUP, EntryKind.READ, 1)
    m.event("alice", DIRECT, EntryKind.READ, 1)  # stale: a no-op
    assert gone.ack is not None
    m.event("bob", GROUP, EntryKind.RECALL, gone.ack.conv_seq)
    m.send("bob", DIRECT)
    m.send("carol", GROUP)
    m.fanout()
    m.event("bob", DIRECT, EntryKind.READ, 3)
    m.fanout()
    return m, gone


def kinds(h: History) -> set[Kind]:
    return {v.kind for v in check(h).violations}


def test_entry_kinds_are_the_protocols() -> None:
    for kind in EntryKind:
        if kind != EntryKind.UNKNOWN:
            assert common_pb2.MessageKind.Value(f"MESSAGE_KIND_{kind.name}") == kind.value


def test_a_clean_history_with_reads_and_a_recall_has_no_violation() -> None:
    m, _ = busy_state()
    report = check(m.state_history())
    assert report.violations == [], summarize(report)
    assert (report.reads, report.noop_reads, report.recalls, report.events) == (3, 1, 1, 4)
    assert report.recall_violations == report.read_regressions == report.unread_mismatches == 0


def test_an_event_is_held_to_exactly_once_on_its_recipients_only() -> None:
    m, _ = busy_state()
    h = m.state_history()
    # A group READ goes to its reader only: carol holding alice's is misdelivered.
    read = next(s for s in m.sends if s.kind == EntryKind.READ and s.conversation_id == GROUP)
    assert read.ack is not None
    carol = next(d for d in h.devices if (d.user_id, d.device_id) == ("carol", "phone"))
    carol.entries.append(
        Delivered(read.ack.msg_id, GROUP, "alice", read.client_msg_id, read.ack.conv_seq, 99)
    )
    # A direct READ goes to the peer too: bob's phone missing alice's is lost.
    direct = next(s for s in m.sends if s.kind == EntryKind.READ and s.stored)
    assert direct.ack is not None
    bob = next(d for d in h.devices if (d.user_id, d.device_id) == ("bob", "phone"))
    bob.entries = [e for e in bob.entries if e.msg_id != direct.ack.msg_id]
    report = check(h)
    assert {v.kind for v in report.violations} == {Kind.MISDELIVERED, Kind.LOST}
    lost = [v for v in report.violations if v.kind is Kind.LOST]
    assert [(v.user_id, v.device_id, v.msg_id) for v in lost] == [
        ("bob", "phone", direct.ack.msg_id)
    ]
    assert "READ" in lost[0].detail


def test_a_recalled_message_handed_with_an_empty_body_is_not_corrupted() -> None:
    m, gone = busy_state()
    h = m.state_history()
    assert gone.ack is not None
    # carol's phone synced after the recall: the message came with no body.
    carol = next(d for d in h.devices if (d.user_id, d.device_id) == ("carol", "phone"))
    carol.entries = [
        dataclasses.replace(e, body=b"") if e.msg_id == gone.ack.msg_id else e
        for e in carol.entries
    ]
    assert kinds(h) == set()
    # ... but an empty body of a message nobody recalled is.
    other = next(e for e in carol.entries if e.body)
    carol.entries[carol.entries.index(other)] = dataclasses.replace(other, body=b"")
    assert kinds(h) == {Kind.CORRUPTED}


def recall_of(m: StateModel) -> SendRecord:
    return next(s for s in m.sends if s.kind == EntryKind.RECALL)


def test_a_body_served_after_the_recalls_ack_is_a_violation() -> None:
    m, gone = busy_state()
    h = m.state_history()
    recall = recall_of(m)
    assert gone.ack is not None and recall.acked_at is not None and gone.body is not None
    body = Delivered(
        gone.ack.msg_id,
        GROUP,
        "bob",
        gone.client_msg_id,
        gone.ack.conv_seq,
        0,
        gone.body,
        EntryKind.MESSAGE,
    )
    # Requested before the ACK: it may still have the body.
    h.served.append(Served("carol", "History g:team", recall.acked_at - 0.5, [body]))
    assert kinds(h) == set()
    h.served.append(Served("carol", "History g:team", recall.acked_at + 0.5, [body]))
    report = check(h)
    assert report.by_kind() == {Kind.RECALLED_BODY.value: 1}
    v = report.violations[0]
    assert (v.user_id, v.conversation_id, v.msg_id) == ("carol", GROUP, gone.ack.msg_id)
    assert "History g:team" in v.detail and report.recall_violations == 1


def test_the_audit_sync_serving_a_recalled_body_is_a_violation() -> None:
    m, gone = busy_state()
    h = m.state_history()
    assert gone.ack is not None
    for s in h.served:
        s.entries[:] = [  # type: ignore[index]
            dataclasses.replace(e, body=b"still here", recalled=False)
            if e.msg_id == gone.ack.msg_id
            else e
            for e in s.entries
        ]
    report = check(h)
    assert Kind.RECALLED_BODY in {v.kind for v in report.violations}
    assert {v.user_id for v in report.violations if v.kind is Kind.RECALLED_BODY} == {
        "alice",
        "bob",
        "carol",
    }


def test_a_push_with_the_body_after_the_recall_entry_is_a_violation() -> None:
    m, gone = busy_state()
    h = m.state_history()
    recall = recall_of(m)
    assert gone.ack is not None and recall.ack is not None and gone.body is not None
    msg = Delivered(
        gone.ack.msg_id, GROUP, "bob", gone.client_msg_id, gone.ack.conv_seq, 4, gone.body, 1
    )
    rc = Delivered(
        recall.ack.msg_id,
        GROUP,
        "bob",
        recall.client_msg_id,
        recall.ack.conv_seq,
        5,
        b"",
        EntryKind.RECALL,
        gone.ack.conv_seq,
    )
    # The in-flight push and a retransmit of it, arriving after the RECALL
    # entry: fine, it is below the RECALL's seq (applied first, or a duplicate).
    h.pushes.append(PushLog("carol", "obs", [rc, msg, msg]))
    h.pushes.append(PushLog("bob", "obs", [msg, rc, msg]))
    assert kinds(h) == set()
    # The body in an entry above the RECALL's (a device applies it after the
    # recall), whenever it arrives: not fine.
    again = dataclasses.replace(msg, seq=6)
    h.pushes.append(PushLog("alice", "obs", [again, msg, rc]))
    report = check(h)
    assert report.by_kind() == {Kind.RECALLED_BODY.value: 1}
    v = report.violations[0]
    assert (v.user_id, v.device_id) == ("alice", "obs")
    assert "above the RECALL entry" in v.detail


def test_a_device_handed_the_body_after_the_recall_entry_is_a_violation() -> None:
    m, gone = busy_state()
    h = m.state_history()
    assert gone.ack is not None
    carol = next(d for d in h.devices if (d.user_id, d.device_id) == ("carol", "phone"))
    i = next(k for k, e in enumerate(carol.entries) if e.msg_id == gone.ack.msg_id)
    late = carol.entries.pop(i)
    carol.entries.append(dataclasses.replace(late, seq=100))
    assert Kind.RECALLED_BODY in kinds(h)


def read_entry(m: StateModel, reader: str, conv: str, target: int, seq: int) -> Delivered:
    rec = next(
        s
        for s in m.sends
        if s.kind == EntryKind.READ and s.sender_id == reader and s.conversation_id == conv
    )
    assert rec.ack is not None
    return Delivered(
        rec.ack.msg_id, conv, reader, rec.client_msg_id, rec.ack.conv_seq, seq, b"", 4, target
    )


def test_read_entries_whose_targets_go_back_in_a_timeline_are_a_regression() -> None:
    m = StateModel()
    for _ in range(3):
        m.send("bob", DIRECT)
    m.fanout()
    first = m.event("alice", DIRECT, EntryKind.READ, 2)
    second = m.event("alice", DIRECT, EntryKind.READ, 3)
    m.fanout()
    assert kinds(m.state_history()) == set()
    # The server answered both, but bob's timeline shows the position going back.
    h = m.state_history()
    bob = next(d for d in h.devices if (d.user_id, d.device_id) == ("bob", TIMELINE_DEVICE))
    for i, e in enumerate(bob.entries):
        if first.ack and e.msg_id == first.ack.msg_id:
            bob.entries[i] = dataclasses.replace(e, target_conv_seq=3)
        if second.ack and e.msg_id == second.ack.msg_id:
            bob.entries[i] = dataclasses.replace(e, target_conv_seq=2)
    report = check(h)
    assert Kind.READ_REGRESSION in {v.kind for v in report.violations}
    v = next(v for v in report.violations if v.kind is Kind.READ_REGRESSION)
    assert (v.user_id, v.device_id) == ("bob", TIMELINE_DEVICE)
    assert "READ to 2" in v.detail and "READ to 3" in v.detail


def test_a_list_answer_below_an_earlier_answer_is_a_regression() -> None:
    m = StateModel()
    for _ in range(3):
        m.send("bob", DIRECT)
    m.fanout()
    early = m.answer("alice")
    m.event("alice", DIRECT, EntryKind.READ, 3)
    m.fanout()
    later = m.answer("alice")
    h = m.state_history()
    h.conversations += [early, later]
    assert kinds(h) == set()
    # A third answer, requested after `later` was answered, back at 0.
    back = m.answer("alice")
    h.conversations.append(
        dataclasses.replace(back, positions={**back.positions, DIRECT: Position(0, 3)})
    )
    report = check(h)
    assert report.read_regressions == 1
    assert "read_conv_seq 0, below 3" in report.violations[0].detail
    # Requested before the READ's ACK (concurrent with it): 0 is allowed.
    h.conversations[-1] = dataclasses.replace(
        h.conversations[-1], requested_at=early.answered_at + 0.1
    )
    assert kinds(h) == set()


def test_a_stale_read_that_was_stored_is_a_regression() -> None:
    m = StateModel()
    for _ in range(3):
        m.send("bob", DIRECT)
    m.fanout()
    m.event("alice", DIRECT, EntryKind.READ, 3)
    stale = m.event("alice", DIRECT, EntryKind.READ, 2)
    assert stale.noop
    m.fanout()
    assert kinds(m.state_history()) == set()
    # The same history, but the server stored the stale READ.
    h = m.state_history()
    i = h.sends.index(stale)
    h.sends[i] = dataclasses.replace(stale, ack=Ack(9999, 99, 9))
    report = check(h)
    assert any(
        v.kind is Kind.READ_REGRESSION and "position 3 was known" in v.detail
        for v in report.violations
    ), summarize(report)
    # And a no-op READ whose ACK names a position below its target.
    h = m.state_history()
    h.sends[i] = dataclasses.replace(stale, ack=Ack(0, 0, 1))
    report = check(h)
    assert report.by_kind() == {Kind.READ_REGRESSION.value: 1}
    assert "below its target" in report.violations[0].detail


def test_a_final_unread_count_off_the_timeline_is_a_mismatch() -> None:
    m, _ = busy_state()
    h = m.state_history()
    assert kinds(h) == set()
    # carol read nothing: in the group she has bob's (recalled: not counted)
    # and ... counted from her timeline; the server says one more.
    i = next(k for k, a in enumerate(h.conversations) if a.user_id == "carol" and a.final)
    a = h.conversations[i]
    pos = a.positions[GROUP]
    h.conversations[i] = dataclasses.replace(
        a, positions={**a.positions, GROUP: Position(pos.read_conv_seq, pos.unread_count + 1)}
    )
    report = check(h)
    assert report.by_kind() == {Kind.UNREAD_MISMATCH.value: 1}
    v = report.violations[0]
    assert (v.user_id, v.conversation_id) == ("carol", GROUP)
    assert report.unread_mismatches == 1
    # The same answer taken before quiescence (not final) is not judged.
    h.conversations[i] = dataclasses.replace(h.conversations[i], final=False)
    assert kinds(h) == set()


def test_an_unread_count_that_includes_a_recalled_message_is_a_mismatch() -> None:
    m, gone = busy_state()
    h = m.state_history()
    assert gone.ack is not None
    i, a = next((k, a) for k, a in enumerate(h.conversations) if a.user_id == "alice")
    # alice read the group up to 1; above it: bob's (recalled) and carol's second.
    assert a.positions[GROUP] == Position(1, 1)
    h.conversations[i] = dataclasses.replace(a, positions={**a.positions, GROUP: Position(1, 2)})
    assert {(v.kind, v.user_id) for v in check(h).violations} == {(Kind.UNREAD_MISMATCH, "alice")}
