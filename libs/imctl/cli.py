"""`imctl`: a command-line client for the IM backend, built on `imclient`.

    imctl token alice                      # print a dev token
    imctl chat --user alice --to bob       # interactive two-way chat
    imctl send --user alice --to bob hi    # one message, waits for its ACK
    imctl listen --user bob                # print incoming messages
    imctl sync|history|group ...

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
from pathlib import Path
from typing import Any, TextIO

from imclient import (
    Client,
    ConnectTimeout,
    Conversation,
    GatewayApi,
    ImClientError,
    MemoryStore,
    Message,
    SQLiteStore,
    Store,
    TLSConfig,
    TLSError,
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
    return {
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


def message_line(m: Message) -> str:
    return f"[{m.conversation_id} #{m.conv_seq}] {m.sender_id}/{m.sender_device_id}: {m.text}"


def conversation_json(c: Conversation) -> dict[str, object]:
    return {
        "conversation_id": c.conversation_id,
        "kind": c.kind.name,
        "name": c.name,
        "owner_id": c.owner_id,
        "member_ids": list(c.member_ids),
        "last_conv_seq": c.last_conv_seq,
    }


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

    unary = [_connection_options("cli")]
    p = sub.add_parser("sync", parents=unary, help="print your timeline after a seq")
    p.add_argument("--after", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--all", action="store_true", help="follow has_more to the end")

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
    return parser


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

        async def show() -> None:
            async for m in client.messages():
                if m.conversation_id != conv:
                    continue
                if m.sender_id == me and m.sender_device_id == device:
                    continue  # our own lines are on the screen already
                emit(out, args.json, message_json(m), message_line(m))

        def report(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                print(f"not sent: {fut.exception()}", file=sys.stderr)

        shower = asyncio.create_task(show())
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        _stdin_lines(asyncio.get_running_loop(), lines)
        try:
            while (line := await lines.get()) is not None:
                if line.strip():
                    client.submit(conv, line).add_done_callback(report)
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
                        await asyncio.shield(shower)
        finally:
            shower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shower
    return 0


async def cmd_sync(args: argparse.Namespace, out: TextIO) -> int:
    async with GatewayApi(args.address, _token(args), **_security(args)) as api:
        if args.all:
            messages = await api.sync_all(args.after, args.limit or 500)
        else:
            messages = (await api.sync(args.after, args.limit)).messages
    for m in messages:
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
            convs = await api.list_conversations()
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


COMMANDS = {
    "send": cmd_send,
    "listen": cmd_listen,
    "chat": cmd_chat,
    "sync": cmd_sync,
    "history": cmd_history,
    "group": cmd_group,
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
