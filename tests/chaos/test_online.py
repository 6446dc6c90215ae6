"""Online delivery times (`chaos.online.measure`) on made-up timelines: which
(message, device) pairs are judged, how faults move the start of the clock, what
counts as late, and the per-kind maxima.

Times are plain seconds on one clock; LIVENESS is the bound.
"""

from __future__ import annotations

import pytest

from chaos.online import (
    NO_FAULT,
    AckedMessage,
    DeviceTrack,
    FaultSpan,
    OnlineReport,
    Receipt,
    Skip,
    Window,
    measure,
)

LIVENESS = 10.0
CONV = "d:alice:bob"
MEMBERS = {CONV: {"alice", "bob"}}
END = 100.0


def bob(*windows: Window, receipts: dict[int, Receipt] | None = None) -> DeviceTrack:
    return DeviceTrack("bob", "d1", windows=list(windows), receipts=receipts or {})


def observer(
    *windows: Window, receipts: dict[int, Receipt] | None = None, skips: list[Skip] | None = None
) -> DeviceTrack:
    return DeviceTrack(
        "bob",
        "obs",
        observer=True,
        windows=list(windows),
        receipts=receipts or {},
        skips=skips or [],
    )


def msg(msg_id: int, acked_at: float, conv: str = CONV) -> AckedMessage:
    return AckedMessage(msg_id, conv, acked_at)


def judge(
    messages: list[AckedMessage],
    devices: list[DeviceTrack],
    faults: list[FaultSpan] | None = None,
    seq_of: dict[tuple[str, int], int] | None = None,
) -> OnlineReport:
    return measure(messages, MEMBERS, devices, faults or [], END, LIVENESS, seq_of)


def test_a_prompt_delivery_is_judged_and_on_time() -> None:
    r = judge([msg(1, 10.0)], [bob(Window(0.0), receipts={1: Receipt(10.2, 0)})])
    assert (r.pairs, r.received, r.online_late, r.never) == (1, 1, 0, 0)
    assert r.max_delay_s == pytest.approx(0.2)
    assert r.max_by_kind == {NO_FAULT: pytest.approx(0.2)}


def test_a_delivery_slower_than_the_bound_is_late() -> None:
    r = judge([msg(1, 10.0)], [bob(Window(0.0), receipts={1: Receipt(20.5, 0)})])
    assert r.online_late == 1 and r.never == 0
    assert r.late[0].delay_s == pytest.approx(10.5)
    assert r.late_by_kind == {NO_FAULT: 1}


def test_exactly_the_bound_is_not_late() -> None:
    r = judge([msg(1, 10.0)], [bob(Window(0.0), receipts={1: Receipt(20.0, 0)})])
    assert r.online_late == 0


def test_the_clock_starts_when_the_fault_in_progress_is_over() -> None:
    # Acked at 10 during a Redis kill that ends at 14; received at 23: 9 s after
    # the fault, on time although 13 s after the ack.
    faults = [FaultSpan("redis_kill", 8.0, 14.0)]
    r = judge([msg(1, 10.0)], [bob(Window(0.0), receipts={1: Receipt(23.0, 0)})], faults)
    assert r.online_late == 0
    assert r.max_delay_s == pytest.approx(9.0)
    assert r.max_by_kind == {"redis_kill": pytest.approx(9.0)}


def test_the_last_of_several_overlapping_faults_sets_the_start() -> None:
    faults = [
        FaultSpan("logic_kill", 9.0, 12.0),
        FaultSpan("postgres_restart", 11.0, 16.0),  # starts before the first ends
        FaultSpan("nats_restart", 30.0, 31.0),  # after the receipt: no effect
    ]
    r = judge([msg(1, 10.0)], [bob(Window(0.0), receipts={1: Receipt(27.0, 0)})], faults)
    assert r.online_late == 1  # 11 s after the last fault that was in progress
    assert r.late[0].base == pytest.approx(16.0)
    assert set(r.late[0].kinds) == {"logic_kill", "postgres_restart"}


