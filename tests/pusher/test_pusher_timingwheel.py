"""The hashed timing wheel, driven by a fake clock."""

from __future__ import annotations

import pytest

from pusher.timingwheel import TimingWheel


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def wheel(
    clock: FakeClock,
    schedule: list[float] | None = None,
    max_attempts: int = 4,
    slots: int = 8,
    tick: float = 0.1,
    max_timers: int = 1000,
) -> TimingWheel[str]:
    return TimingWheel(
        tick_s=tick,
        slots=slots,
        schedule_s=schedule or [1.0, 2.0, 4.0],
        max_attempts=max_attempts,
        clock=clock,
        max_timers=max_timers,
    )


def run_until(w: TimingWheel[str], clock: FakeClock, until: float, step: float = 0.05):
    """Advances the clock in small steps; returns (time, kind, seq, attempts) events."""
    events = []
    while clock.t < until - 1e-9:
        clock.t = round(clock.t + step, 6)
        out = w.advance()
        events += [(round(clock.t - 1000, 2), "re", t.seq, t.attempts) for t in out.retransmit]
        events += [(round(clock.t - 1000, 2), "gave_up", t.seq, t.attempts) for t in out.gave_up]
    return events


def test_retransmit_schedule_then_give_up() -> None:
    clock = FakeClock()
    w = wheel(clock, schedule=[1.0, 2.0, 4.0], max_attempts=4)
    assert w.add("u", "d", 7, "m7")
    events = run_until(w, clock, 1000 + 12)
    # Deliveries at t=0 (by the caller), 1, 3, 7; gave up at 11 (7 + last delay 4).
    assert events == [
        (1.0, "re", 7, 2),
        (3.0, "re", 7, 3),
        (7.0, "re", 7, 4),
        (11.0, "gave_up", 7, 4),
    ]
    assert len(w) == 0 and w.given_up == 1 and w.retransmits == 3


def test_schedule_longer_than_a_revolution() -> None:
    """8 slots x 0.1 s = 0.8 s per revolution; a 2.5 s timer waits for its round."""
    clock = FakeClock()
    w = wheel(clock, schedule=[2.5], max_attempts=2)
    w.add("u", "d", 1, "x")
    events = run_until(w, clock, 1000 + 5.1)
    assert events == [(2.5, "re", 1, 2), (5.0, "gave_up", 1, 2)]


def test_cumulative_ack_cancels_at_or_below() -> None:
    clock = FakeClock()
    w = wheel(clock)
    for seq in (3, 5, 8, 9):
        w.add("u", "d", seq, f"m{seq}")
    w.add("u", "other", 5, "x")
    w.add("v", "d", 5, "y")
    assert w.ack("u", "d", 8) == 3
    assert w.pending("u", "d") == [9]
    assert w.ack("u", "d", 8) == 0  # idempotent
    assert len(w) == 3
    events = run_until(w, clock, 1000 + 1.01)
    assert sorted(e[2] for e in events) == [5, 5, 9]  # other devices untouched


def test_ack_between_retransmits_stops_them() -> None:
    clock = FakeClock()
    w = wheel(clock)
    w.add("u", "d", 1, "m1")
    assert [e[1] for e in run_until(w, clock, 1000 + 1.2)] == ["re"]
    assert w.ack("u", "d", 1) == 1
    assert run_until(w, clock, 1000 + 30) == []
    assert w.given_up == 0


def test_add_is_idempotent_per_device_and_seq() -> None:
    clock = FakeClock()
    w = wheel(clock, schedule=[1.0], max_attempts=3)
    assert w.add("u", "d", 1, "a")
    run_until(w, clock, 1000 + 1.01)
    assert not w.add("u", "d", 1, "a")  # a redelivered fan-out does not reset attempts
    events = run_until(w, clock, 1000 + 5)
    assert events == [(2.0, "re", 1, 3), (3.0, "gave_up", 1, 3)]


def test_expiries_come_in_seq_order_per_device() -> None:
    clock = FakeClock()
    w = wheel(clock)
    for seq in (9, 2, 5):
        w.add("u", "d", seq, "x")
    out = []
    clock.t += 1.0
    out = w.advance().retransmit
    assert [t.seq for t in out] == [2, 5, 9]


def test_long_pause_fires_everything_due_once() -> None:
    clock = FakeClock()
    w = wheel(clock, schedule=[1.0, 1.0], max_attempts=10)
    for seq in range(1, 20):
        w.add("u", "d", seq, "x")
    clock.t += 50  # many revolutions without a tick
    out = w.advance()
    assert sorted(t.seq for t in out.retransmit) == list(range(1, 20))
    assert all(t.attempts == 2 for t in out.retransmit)
    assert w.advance().retransmit == []


def test_max_timers_bounds_memory() -> None:
    clock = FakeClock()
    w = wheel(clock, max_timers=2)
    assert w.add("u", "d", 1, "x") and w.add("u", "d", 2, "x")
    assert not w.add("u", "e", 3, "x")
    assert w.refused == 1 and len(w) == 2
    w.ack("u", "d", 1)
    assert w.add("u", "e", 3, "x")


def test_one_shot_when_max_attempts_is_one() -> None:
    clock = FakeClock()
    w = wheel(clock, max_attempts=1)
    w.add("u", "d", 1, "x")
    assert run_until(w, clock, 1000 + 2) == [(1.0, "gave_up", 1, 1)]


@pytest.mark.parametrize(
    "kwargs",
    [{"tick_s": 0}, {"slots": 0}, {"max_attempts": 0}, {"schedule_s": []}, {"schedule_s": [1, -1]}],
)
def test_bad_parameters(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "tick_s": 0.1, "slots": 8, "schedule_s": [1.0], "max_attempts": 3, "clock": FakeClock(),
    }  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError):
        TimingWheel(**args)  # type: ignore[arg-type]
