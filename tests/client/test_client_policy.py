"""Retransmit and reconnect timing policies."""

from __future__ import annotations

import random

import pytest

from imclient import direct_conversation_id
from imclient.policy import ReconnectPolicy, RetransmitPolicy


def test_retransmit_timeouts_back_off_to_a_cap() -> None:
    p = RetransmitPolicy(initial_s=1.0, multiplier=2.0, max_interval_s=5.0)
    assert [p.timeout(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert p.timeout(10_000) == 5.0  # no overflow


def test_retry_delay_backs_off_to_a_cap() -> None:
    p = RetransmitPolicy(retry_initial_s=0.1, retry_max_s=0.3)
    assert [p.retry_delay(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])


def test_reconnect_delay_has_full_jitter_below_an_exponential_cap() -> None:
    p = ReconnectPolicy(initial_s=0.1, multiplier=2.0, max_s=1.0)
    rng = random.Random(1)
    for failures, cap in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (50, 1.0)]:
        delays = [p.delay(failures, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # spread over the whole range: jitter


@pytest.mark.parametrize(
    "kwargs",
    [{"initial_s": 0}, {"multiplier": 0.5}, {"max_attempts": 0}, {"max_interval_s": 0.1}],
)
def test_bad_retransmit_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetransmitPolicy(**kwargs)  # type: ignore[arg-type]


def test_direct_conversation_id_orders_users() -> None:
    assert direct_conversation_id("bob", "alice") == "d:alice:bob"
    assert direct_conversation_id("alice", "bob") == "d:alice:bob"
    with pytest.raises(ValueError):
        direct_conversation_id("alice", "alice")
    with pytest.raises(ValueError):
        direct_conversation_id("alice", "bad id")
