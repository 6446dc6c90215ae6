"""`imctl`: a command-line client for the IM backend, built on `imclient`.

    imctl token alice                      # print a dev token
    imctl chat --user alice --to bob       # interactive two-way chat
    imctl send --user alice --to bob hi    # one message, waits for its ACK
    imctl listen --user bob                # print incoming messages
    imctl sync|history|group ...
    imctl conversations --user bob         # unread counts, read positions, all pages
    imctl read --user bob d:alice:bob      # mark read (up to the last message)
    imctl edit|recall --user alice d:alice:bob 7 ...
    imctl receipts --user alice g:... 7 --readers
    imctl presence --user alice bob carol

(`imctl` is installed by `pip install ./sdk/python`; in the repository's .venv
it is `python -m imctl`.)

Every command takes the connection options: `--address` (or IM_ADDRESS; several
comma-separated; default 127.0.0.1:17000, the gateway of `make run`) and either
`--token` (or IM_TOKEN) or `--user` (with `--device`), which mints a token with
the secret from `--secret`, IM_GATEWAY_TOKEN_SECRET, or the gateway's DEV default.

Connections use TLS, checking the gateway's certificate against the system's
trusted CAs, unless `--plaintext` (or IMCTL_PLAINTEXT=1) asks for plaintext, as
the gateway of `make run` needs. `--ca-file` (IMCTL_CA_FILE) trusts a private CA
instead; `--server-name` (IMCTL_SERVER_NAME) checks that name in the certificate
instead of the host dialled.

Device ids: a gateway keeps one stream per user and device, and a second
connection of the same device replaces (kicks) the first. So each command kind
has its own default device (`cli-listen`, `cli-send`, `cli-chat-<conversation>`,
and `cli` for the unary commands, which open no stream): `listen`, `chat` and an
SDK app of the same user run side by side. The ids are fixed, not random, so
the server's device rows and the local cursors stay one per kind (and per
conversation for chat), however often imctl runs, and a restarted command finds
its cursor again. Two `listen`s of one user need `--device`.

Streaming commands (chat, listen, send) fail within `--connect-timeout` seconds
(default 5) when no gateway answers, with the reason of the last attempt
("UNAVAILABLE: connection refused at 127.0.0.1:17000"). They keep the device's
sync cursor in `$IMCTL_STATE_DIR/store.sqlite3` (default ~/.imctl), so a
restarted `listen` or `chat` shows only what it has not shown before; `--memory`
forgets on exit. The cursor is kept with the server's store epoch: after the
server's database was replaced (`make clean`), the SDK warns and shows the new
timeline from the start.
`listen` and `chat` stay complete while connected through the SDK: a timeline
head above the local seq (announced by the gateway) makes them sync, so a lost
push shows up within the gateway's head interval. Their first stderr line
gives the local seq and the head.

Conversation events (read and delivered positions, edits, recalls, deletions)
are timeline entries too. `listen` and `sync` print chat messages only, as
they always did, unless `--events` asks for the events as well (JSON lines
then carry `kind` and `target_conv_seq`; a plain message's JSON is unchanged).
`chat` shows the peer's typing, ticks for its own lines (✓ stored, ✓✓
delivered, ✓✓ read: direct conversations), edits and recalls, and marks read
what it showed; with `--json` those show only with `--events`. `read`, `edit`
and `recall` send their event on the stream like `send` (device `cli-send`)
and wait for its ACK.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from imclient import (
    Client,
    ConnectTimeout,
    Conversation,
    ConversationKind,
    GatewayApi,
    ImClientError,
    MemoryStore,
    Message,
    MessageKind,
    SendResult,
    SQLiteStore,
    Store,
    TLSConfig,
    TLSError,
    TypingNotice,
    direct_conversation_id,
)
from imclient.tokens import DEV_TOKEN_SECRET, ID_PATTERN, mint_token

DEFAULT_ADDRESS = "127.0.0.1:17000"


# -- tokens ------------------------------------------------------------------------


def mint(user: str, device: str, secret: str | None, ttl_s: int) -> str:
    """A token signed with `secret`, else IM_GATEWAY_TOKEN_SECRET, else the
    gateway's DEV secret (imclient.tokens: the format the gateway verifies)."""
    secret = secret or os.environ.get("IM_GATEWAY_TOKEN_SECRET") or DEV_TOKEN_SECRET
    return mint_token(secret, user, device, ttl_s)


