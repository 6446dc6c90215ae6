"""The sequence allocator: WeChat seqsvr's sections plus Leaf's double buffer.

State, per instance:
- `cur[key]`: the last value handed out for a key, in memory only (bounded, see
  `max_keys`);
- per section (keys map to sections by a stable hash): `ceiling`, the persisted
  max_seq this instance has seen committed; `high`, the highest value handed out
  in the section; `base`, where a key that is not in memory resumes.

Guarantees (invariant I6):
- A value is handed out only if it is <= its section's committed ceiling, so after
  any crash the next owner, which starts every key of the section at that ceiling or
  above, never repeats or goes below a value handed out before.
- Per key, values strictly increase: `cur[key]` only grows, and a key that is not in
  memory resumes at its section's `base`, which is >= every value the key was ever
  given (the persisted ceiling at start, raised to the last value of every key
  evicted since).
- Only the owner of the current fencing epoch raises a ceiling (`extend` is
  conditional on the epoch), and an instance serves only while its lease, renewed in
  the background, is valid; so two instances never serve one section at once.
- A live lease is never taken from a process that may still be alive, not even by
  one with the same instance id: that needs the lease's own boot nonce, or proof
  that its holder is gone (see `Allocator.start`). A twin with the same id that is
  seen renewing the lease makes `start` raise `DuplicateInstance`.

The hot path (`next_nowait`, and `next`/`next_batch`/`reserve` while there is
headroom) never awaits: the database is written by one background refill task, at
most one reservation in flight at a time, started when a section's headroom falls
below the prefetch threshold. Callers wait only when headroom is exhausted, and get
`Unavailable` (retryable) if the store is down or does not answer in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from seqsvc.keys import InvalidArgument, key_bytes

log = logging.getLogger(__name__)

#: An instance stops serving this fraction of the lease before it runs out, so a
#: clock running a little slow cannot make it serve past the moment another
#: instance may take over.
LEASE_SAFETY = 0.8


class Unavailable(Exception):
    """The call cannot be served now; retrying later is safe (no value was given)."""


class Fenced(Exception):
    """Another instance took the sections over: this one must stop serving them."""


class DuplicateInstance(Exception):
    """Another live process uses this instance's id: this one must not start."""


@dataclass(frozen=True)
class Boot:
    """One start of one process, as recorded with the lease it holds."""

    #: Random per start: tells this start's lease from any other's, including an
    #: earlier process with the same instance id.
    nonce: str
    #: The address this process listens on, named so that it is unique on a
    #: machine while someone listens there ('<boot id>/<network namespace>/
    #: <host>:<port>'); '' when unknown, which proves nothing. The process binds it
    #: before it takes the lease and keeps it while it serves, so another process
    #: that has bound the same listener knows the holder no longer serves.
    listener: str = ""


@dataclass(frozen=True)
class Grant:
    """Ownership of every section, taken at start in one transaction."""

    epoch: int
    #: Per section, max_seq as it was before this start: every value ever handed out
    #: for any key of the section is <= it.
    floors: list[int]
    #: Per section, max_seq as committed by the acquiring transaction.
    ceilings: list[int]


@dataclass(frozen=True)
class Busy:
    """Another live instance holds the lease."""

    owner: str
    lease_remaining_s: float
    #: The holder's `Boot` ('' for a holder that recorded none).
    nonce: str = ""
    listener: str = ""
    #: When the lease ends, on the store's clock: it grows only when the holder
    #: renews, i.e. is alive.
    lease_until: float = 0.0


class SectionStore(Protocol):
    """Where section ceilings and ownership persist (PostgreSQL in production, a
    dict in unit tests). Every method either commits durably before it returns or
    raises; a raised error may still have committed (callers treat the result as
    unknown and never use a value they have not seen committed)."""

    async def acquire(
        self,
        owner: str,
        sections: int,
        step: int,
        lease_s: float,
        boot: Boot,
        takeover_from: str = "",
    ) -> Grant | Busy:
        """Takes every section if the lease has expired (or was released), is held
        by this same `boot`, or is held under `owner` by the boot whose nonce is
        `takeover_from` (non-empty: the caller proved that process gone). Taking
        them bumps the fencing epoch, raises every max_seq by `step` and records
        `owner` and `boot` with the lease. If the stored section count differs from
        `sections`, first resets every section to the highest old max_seq (so
        re-hashing keys cannot lower anyone's ceiling). Otherwise returns Busy."""
        ...

    async def extend(self, epoch: int, amounts: Mapping[int, int]) -> dict[int, int]:
        """Raises max_seq of each section by its amount, only where the section still
        belongs to `epoch`. Returns the new max_seq of the sections it raised."""
        ...

    async def renew(self, epoch: int, lease_s: float) -> bool:
        """Extends the lease of `epoch`; False if another epoch owns the sections."""
        ...

    async def release(self, epoch: int) -> None:
        """Ends the lease of `epoch` now, so a standby can take over at once."""
        ...


