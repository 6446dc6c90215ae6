"""Receiver: in-order exactly-once hand-off from pushes and paged syncs."""

from __future__ import annotations

import random

import pytest

from imclient.receiver import Entry, Receiver


def e(seq: int) -> Entry[str]:
    return Entry(seq, f"msg@{seq}")


def seqs(entries: list[Entry[str]]) -> list[int]:
    return [x.seq for x in entries]


def synced(last_seq: int = 0, entries: list[int] | None = None) -> Receiver[str]:
    """A receiver that finished its first sync."""
    r: Receiver[str] = Receiver(last_seq)
    r.start_sync()
    r.on_sync_page([e(s) for s in entries or []], has_more=False)
    r.take_ack()
    return r


def test_nothing_is_trusted_before_the_first_sync() -> None:
    r: Receiver[str] = Receiver(0)
    assert r.need_sync
    assert r.on_push(e(1)) == []  # buffered, not applied
    assert r.start_sync() == 0
    assert seqs(r.on_sync_page([], has_more=False)) == [1]
    assert r.seq == 1


def test_after_a_reconnect_pushes_wait_for_the_sync_even_if_in_order() -> None:
    r = synced(entries=[1, 2])
    r.on_connected()
    assert r.need_sync
    assert r.on_push(e(3)) == []  # looks in order, but only a sync can vouch for it
    assert r.start_sync() == 2
    assert seqs(r.on_sync_page([e(3), e(4)], has_more=False)) == [3, 4]


def test_in_order_pushes_are_applied_and_acked_cumulatively() -> None:
    r = synced()
    assert seqs(r.on_push(e(1))) == [1]
    assert seqs(r.on_push(e(2))) == [2]
    assert r.take_ack() == 2  # one ACK covers both
    assert r.take_ack() is None


def test_a_duplicate_push_is_dropped_and_acked_again() -> None:
    r = synced()
    r.on_push(e(1))
    r.take_ack()
    assert r.on_push(e(1)) == []
    assert r.duplicates == 1
    assert r.take_ack() == 1  # the pusher retransmits because it missed the ACK


def test_a_gap_buffers_the_push_and_asks_for_a_sync() -> None:
    r = synced(entries=[1])
    assert r.on_push(e(4)) == []
    assert r.need_sync and r.gaps == 1
    assert r.start_sync() == 1
    assert seqs(r.on_sync_page([e(2), e(3), e(4)], has_more=False)) == [2, 3, 4]
    assert not r.need_sync
    assert r.take_ack() == 4


def test_push_during_sync_never_skips_what_the_sync_has_not_returned_gim_46() -> None:
    """Local 10; a sync is running; push 16 arrives before the sync's answer
    (which was read before 16 committed). 11..15 must not be skipped."""
    r = synced(10)
    r.on_connected()  # a reconnect: sync before trusting pushes
    assert r.start_sync() == 10
    assert r.on_push(e(16)) == []  # held, seq stays 10
    assert r.seq == 10
    out = r.on_sync_page([e(s) for s in range(11, 16)], has_more=False)
    assert seqs(out) == [11, 12, 13, 14, 15, 16]
    assert r.seq == 16 and not r.need_sync


def test_push_during_sync_that_the_sync_also_returns_is_handed_once() -> None:
    r = synced(10)
    r.on_connected()
    r.start_sync()
    r.on_push(e(11))
    assert seqs(r.on_sync_page([e(11), e(12)], has_more=False)) == [11, 12]


def test_paged_sync_holds_pushes_until_the_last_page() -> None:
    r = synced()
    r.on_connected()
    assert r.start_sync() == 0
    assert seqs(r.on_sync_page([e(1), e(2)], has_more=True)) == [1, 2]
    assert r.syncing
    assert r.on_push(e(5)) == []
    assert seqs(r.on_sync_page([e(3), e(4)], has_more=True)) == [3, 4]
    assert seqs(r.on_sync_page([], has_more=False)) == [5]


