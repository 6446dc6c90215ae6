"""Async Python client of seqsvc, for any team that needs sequence numbers.

    async with SeqClient("127.0.0.1:7000") as seq:
        v = await seq.next("u:alice")             # coalesced into NextBatch
        a, b = await seq.next_batch(["c:x", "c:x"])  # a < b
        first, last = await seq.reserve("job:42", 100)
        cur = await seq.current("u:alice")

Guarantees, as the service gives them: per key, every value is above every value
handed out before (across restarts of the service); values are never reused; gaps
are allowed. A caller's successive awaited calls for one key therefore see strictly
increasing values, whether or not they were coalesced with other callers' calls.

Routing: seqsvc may run as several active instances, each serving some of the
sections (a key's section is crc32(utf8(key)) % sections). The client reads the
routing table (`GetRouting`) from the address it was given (any instance, or a
Service in front of them), sends each key to the instance that serves its section,
splits batches by owner, and when an instance refuses a key it does not serve
(FAILED_PRECONDITION with the owner and the routing version), refreshes the table
and retries there. With a single instance, or a server without `GetRouting`,
every call goes to the given address, as before.

Errors: `SeqInvalidArgument` (a ValueError: bad key or count; never retried),
`SeqUnavailable` (still unavailable after `max_retries` retries with exponential
backoff and full jitter); with team namespaces, `SeqUnauthenticated` (no or a wrong
`token`), `SeqPermissionDenied` (a key outside the team's prefixes) and
`SeqQuotaExceeded` (over the team's quota; `retry_after_s` says when to try again);
`SeqError` for anything else. Retrying a call that timed
out is safe: the worst outcome is a gap.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc

from im.seqsvc.v1 import seqsvc_pb2 as pb
from im.seqsvc.v1 import seqsvc_pb2_grpc as pb_grpc
from seqsvc.keys import MAX_KEY_BYTES, InvalidArgument, key_bytes

T = TypeVar("T")

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Trailing metadata of a "not served here" refusal (see seqsvc.servicer).
_OWNER_MD, _VERSION_MD = "seqsvc-owner", "seqsvc-routing-version"
#: Refusals followed per call before giving up (a section moving between
#: instances is refused by both for a moment; backoff between them).
_MAX_MOVES = 16
_MOVE_BACKOFF_MAX_S = 0.2


@dataclass(frozen=True)
class _Table:
    version: int
    sections: int
    #: Per section, the address to call ('' while no instance holds it).
    owners: list[str]
    #: Every address in the table (to ask for a newer table if the given one fails).
    addresses: list[str]
    #: One address serves every section (no splitting needed).
    single: bool = False


def _refusal(exc: grpc.aio.AioRpcError) -> int | None:
    """The routing version of a "not served here" refusal, or None for another error."""
    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == _VERSION_MD:
            try:
                return int(value)
            except (TypeError, ValueError):
                return 0
    return None


class SeqError(Exception):
    """seqsvc failed in a way that is neither of the two below."""


class SeqUnavailable(SeqError):
    """seqsvc could not serve the call, even after retries. Retrying later is safe."""


class SeqInvalidArgument(SeqError, ValueError):
    """The service refuses this input whatever its state (bad key or count)."""


class SeqUnauthenticated(SeqError):
    """seqsvc has team namespaces and the client's token belongs to no team."""


class SeqPermissionDenied(SeqError):
    """A key outside the prefixes of the client's team (the message lists them)."""


class SeqQuotaExceeded(SeqError):
    """The team is over its quota. `retry_after_s`: when the same call would be
    admitted; None if it never would (more values than the team's burst)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _error_for(exc: grpc.aio.AioRpcError) -> SeqError:
    """The error of a status that is not retried."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return SeqInvalidArgument(details or "invalid argument")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SeqUnauthenticated(details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return SeqPermissionDenied(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        after = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
        seconds = int(after) / 1000 if isinstance(after, str) and after.isdigit() else None
        return SeqQuotaExceeded(details, seconds)
    return SeqError(f"seqsvc {code.name}: {details}")


def _check_key(key: str) -> None:
    # Fast path: a non-empty ASCII str of at most 128 chars is a valid key.
    if isinstance(key, str) and 0 < len(key) <= MAX_KEY_BYTES and key.isascii():
        return
    try:
        key_bytes(key)
    except InvalidArgument as exc:
        raise SeqInvalidArgument(str(exc)) from None


