"""A hashed timing wheel of push retransmit timers. Pure: no I/O, no asyncio; the
caller passes a clock and calls `advance()` every tick.

One timer per (user, device, seq): a push of timeline entry `seq` to one device
that has not been acknowledged yet. `add` arms it after the first delivery;
each expiry is one more delivery (the caller retransmits) and re-arms it with the
next delay of the retransmit schedule, until `max_attempts` deliveries were made:
the next expiry then gives up (the device heals by sync). A device's cumulative
ACK `ack(user, device, seq)` cancels every timer of that device at or below seq.

Wheel: `slots` buckets of `tick_s` each. A timer due at tick T lives in bucket
T % slots and fires when the wheel's cursor reaches T (timers further away than
one revolution wait in their bucket for later passes). Adding, cancelling and
firing a timer are O(1) per timer; one tick visits one bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

P = TypeVar("P")

DeviceKey = tuple[str, str]


class Clock(Protocol):
    def __call__(self) -> float:
        """Current time in seconds (monotonic)."""
        ...


@dataclass(eq=False, slots=True)
class Timer(Generic[P]):
    user_id: str
    device_id: str
    seq: int
    payload: P
    attempts: int  # deliveries made so far
    due_tick: int = 0


@dataclass(slots=True)
class Expired(Generic[P]):
    """What one `advance()` found due."""

    retransmit: list[Timer[P]] = field(
        default_factory=list
    )  # deliver again, in (user, device, seq) order
    gave_up: list[Timer[P]] = field(default_factory=list)  # removed after max_attempts


class TimingWheel(Generic[P]):
    def __init__(
        self,
        *,
        tick_s: float,
        slots: int,
        schedule_s: Sequence[float],
        max_attempts: int,
        clock: Clock,
        max_timers: int = 1_000_000,
    ) -> None:
        """`schedule_s[i]` is the wait after delivery i+1 (the last one repeats);
        `max_attempts` counts every delivery, the first included; `max_timers`
        bounds memory (`add` refuses beyond it)."""
        if tick_s <= 0 or slots < 1 or max_attempts < 1 or max_timers < 1:
            raise ValueError("tick_s > 0, slots >= 1, max_attempts >= 1, max_timers >= 1")
        if not schedule_s or any(d <= 0 for d in schedule_s):
            raise ValueError("schedule_s must be a non-empty list of positive delays")
        self.tick_s = tick_s
        self.slots = slots
        self.schedule_s = list(schedule_s)
        self.max_attempts = max_attempts
        self.max_timers = max_timers
        self._clock = clock
        self._origin = clock()
        self._tick = 0  # the last tick processed
        self._buckets: list[dict[int, Timer[P]]] = [{} for _ in range(slots)]
        self._by_device: dict[DeviceKey, dict[int, Timer[P]]] = {}
        self._count = 0
        # Running totals, for metrics.
        self.retransmits = 0
        self.given_up = 0
        self.cancelled = 0
        self.refused = 0

    def __len__(self) -> int:
        return self._count

    def pending(self, user_id: str, device_id: str) -> list[int]:
        """Seqs of the device's armed timers, ascending."""
        return sorted(self._by_device.get((user_id, device_id), {}))

    def _now_tick(self) -> int:
        return math.floor((self._clock() - self._origin) / self.tick_s)

    def _arm(self, timer: Timer[P], delay_s: float) -> None:
        ticks = max(1, math.ceil(delay_s / self.tick_s - 1e-9))
        timer.due_tick = max(self._tick, self._now_tick()) + ticks
        self._buckets[timer.due_tick % self.slots][id(timer)] = timer

    def _delay_after(self, attempts: int) -> float:
        return self.schedule_s[min(attempts - 1, len(self.schedule_s) - 1)]

    def add(self, user_id: str, device_id: str, seq: int, payload: P) -> bool:
        """Arms the timer of a first delivery. Idempotent: if (user, device, seq)
        already has one, it is kept as is (its attempts go on counting). False if
        it was already armed or the wheel is full."""
        device = self._by_device.setdefault((user_id, device_id), {})
        if seq in device:
            return False
        if self._count >= self.max_timers:
            self.refused += 1
            if not device:
                del self._by_device[(user_id, device_id)]
            return False
        timer = Timer(user_id, device_id, seq, payload, attempts=1)
        device[seq] = timer
        self._count += 1
        self._arm(timer, self._delay_after(1))
        return True

    def _remove(self, timer: Timer[P]) -> None:
        self._buckets[timer.due_tick % self.slots].pop(id(timer), None)
        key = (timer.user_id, timer.device_id)
        device = self._by_device.get(key)
        if device is not None and device.get(timer.seq) is timer:
            del device[timer.seq]
            if not device:
                del self._by_device[key]
        self._count -= 1

    def ack(self, user_id: str, device_id: str, seq: int) -> int:
        """Cancels every timer of the device at or below `seq` (a cumulative ACK);
        returns how many. Idempotent."""
        device = self._by_device.get((user_id, device_id))
        if not device:
            return 0
        done = [t for s, t in device.items() if s <= seq]
        for timer in done:
            self._remove(timer)
        self.cancelled += len(done)
        return len(done)

    def advance(self) -> Expired[P]:
        """Processes every tick up to now. Due timers below max_attempts are
        re-armed with the next delay and returned for retransmission (their
        `attempts` already counts it); the others are removed and returned as
        given up."""
        now_tick = self._now_tick()
        out: Expired[P] = Expired()
        if now_tick <= self._tick:
            return out
        # After a long pause, one revolution visits every bucket.
        steps = min(now_tick - self._tick, self.slots)
        due: list[Timer[P]] = []
        for step in range(1, steps + 1):
            bucket = self._buckets[(self._tick + step) % self.slots]
            for key, timer in list(bucket.items()):
                if timer.due_tick <= now_tick:
                    del bucket[key]
                    due.append(timer)
        self._tick = now_tick
        due.sort(key=lambda t: (t.user_id, t.device_id, t.seq))
        for timer in due:
            if timer.attempts >= self.max_attempts:
                self._by_device[(timer.user_id, timer.device_id)].pop(timer.seq, None)
                if not self._by_device[(timer.user_id, timer.device_id)]:
                    del self._by_device[(timer.user_id, timer.device_id)]
                self._count -= 1
                self.given_up += 1
                out.gave_up.append(timer)
            else:
                timer.attempts += 1
                self._arm(timer, self._delay_after(timer.attempts))
                self.retransmits += 1
                out.retransmit.append(timer)
        return out