def test_seq_may_skip_numbers_only_sync_can_tell() -> None:
    r = synced(entries=[3, 7])
    assert r.seq == 7
    assert r.on_push(e(20)) == []  # could be a gap or a skip
    r.start_sync()
    assert seqs(r.on_sync_page([e(20)], has_more=False)) == [20]


def test_a_buffered_push_above_a_hole_triggers_one_more_sync_then_is_dropped() -> None:
    r = synced(5)
    r.on_connected()
    r.start_sync()
    r.on_push(e(9))  # arrives while the first sync runs: it may legitimately miss it
    assert seqs(r.on_sync_page([e(6)], has_more=False)) == [6]
    assert r.need_sync  # 9 is above 7: only a sync started after it can confirm
    r.start_sync()
    # A sync that started after 9 arrived and still does not return it: the
    # server broke prefix-closure. The client never jumps over the hole.
    assert r.on_sync_page([], has_more=False) == []
    assert r.seq == 6
    assert r.dropped_unconfirmed == 1
    assert not r.need_sync


def test_a_page_out_of_order_is_refused_without_changing_state() -> None:
    r = synced(1)
    r.start_sync()
    with pytest.raises(ValueError):
        r.on_sync_page([e(3), e(2)], has_more=False)
    assert r.seq == 1


def test_failed_sync_is_retried_and_keeps_the_buffer() -> None:
    r = synced(1)
    r.on_connected()
    r.start_sync()
    r.on_push(e(3))
    r.sync_failed()
    assert r.need_sync and not r.syncing
    r.start_sync()
    assert seqs(r.on_sync_page([e(2), e(3)], has_more=False)) == [2, 3]


def test_empty_page_with_has_more_ends_the_sync_instead_of_looping() -> None:
    r = synced()
    r.on_connected()
    r.start_sync()
    r.on_sync_page([], has_more=True)
    assert not r.syncing


# -- timeline heads (Welcome.head_seq, Pong.head_seq, Head frames) ----------------


def test_a_head_above_local_makes_exactly_one_sync_due() -> None:
    r = synced(entries=[1, 2])
    assert r.on_head(5)  # a sync is now due
    assert r.need_sync and r.head == 5 and r.head_syncs == 1
    assert not r.on_head(5)  # a repeat of the same head: already due
    assert r.start_sync() == 2
    assert seqs(r.on_sync_page([e(3), e(4), e(5)], has_more=False)) == [3, 4, 5]
    assert not r.need_sync  # the head is reached: no second sync
    assert r.take_ack() == 5
    assert not r.on_head(5)  # and the next repeat of it does nothing
    assert r.head_syncs == 1


def test_a_head_at_or_below_local_or_unknown_does_nothing() -> None:
    r = synced(entries=[1, 2, 3])
    assert not r.on_head(3)
    assert not r.on_head(1)
    assert not r.on_head(0)  # 0: an old gateway, or the store did not answer
    assert not r.need_sync and r.head_syncs == 0
    assert r.take_ack() is None  # nothing new to acknowledge


def test_a_head_during_a_sync_is_remembered_and_honoured_after_it() -> None:
    r = synced(entries=[1])
    r.on_push(e(3))  # a gap: sync
    assert r.start_sync() == 1
    assert not r.on_head(6)  # a sync is running: remembered, not started
    # The running sync read the timeline before 4..6 committed.
    assert seqs(r.on_sync_page([e(2), e(3)], has_more=False)) == [2, 3]
    assert r.need_sync and r.head_syncs == 1  # the head was not lost
    assert r.head_backoff == 0  # the sync started before the head: no reason to wait
    assert r.start_sync() == 3
    assert seqs(r.on_sync_page([e(4), e(5), e(6)], has_more=False)) == [4, 5, 6]
    assert not r.need_sync


