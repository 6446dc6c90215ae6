"""Conversation state through the SDK and imctl, on the real stack: read
positions synced across a user's devices and to the peer, the no-op ACK of an
old position, edit and recall as the peer's SDK sees them (live and by
Sync/History), automatic DELIVERED receipts without ping-pong, imctl's
read/edit/recall/conversations/receipts commands run in-process, unread counts
and read positions while senders send and the reader reads, and the receipts of
a 500-member group."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
from pathlib import Path

import pytest
from e2e.e2e_support import Inbox, uid, wait_until

from imclient import (
    Client,
    FrameError,
    FrameErrorCode,
    GatewayApi,
    Message,
    MessageKind,
    PermissionDenied,
    PresenceState,
    PresenceUpdate,
    SendFailed,
    TypingNotice,
    direct_conversation_id,
)
from imctl.cli import main as imctl_main
from imdev.servers import ROOT
from imdev.stack import Stack

DELIVERY_S = 15.0


def connect(stack: Stack, user: str, device: str, **kwargs: object) -> Client:
    return Client(stack.gateway_addresses, stack.mint(user, device), insecure=True, **kwargs)  # type: ignore[arg-type]


def kinds(inbox: Inbox, conv: str) -> list[tuple[MessageKind, str, int]]:
    """(kind, sender, target) of every entry of `conv` the device was handed."""
    return [
        (m.kind, m.sender_id, m.target_conv_seq) for m in inbox.entries if m.conversation_id == conv
    ]


async def test_a_read_position_reaches_the_users_other_device_once_and_the_peer(
    stack: Stack,
) -> None:
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    async with (
        connect(stack, alice, "a1", auto_delivered=False) as a1,
        connect(stack, alice, "a2", auto_delivered=False) as a2,
        connect(stack, bob, "b1", auto_delivered=False) as b1,
    ):
        inbox_a1, inbox_a2, inbox_b1 = Inbox(a1, "a1"), Inbox(a2, "a2"), Inbox(b1, "b1")
        acks = [await b1.send(conv, f"m{i}") for i in range(3)]
        await inbox_a1.wait_for(3, DELIVERY_S, conv)
        read = await a1.mark_read(conv, acks[-1].conv_seq)
        assert read.stored and read.conv_seq == acks[-1].conv_seq + 1

        # alice's other device: the READ entry, once, after the messages, and
        # its state says so.
        await wait_until(
            lambda: a2.conversation_state(conv).read_conv_seq == acks[-1].conv_seq,
            DELIVERY_S,
            lambda: f"a2's read position (entries {kinds(inbox_a2, conv)})",
        )
        assert kinds(inbox_a2, conv) == [
            *[(MessageKind.MESSAGE, bob, 0)] * 3,
            (MessageKind.READ, alice, acks[-1].conv_seq),
        ]
        # The peer gets the read receipt; its own read position is untouched.
        await wait_until(
            lambda: b1.conversation_state(conv).peer_read_conv_seq == acks[-1].conv_seq,
            DELIVERY_S,
            lambda: f"b1's receipt (entries {kinds(inbox_b1, conv)})",
        )
        assert b1.conversation_state(conv).read_conv_seq == 0

        # A position at or below the current one: acknowledged, nothing stored,
        # nothing delivered. The next message is the barrier that proves it.
        again = await a2.mark_read(conv, acks[0].conv_seq)
        assert not again.stored and again.msg_id == 0 and again.conv_seq == acks[-1].conv_seq
        barrier = await b1.send(conv, "barrier")
        await inbox_a1.wait_for(4, DELIVERY_S, conv)
        await inbox_a2.wait_for(4, DELIVERY_S, conv)
        for inbox in (inbox_a1, inbox_a2):
            assert [k for k, _, _ in kinds(inbox, conv)].count(MessageKind.READ) == 1
            assert inbox.entries[-1].conv_seq == barrier.conv_seq
        # Above the conversation's head: refused, nothing changed.
        with pytest.raises(SendFailed):
            await a1.mark_read(conv, barrier.conv_seq + 100)

        async with GatewayApi(
            stack.gateway_addresses, stack.mint(alice, "x"), insecure=True
        ) as api:
            (listed,) = [c async for c in api.conversations() if c.conversation_id == conv]
        assert listed.read_conv_seq == acks[-1].conv_seq and listed.unread_count == 1
        for inbox in (inbox_a1, inbox_a2, inbox_b1):
            await inbox.close()


async def test_edit_and_recall_seen_by_the_peers_sdk_live_and_by_sync(stack: Stack) -> None:
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    async with (
        connect(stack, alice, "a1", auto_delivered=False) as a,
        connect(stack, bob, "b1", auto_delivered=False) as b,
    ):
        inbox = Inbox(b, "b1")
        kept = await a.send(conv, "typo")
        gone = await a.send(conv, "secret")
        await inbox.wait_for(2, DELIVERY_S, conv)
        edit = await a.edit(conv, kept.conv_seq, "fixed")
        assert edit.stored and edit.conv_seq > gone.conv_seq
        await a.recall(conv, gone.conv_seq)
        await wait_until(
            lambda: gone.conv_seq in b.conversation_state(conv).recalled,
            DELIVERY_S,
            lambda: f"the recall at bob (entries {kinds(inbox, conv)})",
        )
        state = b.conversation_state(conv)
        shown = {m.conv_seq: state.current(m) for m in inbox.messages}
        assert shown[kept.conv_seq].text == "fixed" and shown[kept.conv_seq].edited_at_ms > 0
        assert shown[gone.conv_seq].recalled and shown[gone.conv_seq].body == b""
        # Only alice's own events: bob cannot edit or recall her message.
        with pytest.raises(SendFailed):
            await b.recall(conv, kept.conv_seq)
        with pytest.raises(SendFailed):
            await b.edit(conv, kept.conv_seq, "mine now")
        await inbox.close()

    # What a device that syncs now is served: the current bodies, no secret.
    async with GatewayApi(stack.gateway_addresses, stack.mint(bob, "x"), insecure=True) as api:
        timeline = [m for m in await api.sync_all(0) if m.conversation_id == conv]
        history = (await api.history(conv)).messages
    by_seq: dict[int, Message] = {m.conv_seq: m for m in timeline}
    assert by_seq[kept.conv_seq].text == "fixed" and by_seq[kept.conv_seq].edited_at_ms
    assert by_seq[gone.conv_seq].recalled and by_seq[gone.conv_seq].body == b""
    assert [m.kind for m in timeline] == [
        MessageKind.MESSAGE,
        MessageKind.MESSAGE,
        MessageKind.EDIT,
        MessageKind.RECALL,
    ]
    assert all(b"secret" not in m.body for m in timeline + history)
    assert [(m.text, m.recalled) for m in reversed(history)] == [("fixed", False), ("", True)]


async def test_automatic_delivered_receipts_are_coalesced_and_never_answered(
    stack: Stack,
) -> None:
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    async with connect(stack, alice, "a1") as a, connect(stack, bob, "b1") as b:
        inbox_a, inbox_b = Inbox(a, "a1"), Inbox(b, "b1")
        acks = await asyncio.gather(*(a.submit(conv, f"m{i}") for i in range(20)))
        last = max(ack.conv_seq for ack in acks)
        await wait_until(
            lambda: a.conversation_state(conv).peer_delivered_conv_seq == last,
            DELIVERY_S,
            lambda: f"alice's delivered tick (entries {kinds(inbox_a, conv)})",
        )
        # 20 messages, at most one receipt per 0.5 s: far fewer than 20. alice
        # received only events, so she sent none (no ping-pong).
        assert 1 <= b.stats.delivered_receipts < 10
        assert a.stats.delivered_receipts == 0
        # bob's one chat message gets alice's one receipt; bob's device is
        # handed it and answers nothing (events never cause a receipt).
        barrier = await b.send(conv, "barrier")
        await wait_until(
            lambda: b.conversation_state(conv).peer_delivered_conv_seq == barrier.conv_seq,
            DELIVERY_S,
            lambda: f"bob's delivered tick (entries {kinds(inbox_b, conv)})",
        )
        sent_by_bob = b.stats.delivered_receipts
        # Not a synchronisation: a window longer than the coalescing interval
        # (0.5 s) in which an answer to an answer would be sent.
        await asyncio.sleep(1.5)
        assert b.stats.delivered_receipts == sent_by_bob
        assert a.stats.delivered_receipts == 1
        from_alice = [
            m.target_conv_seq
            for m in inbox_b.entries
            if m.kind == MessageKind.DELIVERED and m.sender_id == alice
        ]
        assert from_alice == [barrier.conv_seq]
        await inbox_a.close()
        await inbox_b.close()


# -- imctl in-process -------------------------------------------------------------------


@pytest.fixture
def imctl(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IM_ADDRESS", ",".join(stack.gateway_addresses))
    monkeypatch.setenv("IM_GATEWAY_TOKEN_SECRET", stack.token_secret)
    monkeypatch.setenv("IMCTL_STATE_DIR", str(tmp_path / "imctl-state"))
    monkeypatch.setenv("IMCTL_PLAINTEXT", "1")

    def run(*args: str) -> list[dict[str, object]]:
        capsys.readouterr()
        code = imctl_main([*args, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, f"imctl {' '.join(args)} failed: {err}"
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    return run


def test_imctl_read_edit_recall_conversations_and_receipts(imctl) -> None:  # type: ignore[no-untyped-def]
    alice, bob, carol = uid("alice"), uid("bob"), uid("carol")
    conv = direct_conversation_id(alice, bob)
    sent = [imctl("send", "--user", alice, "--to", bob, f"m{i}")[0] for i in range(3)]
    last = int(sent[-1]["conv_seq"])  # type: ignore[call-overload]

    def listed(user: str) -> dict[str, object]:
        (c,) = [c for c in imctl("conversations", "--user", user) if c["conversation_id"] == conv]
        return c

    before = listed(bob)
    assert (before["unread_count"], before["read_conv_seq"], before["last_conv_seq"]) == (3, 0, 3)
    assert before["last_activity_ms"] and before["kind"] == "DIRECT"

    (read,) = imctl("read", "--user", bob, conv)  # default: the last conv_seq
    assert read["stored"] and read["read_conv_seq"] == last
    after = listed(bob)
    assert (after["unread_count"], after["read_conv_seq"]) == (0, last)
    assert listed(alice)["peer_read_conv_seq"] == last
    (again,) = imctl("read", "--user", bob, conv, "1")
    assert again["stored"] is False and again["read_conv_seq"] == last

    (receipts,) = imctl("receipts", "--user", alice, conv, str(last), "--readers")
    assert receipts["read_count"] == 1 and receipts["reader_ids"] == [bob]

    imctl("edit", "--user", alice, conv, str(sent[0]["conv_seq"]), "m0", "edited")
    imctl("recall", "--user", alice, conv, str(sent[1]["conv_seq"]))
    history = imctl("history", "--user", bob, conv)
    assert [
        (m["text"], m.get("edited_at_ms", 0) > 0, m.get("recalled", False)) for m in history
    ] == [  # type: ignore[operator]
        ("m0 edited", True, False),
        ("", False, True),
        ("m2", False, False),
    ]
    # sync prints chat messages as it always did; --events adds the events.
    assert [m["text"] for m in imctl("sync", "--user", bob, "--all")] == ["m0 edited", "", "m2"]
    events = [m for m in imctl("sync", "--user", bob, "--all", "--events") if "kind" in m]
    assert [m["kind"] for m in events] == ["READ", "EDIT", "RECALL"]

    # A group: "read by N of M", and who.
    (group,) = imctl("group", "create", "--user", alice, "team", bob, carol)
    gid = str(group["conversation_id"])
    (msg,) = imctl("send", "--user", alice, "-c", gid, "hello team")
    imctl("read", "--user", carol, gid)
    (receipts,) = imctl("receipts", "--user", alice, gid, str(msg["conv_seq"]), "--readers")
    assert (receipts["member_count"], receipts["read_count"]) == (2, 1)  # not counting alice
    assert receipts["reader_ids"] == [carol]


async def test_imctl_chat_shows_ticks_edits_and_recalls_and_marks_read(
    stack: Stack, tmp_path: Path
) -> None:
    """alice chats in imctl (a process, lines from a pipe); bob's SDK device
    receives her line (its automatic DELIVERED receipt), reads it, and edits
    and recalls lines of his own. alice's chat shows each, and marks bob's
    lines read."""
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("services", "libs", "gen")),
        IM_ADDRESS=",".join(stack.gateway_addresses),
        IM_GATEWAY_TOKEN_SECRET=stack.token_secret,
        IMCTL_STATE_DIR=str(tmp_path / "imctl-state"),
        IMCTL_PLAINTEXT="1",
    )
    async with connect(stack, bob, "b1") as b:
        inbox = Inbox(b, "b1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imctl", "chat", "--user", alice, "--to", bob,
            "--json", "--events", "--linger", "8",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"hello bob\n")
            await proc.stdin.drain()
            proc.stdin.close()
            await inbox.wait_for(1, DELIVERY_S, conv)
            (hello,) = inbox.messages
            await b.mark_read(conv, hello.conv_seq)
            typo = await b.send(conv, "typo")
            gone = await b.send(conv, "oops")
            await b.edit(conv, typo.conv_seq, "fixed")
            await b.recall(conv, gone.conv_seq)
            # alice's chat marks bob's lines read before it leaves.
            await wait_until(
                lambda: b.conversation_state(conv).peer_read_conv_seq >= gone.conv_seq,
                DELIVERY_S + 10,
                "alice's chat to mark bob's lines read",
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
        await inbox.close()
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    events = [(o.get("event") or o.get("kind") or "message") for o in lines]
    assert events.index("sent") < events.index("delivered") < events.index("read"), events
    sent = next(o for o in lines if o.get("event") == "sent")
    assert sent["conv_seq"] == hello.conv_seq
    for name in ("delivered", "read"):
        assert next(o for o in lines if o.get("event") == name)["conv_seqs"] == [hello.conv_seq]
    # bob's lines, as they stood when shown: the state the chat had applied by
    # then (an edit or recall that came in the same burst already shows).
    shown = [o for o in lines if "event" not in o and "kind" not in o]
    assert [o["conv_seq"] for o in shown] == [typo.conv_seq, gone.conv_seq]
    assert shown[0]["text"] in ("typo", "fixed") and shown[1]["text"] in ("oops", "")
    edit = next(o for o in lines if o.get("kind") == "EDIT")
    assert (edit["target_conv_seq"], edit["text"]) == (typo.conv_seq, "fixed")
    recall = next(o for o in lines if o.get("kind") == "RECALL")
    assert recall["target_conv_seq"] == gone.conv_seq


# -- typing and presence through the SDK ----------------------------------------------


async def test_typing_reaches_the_peer_as_a_signal_and_a_message_ends_it(stack: Stack) -> None:
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    async with connect(stack, alice, "a1") as a, connect(stack, bob, "b1") as b:
        inbox = Inbox(b, "b1")
        signals = b.signals()
        own = a.signals()
        assert a.typing(conv, True)
        notice = await asyncio.wait_for(anext(signals), DELIVERY_S)
        assert isinstance(notice, TypingNotice)
        assert (notice.conversation_id, notice.user_id, notice.device_id, notice.typing) == (
            conv,
            alice,
            "a1",
            True,
        )
        assert notice.expires_in_ms > 0 and b.typing_users(conv) == [alice]
        # A chat message of the typist ends the typing state where it is handed.
        await a.send(conv, "done typing")
        await inbox.wait_for(1, DELIVERY_S, conv)
        assert b.typing_users(conv) == []
        # typing=False is forwarded too; the typer's own devices get nothing.
        assert a.typing(conv, False)
        stop = await asyncio.wait_for(anext(signals), DELIVERY_S)
        assert isinstance(stop, TypingNotice) and not stop.typing
        assert a.stats.signals == 0  # nothing came back to the typer
        # A conversation alice is not in: refused, as a FrameError signal.
        assert a.typing(direct_conversation_id(bob, uid("carol")), True)
        refused = await asyncio.wait_for(anext(own), DELIVERY_S)
        assert isinstance(refused, FrameError) and refused.frame == "typing"
        assert refused.code == FrameErrorCode.PERMISSION_DENIED
        await inbox.close()


async def test_presence_of_a_peer_by_subscription_and_by_query(
    stack: Stack,
    imctl,  # type: ignore[no-untyped-def]
) -> None:
    alice, bob, stranger = uid("alice"), uid("bob"), uid("stranger")
    conv = direct_conversation_id(alice, bob)
    async with connect(stack, bob, "b1") as b:
        signals = b.signals()
        async with connect(stack, alice, "a1") as a:
            await a.send(conv, "we share a conversation now")
            b.subscribe_presence([alice])
            update = await asyncio.wait_for(anext(signals), DELIVERY_S)
            assert isinstance(update, PresenceUpdate)
            assert [(p.user_id, p.state) for p in update.presences] == [
                (alice, PresenceState.ONLINE)
            ]
            (queried,) = await b.get_presence([alice])
            assert queried.online
            with pytest.raises(PermissionDenied):
                await b.get_presence([alice, stranger])
            b.subscribe_presence([stranger])
            refused = await asyncio.wait_for(anext(signals), DELIVERY_S)
            assert isinstance(refused, FrameError)
            assert refused.frame == "subscribe_presence"
            assert refused.code == FrameErrorCode.PERMISSION_DENIED
        # alice's only device left: offline, with a last seen.
        while True:
            update = await asyncio.wait_for(anext(signals), DELIVERY_S)
            if isinstance(update, PresenceUpdate):
                break
        (gone,) = update.presences
        assert gone.user_id == alice and gone.state == PresenceState.OFFLINE
        assert gone.last_seen_ms > 0
    (shown,) = await asyncio.to_thread(imctl, "presence", "--user", bob, alice)
    assert shown["user_id"] == alice and shown["state"] == "OFFLINE"


# -- read positions and unread counts under load; receipts of a big group -------------


async def test_unread_counts_while_senders_send_and_the_reader_reads_meanwhile(
    stack: Stack,
) -> None:
    """Three senders send concurrently into a group and two direct conversations
    of one reader, who sends too; the reader's two devices mark read while the
    sends are in flight (one the newest message it has, the other a random
    older one: out of order, often a no-op). Whatever order things commit in,
    no observed read position goes back, and once everything is acknowledged
    and delivered ListConversations has, per conversation, the highest position
    any READ was acknowledged for and unread_count = the others' messages above
    it."""
    rng = random.Random(15)
    reader = uid("reader")
    senders = [uid(f"s{i}") for i in range(3)]
    async with contextlib.AsyncExitStack() as exits:

        async def open_client(user: str, device: str, **kwargs: object) -> Client:
            return await exits.enter_async_context(connect(stack, user, device, **kwargs))

        devices = {d: await open_client(reader, d) for d in ("r1", "r2")}
        out = {s: await open_client(s, "d1", receive=False) for s in senders}
        group = await out[senders[0]].create_group("busy", [reader, *senders[1:]])
        writers = {  # conversation -> who sends into it besides the reader
            group.conversation_id: senders,
            direct_conversation_id(reader, senders[0]): senders[:1],
            direct_conversation_id(reader, senders[1]): senders[1:2],
        }
        inboxes = {d: Inbox(c, d) for d, c in devices.items()}
        for inbox in inboxes.values():
            exits.push_async_callback(inbox.close)

        sent: dict[str, list[tuple[str, int]]] = {conv: [] for conv in writers}

        async def send_round(tag: str, per_sender: int) -> None:
            futures = []
            for i in range(per_sender):
                for conv, who in writers.items():
                    futures += [(conv, s, out[s].submit(conv, f"{tag}-{s}-{i}")) for s in who]
                    if i % 3 == 0:  # the reader's own: never unread
                        futures.append((conv, reader, devices["r1"].submit(conv, f"{tag}-own")))
            for conv, s, future in futures:
                sent[conv].append((s, (await future).conv_seq))

        # The read positions each (device, conversation) was answered with, and
        # the targets of every READ acknowledged.
        answered: dict[tuple[str, str], list[int]] = {}
        acked_targets: dict[str, list[int]] = {conv: [] for conv in writers}
        stored_reads = 0
        stop = asyncio.Event()

        def received(device: str, conv: str) -> list[int]:
            return [
                m.conv_seq
                for m in inboxes[device].messages
                if m.conversation_id == conv and m.sender_id != reader
            ]

        async def mark_reads(device: str) -> None:
            nonlocal stored_reads
            last: dict[str, int] = {}
            while not stop.is_set():
                acted = False
                for conv in writers:
                    seqs = received(device, conv)
                    if not seqs:
                        continue
                    target = max(seqs) if device == "r1" else rng.choice(seqs)
                    if target == last.get(conv):
                        continue
                    result = await devices[device].mark_read(conv, target)
                    # Stored: the position is the target; a no-op answers the
                    # current one, which is at or above it.
                    position = target if result.stored else result.conv_seq
                    assert position >= target, (device, conv, target, result)
                    answered.setdefault((device, conv), []).append(position)
                    acked_targets[conv].append(target)
                    stored_reads += result.stored
                    last[conv] = target
                    acted = True
                if not acted:
                    await asyncio.sleep(0.02)  # polls for new messages

        listed: dict[str, list[int]] = {conv: [] for conv in writers}
        shown: dict[tuple[str, str], list[int]] = {}

        async def poll(api: GatewayApi) -> None:
            while True:
                for c in [c async for c in api.conversations()]:
                    if c.conversation_id in listed:
                        listed[c.conversation_id].append(c.read_conv_seq)
                for d, client in devices.items():
                    for conv in writers:
                        state = client.conversation_state(conv)
                        shown.setdefault((d, conv), []).append(state.read_conv_seq)
                if stop.is_set():
                    return
                await asyncio.sleep(0.05)

        api = await exits.enter_async_context(
            GatewayApi(stack.gateway_addresses, stack.mint(reader, "poll"), insecure=True)
        )
        tasks = [asyncio.create_task(mark_reads(d)) for d in devices]
        tasks.append(asyncio.create_task(poll(api)))
        try:
            await send_round("a", 8)
            # The second half goes out only once reads are being stored, so reads
            # and sends overlap whatever the machine's speed.
            await wait_until(
                lambda: stored_reads >= 3 and all(acked_targets.values()),
                DELIVERY_S,
                "a stored read, and a read of every conversation",
            )
            reads_before = sum(map(len, acked_targets.values()))
            await send_round("b", 8)
            reads_during = sum(map(len, acked_targets.values())) - reads_before
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        # A last message from every sender: something is unread everywhere.
        await send_round("late", 1)

        def others(conv: str) -> list[int]:
            return sorted(seq for s, seq in sent[conv] if s != reader)

        await wait_until(
            lambda: all(
                sorted(received(d, conv)) == others(conv) for d in devices for conv in writers
            ),
            DELIVERY_S,
            "every message at both of the reader's devices",
        )
        final = {conv: max(targets) for conv, targets in acked_targets.items()}

        def read_entries(device: str, conv: str) -> list[int]:
            return [
                m.target_conv_seq
                for m in inboxes[device].entries
                if m.conversation_id == conv and m.kind == MessageKind.READ
            ]

        # The READ entries reach both devices, up to the highest.
        await wait_until(
            lambda: all(final[conv] in read_entries(d, conv) for d in devices for conv in writers),
            DELIVERY_S,
            lambda: f"both devices to be handed the READs up to {final}",
        )
        conversations = {c.conversation_id: c async for c in api.conversations()}

    assert stored_reads >= 3 and reads_during >= 1, (stored_reads, reads_during)
    total = sum(map(len, acked_targets.values()))
    print(
        f"{total} reads ({stored_reads} stored, {reads_during} during the second round); "
        f"final {final}; unread {[conversations[c].unread_count for c in writers]}"
    )
    for conv in writers:
        c = conversations[conv]
        unread = [seq for seq in others(conv) if seq > final[conv]]
        assert (c.read_conv_seq, c.unread_count) == (final[conv], len(unread)), conv
        assert c.unread_count >= len(writers[conv])  # at least the late ones
    # Never back, wherever observed: each device's answers (its reads are
    # sequential), the list polled, the SDK's state, and the READ entries each
    # device was handed (in timeline order, which is commit order).
    for d in devices:
        for conv in writers:
            reads = read_entries(d, conv)
            assert reads == sorted(set(reads)) and reads[-1] == final[conv], (d, conv, reads)
            assert devices[d].conversation_state(conv).read_conv_seq == final[conv]
    observed = [*answered.items(), *listed.items(), *shown.items()]
    for where, values in observed:
        assert values == sorted(values), (where, values)


async def test_receipts_of_a_500_member_group(stack: Stack) -> None:
    """A group of 500 made through the API; its owner sends two messages. 30
    members read up to the second on their own devices (a READ is the reader's
    own: each needs its own connection, opened a few at a time), 5 only up to
    the first, and the owner reads its own. GetReceipts of each: read by N of
    499 (the sender counts in neither), and exactly those readers, paged."""
    boss = uid("boss")
    members = sorted(uid(f"m{i:03}") for i in range(499))
    readers = members[1::16][:30]  # spread over the id order, so over the pages
    first_only = members[2::100][:5]
    assert len(readers) == 30 and not set(first_only) & set(readers)
    sem = asyncio.Semaphore(6)

    async def read_on_own_device(user: str, conv: str, conv_seq: int) -> None:
        async with sem, connect(stack, user, "phone", auto_delivered=False) as c:

            async def shown() -> None:
                async for m in c.messages():
                    if m.conversation_id == conv and m.conv_seq >= conv_seq:
                        return

            await asyncio.wait_for(shown(), DELIVERY_S)
            assert (await c.mark_read(conv, conv_seq)).stored

    async with connect(stack, boss, "b1", auto_delivered=False) as b:
        group = await b.create_group("all hands", members)
        g = group.conversation_id
        assert len(group.member_ids) == 500
        first = await b.send(g, "first")
        second = await b.send(g, "second")
        await asyncio.gather(
            *(read_on_own_device(u, g, second.conv_seq) for u in readers),
            *(read_on_own_device(u, g, first.conv_seq) for u in first_only),
        )
        assert (await b.mark_read(g, second.conv_seq)).stored  # never counted

        async def pages(
            conv_seq: int, page_size: int
        ) -> tuple[list[list[str]], set[tuple[int, int]]]:
            got: list[list[str]] = []
            totals: set[tuple[int, int]] = set()
            token = ""
            while True:
                r = await b.get_receipts(g, conv_seq, True, page_size, token)
                got.append(r.reader_ids)
                totals.add((r.member_count, r.read_count))
                token = r.next_page_token
                if not token:
                    return got, totals

        got, totals = await pages(second.conv_seq, 7)
        assert totals == {(499, 30)}
        assert [len(p) for p in got] == [7, 7, 7, 7, 2]
        assert [u for p in got for u in p] == sorted(readers)
        got, totals = await pages(first.conv_seq, 0)
        assert totals == {(499, 35)} and len(got) == 1
        assert got[0] == sorted(readers + first_only)
    # Any member may ask (one who read nothing, through the unary API), nobody else.
    async with GatewayApi(
        stack.gateway_addresses, stack.mint(members[0], "x"), insecure=True
    ) as api:
        assert [u async for u in api.readers(g, second.conv_seq, 10)] == sorted(readers)
    async with GatewayApi(
        stack.gateway_addresses, stack.mint(uid("stranger"), "x"), insecure=True
    ) as api:
        with pytest.raises(PermissionDenied):
            await api.get_receipts(g, second.conv_seq)