def test_a_fault_that_ended_before_the_ack_does_not_excuse_it_but_is_named() -> None:
    # A Redis flush is over in a moment; what it broke (routes) outlasts it. It
    # moves no clock, and the pair still counts for it in the per-kind table.
    faults = [FaultSpan("redis_flush", 5.0, 5.01)]
    r = judge([msg(1, 10.0)], [bob(Window(0.0), receipts={1: Receipt(21.0, 0)})], faults)
    assert r.online_late == 1
    assert r.late[0].base == pytest.approx(10.0)
    assert r.late_by_kind == {"redis_flush": 1}
    # Longer ago than the bound: not named.
    far = [FaultSpan("redis_flush", -5.0, -4.99)]
    r = judge([msg(1, 10.0)], [bob(Window(0.0), receipts={1: Receipt(10.5, 0)})], far)
    assert r.max_by_kind == {NO_FAULT: pytest.approx(0.5)}


def test_never_received_on_a_connection_open_to_the_end_is_late() -> None:
    faults = [FaultSpan("route_removed", 11.0, 11.0), FaultSpan("seqsvc_kill", 60.0, 62.0)]
    r = judge([msg(1, 10.0)], [bob(Window(0.0))], faults)
    assert (r.online_late, r.never, r.received) == (1, 1, 0)
    pair = r.late[0]
    assert pair.never and pair.received_at is None
    # Counted up to the end of the run, every fault after the ack taken out.
    assert pair.base == pytest.approx(62.0)
    assert pair.delay_s == pytest.approx(END - 62.0)
    # Named after the faults around its ack only, not every later one.
    assert pair.kinds == ("route_removed",)


def test_a_connection_that_ended_before_the_message_came_is_not_judged() -> None:
    # Disconnected at 12 (its gateway was killed); got it at 13 on a new
    # connection (a sync): neither an online delivery nor a late one.
    dev = bob(Window(0.0, 12.0), Window(12.5), receipts={1: Receipt(13.0, 1)})
    r = judge([msg(1, 10.0)], [dev])
    assert r.pairs == 0 and r.online_late == 0
    # Never got it and went offline: not judged either.
    r = judge([msg(1, 10.0)], [bob(Window(0.0, 12.0))])
    assert r.pairs == 0


def test_only_messages_acked_while_connected_are_judged() -> None:
    dev = bob(Window(0.0, 5.0), Window(11.0), receipts={2: Receipt(12.0, 1)})
    r = judge([msg(1, 8.0), msg(2, 11.5)], [dev])  # 1 acked while offline
    assert r.pairs == 1 and r.received == 1
    assert r.max_delay_s == pytest.approx(0.5)


def test_a_push_that_beats_the_send_ack_takes_no_time() -> None:
    r = judge([msg(1, 10.0)], [bob(Window(0.0), receipts={1: Receipt(9.9, 0)})])
    assert r.pairs == 1 and r.max_delay_s == 0.0


def test_a_message_the_device_had_before_this_connection_is_not_a_pair() -> None:
    # Handed at 9.9 on the first connection, acked (late) at 10.5 on the second.
    dev = bob(Window(0.0, 10.0), Window(10.2), receipts={1: Receipt(9.9, 0)})
    assert judge([msg(1, 10.5)], [dev]).pairs == 0


def test_an_arrival_not_tied_to_a_connection_is_not_judged() -> None:
    dev = bob(Window(0.0), receipts={1: Receipt(10.5, None)})
    assert judge([msg(1, 10.0)], [dev]).pairs == 0


def test_only_devices_of_members_are_judged() -> None:
    carol = DeviceTrack("carol", "d1", windows=[Window(0.0)])
    alice = DeviceTrack("alice", "d1", windows=[Window(0.0)], receipts={1: Receipt(10.1, 0)})
    r = judge([msg(1, 10.0)], [carol, alice, bob(Window(0.0), receipts={1: Receipt(10.3, 0)})])
    assert r.pairs == 2 and r.online_late == 0


