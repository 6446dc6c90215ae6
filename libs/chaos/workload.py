"""The workload: many SDK clients chatting in 1:1 and group conversations while
faults happen, and a record of everything they did and saw.

- Users `u00`, `u01`, ...; the first `two_device_users` have a second device, so
  two devices of one user send at once and both must see everything.
- Each user has a few direct conversations and belongs to some groups (made by
  CreateGroup before the run). Membership never changes during a run.
- Every device runs a sender (random conversation, random think time, up to
  `max_in_flight` sends outstanding, each recorded with its SendAck) and a
  reader (every message `Client.messages()` hands over, in order).
- A "retransmit storm": now and then an acked message is sent again with the
  same client_msg_id, from the same device or the user's other one; the server
  must answer with the original ACK, never store a second copy.
- A client "process restart" closes the SDK client and opens a new one on the
  same SQLite store after an offline pause; sends that were still unacked are
  sent again first, in their original order, with the same client_msg_ids (what
  an app with a durable outbox does).
- Every device reaches the gateways only through its own TCP proxies
  (`netproxy`), so a stream cut resets exactly that device's connection.
- Conversation events (`chaos.events`, on a raw stream of the user's device
  `ev`, which is nobody's judged device): a fraction of users (`read_users`) now and then mark a
  conversation read up to the highest conv_seq one of their devices was
  handed, sometimes (`stale_read_probability`) to a position they already
  read, which must be a no-op; some of them ask ListConversations afterwards.
  A fraction of users (`recall_users`) recall some of their own acked
  messages, part of them as soon as the ACK is in (racing the message's
  fan-out), the rest a little later; after each recall's ACK a History request
  of the conversation records what it serves.

Records use one monotonic clock, so the checker can tell "acked before that send
started" (causality) across devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from chaos import checker, online
from chaos.checker import TIMELINE_DEVICE, EntryKind
from chaos.events import EVENT_DEVICE, RawGateway, SendRefused
from chaos.netproxy import TcpProxy
from imclient import (
    Client,
    ClientClosed,
    GatewayApi,
    ImClientError,
    Kicked,
    ReconnectPolicy,
    RetransmitPolicy,
    SendFailed,
    SendResult,
    SQLiteStore,
    direct_conversation_id,
)

log = logging.getLogger("chaos.workload")

TokenFactory = Callable[[str, str], str]  # (user, device) -> token

__all__ = ["TIMELINE_DEVICE", "Device", "Workload", "WorkloadConfig", "WorkloadStats"]


@dataclass(frozen=True)
class WorkloadConfig:
    users: int = 16
    two_device_users: int = 4
    groups: int = 4
    group_size: tuple[int, int] = (3, 6)
    directs_per_user: int = 2
    think_mean_s: float = 0.3
    max_in_flight: int = 4
    storm_probability: float = 0.02
    body_bytes: tuple[int, int] = (16, 200)
    messages: int = 1_000  # the run goes on at least until this many sends are acked
    seed: int = 1
    # Conversation events (module docs). Fractions of users; 0 turns a kind off.
    read_users: float = 0.5
    read_mean_s: float = 1.0  # mean pause between one reading user's READs
    stale_read_probability: float = 0.2  # a READ to a position already read (a no-op)
    list_probability: float = 0.3  # a ListConversations after a READ's ACK
    recall_users: float = 0.25
    recall_probability: float = 0.05  # of a recalling user's acked messages
    recall_at_once: float = 0.5  # of the recalls: sent as soon as the message's ACK is in
    event_timeout_s: float = 30.0  # an event is retransmitted until acked or this passes

    @property
    def clients(self) -> int:
        return self.users + self.two_device_users

    def __post_init__(self) -> None:
        if self.users < 3:
            raise ValueError("at least 3 users (groups need 3 members)")
        if not 0 <= self.two_device_users <= self.users:
            raise ValueError("two_device_users must be within 0..users")
        lo, hi = self.group_size
        if not 3 <= lo <= hi <= self.users:
            raise ValueError("group_size must be 3 <= min <= max <= users")
        for name in (
            "read_users",
            "stale_read_probability",
            "list_probability",
            "recall_users",
            "recall_probability",
            "recall_at_once",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1")


@dataclass
class _Send:
    """A send as it happens; `checker.SendRecord` once the run is over."""

    sender: str
    device: str
    client_msg_id: str
    conversation: str
    session: str
    index: int
    attempted_at: float
    body: bytes
    acked_at: float | None = None
    ack: SendResult | checker.Ack | None = None
    outcome: str = "pending"  # acked | closed | unacked | failed:<code>
    kind: int = EntryKind.MESSAGE
    target_conv_seq: int = 0

    def record(self) -> checker.SendRecord:
        ack = (
            checker.Ack(self.ack.msg_id, self.ack.seq, self.ack.conv_seq)
            if self.ack is not None
            else None
        )
        return checker.SendRecord(
            self.sender,
            self.device,
            self.client_msg_id,
            self.conversation,
            self.session,
            self.index,
            self.attempted_at,
            self.acked_at,
            ack,
            self.body,
            self.kind,
            self.target_conv_seq,
        )


@dataclass
class WorkloadStats:
    sent: int = 0  # submits, storms and resends included (events too)
    acked: int = 0  # chat messages (events: reads, noop_reads, recalls)
    closed: int = 0  # unacked when its client closed (resent by the next one)
    failed: int = 0  # refused for good (should stay 0)
    storms: int = 0
    resends: int = 0
    cuts: int = 0
    restarts: int = 0
    kicked: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    # From the SDK's own counters, summed over every client session:
    duplicates_suppressed: int = 0  # a msg_id the server delivered again (hidden by the SDK)
    retransmits: int = 0
    gaps: int = 0
    syncs: int = 0
    connects: int = 0
    # Conversation events (sent on the raw `ev` device):
    reads: int = 0  # READs acked as stored
    noop_reads: int = 0  # READs acked as no-ops (msg_id 0)
    stale_reads: int = 0  # READs sent to a position already read (must be no-ops)
    recalls: int = 0  # RECALLs acked
    recalls_at_once: int = 0  # of which sent as soon as the message's ACK was in
    events_unacked: int = 0  # no ACK within event_timeout_s
    events_refused: int = 0
    conversation_lists: int = 0  # ListConversations answers recorded
    history_probes: int = 0  # History responses recorded after a recall


class Device:
    """One device of one user: its proxies, its durable store, its current SDK
    client (one "process" at a time) and everything it was handed."""

    def __init__(self, user: str, device_id: str, store_path: Path) -> None:
        self.user = user
        self.device_id = device_id
        self.store_path = store_path
        self.proxies: list[TcpProxy] = []
        self.history = checker.DeviceHistory(user, device_id)
        self.handed: set[int] = set()
        self.client: Client | None = None
        self.sessions = 0
        self.session = ""
        self.index = 0
        self.reader: asyncio.Task[None] | None = None
        self.sender: asyncio.Task[None] | None = None
        self.waiters: set[asyncio.Task[None]] = set()
        self.unacked: list[_Send] = []  # closed before their ACK: resend on restart
        self.lock = asyncio.Lock()  # one restart at a time
        self.conversations: list[str] = []
        self.top: dict[str, int] = {}  # conversation -> highest conv_seq handed
        # Connections as the harness saw them (polled), and the first arrival of
        # each msg_id with the connection it came in: for `online.measure`.
        self.windows: list[online.Window] = []
        self.receipts: dict[int, online.Receipt] = {}
        self.connection: tuple[int, int] | None = None  # (session, connects) when connected
        self.seen_at = 0.0  # last poll that found `connection` open

    def connection_key(self) -> tuple[int, int] | None:
        """Names the current connection: the SDK client instance and its count
        of connections; None while not connected."""
        client = self.client
        if client is None or not client.connected:
            return None
        return (self.sessions, client.stats.connects)

    def track(self) -> online.DeviceTrack:
        return online.DeviceTrack(
            self.user, self.device_id, windows=list(self.windows), receipts=dict(self.receipts)
        )

    @property
    def name(self) -> str:
        return f"{self.user}/{self.device_id}"


class Workload:
    """The clients of one run. `setup()`, `start()`, then the fault scheduler may
    call `cut_stream` / `restart_client`; `stop_sending()`, `quiesce()`,
    `stop_watching()` and `tracks()` for online delivery, `close()`, and
    `history()` for the checker."""

    def __init__(
        self,
        config: WorkloadConfig,
        gateways: Sequence[str],
        token: TokenFactory,
        workdir: Path,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = config
        self.gateways = list(gateways)
        self.token = token
        self.workdir = workdir
        self.echo = echo or (lambda _line: None)
        self.rng = random.Random(config.seed)
        self.users = [f"u{i:02d}" for i in range(config.users)]
        self.devices: list[Device] = []
        self.by_user: dict[str, list[Device]] = defaultdict(list)
        self.members: dict[str, frozenset[str]] = {}
        self.sends: list[_Send] = []
        self.stats = WorkloadStats()
        self.sending = False
        self.t0 = time.monotonic()
        self._background: set[asyncio.Task[None]] = set()
        self._monitor: asyncio.Task[None] | None = None
        # Conversation events: one raw gateway per user, the tasks sending them,
        # and what the unary answers were (for the checker).
        self.raw: dict[str, RawGateway] = {}
        self._kind_cache: dict[tuple[str, str], int] = {}
        self._kind_seen = 0  # how many of `sends` the index has taken in
        self.events: set[asyncio.Task[None]] = set()
        self.recalled: set[int] = set()  # msg_ids a RECALL was sent for
        self.read_at: dict[tuple[str, str], int] = {}  # (user, conv) -> position acked
        self.served: list[checker.Served] = []
        self.answers: list[checker.ConversationsAnswer] = []
        self.readers: set[str] = set()
        self.recallers: set[str] = set()

    # -- setup ---------------------------------------------------------------

    async def setup(self) -> None:
        """Makes the devices, their proxies and the conversations (groups are
        created through the gateway)."""
        stores = self.workdir / "clients"
        stores.mkdir(parents=True, exist_ok=True)
        for i, user in enumerate(self.users):
            n = 2 if i < self.cfg.two_device_users else 1
            for d in range(1, n + 1):
                dev = Device(user, f"d{d}", stores / f"{user}-d{d}.sqlite")
                for gw in self.gateways:
                    proxy = TcpProxy(gw)
                    await proxy.start()
                    dev.proxies.append(proxy)
                self.devices.append(dev)
                self.by_user[user].append(dev)

        n = len(self.users)
        for i, user in enumerate(self.users):
            for k in range(1, self.cfg.directs_per_user + 1):
                other = self.users[(i + k * (1 + i % 3)) % n]
                if other != user:
                    conv = direct_conversation_id(user, other)
                    self.members[conv] = frozenset({user, other})
        lo, hi = self.cfg.group_size
        for g in range(self.cfg.groups):
            size = self.rng.randint(lo, hi)
            people = self.rng.sample(self.users, size)
            owner = people[0]
            conv = await self._create_group(owner, f"chaos-{g}", people[1:])
            self.members[conv] = frozenset(people)
        for dev in self.devices:
            dev.conversations = sorted(c for c, m in self.members.items() if dev.user in m)
        # A user in no conversation would idle; the direct pairs above rule it out.
        assert all(dev.conversations for dev in self.devices)
        pick = random.Random(self.cfg.seed + 7)
        self.readers = {u for u in self.users if pick.random() < self.cfg.read_users}
        self.recallers = {u for u in self.users if pick.random() < self.cfg.recall_users}
        for user in self.users:
            self.raw[user] = RawGateway(
                user, self.gateways, self._token_source(user, EVENT_DEVICE), self._clock
            )

    async def _create_group(self, owner: str, name: str, others: Sequence[str]) -> str:
        deadline = time.monotonic() + 60
        async with GatewayApi(
            self.gateways, self._token_source(owner, "setup"), insecure=True
        ) as api:
            while True:
                try:
                    conv = await api.create_group(name, list(others))
                    return conv.conversation_id
                except ImClientError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

    # -- clients ---------------------------------------------------------------

    def _new_client(self, dev: Device) -> Client:
        return Client(
            [p.address for p in dev.proxies],
            self._token_source(dev.user, dev.device_id),
            store=SQLiteStore(dev.store_path),
            send_window=16,
            # Shorter than the defaults so a run spends its time on faults, not
            # waiting: a dead connection is noticed within a few seconds.
            retransmit=RetransmitPolicy(initial_s=2.0, max_interval_s=4.0, max_attempts=3),
            reconnect=ReconnectPolicy(initial_s=0.05, max_s=2.0),
            connect_timeout_s=None,
            rng=random.Random(self.rng.random()),
            insecure=True,
            # The judge sends only what it checks: no automatic receipts in
            # the timelines it compares with its sends.
            auto_delivered=False,
        )

    async def start(self, ready_timeout_s: float = 60.0, senders: bool = True) -> None:
        """Opens every device's client and waits until all are connected and
        synced; then starts the random senders (unless `senders` is false: a
        scripted test drives `send()` itself)."""
        for dev in self.devices:
            await self._open(dev)
        await asyncio.gather(
            *(dev.client.wait_ready(ready_timeout_s) for dev in self.devices if dev.client)
        )
        self.poll_connections()
        self._monitor = asyncio.create_task(self._watch_connections(), name="connections")
        if not senders:
            return
        self.sending = True
        for dev in self.devices:
            dev.sender = asyncio.create_task(self._send_loop(dev), name=f"send-{dev.name}")
        for user in sorted(self.readers):
            self._event_task(self._read_marks(user), f"reads-{user}")

    async def _open(self, dev: Device) -> None:
        client = self._new_client(dev)
        await client.start(wait_ready=False)
        dev.client = client
        dev.sessions += 1
        dev.session = f"{dev.name}#{dev.sessions}"
        dev.index = 0
        dev.reader = asyncio.create_task(self._read_loop(dev, client), name=f"read-{dev.name}")
        # What the previous "process" could not get acked, first and in order.
        resend, dev.unacked = dev.unacked, []
        for old in resend:
            self.stats.resends += 1
            self._submit(dev, old.conversation, old.client_msg_id, old.body)

    # -- connection windows (for online delivery) ------------------------------------

    POLL_S = 0.05

    def poll_connections(self) -> None:
        """One look at every device's connection. A window opens at the first
        poll that sees a connection and closes at the last poll that saw it
        open, so it never claims more connected time than there was."""
        now = time.monotonic()
        for dev in self.devices:
            key = dev.connection_key()
            if key != dev.connection:
                if dev.connection is not None:
                    dev.windows[-1] = online.Window(dev.windows[-1].start, dev.seen_at)
                if key is not None:
                    dev.windows.append(online.Window(now))
                dev.connection = key
            dev.seen_at = now

    async def _watch_connections(self) -> None:
        while True:
            self.poll_connections()
            await asyncio.sleep(self.POLL_S)  # sampling the clients' state, not synchronising

    async def stop_watching(self) -> None:
        """Stops the connection monitor after one last look (before `tracks()`)."""
        task, self._monitor = self._monitor, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.poll_connections()

    def tracks(self) -> list[online.DeviceTrack]:
        return [dev.track() for dev in self.devices]

    def _receipt(self, dev: Device, msg_id: int) -> None:
        if msg_id in dev.receipts:
            return
        now = time.monotonic()
        key = dev.connection_key()
        window = len(dev.windows) - 1 if key is not None and key == dev.connection else None
        dev.receipts[msg_id] = online.Receipt(now, window)

    async def _read_loop(self, dev: Device, client: Client) -> None:
        try:
            async for m in client.messages():
                self._receipt(dev, m.msg_id)
                dev.history.entries.append(
                    checker.Delivered(
                        m.msg_id,
                        m.conversation_id,
                        m.sender_id,
                        m.client_msg_id,
                        m.conv_seq,
                        m.seq,
                        m.body,
                        int(m.kind),
                        m.target_conv_seq,
                        m.recalled,
                    )
                )
                dev.handed.add(m.msg_id)
                dev.top[m.conversation_id] = max(dev.top.get(m.conversation_id, 0), m.conv_seq)
        except Kicked as exc:
            self.stats.kicked += 1
            self.echo(f"ANOMALY {dev.name} {exc}; restarting it")
            task = asyncio.create_task(self._restart(dev, 0.0, "after kick"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        except ClientClosed as exc:
            self.echo(f"ANOMALY {dev.name} client stopped: {exc}")

    def _submit(self, dev: Device, conv: str, cmid: str | None = None, body: bytes = b"") -> _Send:
        """Submits one send and records it. submit() is synchronous, so the call
        order of this method is the order the SDK promises to keep. Raises
        ClientClosed, or ValueError if `cmid` is pending on this client."""
        assert dev.client is not None
        cmid = cmid or str(uuid.uuid4())
        if not body:
            pad = self.rng.randint(*self.cfg.body_bytes)
            body = (
                f"{dev.name}|{conv}|{cmid}|".encode() + self.rng.randbytes(pad // 2).hex().encode()
            )
        attempted_at = time.monotonic() - self.t0
        future = dev.client.submit(conv, body, client_msg_id=cmid)
        dev.index += 1
        rec = _Send(dev.user, dev.device_id, cmid, conv, dev.session, dev.index, attempted_at, body)
        self.sends.append(rec)
        self.stats.sent += 1
        waiter = asyncio.create_task(self._await_ack(dev, rec, future))
        dev.waiters.add(waiter)
        waiter.add_done_callback(dev.waiters.discard)
        return rec

    async def _await_ack(self, dev: Device, rec: _Send, future: asyncio.Future[SendResult]) -> None:
        try:
            ack = await future
        except SendFailed as exc:
            rec.outcome = f"failed:{exc.code.name}"
            self.stats.failed += 1
            self.stats.failures[exc.code.name] += 1
            self.echo(f"ANOMALY send refused {rec.client_msg_id} by {dev.name}: {exc}")
            return
        except ClientClosed:
            rec.outcome = "closed"
            self.stats.closed += 1
            dev.unacked.append(rec)
            return
        rec.ack = ack
        rec.acked_at = time.monotonic() - self.t0
        rec.outcome = "acked"
        self.stats.acked += 1
        if self.sending and self.rng.random() < self.cfg.storm_probability:
            self._storm(dev, rec)
        if (
            self.sending
            and dev.user in self.recallers
            and ack.msg_id not in self.recalled
            and self.rng.random() < self.cfg.recall_probability
        ):
            self.recalled.add(ack.msg_id)
            at_once = self.rng.random() < self.cfg.recall_at_once
            delay = 0.0 if at_once else self.rng.uniform(0.2, 3.0)
            self._event_task(self._recall(rec, delay), f"recall-{rec.client_msg_id}")

    def _storm(self, dev: Device, rec: _Send) -> None:
        """Sends an acked message again, same client_msg_id, from this device or
        the user's other one (two devices at once)."""
        targets = [d for d in self.by_user[dev.user] if d.client is not None]
        if not targets:
            return
        target = self.rng.choice(targets)
        # ValueError: that device has it pending already (a storm of its own).
        with contextlib.suppress(ClientClosed, ValueError):
            self._submit(target, rec.conversation, rec.client_msg_id, rec.body)
            self.stats.storms += 1

    async def _send_loop(self, dev: Device) -> None:
        rng = random.Random(self.rng.random())
        while self.sending:
            await asyncio.sleep(rng.expovariate(1 / self.cfg.think_mean_s))
            client = dev.client
            if client is None or not self.sending:
                continue
            if client.pending_sends >= self.cfg.max_in_flight:
                # Backpressure: wait for one answer (the SDK keeps order anyway).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.wait(set(dev.waiters), return_when=asyncio.FIRST_COMPLETED)
                        if dev.waiters
                        else asyncio.sleep(0.1),
                        5.0,
                    )
                continue
            try:
                self._submit(dev, rng.choice(dev.conversations))
            except ClientClosed:
                await asyncio.sleep(0.05)

    # -- conversation events ------------------------------------------------------------

    def _clock(self) -> float:
        return time.monotonic() - self.t0

    def _event_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.events.add(task)
        task.add_done_callback(self.events.discard)

    async def _event(self, user: str, conv: str, kind: int, target: int) -> _Send:
        """Sends one event from `user`'s `ev` device and records it like a send."""
        raw = self.raw[user]
        cmid = str(uuid.uuid4())
        rec = _Send(
            user,
            EVENT_DEVICE,
            cmid,
            conv,
            f"{user}/{EVENT_DEVICE}",
            0,
            self._clock(),
            b"",
            kind=kind,
            target_conv_seq=target,
        )
        self.sends.append(rec)
        self.stats.sent += 1
        try:
            ack = await raw.send_event(conv, kind, target, cmid, self.cfg.event_timeout_s)
        except SendRefused as exc:
            rec.outcome = f"failed:{exc.code}"
            self.stats.events_refused += 1
            self.echo(f"ANOMALY {EntryKind(kind).name} {cmid} by {user} refused: {exc}")
            return rec
        except TimeoutError as exc:
            rec.outcome = "unacked"
            self.stats.events_unacked += 1
            self.echo(f"ANOMALY {EntryKind(kind).name} by {user}: {exc}")
            return rec
        rec.ack = checker.Ack(ack.msg_id, ack.seq, ack.conv_seq)
        rec.acked_at = self._clock()
        rec.outcome = "acked"
        return rec

    async def _read_marks(self, user: str) -> None:
        """While sending: now and then a READ of one conversation, up to what one
        of the user's devices was handed, or (stale) to a position already read."""
        rng = random.Random(self.rng.random())
        while self.sending:
            await asyncio.sleep(rng.expovariate(1 / self.cfg.read_mean_s))
            if not self.sending:
                return
            dev = rng.choice(self.by_user[user])
            seen = [c for c in dev.conversations if dev.top.get(c)]
            if not seen:
                continue
            conv = rng.choice(seen)
            done = self.read_at.get((user, conv), 0)
            stale = done > 0 and rng.random() < self.cfg.stale_read_probability
            target = rng.randint(1, done) if stale else dev.top[conv]
            self.stats.stale_reads += stale
            rec = await self._event(user, conv, EntryKind.READ, target)
            if rec.ack is None:
                continue
            if rec.ack.msg_id == 0:
                self.stats.noop_reads += 1
                position = rec.ack.conv_seq
            else:
                self.stats.reads += 1
                position = target
            self.read_at[(user, conv)] = max(done, position)
            if rng.random() < self.cfg.list_probability:
                await self._list_conversations(user)

    async def _list_conversations(self, user: str, final: bool = False) -> None:
        try:
            self.answers.append(await self.raw[user].conversations(final))
            self.stats.conversation_lists += 1
        except grpc.aio.AioRpcError as exc:
            if final:
                raise
            log.info("ListConversations of %s failed: %s", user, exc.code())

    async def _recall(self, sent: _Send, delay_s: float) -> None:
        """Recalls an acked message of the workload's (at once, or after
        `delay_s`), then records what History serves of it."""
        if delay_s:
            await asyncio.sleep(delay_s)  # "a little later", on purpose
        assert sent.ack is not None
        conv_seq = sent.ack.conv_seq
        rec = await self._event(sent.sender, sent.conversation, EntryKind.RECALL, conv_seq)
        if rec.ack is None:
            return
        self.stats.recalls += 1
        self.stats.recalls_at_once += delay_s == 0
        requested = self._clock()
        try:
            entries = await self.raw[sent.sender].history(sent.conversation, conv_seq + 1, 3)
        except grpc.aio.AioRpcError as exc:
            log.info("History after a recall failed: %s", exc.code())
            return
        self.served.append(
            checker.Served(
                sent.sender, f"History {sent.conversation} after a recall", requested, entries
            )
        )
        self.stats.history_probes += 1

    def recipients(self, conv: str, sender: str, cmid: str) -> frozenset[str]:
        """Whose timelines the entry (sender, client_msg_id) of `conv` belongs to."""
        kind = self._kinds().get((sender, cmid), EntryKind.MESSAGE)
        return checker.recipients(kind, conv, sender, self.members.get(conv, frozenset()))

    def _kinds(self) -> dict[tuple[str, str], int]:
        """(sender, client_msg_id) -> kind, the latest send of a key winning. Sends
        are only appended: the index takes in the ones it has not seen yet."""
        for rec in self.sends[self._kind_seen :]:
            self._kind_cache[(rec.sender, rec.client_msg_id)] = rec.kind
        self._kind_seen = len(self.sends)
        return self._kind_cache

    # -- faults (chaos.faults.ClientFaults) ---------------------------------------

    async def cut_stream(self, rng: random.Random) -> str:
        dev = rng.choice(self.devices)
        n = sum(p.cut() for p in dev.proxies)
        self.stats.cuts += 1
        return f"{dev.name} ({n} connection{'s' if n != 1 else ''})"

    async def restart_client(self, rng: random.Random, offline_s: float) -> str:
        dev = rng.choice(self.devices)
        await self._restart(dev, offline_s, "fault")
        return f"{dev.name} (offline {offline_s:.1f}s, session {dev.sessions})"

    async def _restart(self, dev: Device, offline_s: float, why: str) -> None:
        async with dev.lock:
            self.stats.restarts += 1
            await self._go_offline(dev)
            if offline_s > 0:
                await asyncio.sleep(offline_s)  # the device is deliberately offline
            await self._go_online(dev)
            log.info("restarted %s (%s)", dev.name, why)

    async def _go_offline(self, dev: Device) -> None:
        """Ends the device's client "process": pending sends fail with
        ClientClosed and are kept for the next one."""
        sender, dev.sender = dev.sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        client, dev.client = dev.client, None
        if client is not None:
            await client.close()
            self._count(client)
        # Every pending send's waiter has seen ClientClosed (or its ACK).
        await asyncio.gather(*list(dev.waiters), return_exceptions=True)
        if dev.reader is not None:
            await asyncio.gather(dev.reader, return_exceptions=True)

    async def _go_online(self, dev: Device) -> None:
        await self._open(dev)
        if self.sending:
            dev.sender = asyncio.create_task(self._send_loop(dev), name=f"send-{dev.name}")

    # -- scripted use (targeted tests) ------------------------------------------------

    def device(self, user: str, device_id: str = "d1") -> Device:
        return next(d for d in self.by_user[user] if d.device_id == device_id)

    async def take_offline(self, dev: Device) -> None:
        async with dev.lock:
            await self._go_offline(dev)

    async def bring_online(self, dev: Device, ready_timeout_s: float = 30.0) -> None:
        async with dev.lock:
            await self._go_online(dev)
        assert dev.client is not None
        await dev.client.wait_ready(ready_timeout_s)

    async def send(self, dev: Device, conversation: str, timeout_s: float = 30.0) -> _Send:
        """One send from `dev`, returned once acked (raises on timeout)."""
        rec = self._submit(dev, conversation)
        deadline = time.monotonic() + timeout_s
        while rec.outcome == "pending":
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SendAck for {rec.client_msg_id} in {timeout_s}s")
            await asyncio.wait(set(dev.waiters), timeout=0.2)
        return rec

    # -- the end of a run ---------------------------------------------------------

    async def stop_sending(self, timeout_s: float) -> None:
        """No new sends; waits up to `timeout_s` for the outstanding ones' ACKs."""
        self.sending = False
        senders = [d.sender for d in self.devices if d.sender is not None]
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for dev in self.devices:
            dev.sender = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            waiters = [w for d in self.devices for w in d.waiters] + list(self.events)
            if not waiters and not any(d.unacked for d in self.devices):
                return
            if waiters:
                await asyncio.wait(waiters, timeout=0.5)
            else:
                await asyncio.sleep(0.1)  # a restart is reopening a client

    def timeline_seqs(self, user: str) -> dict[int, int]:
        """msg_id -> seq in `user`'s timeline, as the user's devices were handed
        them (one timeline per user, so every device agrees)."""
        return {e.msg_id: e.seq for dev in self.by_user[user] for e in dev.history.entries if e.seq}

    def expected_missing(self) -> int:
        """(message, device) pairs still missing: every acked message or event,
        and every one some device has seen, on every device of every user whose
        timeline it belongs to."""
        known: dict[int, frozenset[str]] = {}
        for s in self.sends:
            if s.ack is not None and s.ack.msg_id:
                known[s.ack.msg_id] = self.recipients(s.conversation, s.sender, s.client_msg_id)
        for dev in self.devices:
            for e in dev.history.entries:
                if e.msg_id not in known:
                    known[e.msg_id] = self.recipients(
                        e.conversation_id, e.sender_id, e.client_msg_id
                    )
        missing = 0
        for msg_id, users in known.items():
            for user in users:
                for dev in self.by_user[user]:
                    if msg_id not in dev.handed:
                        missing += 1
        return missing

    async def quiesce(
        self, deadline_s: float, also_missing: Callable[[], int] = lambda: 0
    ) -> tuple[bool, float]:
        """After the faults, strictly: touches no device (no reconnect, no cut,
        no sync request) and waits until every device has every known message of
        its conversations and `also_missing()` (the observers) is 0 (true), or
        until `deadline_s` passes (false). Returns (quiet, seconds)."""
        start = time.monotonic()
        while True:
            now = time.monotonic()
            pending = bool(self.events) or any(d.waiters or d.unacked for d in self.devices)
            missing = self.expected_missing() + also_missing()
            if not missing and not pending:
                return True, now - start
            if now - start > deadline_s:
                self.echo(f"quiesce: deadline passed with {missing} missing deliveries")
                return False, now - start
            await asyncio.sleep(0.25)  # polling the histories, not synchronising

    async def close(self) -> None:
        self.sending = False
        await self.stop_watching()
        for dev in self.devices:
            async with dev.lock:
                if dev.sender is not None:
                    dev.sender.cancel()
                    await asyncio.gather(dev.sender, return_exceptions=True)
                client, dev.client = dev.client, None
                if client is not None:
                    await client.close()
                    self._count(client)
                if dev.reader is not None:
                    await asyncio.gather(dev.reader, return_exceptions=True)
                await asyncio.gather(*list(dev.waiters), return_exceptions=True)
                for p in dev.proxies:
                    await p.close()
        events = list(self.events)
        for task in events:
            task.cancel()
        await asyncio.gather(*events, return_exceptions=True)
        for raw in self.raw.values():
            await raw.close()

    def _token_source(self, user: str, device: str) -> Callable[[], str]:
        return lambda: self.token(user, device)

    def _count(self, client: Client) -> None:
        st = client.stats
        self.stats.duplicates_suppressed += st.duplicates_suppressed
        self.stats.retransmits += st.retransmits
        self.stats.gaps += st.gaps
        self.stats.syncs += st.syncs
        self.stats.connects += st.connects

    async def audit_timelines(self, conversations: bool = False) -> list[checker.DeviceHistory]:
        """Every user's whole timeline as the server holds it (Sync from 0, with
        kinds and recalled flags), as one more "device" per user named
        `TIMELINE_DEVICE`. The checker then holds the server's timeline to the
        same rules as a device's: a second copy of a msg_id there is a
        duplicate even though the SDK would hide it from the application. Each
        Sync is also recorded as served (for the recall rule). With
        `conversations` (only at quiescence: the checker then holds unread
        counts to the timelines), each user's ListConversations first, final."""
        out = []
        for user in self.users:
            raw = self.raw[user]
            if conversations:
                await self._list_conversations(user, final=True)
            requested = self._clock()
            entries = await raw.sync_all()
            self.served.append(checker.Served(user, "Sync from 0 (audit)", requested, entries))
            out.append(checker.DeviceHistory(user, TIMELINE_DEVICE, entries))
        return out

    def history(
        self,
        timelines: Sequence[checker.DeviceHistory] = (),
        pushes: Sequence[checker.PushLog] = (),
    ) -> checker.History:
        return checker.History(
            devices=[dev.history for dev in self.devices] + list(timelines),
            sends=[s.record() for s in self.sends],
            members=self.members,
            served=list(self.served),
            pushes=list(pushes),
            conversations=list(self.answers),
        )