def test_a_head_during_a_sync_that_the_sync_reaches_needs_nothing_more() -> None:
    r = synced(entries=[1])
    r.on_head(3)
    r.start_sync()
    assert seqs(r.on_sync_page([e(2)], has_more=True)) == [2]
    r.on_head(3)  # the timer repeats it while the sync runs
    assert seqs(r.on_sync_page([e(3)], has_more=False)) == [3]
    assert not r.need_sync and r.head_syncs == 1


def test_pushes_during_a_head_sync_keep_the_rules_of_step_8() -> None:
    """Local 2, head 4: while the head's sync runs, push 6 arrives. It is held,
    never used to skip 5, which the sync did not return."""
    r = synced(entries=[1, 2])
    r.on_head(4)
    r.start_sync()
    assert r.on_push(e(6)) == []
    assert seqs(r.on_sync_page([e(3), e(4)], has_more=False)) == [3, 4]
    assert r.seq == 4 and r.need_sync  # 6 is above a hole: one more sync
    r.start_sync()
    assert seqs(r.on_sync_page([e(5)], has_more=False)) == [5, 6]


def test_the_welcome_head_holds_the_first_sync_until_it_is_reached() -> None:
    """Welcome says head 6; the first sync ends at 4 (a page that raced a commit,
    or a lagging read): the sync is not over, it goes on (after a backoff,
    since the sync started after the head was known)."""
    r: Receiver[str] = Receiver(2)
    r.on_connected()
    assert not r.on_head(6)  # a sync is due anyway (the connect)
    r.start_sync()
    assert seqs(r.on_sync_page([e(3), e(4)], has_more=False)) == [3, 4]
    assert r.need_sync and r.head_backoff == 1 and r.head_misses == 1
    r.start_sync()
    assert seqs(r.on_sync_page([e(5), e(6)], has_more=False)) == [5, 6]
    assert not r.need_sync and r.head_backoff == 0


def test_a_head_no_sync_reaches_is_given_up_after_the_limit() -> None:
    """A head that syncs started after it never reach (a server fault): a
    bounded number of syncs with backoff, never a busy loop; a later
    announcement of it arms it again."""
    r: Receiver[str] = Receiver(0, head_miss_limit=3)
    r.on_connected()
    r.on_head(9)
    rounds = 0
    while r.need_sync:
        rounds += 1
        assert rounds <= 10
        r.start_sync()
        r.on_sync_page([e(1)] if r.seq == 0 else [], has_more=False)
    assert rounds == 4  # the first sync and 3 more
    assert r.heads_unreached == 1 and r.head_misses == 4 and r.seq == 1
    assert r.head_backoff == 0
    assert r.on_head(9)  # the gateway's timer says it again: try again
    assert r.need_sync


def test_a_failed_head_sync_stays_due_and_keeps_the_head() -> None:
    r = synced(entries=[1])
    r.on_head(3)
    r.start_sync()
    r.sync_failed()  # logic down
    assert r.need_sync and r.head == 3
    r.start_sync()
    assert seqs(r.on_sync_page([e(2), e(3)], has_more=False)) == [2, 3]
    assert not r.need_sync


def test_a_reconnect_keeps_a_head_not_yet_reached() -> None:
    r = synced(entries=[1])
    r.on_head(3)
    r.on_connected()  # the stream broke before the sync ran
    r.on_head(0)  # an old gateway this time
    r.start_sync()
    r.on_sync_page([e(2)], has_more=False)
    assert r.need_sync  # 3 is still known to exist


def test_skip_to_acknowledges_without_handing_anything() -> None:
    """A send-only device: a head is acknowledged as if shown (it shows nothing)."""
    r = synced(entries=[1])
    r.skip_to(5)
    assert r.seq == 5 and not r.need_sync
    assert r.take_ack() == 5
    r.skip_to(4)
    assert r.seq == 5 and r.take_ack() is None