def test_a_hole_skipped_before_the_pair_was_due_is_not_judged() -> None:
    # Message 1 is seq 5 of bob's timeline; the observer took (4, 7) as a hole
    # at 15, five seconds after the ack: the server still had time.
    obs = observer(Window(0.0), skips=[Skip(0, 4, 7, 15.0)])
    r = judge([msg(1, 10.0)], [obs], seq_of={("bob", 1): 5})
    assert r.pairs == 0 and r.skipped == 1 and r.online_late == 0


def test_a_hole_skipped_after_the_pair_was_due_still_counts_it_late() -> None:
    obs = observer(Window(0.0), skips=[Skip(0, 4, 7, 21.0)])
    r = judge([msg(1, 10.0)], [obs], seq_of={("bob", 1): 5})
    assert r.skipped == 0 and r.online_late == 1 and r.observer_pairs == 1


def test_a_skip_during_a_fault_is_before_the_pair_was_due() -> None:
    # Skipped 12 s after the ack, but a NATS outage was in progress until 15:
    # the pair was due at 25 only.
    obs = observer(Window(0.0), skips=[Skip(0, 4, 7, 22.0)])
    faults = [FaultSpan("nats_down_long", 9.0, 15.0)]
    r = judge([msg(1, 10.0)], [obs], faults, seq_of={("bob", 1): 5})
    assert r.skipped == 1 and r.online_late == 0


def test_a_skip_in_another_connection_or_hole_does_not_excuse_a_pair() -> None:
    obs = observer(Window(0.0), skips=[Skip(0, 5, 9, 12.0), Skip(1, 4, 7, 12.0)])
    r = judge([msg(1, 10.0)], [obs], seq_of={("bob", 1): 5})
    assert r.skipped == 0 and r.online_late == 1


def test_per_kind_maxima() -> None:
    faults = [FaultSpan("gateway_kill", 20.0, 22.0), FaultSpan("nats_restart", 50.0, 51.0)]
    dev = bob(
        Window(0.0),
        receipts={
            1: Receipt(10.1, 0),  # no fault near: the normal path
            2: Receipt(24.0, 0),  # gateway_kill in progress at the ack: 2 s after it
            3: Receipt(53.0, 0),  # nats_restart in progress before the receipt
        },
    )
    r = judge([msg(1, 10.0), msg(2, 21.0), msg(3, 49.5)], [dev], faults)
    assert r.max_by_kind == {
        NO_FAULT: pytest.approx(0.1),
        "gateway_kill": pytest.approx(2.0),
        "nats_restart": pytest.approx(2.0),
    }
    assert r.pairs_by_kind == {NO_FAULT: 1, "gateway_kill": 1, "nats_restart": 1}
    assert r.online_late == 0
    data = r.to_json()
    assert data["max_online_delivery_s"] == pytest.approx(2.0)
    assert data["max_by_kind"] == {"gateway_kill": 2.0, "nats_restart": 2.0, NO_FAULT: 0.1}


def test_an_entry_at_or_below_the_welcome_head_is_the_connect_syncs_not_a_pair() -> None:
    # The message was committed and fanned out (bob's seq 5) before bob's
    # observer connected, but its SendAck reached the sender only after the
    # Welcome (head 5): the push went to the gateway bob had left. Entries at or
    # below the Welcome head are what a client's sync on connect fetches; an
    # observer never syncs, so it cannot judge them.
    obs = observer(Window(9.9, head_seq=5))
    r = judge([msg(1, 10.0)], [obs], seq_of={("bob", 1): 5})
    assert r.pairs == 0 and r.online_late == 0
    # One above the head is the server's to push.
    r = judge([msg(1, 10.0)], [obs], seq_of={("bob", 1): 6})
    assert r.observer_pairs == 1 and r.online_late == 1
