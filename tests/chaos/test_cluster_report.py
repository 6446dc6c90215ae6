"""The cluster report's failover numbers (chaos.run.failover_numbers): the
failover time counts only messages first submitted after the primary's kill, and
an ACK of such a message before the rebuilt standby started is a violation."""

from __future__ import annotations

from chaos.faults import FailoverTimes
from chaos.run import SendTimes, failover_numbers

KILL = 100.0
STANDBY = 104.25  # the rebuilt standby launched 4.25 s after the kill


def test_an_ack_of_a_send_made_before_the_kill_does_not_time_the_failover() -> None:
    # The chaos run's "0.05 s failover": this ACK's commit was the old
    # primary's, made (and confirmed by its standby) before the kill.
    sends = [
        SendTimes("old", attempted=99.9, acked=100.05),
        SendTimes("new", attempted=100.5, acked=104.6),
    ]
    times, early = failover_numbers(sends, [FailoverTimes(KILL, STANDBY)])
    assert times == [104.6 - KILL]
    assert early == 0


def test_a_resubmission_after_the_kill_is_not_a_first_submission() -> None:
    # A retransmit storm's repeat of an older message, answered from its stored
    # ACK: neither a failover time nor an ACK without a standby.
    sends = [
        SendTimes("m1", attempted=99.0, acked=99.1),
        SendTimes("m1", attempted=100.2, acked=100.3),
        SendTimes("m2", attempted=101.0, acked=105.0),
    ]
    times, early = failover_numbers(sends, [FailoverTimes(KILL, STANDBY)])
    assert times == [5.0]
    assert early == 0


def test_an_ack_of_a_new_send_before_the_standby_is_a_violation() -> None:
    sends = [
        SendTimes("a", attempted=100.1, acked=100.9),  # on the promoted primary alone
        SendTimes("b", attempted=100.2, acked=104.5),
        SendTimes("c", attempted=101.0, acked=None),
    ]
    times, early = failover_numbers(sends, [FailoverTimes(KILL, STANDBY)])
    assert times == [100.9 - KILL]
    assert early == 1
    # Never rebuilt: every ACK of a new send after the kill is one.
    _, early = failover_numbers(sends, [FailoverTimes(KILL, None)])
    assert early == 2


def test_each_failover_is_timed_by_its_own_first_new_ack() -> None:
    sends = [
        SendTimes("a", attempted=100.5, acked=105.0),
        SendTimes("b", attempted=200.5, acked=207.0),
    ]
    kills = [FailoverTimes(100.0, 104.0), FailoverTimes(200.0, 206.0)]
    times, early = failover_numbers(sends, kills)
    assert times == [5.0, 7.0]
    assert early == 0
