"""The client_id rule and the token bucket, as pure state machines."""

from __future__ import annotations

import pytest

from gateway.ordering import Accept, ClientIdOrder, OutOfOrder, Pending, Replay
from gateway.ratelimit import TokenBucket


def test_in_order_sends_are_accepted_and_replayed() -> None:
    order: ClientIdOrder[str] = ClientIdOrder(ack_memory=10)
    assert order.classify(1, "a") == Accept()
    e = order.accept(1, "a")
    assert order.classify(2, "b") == Accept()
    order.accept(2, "b")
    assert order.in_flight == 2
    # A retransmit of 1 while it is still being processed: its answer is coming.
    assert order.classify(1, "a") == Pending()
    order.completed(1, "a", "ack-1")
    assert not order.is_stale(e)
    assert order.classify(1, "a") == Replay("ack-1")
    assert order.in_flight == 1


def test_higher_is_out_of_order_with_expected() -> None:
    order: ClientIdOrder[str] = ClientIdOrder(ack_memory=10)
    decision = order.classify(3, "c")
    assert isinstance(decision, OutOfOrder) and decision.expected == 1
    assert order.next_client_id == 1


def test_reused_client_id_with_another_message_is_refused() -> None:
    order: ClientIdOrder[str] = ClientIdOrder(ack_memory=10)
    order.accept(1, "a")
    order.completed(1, "a", "ack-1")
    decision = order.classify(1, "zzz")
    assert isinstance(decision, OutOfOrder) and decision.expected == 2


def test_forgotten_ack_asks_for_a_resend_under_the_expected_id() -> None:
    order: ClientIdOrder[str] = ClientIdOrder(ack_memory=2)
    for cid in (1, 2, 3):
        order.accept(cid, f"m{cid}")
        order.completed(cid, f"m{cid}", f"ack-{cid}")
    assert order.classify(3, "m3") == Replay("ack-3")
    assert order.classify(2, "m2") == Replay("ack-2")
    decision = order.classify(1, "m1")
    assert isinstance(decision, OutOfOrder) and decision.expected == 4


def test_failure_does_not_consume_the_id_and_stales_the_rest_of_the_window() -> None:
    order: ClientIdOrder[str] = ClientIdOrder(ack_memory=10)
    e1 = order.accept(1, "a")
    e2 = order.accept(2, "b")
    e3 = order.accept(3, "c")
    assert e1 == e2 == e3
    order.failed(1)
    assert order.next_client_id == 1 and order.reset_to == 1
    assert order.is_stale(e2) and order.is_stale(e3)
    assert order.in_flight == 0
    # The same (or the next) message is accepted again under client_id 1.
    assert order.classify(1, "b") == Accept()
    e = order.accept(1, "b")
    assert not order.is_stale(e)
    # The stale send 2 of the old window is not "pending" any more.
    assert order.classify(2, "c") == Accept()


def test_failure_in_the_middle_keeps_earlier_ones() -> None:
    order: ClientIdOrder[str] = ClientIdOrder(ack_memory=10)
    for cid in (1, 2, 3):
        order.accept(cid, f"m{cid}")
    order.completed(1, "m1", "ack-1")
    order.failed(2)
    assert order.next_client_id == 2
    assert order.classify(1, "m1") == Replay("ack-1")


def test_accept_requires_the_expected_id() -> None:
    order: ClientIdOrder[str] = ClientIdOrder(ack_memory=1)
    with pytest.raises(ValueError):
        order.accept(2, "x")


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.1)
    assert not bucket.take(0.05)
    assert bucket.take(0.11)
    # Idle time refills up to the burst, never beyond.
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
