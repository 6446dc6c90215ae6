"""Helpers for end-to-end tests against the real stack: an inbox that collects a
client's messages, condition waits with deadlines, the exactly-once-in-order
check, and a TCP proxy whose connections a test can cut."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Callable, Iterable

from imclient import Client, Message


def uid(prefix: str) -> str:
    """A user id unique to this test run (tests share one stack per module)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def wait_until(
    condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]
) -> None:
    """Waits (polling briefly) until `condition()` holds; fails after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {detail}")
        await asyncio.sleep(0.02)


class Inbox:
    """Everything `client.messages()` hands out, in order, collected by a task:
    `entries` all of it, `messages` the chat messages. Conversation events
    (read positions, the SDK's automatic DELIVERED receipts, edits, recalls)
    are timeline entries too; the delivery checks here are about messages,
    and events have their own tests."""

    def __init__(self, client: Client, name: str = "") -> None:
        self.client = client
        self.name = name or (client.device_id or "client")
        self.entries: list[Message] = []
        self.messages: list[Message] = []
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._collect(), name=f"inbox-{self.name}")

    async def _collect(self) -> None:
        try:
            async for m in self.client.messages():
                self.entries.append(m)
                if not m.is_event:
                    self.messages.append(m)
        except Exception as exc:  # surfaced by wait()/check
            self.error = exc

    def texts(self, conversation_id: str | None = None, sender: str | None = None) -> list[str]:
        return [
            m.text
            for m in self.messages
            if (conversation_id is None or m.conversation_id == conversation_id)
            and (sender is None or m.sender_id == sender)
        ]

    async def wait_for(
        self, count: int, timeout: float, conversation_id: str | None = None
    ) -> None:
        def done() -> bool:
            if self.error is not None:
                raise AssertionError(f"{self.name}: messages() failed: {self.error!r}")
            return len(self.texts(conversation_id)) >= count

        await wait_until(
            done,
            timeout,
            lambda: (
                f"{self.name} to receive {count} messages (has "
                f"{len(self.texts(conversation_id))}; stats {self.client.stats})"
            ),
        )

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def assert_exactly_once_in_order(
    inbox: Inbox, conversation_id: str, expected: Iterable[str]
) -> None:
    """The device was handed exactly `expected`, once each, in that order, with
    strictly increasing timeline seq and conv_seq, and no msg_id twice."""
    want = list(expected)
    got = [m for m in inbox.messages if m.conversation_id == conversation_id]
    texts = [m.text for m in got]
    if texts != want:
        missing = sorted(set(want) - set(texts))
        dupes = sorted({t for t in texts if texts.count(t) > 1})
        pairs = zip(texts, want, strict=False)
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        raise AssertionError(
            f"{inbox.name}: got {len(texts)} of {len(want)} messages; "
            f"missing {missing[:10]}, duplicated {dupes[:10]}, first divergence at {first}"
        )
    assert len({m.msg_id for m in got}) == len(got), f"{inbox.name}: a msg_id twice"
    seqs = [m.seq for m in inbox.messages]
    assert all(a < b for a, b in itertools.pairwise(seqs)), f"{inbox.name}: seq order"
    conv_seqs = [m.conv_seq for m in got]
    assert all(a < b for a, b in itertools.pairwise(conv_seqs)), f"{inbox.name}: conv_seq order"


class TcpProxy:
    """A loopback TCP relay in front of one server. `cut()` aborts every relayed
    connection at once (both sides see a reset), like a network failure."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.cuts = 0

    @property
    def address(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        self.cuts += 1
        for a, b in list(self._pairs):
            a.transport.abort()
            b.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