class SeqClient:
    """One grpc.aio channel to seqsvc, reused by every call.

    `next()` calls made concurrently (by any number of tasks) are coalesced into
    `NextBatch` requests: a batch is sent `coalesce_window_ms` after its first call
    (0: at the next turn of the event loop), or at once when it holds `max_batch`
    keys; while `max_in_flight` batches are outstanding, new calls queue for the next
    one, so batches grow with load. Each caller gets its own value.

    `token`: the team's bearer token, sent on every call (`authorization: Bearer`),
    for a seqsvc with team namespaces. `tls`: True for TLS with the system's root
    certificates, or `grpc.ssl_channel_credentials(...)` (a private CA, a client
    certificate); False: plaintext. `channel_factory(address, options)`, if given,
    makes the channel instead (e.g. one with tracing and TLS:
    `imcommon.telemetry.internal_channel`); `tls` is then ignored.

    `deadline_s` bounds each attempt; UNAVAILABLE and DEADLINE_EXCEEDED are retried
    up to `max_retries` times with exponential backoff (`backoff_base_s` doubling up to
    `backoff_max_s`) and full jitter.

    `address` is where the routing table is read (any instance, or a Service in
    front of them); each key then goes to its section's owner, one channel per
    instance. `observer(address, keys, values)`, if given, is called with every
    answer (for tests and audits: which instance handed out which value).
    """

    def __init__(
        self,
        address: str,
        *,
        coalesce_window_ms: float = 0.0,
        max_batch: int = 1000,
        max_in_flight: int = 4,
        deadline_s: float = 2.0,
        max_retries: int = 5,
        backoff_base_s: float = 0.02,
        backoff_max_s: float = 1.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        channel_factory: Callable[[str, list[tuple[str, Any]]], grpc.aio.Channel] | None = None,
        observer: Callable[[str, Sequence[str], Sequence[int]], None] | None = None,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
    ) -> None:
        if not address:
            raise ValueError("seqsvc address is empty (expected host:port)")
        if max_batch < 1 or max_in_flight < 1 or deadline_s <= 0 or max_retries < 0:
            raise ValueError("max_batch, max_in_flight, deadline_s must be positive")
        self.address = address
        self._window = coalesce_window_ms / 1000.0
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._deadline = deadline_s
        self._max_retries = max_retries
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self._options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            *channel_options,
        ]
        self._channel_factory = channel_factory
        self._observer = observer
        self._tls = tls
        self._metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {token}"),) if token else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SeqServiceStub | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.SeqServiceStub] = {}
        self._table: _Table | None = None
        #: True once the server said it has no GetRouting (an older seqsvc).
        self._unrouted = False
        self._table_lock = asyncio.Lock()
        self._table_failed_at = float("-inf")
        self._keys: list[str] = []
        self._futs: list[asyncio.Future[int]] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        #: NextBatch requests sent for coalesced next() calls (for tests and metrics).
        self.batches_sent = 0
        #: Routing tables fetched, and refusals followed (for tests and metrics).
        self.routing_refreshes = 0
        self.refusals_followed = 0

    async def __aenter__(self) -> SeqClient:
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def open(self) -> None:
        """Creates the channel; call from the event loop that will use the client."""
        if self._channel is None:
            self._loop = asyncio.get_running_loop()
            self._stub = self._stub_for(self.address)
            self._channel = self._channels[self.address]

    def _stub_for(self, address: str) -> pb_grpc.SeqServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            if self._channel_factory is not None:
                channel = self._channel_factory(address, list(self._options))
            elif self._tls:
                creds = self._tls if self._tls is not True else grpc.ssl_channel_credentials()
                channel = grpc.aio.secure_channel(address, creds, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
            stub = self._stubs[address] = pb_grpc.SeqServiceStub(channel)
        return stub

    async def close(self) -> None:
        """Fails queued calls with SeqUnavailable and closes the channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(self._futs, SeqUnavailable("SeqClient closed"))
        self._keys, self._futs = [], []
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    @property
    def stub(self) -> pb_grpc.SeqServiceStub:
        if self._stub is None or self._closed:
            raise SeqError("SeqClient is not open (use `async with SeqClient(...)`)")
        return self._stub

    # ---- calls -----------------------------------------------------------------

    async def next(self, key: str) -> int:
        """The next value of key (coalesced with concurrent calls)."""
        _check_key(key)
        loop = self._loop
        if loop is None or self._closed:
            raise SeqError("SeqClient is not open (use `async with SeqClient(...)`)")
        fut: asyncio.Future[int] = loop.create_future()
        self._keys.append(key)
        self._futs.append(fut)
        if len(self._keys) >= self._max_batch:
            self._flush()
        elif self._timer is None:
            if self._window > 0:
                self._timer = loop.call_later(self._window, self._flush)
            else:
                self._timer = loop.call_soon(self._flush)
        return await fut

    async def next_batch(self, keys: Sequence[str]) -> list[int]:
        """One value per key, in order; a repeated key gets increasing values.
        Keys of sections served by different instances are sent to each in one
        NextBatch per instance, concurrently."""
        for key in keys:
            _check_key(key)
        if not keys:
            return []
        self._check_open()
        return await self._routed_batch(list(keys))

    async def reserve(self, key: str, count: int) -> tuple[int, int]:
        """`count` consecutive values for key, as (first, last)."""
        _check_key(key)
        if count < 1:
            raise SeqInvalidArgument(f"count must be at least 1, got {count}")
        resp = await self._call(key, "Reserve", pb.ReserveRequest(key=key, count=count))
        return int(resp.first), int(resp.last)

    async def current(self, key: str) -> int:
        """The last value handed out for key (its floor if none since its section's
        owner took it). Does not advance."""
        _check_key(key)
        resp = await self._call(key, "Current", pb.CurrentRequest(key=key))
        return int(resp.value)

    async def next_unary(self, key: str) -> int:
        """The next value of key through one Next RPC (no coalescing)."""
        _check_key(key)
        resp = await self._call(key, "Next", pb.NextRequest(key=key))
        return int(resp.value)

    async def routing(self) -> tuple[int, dict[int, str]]:
        """(version, section -> owner address) of the routing table, freshly read."""
        self._check_open()
        await self._refresh(force=True)
        table = self._table
        if table is None:
            return 0, {}
        return table.version, dict(enumerate(table.owners))

    # ---- routing ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._stub is None or self._closed:
            raise SeqError("SeqClient is not open (use `async with SeqClient(...)`)")

    def _owner(self, key: str) -> str:
        table = self._table
        if table is None or table.sections <= 0:
            return self.address
        owner = table.owners[zlib.crc32(key.encode()) % table.sections]
        return owner or self.address

    async def _ensure_table(self) -> None:
        if (
            self._table is None
            and not self._unrouted
            and time.monotonic() - self._table_failed_at > 0.5
        ):
            await self._refresh(force=False)

    async def _refresh(self, force: bool, seen: int | None = None) -> None:
        """Reads the routing table from the given address, else from any instance
        it listed; keeps the newest. With `seen`, skips the read if the table has
        moved past that version meanwhile (another caller refreshed it)."""
        async with self._table_lock:
            table = self._table
            if not force and table is not None:
                return
            if seen is not None and table is not None and table.version > seen:
                return
            candidates = [self.address]
            if table is not None:
                candidates += [a for a in table.addresses if a != self.address]
            for address in candidates:
                try:
                    resp = await self._stub_for(address).GetRouting(
                        pb.GetRoutingRequest(),
                        timeout=min(self._deadline, 1.0),
                        metadata=self._metadata,
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED and address == self.address:
                        self._unrouted = True  # an older seqsvc: one instance
                        return
                    continue
                self.routing_refreshes += 1
                new = self._table_from(address, resp)
                if new is not None and (self._table is None or new.version >= self._table.version):
                    self._table = new
                return
            self._table_failed_at = time.monotonic()

    def _table_from(self, asked: str, resp: Any) -> _Table | None:
        sections = int(resp.sections)
        if sections <= 0 or len(resp.owner) != sections:
            return None
        addresses = [i.address for i in resp.instances]
        owners = [addresses[o] if 0 <= o < len(addresses) else "" for o in resp.owner]
        # One instance serving everything, and it is the one we asked: keep using
        # the address we were given (it may not be able to reach the advertised one).
        me = next((i.address for i in resp.instances if i.id == resp.self_id), None)
        if me is not None and all(o == me for o in owners):
            owners = [asked] * sections
        single = all(o == owners[0] for o in owners)
        return _Table(int(resp.version), sections, owners, sorted(set(addresses)), single)

    def _single(self) -> bool:
        table = self._table
        return table is None or table.single

    async def _after_error(
        self, exc: grpc.aio.AioRpcError, attempt: int, moves: int
    ) -> tuple[int, int]:
        """Decides what a failed attempt means: raises, or returns the (attempt,
        moves) counters for the next try, having waited and refreshed the routing
        table as needed."""
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise _error_for(exc) from None
        version = _refusal(exc)
        if version is not None:
            if moves >= _MAX_MOVES:
                raise SeqUnavailable(
                    f"seqsvc: still not served after {moves} moves: {exc.details()}"
                )
            self.refusals_followed += 1
            if moves:
                cap = min(_MOVE_BACKOFF_MAX_S, self._backoff_base * 2**moves)
                await asyncio.sleep(random.uniform(0, cap))
            # Another caller may have refreshed since this attempt: then that table
            # is at least as new, unless the refusal names a newer version.
            seen = self._table.version if self._table is not None else None
            if seen is not None and version > seen:
                seen = None
            await self._refresh(force=True, seen=seen)
            return attempt, moves + 1
        if code not in _RETRYABLE:
            raise _error_for(exc) from None
        if attempt >= self._max_retries:
            raise SeqUnavailable(
                f"seqsvc {code.name} after {attempt + 1} attempts: {exc.details()}"
            )
        delay = random.uniform(0, min(self._backoff_max, self._backoff_base * 2**attempt))
        await asyncio.sleep(delay)
        if not self._single():
            # The owner may be gone: its sections move once its lease expires.
            seen = self._table.version if self._table is not None else None
            await self._refresh(force=True, seen=seen)
        return attempt + 1, moves

    async def _call(self, key: str, method: str, request: Any) -> Any:
        """One unary call for `key`, at its section's owner, following moves."""
        self._check_open()
        await self._ensure_table()
        attempt = moves = 0
        while True:
            address = self._owner(key)
            try:
                resp = await getattr(self._stub_for(address), method)(
                    request, timeout=self._deadline, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                attempt, moves = await self._after_error(exc, attempt, moves)
                continue
            if self._observer is not None:
                if method == "Reserve":
                    values = list(range(resp.first, resp.last + 1))
                    self._observer(address, [key] * len(values), values)
                elif method == "Next":
                    self._observer(address, [key], [resp.value])
            return resp

    async def _routed_batch(self, keys: list[str]) -> list[int]:
        await self._ensure_table()
        values = [0] * len(keys)
        await self._fill(keys, list(range(len(keys))), values, 0, 0)
        return values

    def _split(self, keys: list[str], idx: list[int]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        if self._single():
            groups[self._owner(keys[idx[0]])] = idx
            return groups
        for i in idx:
            groups.setdefault(self._owner(keys[i]), []).append(i)
        return groups

    async def _fill(
        self, keys: list[str], idx: list[int], values: list[int], attempt: int, moves: int
    ) -> None:
        groups = self._split(keys, idx)
        if len(groups) == 1:
            ((address, part),) = groups.items()
            await self._fill_at(address, keys, part, values, attempt, moves)
        else:
            await asyncio.gather(
                *(
                    self._fill_at(address, keys, part, values, attempt, moves)
                    for address, part in groups.items()
                )
            )

    async def _fill_at(
        self,
        address: str,
        keys: list[str],
        idx: list[int],
        values: list[int],
        attempt: int,
        moves: int,
    ) -> None:
        """NextBatch of keys[idx] at `address`; on a refusal or a retry, re-splits
        them by the (refreshed) routing table. The server refuses a batch whole if
        any of its keys is not served there, so nothing is handed out twice."""
        sub = [keys[i] for i in idx]
        request = pb.NextBatchRequest(keys=sub)
        while True:
            try:
                resp = await self._stub_for(address).NextBatch(
                    request, timeout=self._deadline, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                attempt, moves = await self._after_error(exc, attempt, moves)
                groups = self._split(keys, idx)
                if list(groups) != [address]:
                    await self._fill(keys, idx, values, attempt, moves)
                    return
                continue
            got = resp.values
            if len(got) != len(idx):
                raise SeqError(f"seqsvc returned {len(got)} values for {len(idx)}")
            if self._observer is not None:
                self._observer(address, sub, list(got))
            for i, value in zip(idx, got, strict=True):
                values[i] = value
            return

    # ---- internals -------------------------------------------------------------

    def _flush(self) -> None:
        self._timer = None
        if not self._keys or self._closed:
            return
        if self._in_flight >= self._max_in_flight:
            return  # sent when a batch in flight completes
        keys, futs = self._keys[: self._max_batch], self._futs[: self._max_batch]
        del self._keys[: self._max_batch], self._futs[: self._max_batch]
        self._in_flight += 1
        self.batches_sent += 1
        task = asyncio.get_running_loop().create_task(self._send(keys, futs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if len(self._keys) >= self._max_batch:
            self._flush()

    async def _send(self, keys: list[str], futs: list[asyncio.Future[int]]) -> None:
        try:
            values = await self._routed_batch(keys)
        except asyncio.CancelledError:
            self._fail(futs, SeqUnavailable("SeqClient closed"))
            raise
        except SeqError as exc:
            self._fail(futs, exc)
        except Exception as exc:  # e.g. the channel closed under us
            self._fail(futs, SeqError(repr(exc)))
        else:
            if len(values) != len(futs):
                self._fail(futs, SeqError(f"seqsvc returned {len(values)} values for {len(futs)}"))
            else:
                for fut, value in zip(futs, values, strict=True):
                    if not fut.done():
                        fut.set_result(value)
        finally:
            self._in_flight -= 1
            if self._keys and self._timer is None and not self._closed:
                self._flush()

    @staticmethod
    def _fail(futs: Sequence[asyncio.Future[int]], exc: SeqError) -> None:
        for fut in futs:
            if not fut.done():
                fut.set_exception(copy.copy(exc))
