"""The gateway's unary calls (Sync, History, groups, the conversation list,
receipts, presence), shared by `Client` and the stream-less `GatewayApi`."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from im.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imclient.errors import AuthError, Unauthenticated, Unavailable, rpc_error
from imclient.tls import TLSConfig, Transport
from imclient.types import (
    Conversation,
    ConversationPage,
    HistoryPage,
    Message,
    Presence,
    Receipts,
    SyncPage,
)

TokenSource = str | Callable[[], str | Awaitable[str]]

# Client pings every 20 s (the gateway permits pings every 10 s or more) so dead
# peers and silently dropped NAT mappings are noticed without app traffic.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),
)


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """ "a:1,b:2" or ["a:1", "b:2"] -> ["a:1", "b:2"] (at least one)."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    out = [a.strip() for a in items if a and a.strip()]
    if not out:
        raise ValueError("at least one gateway address (host:port) is required")
    return out


async def resolve_token(token: TokenSource) -> str:
    if isinstance(token, str):
        value = token
    else:
        got = token()
        value = await got if inspect.isawaitable(got) else got
    if not value:
        raise AuthError("empty token")
    return value


class UnaryCalls:
    """Typed wrappers of the unary RPCs. Subclasses provide `_invoke`."""

    async def _invoke(self, method: str, request: Any, timeout: float | None) -> Any:
        raise NotImplementedError

    async def sync(
        self, after_seq: int = 0, limit: int = 0, timeout: float | None = 10.0
    ) -> SyncPage:
        """One page of the caller's timeline after `after_seq`, ascending, with the
        store epoch its seqs belong to. Does not touch the client's own cursor
        (the client syncs by itself)."""
        resp = await self._invoke(
            "Sync", gateway_pb2.SyncRequest(after_seq=after_seq, limit=limit), timeout
        )
        return SyncPage(
            [Message.from_pb(e.message, e.seq) for e in resp.entries],
            resp.has_more,
            resp.store_epoch,
        )

    async def sync_all(self, after_seq: int = 0, page_size: int = 500) -> list[Message]:
        """Every timeline entry after `after_seq`, following `has_more`."""
        out: list[Message] = []
        while True:
            page = await self.sync(after_seq, page_size)
            out.extend(page.messages)
            if not page.has_more or not page.messages:
                return out
            after_seq = page.messages[-1].seq

    async def history(
        self,
        conversation_id: str,
        before_conv_seq: int = 0,
        limit: int = 50,
        timeout: float | None = 10.0,
    ) -> HistoryPage:
        """Messages of a conversation the caller belongs to, newest first."""
        resp = await self._invoke(
            "History",
            gateway_pb2.HistoryRequest(
                conversation_id=conversation_id, before_conv_seq=before_conv_seq, limit=limit
            ),
            timeout,
        )
        return HistoryPage([Message.from_pb(m) for m in resp.messages], resp.has_more)

    async def create_group(
        self, name: str, member_ids: Sequence[str] = (), timeout: float | None = 10.0
    ) -> Conversation:
        """Creates a group; the caller becomes its owner and a member."""
        resp = await self._invoke(
            "CreateGroup",
            gateway_pb2.CreateGroupRequest(name=name, member_ids=list(member_ids)),
            timeout,
        )
        return Conversation.from_pb(resp.conversation)

    async def add_members(
        self, conversation_id: str, member_ids: Sequence[str], timeout: float | None = 10.0
    ) -> Conversation:
        resp = await self._invoke(
            "AddMembers",
            gateway_pb2.AddMembersRequest(
                conversation_id=conversation_id, member_ids=list(member_ids)
            ),
            timeout,
        )
        return Conversation.from_pb(resp.conversation)

    async def remove_members(
        self, conversation_id: str, member_ids: Sequence[str], timeout: float | None = 10.0
    ) -> Conversation:
        resp = await self._invoke(
            "RemoveMembers",
            gateway_pb2.RemoveMembersRequest(
                conversation_id=conversation_id, member_ids=list(member_ids)
            ),
            timeout,
        )
        return Conversation.from_pb(resp.conversation)

    async def list_conversations(
        self, page_size: int = 0, page_token: str = "", timeout: float | None = 10.0
    ) -> ConversationPage:
        """One page of the caller's groups and direct conversations, most recent
        activity first, each with the caller's read position and unread count
        (`Conversation`). `page_size` 0 is the server's default (100; at most
        500); pass the page's `next_page_token` for the next ("" = done).
        `conversations()` follows the pages. A server from before paging
        answers everything in one page."""
        resp = await self._invoke(
            "ListConversations",
            gateway_pb2.ListConversationsRequest(page_size=page_size, page_token=page_token),
            timeout,
        )
        convs = [Conversation.from_pb(c) for c in resp.conversations]
        self._on_conversations(convs)
        return ConversationPage(convs, resp.next_page_token)

    async def conversations(self, page_size: int = 0) -> AsyncIterator[Conversation]:
        """Every conversation of the caller, following `list_conversations()`'s
        pages to the end. Pages are read as iterated; activity between them
        can move a conversation across a page boundary (the server's order is
        by last activity), so a conversation may show up twice or, having
        moved to an earlier page, not at all: key on `conversation_id`."""
        token = ""
        while True:
            page = await self.list_conversations(page_size, token)
            for c in page.conversations:
                yield c
            if not page.next_page_token or not page.conversations:
                return
            token = page.next_page_token

    def _on_conversations(self, conversations: list[Conversation]) -> None:
        """A hook for `Client` (seeds its conversation states)."""

    async def get_receipts(
        self,
        conversation_id: str,
        conv_seq: int,
        list_readers: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = 10.0,
    ) -> Receipts:
        """Read receipts of message `conv_seq`: how many of the current members
        other than its sender have read it (`Receipts`: "read by N of M", the
        sender in neither), and with `list_readers` one page of who
        (`page_size` 0 = 100, at most 1000; `next_page_token` for the next).
        The caller must be a current member (PermissionDenied otherwise)."""
        resp = await self._invoke(
            "GetReceipts",
            gateway_pb2.GetReceiptsRequest(
                conversation_id=conversation_id,
                conv_seq=conv_seq,
                list_readers=list_readers,
                page_size=page_size,
                page_token=page_token,
            ),
            timeout,
        )
        return Receipts(
            resp.member_count,
            resp.read_count,
            list(resp.reader_ids),
            resp.next_page_token,
            resp.delivered,
        )

    async def readers(
        self, conversation_id: str, conv_seq: int, page_size: int = 0
    ) -> AsyncIterator[str]:
        """Every user who has read message `conv_seq`, by user id, following
        `get_receipts(list_readers=True)`'s pages."""
        token = ""
        while True:
            page = await self.get_receipts(conversation_id, conv_seq, True, page_size, token)
            for user in page.reader_ids:
                yield user
            if not page.next_page_token or not page.reader_ids:
                return
            token = page.next_page_token

    async def get_presence(
        self, user_ids: Sequence[str], timeout: float | None = 10.0
    ) -> list[Presence]:
        """Online state and last seen of `user_ids` (at most 200), in that
        order. Each must share a conversation with the caller: one stranger
        and the whole call is PermissionDenied, nothing answered."""
        resp = await self._invoke(
            "GetPresence", gateway_pb2.GetPresenceRequest(user_ids=list(user_ids)), timeout
        )
        return [Presence.from_pb(p) for p in resp.presences]


