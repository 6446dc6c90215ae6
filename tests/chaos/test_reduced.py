"""The chaos harness against the real stack.

- The reduced run (what `make test` runs): every fault kind, many clients and
  raw observers, zero violations, no late online delivery (I9: without the
  gateway's liveness mechanism this fails, as it should), a `RESULT` line and a
  JSON file.
- Reads and recalls on a small stack without faults: the state rules judged
  something (History after recalls, ListConversations answers, final unread
  counts) and found nothing.
- One guarantee broken on purpose at a time (logic's TEST-ONLY switches, and a
  client that advances its cursor without syncing): the checker must report the
  matching violation. Each is a short targeted scenario on a small stack.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from chaos import checker
from chaos.cli import main
from chaos.faults import CLIENT_KINDS, SERVER_KINDS, FaultKind, ServerFaults
from chaos.run import RunConfig, run
from chaos.workload import TIMELINE_DEVICE, Workload, WorkloadConfig
from imclient import Entry, GatewayApi, Message, Receiver, direct_conversation_id
from imdev.stack import Stack

pytestmark = pytest.mark.slow


def test_the_reduced_run_keeps_the_promise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chaos-reduced.json"
    status = main(["--reduced", "--seed", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert status == 0, printed[-6000:]
    last = printed.rstrip().splitlines()[-1]
    assert last.startswith("RESULT ")
    result = json.loads(last.removeprefix("RESULT "))
    assert set(result) == {
        "clients",
        "messages_acked",
        "faults",
        "lost",
        "duplicated",
        "reordered",
        "violations",
        "online_late",
        "max_online_delivery_s",
        "reads",
        "noop_reads",
        "recalls",
        "recall_violations",
        "read_regressions",
        "unread_mismatches",
        "seqsvc_values",
        "seqsvc_repeats",
        "store_seq_disorder",
    }
    assert result["violations"] == result["lost"] == result["duplicated"] == 0
    # I6 through seqsvc's kills and restarts: the probe's values, and the store's.
    assert result["seqsvc_values"] > 0
    assert result["seqsvc_repeats"] == result["store_seq_disorder"] == 0
    assert result["reordered"] == 0
    # The workload also reads (some stale: no-ops) and recalls, under the faults.
    assert result["reads"] > 0 and result["noop_reads"] > 0 and result["recalls"] > 0
    assert result["recall_violations"] == result["read_regressions"] == 0
    assert result["unread_mismatches"] == 0
    # I9: every device that stayed connected got everything within the bound.
    online = data["online"]
    assert result["online_late"] == 0, online["late"][:20]
    assert result["max_online_delivery_s"] <= online["liveness_s"]
    assert online["observer_pairs"] > 0 and online["pairs"] > online["observer_pairs"]
    assert online["never"] == 0 and data["quiet"] is True
    assert set(online["max_by_kind"]) <= {k.value for k in FaultKind} | {"none"}
    assert all(o["connects"] >= 1 for o in data["observers"]) and len(data["observers"]) >= 3
    assert result["clients"] >= 8
    assert result["messages_acked"] >= 300
    assert data["result"] == result and data["ok"] is True
    # Every fault kind of the single-node stack happened, none failed to act (the
    # cluster's own kinds are `make chaos-cluster`'s).
    assert set(data["fault_counts"]) == {k.value for k in (*SERVER_KINDS, *CLIENT_KINDS)}
    assert data["fault_errors"] == 0
    assert data["counts"]["delivered"] == data["counts"]["expected_deliveries"] > 0
    for name in (
        "sent",
        "acked",
        "delivered",
        "lost",
        "duplicated",
        "reordered",
        "quiesce",
        "online_late",
        "max online delivery per fault kind",
    ):
        assert name in printed


def small_run(env: dict[str, dict[str, str]], **workload: object) -> RunConfig:
    """A short run without faults on a one-of-each stack."""
    defaults: dict[str, object] = {
        "users": 4,
        "two_device_users": 1,
        "groups": 1,
        "group_size": (3, 4),
        "think_mean_s": 0.05,
        "messages": 60,
        "seed": 3,
    }
    defaults.update(workload)
    return RunConfig(
        workload=WorkloadConfig(**defaults),  # type: ignore[arg-type]
        rounds=0,
        client_rounds=0,
        gateways=1,
        logics=1,
        pushers=1,
        env=env,
        ack_timeout_s=20,
        quiesce_deadline_s=10,
        name="chaos-break",
    )


def kinds(report: checker.Report) -> set[str]:
    return set(report.by_kind())


async def test_reads_and_recalls_keep_the_state_rules() -> None:
    # Every user reads often (a third of the READs stale) and recalls a third of
    # its messages, half of them the moment the ACK is in (racing fan-out).
    config = small_run(
        {},
        read_users=1.0,
        read_mean_s=0.1,
        stale_read_probability=0.35,
        list_probability=0.5,
        recall_users=1.0,
        recall_probability=0.3,
        messages=80,
    )
    result = await run(dataclasses.replace(config, min_duration_s=3.0), echo=print)
    r = result.report
    assert r.violations == [], checker.summarize(r)
    assert result.ok
    assert r.reads > 0 and r.noop_reads > 0 and r.recalls > 0
    assert result.workload["recalls_at_once"] and result.workload["stale_reads"]
    h = result.history
    assert h is not None
    # The recall rule had something to judge: responses requested after a
    # recall's ACK that include its message (served with no body).
    recalled = {
        (s.conversation_id, s.target_conv_seq): s.acked_at
        for s in h.sends
        if s.kind == checker.EntryKind.RECALL and s.stored
    }
    judged = [
        e
        for served in h.served
        for e in served.entries
        if (at := recalled.get((e.conversation_id, e.conv_seq))) is not None
        and at < served.requested_at
    ]
    assert judged and all(e.body == b"" and e.recalled for e in judged)
    # Read positions and unread counts were asked for, the final ones included.
    finals = [a for a in h.conversations if a.final]
    assert {a.user_id for a in finals} == {u for m in h.members.values() for u in m}
    assert any(p.read_conv_seq for a in finals for p in a.positions.values())
    assert len(h.conversations) > len(finals)


async def test_without_dedup_a_repeated_send_is_reported_as_a_duplicate() -> None:
    config = small_run({"logic": {"IM_LOGIC_TEST_FAULT_SKIP_DEDUP": "1"}}, storm_probability=0.5)
    result = await run(config, echo=print)
    try:
        assert result.workload["storms"], "the scenario needs repeated sends"
        assert kinds(result.report) == {checker.Kind.DUPLICATE_MESSAGE.value}
        assert result.result()["duplicated"] > 0
        assert not result.ok
    finally:
        shutil.rmtree(result.workdir, ignore_errors=True)


async def test_with_dedup_the_same_repeats_are_harmless() -> None:
    # The control of the test above: same workload, guarantee intact.
    result = await run(small_run({}, storm_probability=0.5), echo=print)
    assert result.workload["storms"]
    assert result.report.violations == [], checker.summarize(result.report)
    assert result.ok


async def test_without_outbox_and_repair_acked_messages_are_reported_lost() -> None:
    config = small_run(
        {
            "logic": {
                "IM_LOGIC_TEST_FAULT_SKIP_OUTBOX": "1",
                "IM_LOGIC_TEST_FAULT_SKIP_REPAIR": "1",
            }
        },
        messages=30,
    )
    config = dataclasses.replace(config, quiesce_deadline_s=4)
    result = await run(config, echo=print)
    try:
        assert kinds(result.report) == {checker.Kind.LOST.value}
        # In the server's timelines only recipients miss them: the sender's own
        # timeline row is written by the send itself. On the devices likewise:
        # nothing is ever pushed, but the gateways' liveness checks bring the
        # senders' devices their own rows; nobody brings the recipients anything.
        lost = [v for v in result.report.violations if v.kind is checker.Kind.LOST]
        assert result.history is not None
        sender_of = {s.ack.msg_id: s.sender_id for s in result.history.sends if s.ack}
        in_store = [v for v in lost if v.device_id == TIMELINE_DEVICE]
        assert in_store and all(v.user_id != sender_of[v.msg_id] for v in in_store)
        on_devices = [v for v in lost if v.device_id != TIMELINE_DEVICE]
        assert on_devices and all(v.user_id != sender_of[v.msg_id] for v in on_devices)
        assert result.result()["lost"] == len(lost) > 0
        assert not result.quiet and not result.ok
        assert result.online.online_late > 0  # and no connected device got them
    finally:
        shutil.rmtree(result.workdir, ignore_errors=True)


async def test_without_locks_concurrent_sends_are_reported_lost_or_reordered() -> None:
    # Without the conversation and user locks, commit order stops matching
    # seq/conv_seq order: fan-out skips messages below its watermark and a sync
    # cursor passes rows not yet committed.
    config = small_run(
        {"logic": {"IM_LOGIC_TEST_FAULT_SKIP_LOCKS": "1"}},
        users=8,
        two_device_users=2,
        groups=2,
        group_size=(4, 6),
        think_mean_s=0.02,
        messages=500,
    )
    # The race is a matter of timing: a run can be lucky (seen about once in five
    # on a loaded machine), so up to three runs, each with its own seed; the
    # checker must see the damage in one of them.
    summaries = []
    for attempt in range(3):
        seeded = dataclasses.replace(
            config,
            workload=dataclasses.replace(config.workload, seed=config.workload.seed + attempt),
        )
        result = await run(seeded, echo=print)
        try:
            r = result.report
            # Whatever else breaks without locks, the timelines lose or misorder
            # messages, and the checker must say so.
            if r.lost + r.reordered > 0:
                return
            summaries.append(checker.summarize(r))
        finally:
            shutil.rmtree(result.workdir, ignore_errors=True)
    raise AssertionError(f"no lost or reordered message in 3 runs without locks: {summaries}")


async def test_without_repair_a_wiped_jetstream_store_is_reported_lost(
    stack_dir: Path,
) -> None:
    # I8: JetStream may lose its store; the repair loop is what finds the
    # committed messages that were never fanned out. Turned off, the checker
    # must see them missing on the recipient (not on the sender: its own
    # timeline row is written by the send).
    stack = Stack(stack_dir / "stack", env={"logic": {"IM_LOGIC_TEST_FAULT_SKIP_REPAIR": "1"}})
    await asyncio.to_thread(stack.start, 120.0)
    w = Workload(
        WorkloadConfig(users=3, two_device_users=0, groups=1, group_size=(3, 3), seed=9),
        stack.gateway_addresses,
        lambda user, device: stack.mint(user, device),
        stack_dir,
        echo=print,
    )
    try:
        await w.setup()
        await w.start(senders=False)
        await asyncio.to_thread(stack.pushers[0].stop)  # triggers pile up in the stream
        conv = direct_conversation_id("u00", "u01")
        sent = [await w.send(w.device("u00"), conv) for _ in range(4)]
        await asyncio.to_thread(ServerFaults(stack).nats_wipe, 0.0)
        await asyncio.to_thread(stack.pushers[0].start, 60.0)
        quiet, _ = await w.quiesce(deadline_s=8)
        timelines = await w.audit_timelines()
    finally:
        await w.close()
        await asyncio.to_thread(stack.stop)
    report = checker.check(w.history(timelines))
    assert not quiet
    assert kinds(report) == {checker.Kind.LOST.value}, checker.summarize(report)
    lost = {(v.user_id, v.device_id, v.msg_id) for v in report.violations}
    msg_ids = [s.ack.msg_id for s in sent if s.ack is not None]
    # Each of the four is missing from u01's server timeline (never fanned out),
    # so from u01's device. u00's device has them: the sender's own timeline
    # row is written by the send, and its gateway's liveness checks push it.
    assert lost == {
        (user, device, m)
        for user, device in (("u01", TIMELINE_DEVICE), ("u01", "d1"))
        for m in msg_ids
    }
    assert report.lost == 8


class NoSyncReceiver(Receiver[Message]):
    """A client bug on purpose: it never syncs (not on connect, not on a gap, not on
    a timeline head) and takes any push as the next entry, advancing its cursor
    across the gap (gim issue 46's class of bug). What it missed while offline is
    at or below its Welcome head: its own sync's job, so no catch-up brings it."""

    def __init__(self, last_seq: int = 0) -> None:
        super().__init__(last_seq)
        self.need_sync = False

    def on_connected(self) -> None:
        super().on_connected()
        self.need_sync = False

    def on_head(self, head: int) -> bool:
        return False  # and ignores the timeline heads that would tell it

    def on_push(self, entry: Entry[Message]) -> list[Entry[Message]]:
        self.pushes += 1
        self._ack_due = True
        if entry.seq <= self.seq:
            self.duplicates += 1
            return []
        self.seq = entry.seq
        return [entry]


async def route_gone(stack: Stack, user: str, device: str, timeout_s: float = 10.0) -> None:
    """Waits until the gateway has removed the device's route (gateway/routes.py
    layout), so what is sent next is not pushed to it at all."""
    async with aioredis.Redis.from_url(stack.redis.url()) as r:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while await r.hexists(f"{stack.redis_prefix}route:{user}", device):
            assert asyncio.get_running_loop().time() < deadline, "route never removed"
            await asyncio.sleep(0.05)


async def fanned_out(stack: Stack, user: str, msg_ids: set[int], timeout_s: float = 20.0) -> None:
    """Waits until `msg_ids` are in `user`'s server timeline (read with Sync as
    another device), i.e. their fan-out is over."""
    async with GatewayApi(stack.gateway_addresses, stack.mint(user, "probe"), insecure=True) as api:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not msg_ids <= {m.msg_id for m in await api.sync_all(0)}:
            assert asyncio.get_running_loop().time() < deadline, "fan-out never happened"
            await asyncio.sleep(0.1)


@pytest.fixture
def stack_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chaos-break-"))
    path.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def small_stack(stack_dir: Path) -> AsyncIterator[Stack]:
    stack = Stack(stack_dir / "stack")
    await asyncio.to_thread(stack.start, 120.0)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


async def test_a_client_that_skips_sync_is_reported_losing_what_it_missed(
    small_stack: Stack, stack_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = Workload(
        WorkloadConfig(users=3, two_device_users=0, groups=1, group_size=(3, 3), seed=5),
        small_stack.gateway_addresses,
        lambda user, device: small_stack.mint(user, device),
        stack_dir,
        echo=print,
    )
    await w.setup()
    await w.start(senders=False)
    try:
        sender = w.device("u00")

        async def offline_while_sent_to(user: str) -> None:
            victim = w.device(user)
            conv = direct_conversation_id("u00", user)
            await w.take_offline(victim)
            await route_gone(small_stack, user, "d1")
            sent = [await w.send(sender, conv) for _ in range(5)]
            await fanned_out(small_stack, user, {s.ack.msg_id for s in sent if s.ack})
            await w.bring_online(victim)
            last = await w.send(sender, conv)  # pushed with a gap of 5 behind it
            assert last.ack is not None
            deadline = asyncio.get_running_loop().time() + 20
            while last.ack.msg_id not in victim.handed:
                assert asyncio.get_running_loop().time() < deadline, "the push never came"
                await asyncio.sleep(0.05)

        # The real client: it syncs on reconnect and gets all six.
        await offline_while_sent_to("u01")
        # The broken one: it takes the sixth and skips the five.
        monkeypatch.setattr("imclient.client.Receiver", NoSyncReceiver)
        await offline_while_sent_to("u02")
        quiet, _ = await w.quiesce(deadline_s=5)
    finally:
        await w.close()
    report = checker.check(w.history())
    assert not quiet
    assert kinds(report) == {checker.Kind.LOST.value}, checker.summarize(report)
    assert {(v.user_id, v.device_id) for v in report.violations} == {("u02", "d1")}
    assert report.lost == 5