def chat_device(conversation_id: str) -> str:
    """The default device of `chat` in a conversation: readable when it fits an
    id (`d:alice:bob` -> `cli-chat-d.alice.bob`), else a short digest of it."""
    device = "cli-chat-" + conversation_id.replace(":", ".")
    if ID_PATTERN.fullmatch(device):
        return device
    return "cli-chat-" + hashlib.sha256(conversation_id.encode()).hexdigest()[:16]


# -- formatting --------------------------------------------------------------------


def message_json(m: Message) -> dict[str, object]:
    """A timeline entry as JSON. A plain chat message has the keys it always
    had; an event adds `kind` and `target_conv_seq`, an edited, recalled or
    hidden message the flag that says so."""
    out: dict[str, object] = {
        "seq": m.seq,
        "msg_id": m.msg_id,
        "conversation_id": m.conversation_id,
        "conv_seq": m.conv_seq,
        "sender_id": m.sender_id,
        "sender_device_id": m.sender_device_id,
        "client_msg_id": m.client_msg_id,
        "content_type": m.content_type.name,
        "text": m.text,
        "server_time_ms": m.server_time_ms,
    }
    if m.is_event:
        out["kind"] = m.kind.name
        out["target_conv_seq"] = m.target_conv_seq
    if m.edited_at_ms:
        out["edited_at_ms"] = m.edited_at_ms
    if m.recalled:
        out["recalled"] = True
    if m.deleted_for_me:
        out["deleted_for_me"] = True
    return out


_EVENT_TEXT = {
    MessageKind.READ: "read up to #{t}",
    MessageKind.DELIVERED: "received up to #{t}",
    MessageKind.RECALL: "recalled #{t}",
    MessageKind.DELETE_FOR_ME: "deleted #{t} for themselves",
}


def message_text(m: Message) -> str:
    """What a line shows of an entry: the text of a message (with its state),
    a description of an event."""
    if m.kind == MessageKind.MESSAGE:
        if m.recalled:
            return "(message recalled)"
        if m.deleted_for_me:
            return "(deleted for you)"
        return f"{m.text} (edited)" if m.edited_at_ms else m.text
    if m.kind == MessageKind.EDIT:
        return f"edited #{m.target_conv_seq}: {m.text}"
    template = _EVENT_TEXT.get(m.kind, "event {k} on #{t}")
    return template.format(t=m.target_conv_seq, k=int(m.kind))


def message_line(m: Message) -> str:
    return (
        f"[{m.conversation_id} #{m.conv_seq}] {m.sender_id}/{m.sender_device_id}: {message_text(m)}"
    )


def conversation_json(c: Conversation) -> dict[str, object]:
    return {
        "conversation_id": c.conversation_id,
        "kind": c.kind.name,
        "name": c.name,
        "owner_id": c.owner_id,
        "member_ids": list(c.member_ids),
        "last_conv_seq": c.last_conv_seq,
    }


def conversation_state_json(c: Conversation) -> dict[str, object]:
    """`imctl conversations`: the group listing's keys and the caller's state."""
    out = conversation_json(c)
    out.update(
        read_conv_seq=c.read_conv_seq,
        unread_count=c.unread_count,
        unread_capped=c.unread_capped,
        last_activity_ms=c.last_activity_ms,
    )
    if c.kind == ConversationKind.DIRECT:
        out.update(
            peer_read_conv_seq=c.peer_read_conv_seq,
            peer_delivered_conv_seq=c.peer_delivered_conv_seq,
        )
    return out


def conversation_state_line(c: Conversation) -> str:
    unread = f"{c.unread_count}{'+' if c.unread_capped else ''}"
    when = _time(c.last_activity_ms)
    line = (
        f"{c.conversation_id} {c.kind.name.lower()} {c.name!r} unread {unread} "
        f"read #{c.read_conv_seq}/#{c.last_conv_seq} last activity {when}"
    )
    if c.kind == ConversationKind.DIRECT:
        line += f" peer read #{c.peer_read_conv_seq} delivered #{c.peer_delivered_conv_seq}"
    return line