class _Section:
    __slots__ = (
        "base",
        "ceiling",
        "factor",
        "high",
        "index",
        "need",
        "requested",
        "reserved_at",
        "room",
        "threshold",
    )

    def __init__(self, index: int, floor: int, ceiling: int, threshold: int, now: float) -> None:
        self.index = index
        self.base = floor
        self.high = floor
        self.ceiling = ceiling
        self.requested = False
        self.need = 0  # values wanted by callers waiting for this section
        self.room: asyncio.Future[bool] | None = None
        self.factor = 1  # this section's step is factor * step (adaptive)
        self.threshold = threshold  # prefetch once headroom < threshold
        self.reserved_at = now


_STARTING, _SERVING, _FENCED, _CLOSED = "starting", "serving", "fenced", "closed"


class Allocator:
    """Per-key sequence numbers over a `SectionStore`. Use: `await start()`, run
    `run()` as a background task, serve, `await close()`."""

    def __init__(
        self,
        store: SectionStore,
        *,
        sections: int,
        step: int,
        prefetch_ratio: float = 0.5,
        max_step_factor: int = 64,
        step_target_s: float = 1.0,
        max_batch: int = 10_000,
        max_reserve: int = 1_000_000,
        max_keys: int = 1_000_000,
        wait_timeout_s: float = 5.0,
        store_timeout_s: float = 2.0,
        retry_min_s: float = 0.05,
        retry_max_s: float = 2.0,
        lease_s: float = 10.0,
        standby_poll_s: float = 1.0,
        instance_id: str = "seqsvc",
        boot: Boot | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._n = sections
        self._step = step
        self._ratio = prefetch_ratio
        self._threshold = max(1, int(step * prefetch_ratio))
        self._max_factor = max_step_factor
        self._step_target = step_target_s
        self._max_batch = max_batch
        self._max_reserve = max_reserve
        self._max_keys = max_keys
        self._evict_batch = max(1, max_keys // 256)
        self._wait_timeout = wait_timeout_s
        self._store_timeout = store_timeout_s
        self._retry_min = retry_min_s
        self._retry_max = retry_max_s
        self._lease_s = lease_s
        self._standby_poll = standby_poll_s
        self._instance_id = instance_id
        self._boot = boot or Boot(secrets.token_hex(16))
        self._clock = clock

        self._state = _STARTING
        self._why = "seqsvc is starting"
        self._epoch = 0
        self._lease_deadline = 0.0
        self._sections: list[_Section] = []
        self._cur: dict[str, int] = {}
        self._requested: list[_Section] = []
        self._wanted = asyncio.Event()
        self._store_down = False
        self._tasks: list[asyncio.Task[None]] = []
        #: Counters for metrics (plain ints: the hot path must stay cheap).
        self.evictions = 0
        self.store_writes = 0
        self.store_failures = 0
        self.waits = 0
        self.allocated = 0
        #: Called with the seconds each step reservation (store write) took.
        self.on_store_write: Callable[[float], None] = lambda _s: None

    # ---- lifecycle -------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self._state is _SERVING and self._clock() < self._lease_deadline

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def keys_in_memory(self) -> int:
        return len(self._cur)

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Takes ownership of every section, waiting (standby) while another live
        instance holds the lease and retrying while the store is unreachable.
        Returns False if `stop` was set first.

        A lease held under this instance's own id by another start (a restart, or a
        twin started by mistake) is taken over at once only if its holder is proved
        gone: it recorded the same listener as this process, which this process has
        bound, so the holder no longer listens there and, since an instance stops
        serving before it closes its listener, no longer serves. Otherwise this
        start waits for the lease to expire, like a standby; if it sees the holder
        renew the lease meanwhile, the holder is alive and shares this id, and
        DuplicateInstance is raised (the lease is left alone)."""
        backoff = self._retry_min
        takeover_from = ""
        twin: tuple[str, float] | None = None  # (nonce, lease_until) of a same-id holder
        while stop is None or not stop.is_set():
            t0 = self._clock()
            tried_takeover, takeover_from = takeover_from, ""
            try:
                async with asyncio.timeout(self._store_timeout * 2):
                    got = await self._store.acquire(
                        self._instance_id,
                        self._n,
                        self._step,
                        self._lease_s,
                        self._boot,
                        tried_takeover,
                    )
            except Exception as exc:
                log.warning(
                    "cannot take the sections yet; retrying",
                    extra={"error": repr(exc), "retry_in_s": round(backoff, 3)},
                )
                wait = backoff
                backoff = min(backoff * 2, self._retry_max)
            else:
                if isinstance(got, Grant):
                    self._install(got, t0)
                    return True
                wait = min(self._standby_poll, max(0.01, got.lease_remaining_s))
                if got.owner != self._instance_id:
                    log.info(
                        "standby: the sections are leased by another instance",
                        extra={
                            "owner": got.owner,
                            "lease_remaining_s": round(got.lease_remaining_s, 3),
                        },
                    )
                elif got.listener and got.listener == self._boot.listener and not tried_takeover:
                    log.info(
                        "taking over from an earlier process with this instance id: "
                        "it listened where this process listens now, so it is gone",
                        extra={"owner": got.owner, "listener": got.listener},
                    )
                    takeover_from = got.nonce
                    continue
                elif twin is not None and twin[0] == got.nonce and got.lease_until > twin[1]:
                    raise DuplicateInstance(
                        f"instance id {self._instance_id!r} is in use by another live "
                        "process: it renewed the lease on the sections while this one "
                        "waited. Give every instance its own id (IM_SEQSVC_INSTANCE_ID; "
                        "default hostname:port)"
                    )
                else:
                    if twin is None or twin[0] != got.nonce:
                        log.warning(
                            "the sections are leased under this instance id by another "
                            "process that cannot be proved gone: waiting for its lease to "
                            "expire (and refusing to start if it renews it)",
                            extra={
                                "owner": got.owner,
                                "lease_remaining_s": round(got.lease_remaining_s, 3),
                            },
                        )
                    twin = (got.nonce, got.lease_until)
            if stop is None:
                await asyncio.sleep(wait)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await stop.wait()
        return False

    def _install(self, grant: Grant, t0: float) -> None:
        if len(grant.floors) != self._n or len(grant.ceilings) != self._n:
            raise RuntimeError("store returned a grant for a different number of sections")
        self._epoch = grant.epoch
        now = self._clock()
        self._sections = [
            _Section(i, floor, ceiling, self._threshold, now)
            for i, (floor, ceiling) in enumerate(zip(grant.floors, grant.ceilings, strict=True))
        ]
        self._cur.clear()
        self._lease_deadline = t0 + self._lease_s * LEASE_SAFETY
        self._state = _SERVING
        log.info("serving all sections", extra={"epoch": grant.epoch, "sections": self._n})

    async def run(self) -> None:
        """The background work: refill reservations and renew the lease. Returns on
        close(); raises Fenced if another instance took the sections over (the
        process should exit and come back as a standby)."""
        if self._state is not _SERVING:
            return
        self._tasks = [
            asyncio.create_task(self._refill_loop(), name="seqsvc-refill"),
            asyncio.create_task(self._lease_loop(), name="seqsvc-lease"),
        ]
        try:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stops serving, then ends the lease so a standby may take over at once.
        Idempotent."""
        if self._state is _CLOSED:
            return
        was_serving = self._state is _SERVING
        self._state = _CLOSED
        self._why = "seqsvc is shutting down"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_waiters(self._sections)
        if was_serving:
            try:
                async with asyncio.timeout(self._store_timeout):
                    await self._store.release(self._epoch)
            except Exception as exc:
                log.warning("could not release the lease", extra={"error": repr(exc)})

    def _fence(self, why: str) -> None:
        self._state = _FENCED
        self._why = why
        self._fail_waiters(self._sections)
        log.error("fenced: no longer serving", extra={"epoch": self._epoch, "reason": why})

    # ---- the API ---------------------------------------------------------------

    def _section(self, key: str) -> _Section:
        return self._sections[zlib.crc32(key_bytes(key)) % self._n]

    def _check_serving(self) -> None:
        if self._state is not _SERVING:
            raise Unavailable(self._why)
        if self._clock() >= self._lease_deadline:
            raise Unavailable("seqsvc cannot renew its lease on the sections (store unreachable)")

    def _take(self, key: str, sec: _Section, n: int) -> int | None:
        """Hands out `n` consecutive values for key and returns the first, or returns
        None if the section's committed ceiling is too low. Never awaits."""
        self._check_serving()
        cur = self._cur.get(key)
        if cur is None:
            cur = sec.base
            last = cur + n
            if last > sec.ceiling:
                return None
            if len(self._cur) >= self._max_keys:
                self._evict()
        else:
            last = cur + n
            if last > sec.ceiling:
                return None
        self._cur[key] = last
        self.allocated += n
        if last > sec.high:
            sec.high = last
            if sec.ceiling - last < sec.threshold and not sec.requested:
                self._request(sec)
        return cur + 1

    def _evict(self) -> None:
        """Forgets the oldest keys. An evicted key resumes at its section's base,
        which is raised here to at least the key's last value."""
        victims = list(itertools.islice(self._cur, self._evict_batch))
        for key in victims:
            last = self._cur.pop(key)
            sec = self._section(key)
            if last > sec.base:
                sec.base = last
        self.evictions += len(victims)

    async def _take_waiting(self, key: str, sec: _Section, n: int) -> int:
        """The slow path: waits for the section's ceiling to be raised."""
        self.waits += 1
        deadline = self._clock() + self._wait_timeout
        while True:
            first = self._take(key, sec, n)
            if first is not None:
                return first
            if self._store_down:
                raise Unavailable(
                    "the store is unreachable and this key's section has no reserved "
                    "values left; retry later"
                )
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise Unavailable("timed out waiting for the store to reserve more values")
            if sec.room is None or sec.room.done():
                sec.room = asyncio.get_running_loop().create_future()
            room = sec.room
            sec.need += n
            self._request(sec)
            try:
                async with asyncio.timeout(remaining):
                    ok = await asyncio.shield(room)
            except TimeoutError:
                raise Unavailable(
                    "timed out waiting for the store to reserve more values"
                ) from None
            finally:
                sec.need -= n
            if not ok:
                self._check_serving()
                raise Unavailable(
                    "the store did not reserve more values for this key's section; retry later"
                )

    def next_nowait(self, key: str) -> int | None:
        """The next value of key, or None if the caller would have to wait."""
        return self._take(key, self._section(key), 1)

    async def next(self, key: str) -> int:
        """The next value of key: above every value handed out for it before.
        Raises InvalidArgument or Unavailable."""
        sec = self._section(key)
        first = self._take(key, sec, 1)
        if first is None:
            first = await self._take_waiting(key, sec, 1)
        return first

    async def next_batch(self, keys: Sequence[str]) -> list[int]:
        """One value per entry, in order; a repeated key gets increasing values in
        the order it appears. All keys are validated before any is advanced."""
        if len(keys) > self._max_batch:
            raise InvalidArgument(
                f"batch has {len(keys)} keys; the limit is {self._max_batch} per call"
            )
        n = self._n
        crc = zlib.crc32
        sections = self._sections
        try:
            secs = [sections[crc(key_bytes(k)) % n] for k in keys]
        except InvalidArgument as exc:
            bad = next(i for i, k in enumerate(keys) if not _valid(k))
            raise InvalidArgument(f"keys[{bad}]: {exc}") from None
        out: list[int] = []
        append = out.append
        take = self._take
        for key, sec in zip(keys, secs, strict=True):
            v = take(key, sec, 1)
            if v is None:
                v = await self._take_waiting(key, sec, 1)
            append(v)
        return out

    async def reserve(self, key: str, count: int) -> tuple[int, int]:
        """`count` consecutive values for key, as (first, last)."""
        if count < 1 or count > self._max_reserve:
            raise InvalidArgument(f"count must be between 1 and {self._max_reserve}, got {count}")
        sec = self._section(key)
        first = self._take(key, sec, count)
        if first is None:
            first = await self._take_waiting(key, sec, count)
        return first, first + count - 1

    def current(self, key: str) -> int:
        """The last value handed out for key, or the value it resumes after (its
        section's base) if this instance has not given it any. Does not advance."""
        sec = self._section(key)
        self._check_serving()
        cur = self._cur.get(key)
        return sec.base if cur is None else cur

    # ---- background ------------------------------------------------------------

    def _request(self, sec: _Section) -> None:
        if not sec.requested:
            sec.requested = True
            self._requested.append(sec)
            self._wanted.set()

    def _amount(self, sec: _Section) -> int:
        """How far to raise a section: its step, or enough for every waiting caller
        plus the prefetch threshold, rounded up to whole steps."""
        step = self._step * sec.factor
        deficit = sec.need + sec.threshold - (sec.ceiling - sec.high)
        steps = max(1, -(-deficit // step))
        return steps * step

    def _adapt(self, sec: _Section) -> None:
        """Leaf's dynamic step: a section that used its last reservation up in less
        than step_target_s doubles its step (up to max_step_factor), one that took
        over ten times as long halves it. So a hot section writes about once per
        step_target_s at most, and its prefetch threshold (a share of its step) buys
        the reservation enough time to commit before the headroom runs out."""
        now = self._clock()
        elapsed, sec.reserved_at = now - sec.reserved_at, now
        if elapsed < self._step_target and sec.factor < self._max_factor:
            sec.factor *= 2
        elif elapsed > 10 * self._step_target and sec.factor > 1:
            sec.factor //= 2
        else:
            return
        sec.threshold = max(1, int(self._step * sec.factor * self._ratio))

    @staticmethod
    def _wake(sec: _Section, ok: bool) -> None:
        room, sec.room = sec.room, None
        if room is not None and not room.done():
            room.set_result(ok)

    def _fail_waiters(self, sections: Sequence[_Section]) -> None:
        for sec in sections:
            self._wake(sec, False)

    async def _refill_loop(self) -> None:
        backoff = self._retry_min
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            if self._state is not _SERVING:
                return
            batch, self._requested = self._requested, []
            if not batch:
                continue
            amounts = {sec.index: self._amount(sec) for sec in batch}
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._store_timeout):
                    raised = await self._store.extend(self._epoch, amounts)
            except Exception as exc:
                if not self._store_down:
                    log.warning("store write failed; retrying", extra={"error": repr(exc)})
                self.store_failures += 1
                self._store_down = True
                self._fail_waiters(batch)
                self._requested.extend(batch)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._retry_max)
                self._wanted.set()
                continue
            self.store_writes += 1
            self.on_store_write(time.perf_counter() - started)
            if self._store_down:
                log.info("store reachable again")
            self._store_down = False
            backoff = self._retry_min
            lost = [i for i in amounts if i not in raised]
            if lost:
                self._fence(f"sections {lost[:5]} now belong to another epoch")
                raise Fenced(f"another instance owns the sections (this epoch {self._epoch})")
            for sec in batch:
                new = raised[sec.index]
                if new > sec.ceiling:
                    sec.ceiling = new
                sec.requested = False
                self._adapt(sec)
                self._wake(sec, True)
                # Waiters that still lack room re-request themselves once they ran.
                if sec.ceiling - sec.high < sec.threshold:
                    self._request(sec)
            await asyncio.sleep(0)  # let the woken callers take their values first

    async def _lease_loop(self) -> None:
        interval = self._lease_s / 4
        wait = interval
        while True:
            await asyncio.sleep(wait)
            if self._state is not _SERVING:
                return
            t0 = self._clock()
            try:
                async with asyncio.timeout(self._store_timeout):
                    ok = await self._store.renew(self._epoch, self._lease_s)
            except Exception as exc:
                log.warning("lease renewal failed", extra={"error": repr(exc)})
                wait = min(interval, self._retry_max)
                continue
            if not ok:
                self._fence("the lease belongs to another epoch")
                raise Fenced(f"another instance owns the sections (this epoch {self._epoch})")
            self._lease_deadline = t0 + self._lease_s * LEASE_SAFETY
            wait = interval


def _valid(key: str) -> bool:
    try:
        key_bytes(key)
    except InvalidArgument:
        return False
    return True