async def invoke_on(
    channel: grpc.aio.Channel,
    token: str,
    method: str,
    request: Any,
    timeout: float | None,
    transport: Transport | None = None,
    address: str = "",
) -> Any:
    """Calls `Gateway.<method>` on `channel` (connected to `address`), mapping
    failures to typed errors (a failed TLS handshake to TLSError, described by
    `transport`)."""
    stub = gateway_pb2_grpc.GatewayStub(channel)
    try:
        return await getattr(stub, method)(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=timeout
        )
    except grpc.aio.AioRpcError as exc:
        tls = transport.error(exc, address) if transport is not None else None
        raise (tls or rpc_error(exc, address or None)) from exc


class GatewayApi(UnaryCalls):
    """The unary calls without a stream: no Connect, so it never replaces a
    device's live connection. `async with GatewayApi(addresses, token) as api:`.

    TLS with the system's trusted CAs unless `tls` (`TLSConfig`: a CA file, a
    server name) says otherwise; plaintext only with `insecure=True`
    (`imclient.tls`). A failed TLS handshake raises `TLSError` at once.
    On UNAVAILABLE it tries the next address once round the list.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        token: TokenSource,
        channel_options: Sequence[tuple[str, Any]] = DEFAULT_CHANNEL_OPTIONS,
        *,
        tls: TLSConfig | None = None,
        insecure: bool = False,
    ) -> None:
        self._transport = Transport(tls, insecure)
        self._addresses = parse_addresses(addresses)
        self._token = token
        self._options = list(channel_options)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._index = 0

    async def __aenter__(self) -> GatewayApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close(grace=None)

    async def _invoke(self, method: str, request: Any, timeout: float | None) -> Any:
        token = await resolve_token(self._token)
        last: Exception | None = None
        for _ in range(len(self._addresses)):
            address = self._addresses[self._index % len(self._addresses)]
            channel = self._channels.get(address)
            if channel is None:
                channel = self._transport.channel(address, self._options)
                self._channels[address] = channel
            try:
                return await invoke_on(
                    channel, token, method, request, timeout, self._transport, address
                )
            except Unauthenticated:
                raise
            except Unavailable as exc:
                last = exc
                self._index += 1
        assert last is not None
        raise last