def _time(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def position(client: Client) -> str:
    """Where the device stands: its local seq and the timeline head the gateway
    announced (an old gateway announces none). The SDK syncs while seq < head."""
    head = client.head_seq
    return f"seq {client.last_seq}, head {head if head else 'unknown'}"


def emit(out: TextIO, as_json: bool, obj: dict[str, object], line: str) -> None:
    out.write((json.dumps(obj) if as_json else line) + "\n")
    out.flush()


# -- options -----------------------------------------------------------------------


def _connection_options(default_device: str) -> argparse.ArgumentParser:
    """The connection options; `default_device` describes --device's default."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--address",
        "-a",
        default=os.environ.get("IM_ADDRESS", DEFAULT_ADDRESS),
        help="gateway host:port, several comma-separated (env IM_ADDRESS; default %(default)s)",
    )
    g.add_argument("--token", default=os.environ.get("IM_TOKEN"), help="token (env IM_TOKEN)")
    g.add_argument("--user", "-u", help="mint a token for this user (dev secret by default)")
    g.add_argument(
        "--device", "-d", help=f"device id of the minted token (default {default_device})"
    )
    g.add_argument(
        "--secret", help="token secret (default: IM_GATEWAY_TOKEN_SECRET or the dev one)"
    )
    g.add_argument("--json", action="store_true", help="print JSON lines")
    t = p.add_argument_group("TLS (on unless --plaintext)")
    t.add_argument(
        "--plaintext",
        action="store_true",
        default=_env_flag("IMCTL_PLAINTEXT"),
        help="connect without TLS, e.g. to `make run` (env IMCTL_PLAINTEXT=1)",
    )
    t.add_argument(
        "--ca-file",
        default=os.environ.get("IMCTL_CA_FILE") or None,
        help="PEM CA(s) to trust instead of the system's (env IMCTL_CA_FILE)",
    )
    t.add_argument(
        "--server-name",
        default=os.environ.get("IMCTL_SERVER_NAME") or None,
        help="name to check in the gateway's certificate instead of the host dialled "
        "(env IMCTL_SERVER_NAME)",
    )
    return p


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _stream_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="fail if no gateway answers within S seconds (default %(default)s)",
    )
    return p


def _store_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("local state")
    g.add_argument("--store", type=Path, help="SQLite file for the sync cursor (default: see docs)")
    g.add_argument("--memory", action="store_true", help="keep no state: show the whole timeline")
    return p


def _target(p: argparse.ArgumentParser) -> None:
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--to", help="the other user of a direct conversation")
    t.add_argument("--conversation", "-c", help="a conversation id (d:... or g:...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imctl", description="Command-line client for the IM backend."
    )
    parser.add_argument("--log-level", default="warning", help="SDK log level (default warning)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("token", help="mint a token (dev secret unless --secret)")
    p.add_argument("user")
    p.add_argument("--device", "-d", default="cli")
    p.add_argument(
        "--secret", help="default: IM_GATEWAY_TOKEN_SECRET, else the gateway's dev secret"
    )
    p.add_argument("--ttl", type=int, default=24 * 3600, help="seconds (default one day)")

    p = sub.add_parser(
        "send",
        parents=[_connection_options("cli-send"), _stream_options()],
        help="send one message",
    )
    p.set_defaults(default_device="cli-send")
    _target(p)
    p.add_argument("text", nargs="+", help="the message ('-' reads it from stdin)")

    p = sub.add_parser(
        "listen",
        parents=[_connection_options("cli-listen"), _stream_options(), _store_options()],
        help="print incoming messages",
    )
    p.set_defaults(default_device="cli-listen")
    p.add_argument("--count", "-n", type=int, default=0, help="exit after N messages")
    p.add_argument("--timeout", type=float, default=0, help="exit after S seconds")
    _events_option(p)

    p = sub.add_parser(
        "chat",
        parents=[
            _connection_options("cli-chat-<conversation>"),
            _stream_options(),
            _store_options(),
        ],
        help="interactive chat: lines typed are sent",
    )
    _target(p)
    p.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help="after end of input, keep printing incoming messages for S seconds",
    )
    p.add_argument(
        "--events",
        action="store_true",
        help="with --json: also print events, ticks and typing (always shown without --json)",
    )

    unary = [_connection_options("cli")]
    p = sub.add_parser("sync", parents=unary, help="print your timeline after a seq")
    p.add_argument("--after", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--all", action="store_true", help="follow has_more to the end")
    _events_option(p)

    p = sub.add_parser("history", parents=unary, help="print a conversation's messages")
    p.add_argument("conversation")
    p.add_argument("--before", type=int, default=0, help="below this conv_seq (0: newest)")
    p.add_argument("--limit", type=int, default=50)

    p = sub.add_parser("group", help="groups: create, add, remove, list")
    gsub = p.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    q = gsub.add_parser("create", parents=unary, help="create a group (you are its owner)")
    q.add_argument("name")
    q.add_argument("members", nargs="*")
    q = gsub.add_parser("add", parents=unary, help="add members")
    q.add_argument("conversation")
    q.add_argument("members", nargs="+")
    q = gsub.add_parser("remove", parents=unary, help="remove members")
    q.add_argument("conversation")
    q.add_argument("members", nargs="+")
    gsub.add_parser("list", parents=unary, help="your conversations")

    p = sub.add_parser(
        "conversations",
        parents=unary,
        help="your conversations: unread counts, read positions, last activity (all pages)",
    )
    p.add_argument("--page-size", type=int, default=0, help="per call (0: the server's default)")

    events = [_connection_options("cli-send"), _stream_options()]
    p = sub.add_parser(
        "read", parents=events, help="mark a conversation read (default: up to its last entry)"
    )
    p.set_defaults(default_device="cli-send")
    p.add_argument("conversation")
    p.add_argument("conv_seq", type=int, nargs="?", help="the read position (default: the last)")
    p = sub.add_parser("recall", parents=events, help="recall one of your messages")
    p.set_defaults(default_device="cli-send")
    p.add_argument("conversation")
    p.add_argument("conv_seq", type=int)
    p = sub.add_parser("edit", parents=events, help="replace the text of one of your messages")
    p.set_defaults(default_device="cli-send")
    p.add_argument("conversation")
    p.add_argument("conv_seq", type=int)
    p.add_argument("text", nargs="+", help="the new text ('-' reads it from stdin)")

    p = sub.add_parser("receipts", parents=unary, help="who has read a message")
    p.add_argument("conversation")
    p.add_argument("conv_seq", type=int)
    p.add_argument("--readers", action="store_true", help="also list the readers (all pages)")

    p = sub.add_parser("presence", parents=unary, help="online state and last seen of users")
    p.add_argument("users", nargs="+")
    return parser


def _events_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--events",
        action="store_true",
        help="also print conversation events (reads, receipts, edits, recalls)",
    )


# -- commands ----------------------------------------------------------------------


class UsageError(Exception):
    pass


def device_of(args: argparse.Namespace) -> str:
    """The device id a minted token names: --device, else the command's default."""
    if args.device:
        return str(args.device)
    if args.command == "chat":
        return chat_device(_conversation(args, args.user))
    return str(getattr(args, "default_device", "cli"))  # unary commands: no stream


def _token(args: argparse.Namespace) -> str:
    if args.user:
        return mint(args.user, device_of(args), args.secret, 24 * 3600)
    if args.token:
        return str(args.token)
    raise UsageError("give --user USER (mints a dev token) or --token/IM_TOKEN")


def _security(args: argparse.Namespace) -> dict[str, Any]:
    """The SDK's TLS arguments (`tls=` or `insecure=`) from the options."""
    if args.plaintext:
        if args.ca_file or args.server_name:
            raise UsageError("--plaintext excludes --ca-file and --server-name")
        return {"insecure": True}
    return {"tls": TLSConfig(ca_file=args.ca_file, server_name=args.server_name)}


def _store(args: argparse.Namespace) -> Store:
    if args.memory:
        return MemoryStore()
    if args.store:
        return SQLiteStore(args.store)
    state = Path(os.environ.get("IMCTL_STATE_DIR") or Path.home() / ".imctl")
    return SQLiteStore(state / "store.sqlite3")


def _conversation(args: argparse.Namespace, me: str) -> str:
    if args.conversation:
        return str(args.conversation)
    return direct_conversation_id(me, args.to)


@contextlib.asynccontextmanager
async def _connected(args: argparse.Namespace, **kwargs: Any) -> AsyncIterator[Client]:
    """A connected, synced client that fails fast: `ConnectTimeout` (naming the
    last attempt's failure) when no gateway welcomes it within
    --connect-timeout; no limit on the first sync after that (a long timeline
    may take a while)."""
    client = Client(args.address, _token(args), connect_timeout_s=None, **_security(args), **kwargs)
    try:
        await client.start(wait_ready=False)
        await client.wait_connected(args.connect_timeout)
        try:
            await client.wait_ready(args.connect_timeout)
        except ConnectTimeout:
            print(
                f"imctl: connected to {client.address}; the first sync is still running "
                f"({position(client)}; a long timeline, or the server's store unavailable)",
                file=sys.stderr,
            )
            await client.wait_ready()
        yield client
    finally:
        await client.close()


async def cmd_send(args: argparse.Namespace, out: TextIO) -> int:
    text = sys.stdin.read().rstrip("\n") if args.text == ["-"] else " ".join(args.text)
    async with _connected(args, receive=False) as client:
        assert client.user_id is not None
        conv = _conversation(args, client.user_id)
        ack = await client.send(conv, text)
    emit(
        out,
        args.json,
        {
            "conversation_id": conv,
            "msg_id": ack.msg_id,
            "seq": ack.seq,
            "conv_seq": ack.conv_seq,
            "client_msg_id": ack.client_msg_id,
        },
        f"sent to {conv}: msg_id {ack.msg_id}, conv_seq {ack.conv_seq}",
    )
    return 0


async def cmd_listen(args: argparse.Namespace, out: TextIO) -> int:
    async with _connected(args, store=_store(args)) as client:
        if not args.json:
            print(
                f"listening as {client.user_id}/{client.device_id} ({position(client)})",
                file=sys.stderr,
            )
        count = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.timeout or None):
                async for m in client.messages():
                    if m.is_event and not args.events:
                        continue
                    emit(out, args.json, message_json(m), message_line(m))
                    count += 1
                    if args.count and count >= args.count:
                        break
    return 0


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    """Reads stdin in a daemon thread (works for terminals and pipes alike, and
    never keeps the process alive)."""

    def run() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\r\n"))
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=run, name="imctl-stdin", daemon=True).start()


