"""SendWindow: client_id numbering, window, ACK matching, retransmits, resync."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from imclient.errors import SendErrorCode
from imclient.policy import RetransmitPolicy
from imclient.sender import Frame, Outgoing, SendWindow

POLICY = RetransmitPolicy(
    initial_s=1.0, multiplier=2.0, max_interval_s=4.0, max_attempts=3, retry_initial_s=0.5
)


def msg(i: int) -> Outgoing:
    return Outgoing(f"m{i}", "d:a:b", f"body {i}".encode(), 1)


def window(n: int = 8, count: int = 0) -> SendWindow:
    w = SendWindow(POLICY, window=n)
    for i in range(count):
        w.submit(msg(i))
    w.on_connected(1, n)
    return w


def ids(frames: list[Frame]) -> list[tuple[int, str]]:
    return [(f.client_id, f.message.client_msg_id) for f in frames]


def ack(w: SendWindow, f: tuple[int, str]) -> object:
    return w.on_ack(f[0], f[1], msg_id=100 + f[0], seq=f[0], conv_seq=f[0], server_time_ms=0)


def test_client_ids_count_from_one_in_submit_order() -> None:
    w = window(count=3)
    assert ids(w.poll(0.0)) == [(1, "m0"), (2, "m1"), (3, "m2")]
    assert w.poll(0.1) == []  # nothing is written twice without a reason


def test_window_limits_unanswered_sends_and_an_ack_opens_it() -> None:
    w = window(n=2, count=5)
    assert ids(w.poll(0.0)) == [(1, "m0"), (2, "m1")]
    assert w.poll(0.0) == []
    assert ack(w, (1, "m0")) is not None
    assert ids(w.poll(0.0)) == [(3, "m2")]
    assert len(w) == 4


def test_welcome_window_can_only_lower_the_clients_window() -> None:
    w = SendWindow(POLICY, window=4)
    for i in range(10):
        w.submit(msg(i))
    w.on_connected(1, window=2)
    assert len(w.poll(0.0)) == 2
    w.on_disconnected()
    w.on_connected(1, window=100)
    assert len(w.poll(0.0)) == 4


def test_ack_is_matched_by_client_msg_id_and_repeats_are_ignored() -> None:
    w = window(count=2)
    w.poll(0.0)
    acked = ack(w, (1, "m0"))
    assert acked is not None and acked.message.client_msg_id == "m0"  # type: ignore[attr-defined]
    assert ack(w, (1, "m0")) is None  # the answer to a retransmit
    assert [m.client_msg_id for m in w.pending()] == ["m1"]


def test_reconnect_resends_unacked_in_original_order_new_ids_same_msg_ids() -> None:
    w = window(n=3, count=5)
    first = ids(w.poll(0.0))
    assert first == [(1, "m0"), (2, "m1"), (3, "m2")]
    ack(w, (1, "m0"))
    w.on_disconnected()
    assert w.poll(1.0) == []  # nothing is written while disconnected
    w.submit(msg(5))
    w.on_connected(1, 3)
    assert ids(w.poll(2.0)) == [(1, "m1"), (2, "m2"), (3, "m3")]
    for f in [(1, "m1"), (2, "m2"), (3, "m3")]:
        ack(w, f)
    assert ids(w.poll(2.0)) == [(4, "m4"), (5, "m5")]


def test_out_of_order_rewinds_to_expected_and_resends_in_order() -> None:
    w = window(count=4)
    w.poll(0.0)  # 1..4
    ack(w, (1, "m0"))
    # The gateway lost frame 2 (say) and refuses 3 and 4, expecting 2.
    assert w.on_error(3, "m2", SendErrorCode.OUT_OF_ORDER, False, "", 2, now=0.1) is None
    assert ids(w.poll(0.1)) == [(2, "m1"), (3, "m2"), (4, "m3")]
    # The refusal of the old copy of 4 arrives after the resend: stale, ignored.
    assert w.on_error(4, "m3", SendErrorCode.OUT_OF_ORDER, False, "", 2, now=0.2) is None
    assert w.poll(0.2) == []


def test_a_burst_of_out_of_order_answers_resends_the_window_once() -> None:
    """After a refused frame, every later frame of the window is refused with the
    same `expected`; only the first refusal may cause a resend."""
    w = window(n=32, count=32)
    assert len(w.poll(0.0)) == 32
    w.on_error(1, "m0", SendErrorCode.RATE_LIMITED, True, "slow down", 0, now=0.0)
    w.on_error(2, "m1", SendErrorCode.OUT_OF_ORDER, False, "", 1, now=0.0)
    assert len(w.poll(1.0)) == 32  # the hold is over: the window again, in order
    for i in range(2, 32):  # the rest of the burst arrives late
        w.on_error(i + 1, f"m{i}", SendErrorCode.OUT_OF_ORDER, False, "", 1, now=1.0)
        assert w.poll(1.0) == []
    assert w.writes == 64


def test_non_retryable_error_fails_that_message_and_reuses_its_client_id() -> None:
    w = window(count=4)
    w.poll(0.0)  # 1..4 in flight
    failed = w.on_error(2, "m1", SendErrorCode.PERMISSION_DENIED, False, "not a member", 0, 0.1)
    assert failed is not None
    assert failed.code == SendErrorCode.PERMISSION_DENIED
    assert failed.message.client_msg_id == "m1"
    assert "m1" not in w
    # The gateway still expects 2: m2 and m3 move down and go again, in order.
    assert ids(w.poll(0.1)) == [(2, "m2"), (3, "m3")]
    # The gateway's OUT_OF_ORDER answers to the old 3 and 4 refer to old numbers.
    assert w.on_error(3, "m2", SendErrorCode.OUT_OF_ORDER, False, "", 2, 0.2) is None
    assert w.on_error(4, "m3", SendErrorCode.OUT_OF_ORDER, False, "", 2, 0.2) is None
    assert w.poll(0.2) == []


def test_retryable_error_holds_the_message_and_everything_after_it() -> None:
    w = window(count=3)
    w.poll(0.0)
    assert w.on_error(1, "m0", SendErrorCode.UNAVAILABLE, True, "logic down", 0, now=1.0) is None
    assert w.poll(1.1) == []  # backoff (0.5 s): nothing may overtake m0
    assert w.next_deadline() == pytest.approx(1.5)
    resent = ids(w.poll(1.5))
    assert resent == [(1, "m0"), (2, "m1"), (3, "m2")]  # same numbers, same order


def test_only_the_oldest_send_is_retransmitted_then_the_connection_is_given_up() -> None:
    w = window(count=3)
    assert len(w.poll(0.0)) == 3
    assert w.next_deadline() == pytest.approx(1.0)
    assert w.poll(0.9) == []
    again = w.poll(1.0)
    assert ids(again) == [(1, "m0")] and again[0].retransmit
    assert w.next_deadline() == pytest.approx(3.0)  # backoff: 2 s after the 2nd write
    assert ids(w.poll(3.0)) == [(1, "m0")]
    assert not w.exhausted
    assert w.poll(7.0) == []  # third write unanswered for 4 s: max_attempts reached
    assert w.exhausted
    assert w.retransmits == 2


def test_the_retransmit_timer_restarts_when_the_oldest_send_is_acked() -> None:
    w = window(count=2)
    w.poll(0.0)
    ack(w, (1, "m0"))
    assert w.poll(0.9) == []
    assert w.next_deadline() == pytest.approx(1.9)  # m1's timer starts when it is oldest
    assert ids(w.poll(1.9)) == [(2, "m1")]


def test_an_error_naming_an_older_number_of_the_message_is_ignored() -> None:
    w = window(count=3)
    w.poll(0.0)
    w.on_error(1, "m0", SendErrorCode.INVALID_ARGUMENT, False, "bad", 0, now=0.1)
    assert ids(w.poll(0.1)) == [(1, "m1"), (2, "m2")]
    # A late answer to m1's first frame (client_id 2): m1 is client_id 1 now.
    assert w.on_error(2, "m1", SendErrorCode.UNAVAILABLE, True, "", 0, now=0.2) is None
    assert w.next_deadline() == pytest.approx(1.1)  # no hold was started


def test_out_of_order_may_expect_a_higher_id_than_the_refused_one() -> None:
    """The gateway remembers client_id 2 as used by another message (or has
    forgotten its answer): it refuses 2 and expects 4."""
    w = window(count=3)
    w.poll(0.0)
    assert w.on_error(2, "m1", SendErrorCode.OUT_OF_ORDER, False, "", 4, now=0.1) is None
    assert ids(w.poll(0.1)) == [(4, "m1"), (5, "m2")]
    w.submit(msg(3))
    assert ids(w.poll(0.2)) == [(6, "m3")]


def test_a_retransmit_without_an_answer_is_fine() -> None:
    """The gateway does not answer a retransmit of a send it is still processing."""
    w = window(count=1)
    w.poll(0.0)
    assert ids(w.poll(1.0)) == [(1, "m0")]  # the retransmit, unanswered
    assert ack(w, (1, "m0")) is not None  # the answer to the first frame
    assert len(w) == 0 and not w.exhausted


def test_duplicate_client_msg_id_is_rejected_and_remove_withdraws() -> None:
    w = window(count=2)
    with pytest.raises(ValueError):
        w.submit(msg(0))
    assert w.remove("m1") is not None
    assert ids(w.poll(0.0)) == [(1, "m0")]


# -- a randomized run against a model of the gateway ---------------------------------


@dataclass
class GatewayModel:
    """The gateway's client_id rule (docs/protocol.md, services/gateway/ordering.py)
    over in-order pipes that lose everything on a disconnect.

    Read time: higher -> OUT_OF_ORDER(expected); lower -> the remembered ACK if the
    same message, no answer if it is still being processed, else OUT_OF_ORDER;
    equal -> invalid body / rate limit answered at once (the id is not consumed),
    or accepted into the processing queue. Processing time, one at a time: sends
    accepted before a failure are refused OUT_OF_ORDER(the failed id); a failure
    (retryable or not) makes its id expected again; success stores the message
    once per client_msg_id (logic's dedup) and ACKs it.
    """

    rng: random.Random
    invalid: set[str]  # refused at read time (bad body)
    forbidden: set[str]  # refused at processing time (not a member)
    stored: list[str] = field(default_factory=list)  # client_msg_ids in storage order
    next_cid: int = 1
    epoch: int = 0
    reset_to: int = 1
    in_flight: dict[int, str] = field(default_factory=dict)
    acks: dict[int, str] = field(default_factory=dict)
    queue: list[tuple[int, str, int]] = field(default_factory=list)

    def connect(self) -> None:
        # Sends being processed when the connection broke may still be stored.
        for _, cmid, _ in self.queue:
            if self.rng.random() < 0.5 and cmid not in self.forbidden:
                self._store(cmid)
        self.next_cid, self.epoch, self.reset_to = 1, 0, 1
        self.in_flight, self.acks, self.queue = {}, {}, []

    def _store(self, cmid: str) -> None:
        if cmid not in self.stored:
            self.stored.append(cmid)

    def read(self, cid: int, cmid: str) -> list[tuple[str, int, str, int]]:
        if cid > self.next_cid:
            return [("ooo", cid, cmid, self.next_cid)]
        if cid < self.next_cid:
            if cid in self.acks:
                if self.acks[cid] == cmid:
                    return [("ack", cid, cmid, 0)]
                return [("ooo", cid, cmid, self.next_cid)]
            if self.in_flight.get(cid) == cmid:
                return []  # still being processed: its answer is coming
            return [("ooo", cid, cmid, self.next_cid)]
        if cmid in self.invalid:
            return [("invalid", cid, cmid, 0)]
        if self.rng.random() < 0.03:
            return [("retry", cid, cmid, 0)]  # rate limited
        self.in_flight[cid] = cmid
        self.next_cid += 1
        self.queue.append((cid, cmid, self.epoch))
        return []

    def process(self) -> list[tuple[str, int, str, int]]:
        if not self.queue:
            return []
        cid, cmid, epoch = self.queue.pop(0)
        if epoch != self.epoch:
            self.in_flight.pop(cid, None)
            return [("ooo", cid, cmid, self.reset_to)]
        failure = None
        if cmid in self.forbidden:
            failure = ("forbidden", cid, cmid, 0)
        elif self.rng.random() < 0.05:
            failure = ("retry", cid, cmid, 0)  # logic unavailable
        if failure is not None:
            for c in [c for c in self.in_flight if c >= cid]:
                del self.in_flight[c]
            self.next_cid = self.reset_to = cid
            self.epoch += 1
            return [failure]
        self._store(cmid)
        self.in_flight.pop(cid, None)
        self.acks[cid] = cmid
        return [("ack", cid, cmid, 0)]


@pytest.mark.parametrize("seed", range(40))
def test_randomized_every_message_is_stored_once_in_submit_order(seed: int) -> None:
    rng = random.Random(seed)
    n = 60
    refused = rng.sample(range(n), 6)
    invalid = {f"m{i}" for i in refused[:3]}
    forbidden = {f"m{i}" for i in refused[3:]}
    gw = GatewayModel(rng, invalid, forbidden)
    w = SendWindow(RetransmitPolicy(1.0, 2.0, 4.0, 3, 0.1, 0.4), window=rng.choice([1, 3, 8]))
    to_gateway: list[tuple[int, str]] = []
    to_client: list[tuple[str, int, str, int]] = []
    acked: list[str] = []
    failed: list[str] = []
    submitted = 0
    exhausted = 0
    now = 0.0
    gw.connect()
    w.on_connected(1, 8)
    for _ in range(20_000):
        now += 0.05
        if submitted < n and rng.random() < 0.3:
            w.submit(msg(submitted))
            submitted += 1
        exhausted += w.exhausted
        if rng.random() < 0.01 or w.exhausted:  # the connection breaks: both pipes lost
            to_gateway.clear()
            to_client.clear()
            w.on_disconnected()
            gw.connect()
            w.on_connected(1, 8)
        to_gateway.extend((f.client_id, f.message.client_msg_id) for f in w.poll(now))
        # The gateway reads some frames and processes some sends; answers of both
        # kinds share one outbound queue.
        for _ in range(rng.randint(0, 4)):
            if to_gateway:
                to_client.extend(gw.read(*to_gateway.pop(0)))
        for _ in range(rng.randint(0, 3)):
            to_client.extend(gw.process())
        for _ in range(rng.randint(0, 4)):
            if not to_client:
                break
            kind, cid, cmid, expected = to_client.pop(0)
            if kind == "ack":
                got = w.on_ack(cid, cmid, 1, 1, 1, 0)
                if got is not None:
                    acked.append(cmid)
            elif kind == "ooo":
                w.on_error(cid, cmid, SendErrorCode.OUT_OF_ORDER, False, "", expected, now)
            elif kind == "retry":
                w.on_error(cid, cmid, SendErrorCode.UNAVAILABLE, True, "", 0, now)
            else:
                code = SendErrorCode.INVALID_ARGUMENT
                if kind == "forbidden":
                    code = SendErrorCode.PERMISSION_DENIED
                f = w.on_error(cid, cmid, code, False, "", 0, now)
                if f is not None:
                    failed.append(cmid)
        if submitted == n and len(w) == 0:
            break
    assert len(w) == 0, f"stuck with {len(w)} pending"
    assert sorted(failed) == sorted(invalid | forbidden)
    expected_order = [f"m{i}" for i in range(n) if f"m{i}" not in invalid | forbidden]
    assert gw.stored == expected_order  # stored once each, in submit order
    assert sorted(acked) == sorted(expected_order)  # each acknowledged to the app once
    assert len(set(acked)) == len(acked)
    # A gateway that answers every accepted frame never makes the client give up
    # a connection: the answers alone drive the resync.
    assert exhausted == 0
    assert w.retransmits == 0  # nor wait for a timer
