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


def test_an_error_answering_an_older_copy_is_ignored_while_a_newer_one_is_out() -> None:
    w = window(count=1)
    w.poll(0.0)
    w.poll(1.0)  # retransmit: two copies outstanding
    assert w.on_error(1, "m0", SendErrorCode.UNAVAILABLE, True, "", 0, now=1.1) is None
    assert w.next_deadline() != pytest.approx(1.6)  # not held: the newer copy decides
    acked = ack(w, (1, "m0"))
    assert acked is not None


def test_duplicate_client_msg_id_is_rejected_and_remove_withdraws() -> None:
    w = window(count=2)
    with pytest.raises(ValueError):
        w.submit(msg(0))
    assert w.remove("m1") is not None
    assert ids(w.poll(0.0)) == [(1, "m0")]


# -- a randomized run against a model of the gateway ---------------------------------


@dataclass
class GatewayModel:
    """The gateway rules of docs/protocol.md over an in-order, lossy-on-disconnect
    pipe: expected client_id, one at a time, dedup on client_msg_id."""

    rng: random.Random
    invalid: set[str]
    stored: list[str] = field(default_factory=list)  # client_msg_ids in storage order
    acks_by_cid: dict[int, tuple[int, str]] = field(default_factory=dict)
    expected: int = 1

    def connect(self) -> None:
        self.expected = 1
        self.acks_by_cid = {}

    def handle(self, cid: int, cmid: str) -> tuple[str, int, str, int]:
        """Returns (kind, client_id, client_msg_id, expected)."""
        if cid < self.expected:
            got = self.acks_by_cid.get(cid)
            if got is None:
                return ("error_nonretry_replay", cid, cmid, self.expected)
            return ("ack", cid, got[1], 0)
        if cid > self.expected:
            return ("ooo", cid, cmid, self.expected)
        if self.rng.random() < 0.05:
            return ("retry", cid, cmid, 0)
        if cmid in self.invalid:
            return ("invalid", cid, cmid, 0)
        if cmid not in self.stored:
            self.stored.append(cmid)
        self.acks_by_cid[cid] = (cid, cmid)
        self.expected += 1
        return ("ack", cid, cmid, 0)


@pytest.mark.parametrize("seed", range(30))
def test_randomized_every_message_is_stored_once_in_submit_order(seed: int) -> None:
    rng = random.Random(seed)
    n = 60
    invalid = {f"m{i}" for i in rng.sample(range(n), 4)}
    gw = GatewayModel(rng, invalid)
    w = SendWindow(RetransmitPolicy(0.5, 2.0, 2.0, 3, 0.1, 0.4), window=rng.choice([1, 3, 8]))
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
        # The gateway works through some of its input, in order.
        for _ in range(rng.randint(0, 3)):
            if to_gateway:
                to_client.append(gw.handle(*to_gateway.pop(0)))
        for _ in range(rng.randint(0, 3)):
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
            elif kind == "invalid":
                f = w.on_error(cid, cmid, SendErrorCode.INVALID_ARGUMENT, False, "", 0, now)
                if f is not None:
                    failed.append(cmid)
            else:
                raise AssertionError(f"the client caused an impossible answer: {kind}")
        if submitted == n and len(w) == 0:
            break
    assert len(w) == 0, f"stuck with {len(w)} pending"
    # A gateway that answers every frame never makes the client give up a
    # connection: resync by OUT_OF_ORDER/errors works without reconnecting...
    assert exhausted == 0
    assert w.retransmits == 0  # nor wait for a timer: the answers drive the resync
    assert sorted(failed) == sorted(invalid)
    expected_order = [f"m{i}" for i in range(n) if f"m{i}" not in invalid]
    assert gw.stored == expected_order  # stored once each, in submit order
    assert sorted(acked) == sorted(expected_order)  # each acknowledged to the app once
    assert len(set(acked)) == len(acked)