#: Typing(true) is repeated at most this often while lines arrive (seconds).
TYPING_EVERY_S = 3.0
#: The read position is sent at most this often while messages are shown (seconds).
READ_EVERY_S = 0.5


class _ChatView:
    """What `imctl chat` prints besides the messages: ticks of its own lines
    (✓ on the SendAck, ✓✓ delivered and read as the peer's positions pass
    them, in direct conversations), the peer's typing, edits and recalls.
    Lines go to stdout; with --json only with --events, as objects with an
    "event" key."""

    def __init__(self, client: Client, conv: str, out: TextIO, args: argparse.Namespace) -> None:
        self.client, self.conv, self.out, self.args = client, conv, out, args
        self.mine: list[int] = []  # conv_seqs of this chat's own lines, acknowledged
        self.delivered_shown = 0
        self.read_shown = 0
        self.typing_shown: set[str] = set()
        self.read_due = 0  # the highest conv_seq shown of others' messages

    @property
    def quiet(self) -> bool:
        return bool(self.args.json) and not self.args.events

    def status(self, obj: dict[str, object], line: str) -> None:
        if not self.quiet:
            emit(self.out, self.args.json, obj, line)

    def sent(self, result: SendResult) -> None:
        self.mine.append(result.conv_seq)
        self.status(
            {"event": "sent", "conversation_id": self.conv, "conv_seq": result.conv_seq},
            f"  ✓ #{result.conv_seq}",
        )
        self.ticks()

    def ticks(self) -> None:
        state = self.client.conversation_state(self.conv)
        for name, pos, shown in (
            ("delivered", state.peer_delivered_conv_seq, self.delivered_shown),
            ("read", state.peer_read_conv_seq, self.read_shown),
        ):
            passed = [c for c in self.mine if shown < c <= pos]
            if name == "delivered":
                self.delivered_shown = max(shown, pos)
            else:
                self.read_shown = max(shown, pos)
            if passed:
                seqs = " ".join(f"#{c}" for c in passed)
                self.status(
                    {"event": name, "conversation_id": self.conv, "conv_seqs": passed},
                    f"  ✓✓ {name}: {seqs}",
                )

    def entry(self, m: Message, me: str, device: str | None) -> None:
        """One timeline entry of this conversation, in order."""
        own_device = m.sender_id == me and m.sender_device_id == device
        if m.kind == MessageKind.MESSAGE:
            self.typing_shown.discard(m.sender_id)
            if own_device:
                return  # our own lines are on the screen already
            shown = self.client.conversation_state(self.conv).current(m)
            emit(self.out, self.args.json, message_json(shown), message_line(shown))
            if m.sender_id != me:
                self.read_due = max(self.read_due, m.conv_seq)
        elif m.kind in (MessageKind.EDIT, MessageKind.RECALL):
            if own_device:
                return
            if self.args.json:
                self.status(message_json(m), "")
            elif m.kind == MessageKind.EDIT:
                print(
                    f"[{self.conv} #{m.target_conv_seq}] {m.sender_id}: {m.text} (edited)",
                    file=self.out,
                    flush=True,
                )
            else:
                print(
                    f"[{self.conv} #{m.target_conv_seq}] message recalled",
                    file=self.out,
                    flush=True,
                )
        elif m.kind in (MessageKind.READ, MessageKind.DELIVERED):
            if m.sender_id != me:
                self.ticks()
        elif self.args.json and self.args.events:
            self.status(message_json(m), "")

    def typing(self, notice: TypingNotice, me: str) -> None:
        if notice.conversation_id != self.conv or notice.user_id == me:
            return
        if notice.typing and notice.user_id not in self.typing_shown:
            self.typing_shown.add(notice.user_id)
            self.status(
                {"event": "typing", "conversation_id": self.conv, "user_id": notice.user_id},
                f"{notice.user_id} is typing…",
            )
        elif not notice.typing:
            self.typing_shown.discard(notice.user_id)

    def expire_typing(self) -> None:
        """Notices expire without a frame: forget them, so the next one shows."""
        self.typing_shown &= set(self.client.typing_users(self.conv))