def test_restart_forgets_every_position_of_the_old_store() -> None:
    """Another store epoch: the old seqs mean nothing; everything starts at 0."""
    r = synced(entries=[1, 2, 3])
    r.on_head(9)
    r.on_push(e(5))  # buffered behind a gap
    r.restart()
    assert (r.seq, r.head, r.buffered_seqs, r.need_sync, r.syncing) == (0, 0, [], True, False)
    assert r.take_ack() is None and r.restarts == 1
    # The new store's timeline starts low: nothing is taken for a duplicate.
    assert r.on_push(e(1)) == []  # held until the sync, as after any connect
    assert r.start_sync() == 0
    assert seqs(r.on_sync_page([e(1), e(2)], has_more=False)) == [1, 2]
    assert r.duplicates == 0 and r.take_ack() == 2


def test_restart_abandons_a_running_sync() -> None:
    r = synced(entries=[1])
    r.on_connected()
    r.start_sync()
    r.restart()
    assert not r.syncing and r.need_sync
    assert r.start_sync() == 0


# -- a randomized run: pushes lost, repeated, reordered, racing with syncs ----------


@pytest.mark.parametrize("seed", range(40))
def test_randomized_every_entry_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    # The server's timeline: increasing seqs with occasional skips.
    timeline: list[int] = []
    s = 0
    for _ in range(200):
        s += rng.choice([1, 1, 1, 1, 2, 5])
        timeline.append(s)
    committed = 0  # how many timeline entries are committed so far
    start = rng.choice([0, 0, timeline[10]])
    r: Receiver[str] = Receiver(start)
    delivered: list[int] = []
    pushes: list[int] = []  # the network to the client
    sync_snapshot: list[int] | None = None  # what the running sync read
    page_pos = 0
    for _ in range(5000):
        action = rng.random()
        if action < 0.3 and committed < len(timeline):
            committed += 1
            if rng.random() < 0.8:  # a push may be lost (device offline, gave up)
                pushes.append(timeline[committed - 1])
        elif action < 0.55 and pushes:
            i = rng.randrange(len(pushes)) if rng.random() < 0.2 else 0  # reordering
            seq = pushes.pop(i)
            delivered += seqs(r.on_push(e(seq)))
            if rng.random() < 0.1:
                pushes.append(seq)  # a retransmit
        elif action < 0.7 and r.need_sync and not r.syncing:
            after = r.start_sync()
            # The sync reads the committed prefix at this moment (prefix-closed).
            sync_snapshot = [x for x in timeline[:committed] if x > after]
            page_pos = 0
        elif action < 0.85 and r.syncing and sync_snapshot is not None:
            if rng.random() < 0.05:
                r.sync_failed()
                sync_snapshot = None
                continue
            page = sync_snapshot[page_pos : page_pos + 7]
            page_pos += 7
            more = page_pos < len(sync_snapshot)
            delivered += seqs(r.on_sync_page([e(x) for x in page], more))
        elif action < 0.87:
            r.on_connected()  # a reconnect
            sync_snapshot = None
        elif action < 0.9 and committed:
            # The gateway announces the head (Welcome, Pong, Head frame).
            r.on_head(timeline[committed - 1])
        if r.need_sync is False and not r.syncing and rng.random() < 0.02:
            r.need_sync = True  # an app-side resync now and then
    # Quiet: everything committed, no more pushes; the head alone must bring
    # the device to the end of its timeline.
    committed = len(timeline)
    if r.syncing:
        r.sync_failed()  # the running sync's answer was lost
    r.on_head(timeline[-1])
    for _ in range(10):
        if not r.need_sync:
            break
        after = r.start_sync()
        rest = [x for x in timeline if x > after]
        delivered += seqs(r.on_sync_page([e(x) for x in rest], False))
    expected = [x for x in timeline if x > start]
    assert delivered == expected
    assert r.head_misses == 0 and r.heads_unreached == 0  # syncs were never short
