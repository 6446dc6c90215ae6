"""The checker against hand-made histories: a clean run reports nothing, and each
way of breaking the promise is reported as its own kind.

The histories come from `Model`, a tiny in-memory version of the system that
does what design.md says (conv_seq and the sender's seq at send; fan-out of
others' messages in conv_seq order), so a test breaks exactly one thing.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import defaultdict

import pytest

from chaos.checker import (
    Ack,
    Delivered,
    DeviceHistory,
    History,
    Kind,
    SendRecord,
    check,
    summarize,
)

DIRECT = "d:alice:bob"
GROUP = "g:team"
MEMBERS = {DIRECT: {"alice", "bob"}, GROUP: {"alice", "bob", "carol"}}
DEVICES = {"alice": ["phone", "laptop"], "bob": ["phone"], "carol": ["phone"]}


class Model:
    """Sends commit immediately (the sender's own timeline row included);
    `fanout()` writes every conversation's new messages into the other members'
    timelines in conv_seq order; every device is then handed its user's whole
    timeline."""

    def __init__(self) -> None:
        self.clock = itertools.count(1)
        self.msg_ids = itertools.count(1000)
        self.conv_seq: dict[str, int] = defaultdict(int)
        self.user_seq: dict[str, int] = defaultdict(int)
        self.timeline: dict[str, list[Delivered]] = defaultdict(list)
        self.committed: dict[str, list[Delivered]] = defaultdict(list)
        self.watermark: dict[str, int] = defaultdict(int)
        self.sends: list[SendRecord] = []
        self.index: dict[str, int] = defaultdict(int)

    def _append(self, user: str, m: Delivered) -> Delivered:
        self.user_seq[user] += 1
        row = dataclasses.replace(m, seq=self.user_seq[user])
        self.timeline[user].append(row)
        return row

    def send(
        self,
        sender: str,
        conv: str,
        device: str = "phone",
        session: str | None = None,
        acked: bool = True,
        client_msg_id: str | None = None,
    ) -> SendRecord:
        session = session or f"{sender}/{device}#1"
        self.index[session] += 1
        cmid = client_msg_id or f"{sender}-{len(self.sends)}"
        body = f"{conv}|{sender}|{cmid}".encode()
        attempted = float(next(self.clock))
        self.conv_seq[conv] += 1
        m = Delivered(next(self.msg_ids), conv, sender, cmid, self.conv_seq[conv], 0, body)
        self.committed[conv].append(m)
        own = self._append(sender, m)
        rec = SendRecord(
            sender,
            device,
            cmid,
            conv,
            session,
            self.index[session],
            attempted,
            float(next(self.clock)) if acked else None,
            Ack(m.msg_id, own.seq, m.conv_seq) if acked else None,
            body,
        )
        self.sends.append(rec)
        return rec

    def fanout(self) -> None:
        for conv, msgs in self.committed.items():
            for m in msgs:
                if m.conv_seq <= self.watermark[conv]:
                    continue
                for user in sorted(MEMBERS[conv] - {m.sender_id}):
                    self._append(user, m)
                self.watermark[conv] = m.conv_seq

    def history(self) -> History:
        devices = [
            DeviceHistory(user, dev, list(self.timeline[user]))
            for user, devs in DEVICES.items()
            for dev in devs
        ]
        return History(devices, list(self.sends), MEMBERS)


def device(h: History, user: str, dev: str) -> DeviceHistory:
    return next(d for d in h.devices if (d.user_id, d.device_id) == (user, dev))


def busy_model() -> Model:
    m = Model()
    m.send("alice", DIRECT)
    m.send("bob", DIRECT)
    m.send("alice", GROUP, device="laptop")
    m.send("carol", GROUP)
    m.fanout()
    m.send("alice", DIRECT)
    m.send("alice", DIRECT)
    m.send("bob", GROUP)
    m.send("carol", GROUP)
    m.send("alice", GROUP)
    m.fanout()
    return m


def kinds(h: History) -> set[Kind]:
    return {v.kind for v in check(h).violations}


def test_a_clean_history_has_no_violation() -> None:
    h = busy_model().history()
    report = check(h)
    assert report.violations == [], summarize(report)
    assert report.sent == report.acked == 9
    assert report.committed == 9
    # 4 direct messages x 3 devices + 5 group messages x 4 devices
    assert report.expected == report.delivered == 4 * 3 + 5 * 4


def test_an_unacked_message_may_be_missing_everywhere() -> None:
    m = busy_model()
    rec = m.send("bob", DIRECT, acked=False)
    m.fanout()
    h = m.history()
    for dev in h.devices:
        dev.entries = [e for e in dev.entries if e.client_msg_id != rec.client_msg_id]
    assert check(h).violations == []


def test_an_acked_message_missing_on_a_recipient_is_lost() -> None:
    h = busy_model().history()
    bob = device(h, "bob", "phone")
    victim = next(e for e in bob.entries if e.sender_id == "alice")
    bob.entries.remove(victim)
    report = check(h)
    assert kinds(h) == {Kind.LOST}
    (v,) = report.violations
    assert (v.user_id, v.device_id, v.msg_id) == ("bob", "phone", victim.msg_id)
    assert report.lost == 1


def test_an_acked_message_missing_on_the_senders_other_device_is_lost() -> None:
    h = busy_model().history()
    laptop = device(h, "alice", "laptop")
    own = [e for e in laptop.entries if e.sender_id == "alice"]
    laptop.entries.remove(own[-1])
    assert kinds(h) == {Kind.LOST}


def test_an_acked_message_nobody_received_is_lost_everywhere() -> None:
    m = busy_model()
    rec = m.send("carol", GROUP)
    m.fanout()
    h = m.history()
    for dev in h.devices:
        dev.entries = [e for e in dev.entries if e.client_msg_id != rec.client_msg_id]
    report = check(h)
    assert kinds(h) == {Kind.LOST}
    assert report.lost == 4  # every device of every member, the sender's included


def test_an_unacked_message_seen_somewhere_must_be_seen_everywhere() -> None:
    m = busy_model()
    rec = m.send("bob", GROUP, acked=False)
    m.fanout()
    h = m.history()
    carol = device(h, "carol", "phone")
    carol.entries = [e for e in carol.entries if e.client_msg_id != rec.client_msg_id]
    assert kinds(h) == {Kind.PARTIAL}


def test_a_message_handed_twice_is_a_duplicate() -> None:
    h = busy_model().history()
    bob = device(h, "bob", "phone")
    bob.entries.append(bob.entries[2])
    report = check(h)
    assert kinds(h) == {Kind.DUPLICATE_DELIVERY}
    assert report.duplicated == 1


def test_a_retransmit_stored_twice_is_a_duplicate_even_unacked() -> None:
    # What "skip dedup" does: the retransmit of a send becomes a second message.
    for acked in (True, False):
        m = busy_model()
        first = m.send("alice", DIRECT, acked=acked)
        m.sends.pop()  # one send attempted; the retransmit is the same record
        m.send("alice", DIRECT, acked=acked, client_msg_id=first.client_msg_id)
        m.fanout()
        h = m.history()
        assert Kind.DUPLICATE_MESSAGE in kinds(h), acked
        assert {v.kind for v in check(h).violations} <= {Kind.DUPLICATE_MESSAGE}


def test_two_acks_with_different_msg_ids_for_one_send_are_a_duplicate() -> None:
    m = busy_model()
    rec = m.send("bob", DIRECT)
    m.fanout()
    assert rec.ack is not None
    ghost = dataclasses.replace(
        rec, ack=Ack(rec.ack.msg_id + 10_000, rec.ack.seq + 1000, rec.ack.conv_seq + 1000)
    )
    m.sends.append(ghost)
    assert Kind.DUPLICATE_MESSAGE in kinds(m.history())


def test_a_session_whose_sends_commit_out_of_call_order_breaks_sender_order() -> None:
    m = busy_model()
    a = m.send("alice", DIRECT)
    b = m.send("alice", DIRECT)
    m.fanout()
    # The second call was stored first: swap the records' call positions.
    m.sends[-2] = dataclasses.replace(a, index=b.index)
    m.sends[-1] = dataclasses.replace(b, index=a.index)
    report = check(m.history())
    assert {v.kind for v in report.violations} == {Kind.SENDER_ORDER}
    assert report.reordered == 1


def test_a_send_started_after_an_ack_must_come_after_it_across_devices() -> None:
    m = busy_model()
    first = m.send("alice", GROUP, device="phone")
    second = m.send("alice", GROUP, device="laptop", session="alice/laptop#2")
    m.fanout()
    # The phone's send (stored first) only started after the laptop's (stored
    # second) had been acked: the order contradicts what the sender saw.
    m.sends[-1] = dataclasses.replace(second, attempted_at=100.0, acked_at=101.0)
    m.sends[-2] = dataclasses.replace(first, attempted_at=200.0, acked_at=201.0)
    assert kinds(m.history()) == {Kind.SENDER_ORDER}


def test_concurrent_sends_of_two_devices_may_commit_in_either_order() -> None:
    m = busy_model()
    first = m.send("alice", GROUP, device="phone")
    second = m.send("alice", GROUP, device="laptop", session="alice/laptop#2")
    m.fanout()
    # Both were in flight at once: no order between them is promised.
    assert second.acked_at is not None
    m.sends[-2] = dataclasses.replace(first, acked_at=second.acked_at + 1.0)
    assert check(m.history()).violations == []


def test_a_device_handed_a_senders_messages_out_of_order() -> None:
    m = busy_model()
    m.send("bob", GROUP)
    m.send("bob", GROUP)
    m.fanout()
    h = m.history()
    carol = device(h, "carol", "phone")
    x, y = carol.entries[-2], carol.entries[-1]
    # Handed in timeline order, but the timeline itself holds them reversed.
    carol.entries[-2] = dataclasses.replace(y, seq=x.seq)
    carol.entries[-1] = dataclasses.replace(x, seq=y.seq)
    got = kinds(h)
    assert Kind.SENDER_ORDER in got
    assert Kind.CONVERSATION_ORDER in got


def test_a_fanout_out_of_conv_seq_order_breaks_conversation_order() -> None:
    m = busy_model()
    m.send("alice", GROUP)
    m.send("bob", GROUP)
    # A fan-out that wrote bob's message (conv_seq n+1) into carol's timeline
    # before alice's (conv_seq n).
    alices, bobs = m.committed[GROUP][-2], m.committed[GROUP][-1]
    m._append("carol", bobs)
    m._append("carol", alices)
    m._append("bob", alices)
    m._append("alice", bobs)
    m.watermark[GROUP] = bobs.conv_seq
    h = m.history()
    assert kinds(h) == {Kind.CONVERSATION_ORDER}
    (v,) = check(h).violations
    assert (v.user_id, v.msg_id) == ("carol", alices.msg_id)


def test_a_device_handed_its_timeline_out_of_seq_order() -> None:
    h = busy_model().history()
    bob = device(h, "bob", "phone")
    # Two messages of different conversations, handed in the wrong seq order.
    i = next(
        i
        for i in range(len(bob.entries) - 1)
        if bob.entries[i].conversation_id != bob.entries[i + 1].conversation_id
    )
    bob.entries[i], bob.entries[i + 1] = bob.entries[i + 1], bob.entries[i]
    assert kinds(h) == {Kind.TIMELINE_ORDER}


def test_two_devices_disagreeing_on_a_conv_seq() -> None:
    h = busy_model().history()
    carol = device(h, "carol", "phone")
    carol.entries[-1] = dataclasses.replace(carol.entries[-1], conv_seq=99)
    assert kinds(h) == {Kind.CONV_SEQ_MISMATCH}


def test_two_messages_at_one_conv_seq() -> None:
    m = busy_model()
    m.send("bob", DIRECT)
    m.conv_seq[DIRECT] -= 1  # the next send gets the same conv_seq again
    m.send("alice", DIRECT)
    m.fanout()
    assert Kind.CONV_SEQ_MISMATCH in kinds(m.history())


def test_two_devices_of_one_user_disagreeing_on_the_timeline() -> None:
    h = busy_model().history()
    laptop = device(h, "alice", "laptop")
    laptop.entries[0] = dataclasses.replace(laptop.entries[0], seq=laptop.entries[0].seq - 1)
    assert kinds(h) == {Kind.TIMELINE_MISMATCH}


def test_a_message_nobody_sent_is_a_phantom() -> None:
    h = busy_model().history()
    bob = device(h, "bob", "phone")
    last = bob.entries[-1]
    bob.entries.append(Delivered(99_999, DIRECT, "alice", "never-sent", 1000, last.seq + 1, b"boo"))
    got = kinds(h)
    assert Kind.PHANTOM in got
    # It is also missing on alice's devices, which the checker says too.
    assert got <= {Kind.PHANTOM, Kind.PARTIAL}


def test_a_body_that_changed_is_corrupted() -> None:
    h = busy_model().history()
    bob = device(h, "bob", "phone")
    bob.entries[0] = dataclasses.replace(bob.entries[0], body=b"tampered")
    assert kinds(h) == {Kind.CORRUPTED}


def test_a_message_handed_to_a_non_member_is_misdelivered() -> None:
    h = busy_model().history()
    bob = device(h, "bob", "phone")
    carol = device(h, "carol", "phone")
    direct = next(e for e in bob.entries if e.conversation_id == DIRECT)
    carol.entries.append(dataclasses.replace(direct, seq=carol.entries[-1].seq + 1))
    assert kinds(h) == {Kind.MISDELIVERED}


@pytest.mark.parametrize("limit", [1, 100])
def test_summary_names_every_kind(limit: int) -> None:
    h = busy_model().history()
    bob = device(h, "bob", "phone")
    bob.entries.append(bob.entries[0])
    bob.entries.pop(1)
    lines = summarize(check(h), limit=limit)
    assert "duplicate_delivery" in lines[0] and "lost" in lines[0]
    assert any("[lost]" in line or "[duplicate_delivery]" in line for line in lines[1:])


def test_a_repeated_send_answered_with_the_original_ack_is_not_out_of_order() -> None:
    # A retransmit storm: later in the session the same client_msg_id is sent
    # again and the server answers with the first ACK (an older conv_seq).
    m = busy_model()
    first = m.send("alice", DIRECT)
    m.send("alice", DIRECT)
    m.index[first.session] += 1
    m.sends.append(
        dataclasses.replace(
            first,
            index=m.index[first.session],
            attempted_at=float(next(m.clock)),
            acked_at=float(next(m.clock)),
        )
    )
    m.send("alice", DIRECT)
    m.fanout()
    assert check(m.history()).violations == []


def test_a_resend_from_a_new_session_keeps_the_first_attempts_place() -> None:
    # The first client closed before the ACK; the next one sends the same id
    # first, gets the stored message's ACK, then sends new messages.
    m = busy_model()
    lost_ack = m.send("bob", GROUP, session="bob/phone#1")
    m.sends[-1] = dataclasses.replace(lost_ack, ack=None, acked_at=None)
    assert lost_ack.ack is not None
    m.sends.append(
        dataclasses.replace(
            lost_ack,
            session="bob/phone#2",
            index=1,
            attempted_at=float(next(m.clock)),
            acked_at=float(next(m.clock)),
        )
    )
    m.index["bob/phone#2"] = 1
    m.send("bob", GROUP, session="bob/phone#2")
    m.fanout()
    assert check(m.history()).violations == []


def test_a_second_session_storing_its_sends_out_of_call_order_breaks_sender_order() -> None:
    m = busy_model()
    m.index["bob/phone#2"] = 1  # after one resend, as above
    a = m.send("bob", GROUP, session="bob/phone#2")  # conv_seq n
    b = m.send("bob", GROUP, session="bob/phone#2")  # conv_seq n+1
    m.fanout()
    # b was called first, yet stored after a.
    m.sends[-2] = dataclasses.replace(a, index=b.index)
    m.sends[-1] = dataclasses.replace(b, index=a.index)
    assert kinds(m.history()) == {Kind.SENDER_ORDER}
