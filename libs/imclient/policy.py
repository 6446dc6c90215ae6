"""Timing policies: retransmit timers for sends and reconnect backoff.

Pure values; the randomness of the jitter comes from an injectable `random.Random`
so tests can pin it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetransmitPolicy:
    """When an unanswered send is retransmitted on one connection.

    Only the oldest unanswered send runs a timer: the gateway answers a
    connection's sends strictly in client_id order, so a later one cannot be
    answered before it. The timer starts when a send becomes the oldest one.
    After `max_attempts` writes of the same frame without an answer the
    connection is presumed dead and the client reconnects (where every unacked
    send is resent, so nothing is ever dropped by the client).
    """

    initial_s: float = 3.0
    multiplier: float = 2.0
    max_interval_s: float = 15.0
    max_attempts: int = 4
    # Backoff before resending a send the gateway answered with a retryable
    # SendError (UNAVAILABLE, RATE_LIMITED).
    retry_initial_s: float = 0.2
    retry_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.multiplier < 1 or self.max_interval_s < self.initial_s:
            raise ValueError("retransmit intervals must be positive and non-decreasing")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry backoff must be positive and non-decreasing")

    def timeout(self, attempts: int) -> float:
        """Seconds to wait for an answer after the `attempts`-th write (1-based)."""
        exp = min(max(attempts - 1, 0), 32)
        return float(min(self.initial_s * self.multiplier**exp, self.max_interval_s))

    def retry_delay(self, retries: int) -> float:
        """Seconds to wait before resending after the `retries`-th retryable error."""
        exp = min(max(retries - 1, 0), 32)
        return float(min(self.retry_initial_s * 2.0**exp, self.retry_max_s))


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Exponential backoff with full jitter between connection attempts.

    The n-th consecutive failure waits uniform(0, min(max_s, initial_s * multiplier**n)).
    A connection that got as far as Welcome resets the count.
    """

    initial_s: float = 0.1
    multiplier: float = 2.0
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.multiplier < 1 or self.max_s < self.initial_s:
            raise ValueError("reconnect backoff must be positive and non-decreasing")

    def delay(self, failures: int, rng: random.Random) -> float:
        exp = min(max(failures, 0), 32)
        return rng.uniform(0.0, min(self.max_s, self.initial_s * self.multiplier**exp))
