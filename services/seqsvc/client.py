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
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from im.seqsvc.v1 import seqsvc_pb2 as pb
from im.seqsvc.v1 import seqsvc_pb2_grpc as pb_grpc
from seqsvc.keys import MAX_KEY_BYTES, InvalidArgument, key_bytes

T = TypeVar("T")

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


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


def _refusal(exc: grpc.aio.AioRpcError) -> SeqError:
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
        self._tls = tls
        self._metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {token}"),) if token else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SeqServiceStub | None = None
        self._keys: list[str] = []
        self._futs: list[asyncio.Future[int]] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        #: NextBatch requests sent for coalesced next() calls (for tests and metrics).
        self.batches_sent = 0

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
            if self._channel_factory is not None:
                self._channel = self._channel_factory(self.address, list(self._options))
            elif self._tls:
                creds = self._tls if self._tls is not True else grpc.ssl_channel_credentials()
                self._channel = grpc.aio.secure_channel(self.address, creds, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._stub = pb_grpc.SeqServiceStub(self._channel)

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
        if self._channel is not None:
            await self._channel.close()

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
        """One value per key, in order; a repeated key gets increasing values."""
        for key in keys:
            _check_key(key)
        if not keys:
            return []
        resp = await self._invoke(self.stub.NextBatch, pb.NextBatchRequest(keys=list(keys)))
        return list(resp.values)

    async def reserve(self, key: str, count: int) -> tuple[int, int]:
        """`count` consecutive values for key, as (first, last)."""
        _check_key(key)
        if count < 1:
            raise SeqInvalidArgument(f"count must be at least 1, got {count}")
        resp = await self._invoke(self.stub.Reserve, pb.ReserveRequest(key=key, count=count))
        return int(resp.first), int(resp.last)

    async def current(self, key: str) -> int:
        """The last value handed out for key (its floor if none since the service
        started). Does not advance."""
        _check_key(key)
        resp = await self._invoke(self.stub.Current, pb.CurrentRequest(key=key))
        return int(resp.value)

    async def next_unary(self, key: str) -> int:
        """The next value of key through one Next RPC (no coalescing)."""
        _check_key(key)
        resp = await self._invoke(self.stub.Next, pb.NextRequest(key=key))
        return int(resp.value)

    # ---- internals -------------------------------------------------------------

    async def _invoke(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self._deadline, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in _RETRYABLE:
                    raise _refusal(exc) from None
                if attempt >= self._max_retries:
                    raise SeqUnavailable(
                        f"seqsvc {code.name} after {attempt + 1} attempts: {exc.details()}"
                    ) from None
            delay = random.uniform(0, min(self._backoff_max, self._backoff_base * 2**attempt))
            attempt += 1
            await asyncio.sleep(delay)

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
            resp = await self._invoke(self.stub.NextBatch, pb.NextBatchRequest(keys=keys))
        except asyncio.CancelledError:
            self._fail(futs, SeqUnavailable("SeqClient closed"))
            raise
        except SeqError as exc:
            self._fail(futs, exc)
        except Exception as exc:  # e.g. the channel closed under us
            self._fail(futs, SeqError(repr(exc)))
        else:
            values = resp.values
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