async def cmd_chat(args: argparse.Namespace, out: TextIO) -> int:
    async with _connected(args, store=_store(args)) as client:
        me, device = client.user_id, client.device_id
        assert me is not None
        conv = _conversation(args, me)
        print(
            f"chatting in {conv} as {me}/{device} ({position(client)}); "
            "type a line to send it, Ctrl-D to quit",
            file=sys.stderr,
        )
        view = _ChatView(client, conv, out, args)

        async def show() -> None:
            async for m in client.messages():
                if m.conversation_id == conv:
                    view.entry(m, me, device)

        async def signals() -> None:
            async for signal in client.signals():
                if isinstance(signal, TypingNotice):
                    view.typing(signal, me)

        async def housekeeping() -> None:
            """Marks read what was shown, at most every READ_EVERY_S; forgets
            expired typing notices."""
            marked = 0
            while True:
                await asyncio.sleep(READ_EVERY_S)
                view.expire_typing()
                if view.read_due > marked:
                    marked = view.read_due
                    with contextlib.suppress(ImClientError):
                        client.submit(
                            conv, b"", kind=MessageKind.READ, target_conv_seq=marked
                        ).add_done_callback(_quiet)

        def report(fut: asyncio.Future[SendResult]) -> None:
            if fut.cancelled():
                return
            if fut.exception() is not None:
                print(f"not sent: {fut.exception()}", file=sys.stderr)
            else:
                view.sent(fut.result())

        tasks = [
            asyncio.create_task(show()),
            asyncio.create_task(signals()),
            asyncio.create_task(housekeeping()),
        ]
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        _stdin_lines(asyncio.get_running_loop(), lines)
        loop = asyncio.get_running_loop()
        typing_at = -TYPING_EVERY_S  # when Typing(true) was last sent
        typing_on = False
        try:
            while (line := await lines.get()) is not None:
                if not line.strip():
                    continue
                # Line input cannot see keystrokes: a line that arrives is the
                # only sign of typing. Typing(true) at most every TYPING_EVERY_S
                # while lines come, Typing(false) after the line is sent.
                now = loop.time()
                if now - typing_at >= TYPING_EVERY_S and client.typing(conv, True):
                    typing_at, typing_on = now, True
                client.submit(conv, line).add_done_callback(report)
                if typing_on and lines.empty():
                    client.typing(conv, False)
                    typing_on = False
            await client.flush()
            # Show what has already arrived before leaving.
            for _ in range(100):
                if not client.undelivered:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)
            if args.linger > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(args.linger):
                        await asyncio.shield(tasks[0])
            if view.read_due:
                with contextlib.suppress(ImClientError):
                    await client.mark_read(conv, view.read_due)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return 0


