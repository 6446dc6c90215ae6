"""Load-generator worker processes for bench/e2e.py: full SDK clients (imclient).

Each worker is its own process (multiprocessing, spawn) with its own event loop,
so the load generator never shares a loop with a service. The coordinator
drives it over a pipe with commands; every command gets exactly one reply.

Commands (a tuple `(name, args)`; the reply is a dict):
- `pairs`: open one send-only client per sender and one receiving client per
  recipient of the given 1:1 pairs.
- `load`: open-loop traffic over those pairs at a fixed rate, from an agreed
  start time; then wait until every message is acknowledged and received (or a
  deadline passes) and return one record per message. With `mark_read`, every
  recipient marks what it receives read (see "Read receipts" below).
- `closed`: closed-loop traffic: each of the first few senders sends its next
  message only when the previous one is acknowledged.
- `verify`: the final exactly-once count of a level, after its backlog drained,
  and its READ counts.
- `quiesce`: wait until the previous level's backlog is gone.
- `create_group`: CreateGroup through the gateway.
- `group`: open receiving clients for group members (and the sender's client).
- `group_send`: one message to the group from the sender's client.
- `group_wait`: wait until every member held here has received message k.
- `close`: close every client; the worker then exits.

Read receipts (`mark_read`): a recipient sends a READ (a `Send` with
kind=MESSAGE_KIND_READ, target_conv_seq = the conv_seq of the newest message it
received) the way an app would: at most one READ in flight per conversation
(per device), for the newest position when it is sent, so the messages of one
delivery batch, and any that arrive while a READ waits for its ACK, are covered
by one READ. It travels on the recipient's own connection through the SDK's
reliable send path (`Client.submit(kind=READ)`, the non-blocking form of
`mark_read`: client_id order, retransmit, ACK). Both sides keep the SDK's
default automatic DELIVERED receipts.

Time is `time.monotonic()` everywhere (CLOCK_MONOTONIC, one clock for every
process on the machine), so a timestamp written into a body by one worker can be
compared with the receive time in another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from imclient import Client, GatewayApi, Message, MessageKind, ReconnectPolicy, SendResult

log = logging.getLogger("bench.e2e.load")


#: Clients connected at once while a worker opens its clients.
CONNECT_CONCURRENCY = 50
#: An app repeats "typing" every few seconds while the user types.
TYPING_REPEAT_S = 3.0


@dataclass
class _Pair:
    index: int
    sender_id: str
    recipient_id: str
    conversation_id: str
    sender: Client | None = None
    recipient: Client | None = None
    # Read receipts: the newest conv_seq received, the newest READ sent, and
    # whether a READ is waiting for its ACK.
    read_want: int = 0
    read_sent: int = 0
    read_in_flight: bool = False
    read_level: _Level | None = None  # whose messages the READs count for
    typed_at: float = -math.inf  # when this pair's sender last said it was typing


@dataclass
class _Level:
    """Per-message records of one load level in this worker.

    Index j is the j-th message this worker sends in the level; its intended send
    time is start + j / rate (open loop: the schedule does not wait for ACKs)."""

    name: str
    start: float
    rate: float
    total: int
    pairs: int
    submitted_at: list[float] = field(default_factory=list)
    ack_at: list[float] = field(default_factory=list)
    recv_at: list[float] = field(default_factory=list)
    recv_count: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    wrong_recipient: int = 0
    out_of_order: int = 0
    last_j: dict[int, int] = field(default_factory=dict)  # pair -> last j received
    submitted: int = 0
    mark_read: bool = False
    #: Typing: the sender of every `typing_every`-th pair (0: none) says it is
    #: typing before a message, at most once per TYPING_REPEAT_S, as an app does.
    typing_every: int = 0
    typing_sent: int = 0
    # READs sent for this level's messages and how their SendAcks answered:
    # stored (a new entry with its own conv_seq), no-op (msg_id 0: the position
    # was not ahead), duplicate (a resend the server already had), failed.
    reads_sent: int = 0
    reads_stored: int = 0
    reads_noop: int = 0
    reads_duplicate: int = 0
    reads_failed: list[str] = field(default_factory=list)
    read_stored_at: list[float] = field(default_factory=list)  # when each stored ACK came
    read_ack_ms: list[float] = field(default_factory=list)  # READ submit -> its SendAck
    # Closed loop: j is taken in send order, not from a schedule, so the pair
    # that sent message j is recorded here (open loop: pair j % pairs).
    pair_of: list[int] | None = None

    def __post_init__(self) -> None:
        nan = math.nan
        self.submitted_at = [nan] * self.total
        self.ack_at = [nan] * self.total
        self.recv_at = [nan] * self.total
        self.recv_count = [0] * self.total
        self.failed = [""] * self.total

    def intended(self, j: int) -> float:
        return self.start + j / self.rate

    def settled(self) -> bool:
        """Every submitted message acknowledged (or failed) and every acknowledged
        one received."""
        for j in range(self.submitted):
            if self.failed[j]:
                continue
            if math.isnan(self.ack_at[j]) or self.recv_count[j] == 0:
                return False
        return True


class Worker:
    def __init__(self, addresses: list[str], name: str) -> None:
        self.addresses = addresses
        self.name = name
        self.pairs: list[_Pair] = []
        self.levels: dict[str, _Level] = {}
        self.group_clients: list[Client] = []
        self.group_sender: Client | None = None
        self.group_conv = ""
        self.group_recv: dict[int, list[float]] = {}
        self.group_members_here = 0
        self.group_event = asyncio.Event()
        self.last_rx = 0.0  # when any 1:1 message last arrived
        self.reads_due: dict[int, _Pair] = {}  # pairs with a position to mark read
        self.reads_in_flight = 0
        self._reads_flush_scheduled = False
        #: The SDK's automatic DELIVERED receipts (`pairs` may turn them on).
        self.auto_delivered = False

    # -- clients ---------------------------------------------------------------

    def _client(
        self, token: str, on_message: Callable[[Message], None] | None, receive: bool
    ) -> Client:
        return Client(
            self.addresses,
            token,
            on_message=on_message,
            receive=receive,
            connect_timeout_s=60.0,
            reconnect=ReconnectPolicy(initial_s=0.2, max_s=2.0),
            insecure=True,
            # The plain run: messages only (receipts cost is measured on its own);
            # the everything-on run (e2e_full.py) turns them on.
            auto_delivered=self.auto_delivered,
        )

    async def _start_all(self, clients: list[Client]) -> float:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        t0 = time.monotonic()

        async def one(c: Client) -> None:
            async with sem:
                await c.start()

        await asyncio.gather(*(one(c) for c in clients))
        return time.monotonic() - t0

    async def open_pairs(self, args: dict[str, Any]) -> dict[str, Any]:
        self.auto_delivered = bool(args.get("auto_delivered", False))
        clients: list[Client] = []
        for sender_id, recipient_id, conv, s_token, r_token in args["pairs"]:
            # The index is this worker's: message j goes out on pair j % len(pairs).
            pair = _Pair(len(self.pairs), sender_id, recipient_id, conv)
            pair.sender = self._client(s_token, None, receive=False)
            pair.recipient = self._client(r_token, self._on_pair_message(pair), receive=True)
            clients += [pair.sender, pair.recipient]
            self.pairs.append(pair)
        took = await self._start_all(clients)
        return {"clients": len(clients), "connect_s": took}

    # -- 1:1 load --------------------------------------------------------------

    def _on_pair_message(self, pair: _Pair) -> Callable[[Message], None]:
        def on_message(m: Message) -> None:
            now = self.last_rx = time.monotonic()
            parts = m.body.split(b"|")
            if len(parts) != 4 or parts[0] != b"L":
                return  # not ours (e.g. a leftover from a warm-up)
            level = self.levels.get(parts[1].decode())
            if level is None:
                return
            j = int(parts[2])
            if not 0 <= j < level.total:
                return
            owner = j % level.pairs if level.pair_of is None else level.pair_of[j]
            if m.sender_id != pair.sender_id or owner != pair.index:
                level.wrong_recipient += 1
                return
            if level.recv_count[j] == 0:
                level.recv_at[j] = now
            level.recv_count[j] += 1
            last = level.last_j.get(pair.index, -1)
            if j < last:
                level.out_of_order += 1
            level.last_j[pair.index] = max(last, j)
            if level.mark_read and m.conv_seq > pair.read_want:
                pair.read_want, pair.read_level = m.conv_seq, level
                self._want_read(pair)

        return on_message

    # -- read receipts ---------------------------------------------------------

    def _want_read(self, pair: _Pair) -> None:
        """Marks `pair` as having a newer position to read; the READs go out once
        the current delivery batch has been handed over (call_soon), so a batch
        costs one READ per conversation."""
        self.reads_due[pair.index] = pair
        if not self._reads_flush_scheduled:
            self._reads_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_reads)

    def _flush_reads(self) -> None:
        self._reads_flush_scheduled = False
        due, self.reads_due = self.reads_due, {}
        for pair in due.values():
            if pair.read_in_flight or pair.read_want <= pair.read_sent:
                continue  # the ACK of the READ in flight sends the newer one
            level = pair.read_level
            assert pair.recipient is not None and level is not None
            position = pair.read_want
            try:
                future = pair.recipient.submit(
                    pair.conversation_id, b"", kind=MessageKind.READ, target_conv_seq=position
                )
            except Exception as exc:  # e.g. the client stopped: counted, not fatal
                level.reads_failed.append(repr(exc))
                continue
            pair.read_sent, pair.read_in_flight = position, True
            level.reads_sent += 1
            self.reads_in_flight += 1
            future.add_done_callback(self._read_done(pair, level, time.monotonic()))

    def _read_done(
        self, pair: _Pair, level: _Level, submitted: float
    ) -> Callable[[asyncio.Future[SendResult]], None]:
        def done(fut: asyncio.Future[SendResult]) -> None:
            now = time.monotonic()
            pair.read_in_flight = False
            self.reads_in_flight -= 1
            if fut.cancelled():
                level.reads_failed.append("cancelled")
            elif fut.exception() is not None:
                level.reads_failed.append(repr(fut.exception()))
            else:
                result = fut.result()
                level.read_ack_ms.append((now - submitted) * 1000)
                if result.duplicate:
                    level.reads_duplicate += 1
                elif not result.stored:
                    level.reads_noop += 1
                else:
                    level.reads_stored += 1
                    level.read_stored_at.append(now)
            if pair.read_want > pair.read_sent:
                self._want_read(pair)  # messages arrived while this READ was in flight

        return done

    async def load(self, args: dict[str, Any]) -> dict[str, Any]:
        """Sends `total` messages at `rate`/s from `start_at`, round-robin over the
        pairs (each sender at rate/pairs), then waits up to `drain_s` after the
        last send for every ACK and every delivery, and returns the records.

        Open loop, except for one safety valve: once more than `max_backlog_s`
        seconds of offered load are unacknowledged, the level stops submitting
        (it is overloaded; going on would only queue minutes of backlog). The
        level's state stays here for `verify`, so late deliveries still count."""
        rate = float(args["rate"])
        total = int(args["total"])
        name = str(args["level"])
        level = _Level(name, float(args["start_at"]), rate, total, len(self.pairs))
        level.mark_read = bool(args.get("mark_read"))
        level.typing_every = int(args.get("typing_every", 0))
        self.levels[name] = level
        pairs = self.pairs
        max_backlog = max(1, int(rate * float(args["max_backlog_s"])))
        answered = 0

        def acked(j: int) -> Callable[[asyncio.Future[SendResult]], None]:
            def done(fut: asyncio.Future[SendResult]) -> None:
                nonlocal answered
                answered += 1
                if fut.cancelled():
                    level.failed[j] = "cancelled"
                elif fut.exception() is not None:
                    level.failed[j] = repr(fut.exception())
                else:
                    level.ack_at[j] = time.monotonic()

            return done

        j = 0
        aborted_at: float | None = None
        while j < total:
            now = time.monotonic()
            if j - answered > max_backlog:
                aborted_at = now
                break
            due = level.intended(j)
            if due > now:
                await asyncio.sleep(due - now)
                continue
            # Everything due by now goes out at once: a late loop never lowers the
            # offered rate, and latency is counted from the intended time.
            while j < total and level.intended(j) <= now:
                pair = pairs[j % len(pairs)]
                assert pair.sender is not None
                body = f"L|{name}|{j}|{level.intended(j):.6f}".encode()
                if level.typing_every and pair.index % level.typing_every == 0:
                    self._typing(pair, level, now)
                level.submitted_at[j] = now
                pair.sender.submit(pair.conversation_id, body).add_done_callback(acked(j))
                j += 1
        level.submitted = j
        deadline = time.monotonic() + float(args["drain_s"])
        while not level.settled() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {
            "submitted": j,
            "aborted_at": aborted_at,
            "submitted_at": level.submitted_at[:j],
            "ack_at": level.ack_at[:j],
            "recv_at": level.recv_at[:j],
            "recv_count": level.recv_count[:j],
            "settled": level.settled(),
            "typing_sent": level.typing_sent,
        }

    @staticmethod
    def _typing(pair: _Pair, level: _Level, now: float) -> None:
        """The sender says it is typing (an ephemeral frame the gateway relays to
        the recipient's online devices), at most once per TYPING_REPEAT_S."""
        if now - pair.typed_at < TYPING_REPEAT_S:
            return
        assert pair.sender is not None
        if pair.sender.typing(pair.conversation_id):
            pair.typed_at = now
            level.typing_sent += 1

    async def closed(self, args: dict[str, Any]) -> dict[str, Any]:
        """Closed loop: the first `senders` pairs of this worker each send one
        message, wait for its SendAck, and send the next, from `start_at` for
        `run_s` seconds (the recipients receive and ACK their pushes as in the
        open loop). Records per message like `load`, with `submitted_at` the send
        time (there is no schedule: latency is counted from the submit)."""
        name = str(args["level"])
        start, run_s = float(args["start_at"]), float(args["run_s"])
        senders = self.pairs[: int(args["senders"])]
        # Room for far more than a closed loop of a few senders completes.
        cap = int(run_s * int(args["max_rate"])) + 1
        level = _Level(name, start, 1.0, cap, len(self.pairs))
        level.pair_of = [-1] * cap
        self.levels[name] = level
        end = start + run_s
        await asyncio.sleep(max(0.0, start - time.monotonic()))

        async def sender(pair: _Pair) -> None:
            assert pair.sender is not None
            while (now := time.monotonic()) < end and level.submitted < cap:
                j = level.submitted
                level.submitted += 1
                assert level.pair_of is not None
                level.pair_of[j] = pair.index
                level.submitted_at[j] = now
                body = f"L|{name}|{j}|{now:.6f}".encode()
                try:
                    await pair.sender.submit(pair.conversation_id, body)
                except Exception as exc:  # counted as failed by `verify`
                    level.failed[j] = repr(exc)
                    await asyncio.sleep(0.05)
                    continue
                level.ack_at[j] = time.monotonic()

        await asyncio.gather(*(sender(p) for p in senders))
        j = level.submitted
        deadline = time.monotonic() + float(args["drain_s"])
        while not level.settled() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {
            "submitted": j,
            "submitted_at": level.submitted_at[:j],
            "ack_at": level.ack_at[:j],
            "recv_at": level.recv_at[:j],
            "recv_count": level.recv_count[:j],
            "settled": level.settled(),
        }

    async def verify(self, args: dict[str, Any]) -> dict[str, Any]:
        """Final exactly-once accounting of a level (after `quiesce`): every
        submitted message acknowledged, received once by its recipient, in order."""
        level = self.levels.pop(str(args["level"]))
        n = level.submitted
        failed = [f for f in level.failed[:n] if f]
        acked = [not math.isnan(a) for a in level.ack_at[:n]]
        counts = level.recv_count[:n]
        return {
            "submitted": n,
            "acked": sum(acked),
            "failed": len(failed),
            "failures_sample": failed[:5],
            "unacked": sum(
                1 for a, f in zip(acked, level.failed[:n], strict=True) if not a and not f
            ),
            "received": sum(1 for c in counts if c > 0),
            "duplicates": sum(c - 1 for c in counts if c > 1),
            "missing": sum(1 for a, c in zip(acked, counts, strict=True) if a and c == 0),
            "received_unacked": sum(1 for a, c in zip(acked, counts, strict=True) if not a and c),
            "wrong_recipient": level.wrong_recipient,
            "out_of_order": level.out_of_order,
            "reads": {
                "sent": level.reads_sent,
                "stored": level.reads_stored,
                "noop": level.reads_noop,
                "duplicate": level.reads_duplicate,
                "failed": len(level.reads_failed),
                "failures_sample": level.reads_failed[:5],
                "stored_at": level.read_stored_at,
                "ack_ms": level.read_ack_ms,
            },
        }

    # -- group -----------------------------------------------------------------

    def _on_group_message(self, m: Message) -> None:
        now = time.monotonic()
        parts = m.body.split(b"|")
        if len(parts) != 3 or parts[0] != b"G" or m.conversation_id != self.group_conv:
            return
        self.group_recv.setdefault(int(parts[1]), []).append(now)
        self.group_event.set()

    async def open_group(self, args: dict[str, Any]) -> dict[str, Any]:
        self.group_conv = args["conversation_id"]
        clients = [self._client(t, self._on_group_message, True) for _u, t in args["members"]]
        if args.get("sender") is not None:
            # The sender is a member too: its own device gets the message like any other.
            self.group_sender = self._client(args["sender"][1], self._on_group_message, True)
            clients.append(self.group_sender)
        self.group_clients = clients
        self.group_members_here = len(clients)
        took = await self._start_all(clients)
        return {"clients": len(clients), "connect_s": took}

    async def create_group(self, args: dict[str, Any]) -> dict[str, Any]:
        async with GatewayApi(self.addresses, args["token"], insecure=True) as api:
            conv = await api.create_group(args["name"], args["member_ids"])
        return {"conversation_id": conv.conversation_id, "members": len(conv.member_ids)}

    async def quiesce(self, args: dict[str, Any]) -> dict[str, Any]:
        """Waits until no send is pending and nothing arrived for `quiet_s` (the
        previous level's backlog is gone), up to `timeout_s`."""
        t0 = time.monotonic()
        deadline = t0 + float(args["timeout_s"])
        quiet = float(args["quiet_s"])
        # Recipients send too when they mark read.
        clients = [c for p in self.pairs for c in (p.sender, p.recipient) if c is not None]
        while time.monotonic() < deadline:
            pending = sum(c.pending_sends for c in clients) + len(self.reads_due)
            if pending == 0 and time.monotonic() - self.last_rx >= quiet:
                return {"quiet": True, "waited_s": time.monotonic() - t0}
            await asyncio.sleep(0.1)
        pending = sum(c.pending_sends for c in clients) + len(self.reads_due)
        return {"quiet": False, "waited_s": time.monotonic() - t0, "pending": pending}

    async def group_send(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.group_sender is not None
        t0 = time.monotonic()
        await self.group_sender.send(self.group_conv, f"G|{args['k']}|{t0:.6f}")
        return {"sent_at": t0, "ack_at": time.monotonic()}

    async def group_wait(self, args: dict[str, Any]) -> dict[str, Any]:
        k, deadline = int(args["k"]), time.monotonic() + float(args["timeout_s"])
        while len(self.group_recv.get(k, [])) < self.group_members_here:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.group_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.group_event.wait(), left)
        times = self.group_recv.pop(k, [])
        return {"times": times, "expected": self.group_members_here}

    # -- lifecycle ---------------------------------------------------------------

    async def close(self) -> dict[str, Any]:
        clients: list[Client] = list(self.group_clients)
        for p in self.pairs:
            clients += [c for c in (p.sender, p.recipient) if c is not None]
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        return {"closed": len(clients)}


async def _serve(conn: Connection, addresses: list[str], name: str) -> None:
    worker = Worker(addresses, name)
    loop = asyncio.get_running_loop()
    handlers = {
        "pairs": worker.open_pairs,
        "load": worker.load,
        "closed": worker.closed,
        "group": worker.open_group,
        "quiesce": worker.quiesce,
        "verify": worker.verify,
        "create_group": worker.create_group,
        "group_send": worker.group_send,
        "group_wait": worker.group_wait,
    }
    while True:
        command, args = await loop.run_in_executor(None, conn.recv)
        if command == "close":
            conn.send(await worker.close())
            return
        try:
            reply = await handlers[command](args)
        except Exception as exc:  # reported to the coordinator, which fails the run
            log.exception("worker %s: %s failed", name, command)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send(reply)


def worker_main(conn: Connection, addresses: list[str], name: str) -> None:
    """Process entry point (must be importable for the spawn start method)."""
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
    try:
        import uvloop

        uvloop.run(_serve(conn, addresses, name))
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(_serve(conn, addresses, name))