def _quiet(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def cmd_sync(args: argparse.Namespace, out: TextIO) -> int:
    async with GatewayApi(args.address, _token(args), **_security(args)) as api:
        if args.all:
            messages = await api.sync_all(args.after, args.limit or 500)
        else:
            messages = (await api.sync(args.after, args.limit)).messages
    for m in messages:
        if m.is_event and not args.events:
            continue
        emit(out, args.json, message_json(m), f"seq {m.seq}: {message_line(m)}")
    return 0


async def cmd_history(args: argparse.Namespace, out: TextIO) -> int:
    async with GatewayApi(args.address, _token(args), **_security(args)) as api:
        page = await api.history(args.conversation, args.before, args.limit)
    for m in reversed(page.messages):  # oldest first, like a chat window
        emit(out, args.json, message_json(m), message_line(m))
    if page.has_more and not args.json:
        oldest = page.messages[-1].conv_seq if page.messages else 0
        print(f"(older messages: --before {oldest})", file=sys.stderr)
    return 0


async def cmd_group(args: argparse.Namespace, out: TextIO) -> int:
    async with GatewayApi(args.address, _token(args), **_security(args)) as api:
        if args.group_command == "list":
            convs = [c async for c in api.conversations()]
        elif args.group_command == "create":
            convs = [await api.create_group(args.name, args.members)]
        elif args.group_command == "add":
            convs = [await api.add_members(args.conversation, args.members)]
        else:
            convs = [await api.remove_members(args.conversation, args.members)]
    for c in convs:
        line = (
            f"{c.conversation_id} {c.kind.name.lower()} {c.name!r} members={','.join(c.member_ids)}"
        )
        emit(out, args.json, conversation_json(c), line)
    return 0


async def _last_conv_seq(api: GatewayApi | Client, conversation_id: str) -> int:
    async for c in api.conversations():
        if c.conversation_id == conversation_id:
            return c.last_conv_seq
    raise UsageError(f"{conversation_id} is not one of your conversations")


def _event_json(conv: str, ack: SendResult) -> dict[str, object]:
    return {
        "conversation_id": conv,
        "msg_id": ack.msg_id,
        "seq": ack.seq,
        "conv_seq": ack.conv_seq,
        "client_msg_id": ack.client_msg_id,
        "stored": ack.stored,
    }


async def cmd_read(args: argparse.Namespace, out: TextIO) -> int:
    async with _connected(args, receive=False) as client:
        conv = args.conversation
        position_ = args.conv_seq or await _last_conv_seq(client, conv)
        if position_ < 1:
            raise UsageError(f"{conv} has nothing to read")
        ack = await client.mark_read(conv, position_)
    obj = _event_json(conv, ack) | {"read_conv_seq": position_ if ack.stored else ack.conv_seq}
    if ack.stored:
        line = f"read {conv} up to #{position_}"
    else:
        line = f"{conv} was already read up to #{ack.conv_seq}: nothing changed"
    emit(out, args.json, obj, line)
    return 0


async def cmd_recall(args: argparse.Namespace, out: TextIO) -> int:
    async with _connected(args, receive=False) as client:
        ack = await client.recall(args.conversation, args.conv_seq)
    emit(
        out,
        args.json,
        _event_json(args.conversation, ack) | {"target_conv_seq": args.conv_seq},
        f"recalled #{args.conv_seq} in {args.conversation} (recall #{ack.conv_seq})",
    )
    return 0


async def cmd_edit(args: argparse.Namespace, out: TextIO) -> int:
    text = sys.stdin.read().rstrip("\n") if args.text == ["-"] else " ".join(args.text)
    async with _connected(args, receive=False) as client:
        ack = await client.edit(args.conversation, args.conv_seq, text)
    emit(
        out,
        args.json,
        _event_json(args.conversation, ack) | {"target_conv_seq": args.conv_seq},
        f"edited #{args.conv_seq} in {args.conversation} (edit #{ack.conv_seq})",
    )
    return 0


async def cmd_conversations(args: argparse.Namespace, out: TextIO) -> int:
    async with GatewayApi(args.address, _token(args), **_security(args)) as api:
        convs = [c async for c in api.conversations(args.page_size)]
    for c in convs:
        emit(out, args.json, conversation_state_json(c), conversation_state_line(c))
    return 0


async def cmd_receipts(args: argparse.Namespace, out: TextIO) -> int:
    async with GatewayApi(args.address, _token(args), **_security(args)) as api:
        r = await api.get_receipts(args.conversation, args.conv_seq)
        readers = (
            [u async for u in api.readers(args.conversation, args.conv_seq)]
            if args.readers
            else None
        )
    obj: dict[str, object] = {
        "conversation_id": args.conversation,
        "conv_seq": args.conv_seq,
        "member_count": r.member_count,
        "read_count": r.read_count,
        "delivered": r.delivered,
    }
    direct = args.conversation.startswith("d:")
    line = f"#{args.conv_seq} in {args.conversation}: read by {r.read_count}"
    line += f" of {r.member_count} members besides its sender" if not direct else ""
    if direct:
        line += f", {'delivered' if r.delivered else 'not delivered yet'}"
    if readers is not None:
        obj["reader_ids"] = readers
        line += "\n" + "\n".join(f"  {u}" for u in readers) if readers else ""
    emit(out, args.json, obj, line)
    return 0


async def cmd_presence(args: argparse.Namespace, out: TextIO) -> int:
    async with GatewayApi(args.address, _token(args), **_security(args)) as api:
        presences = await api.get_presence(args.users)
    for p in presences:
        if p.online:
            line = f"{p.user_id} online"
        else:
            line = f"{p.user_id} offline, last seen {_time(p.last_seen_ms)}"
        obj = {"user_id": p.user_id, "state": p.state.name, "last_seen_ms": p.last_seen_ms}
        emit(out, args.json, obj, line)
    return 0


COMMANDS = {
    "send": cmd_send,
    "listen": cmd_listen,
    "chat": cmd_chat,
    "sync": cmd_sync,
    "history": cmd_history,
    "group": cmd_group,
    "conversations": cmd_conversations,
    "read": cmd_read,
    "recall": cmd_recall,
    "edit": cmd_edit,
    "receipts": cmd_receipts,
    "presence": cmd_presence,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    out = sys.stdout
    try:
        if args.command == "token":
            out.write(mint(args.user, args.device, args.secret, args.ttl) + "\n")
            return 0
        return asyncio.run(COMMANDS[args.command](args, out))
    except KeyboardInterrupt:
        return 130
    except (ImClientError, UsageError, ValueError) as exc:
        print(f"imctl: {exc}", file=sys.stderr)
        if isinstance(exc, TLSError):
            print(
                "imctl: --plaintext (IMCTL_PLAINTEXT=1) connects without TLS; --ca-file and "
                "--server-name change what TLS trusts and checks",
                file=sys.stderr,
            )
        return 1
