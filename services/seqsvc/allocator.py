"""The sequence allocator: WeChat seqsvr's sections plus Leaf's double buffer,
spread over several active instances (WeChat's AllocSvr sets).

State, per instance:
- `cur[key]`: the last value handed out for a key, in memory only (bounded, see
  `max_keys`);
- per section (keys map to sections by a stable hash): whether this instance holds
  it, under which fencing `epoch` and until when (`deadline`, its own monotonic
  clock); `ceiling`, the persisted max_seq this instance has seen committed; `high`,
  the highest value handed out in the section; `base`, where a key that is not in
  memory (or was last given a value under an earlier ownership) resumes.

Guarantees (invariant I6):
- A value is handed out only if it is <= its section's committed ceiling, so the
  next owner of the section, which starts every key of it at its persisted max_seq,
  never repeats or goes below a value handed out before.
- Per key, values strictly increase: `cur[key]` only grows, and a key resumes at
  least at its section's `base`, which is >= every value the key was ever given
  (the persisted ceiling when this instance took the section, raised to the last
  value of every key evicted since).
- Each section has its own lease and fencing epoch in the store. Only the owner of
  a section's current epoch raises its ceiling (`extend` is conditional on the
  epoch), and an instance serves a section only while its own clock says the lease
  it last renewed is valid, with a margin (see `LEASE_SAFETY`); another instance
  takes the section only after the lease ran out by the store's clock, or was
  released after the holder stopped serving it. So two instances never serve one
  section at once.
- A live registration is never taken from a process that may still be alive, not
  even by one with the same instance id: that needs the registration's own boot
  nonce, or proof that its holder is gone (see `Allocator.start`). A twin with the
  same id that is seen renewing makes `start` raise `DuplicateInstance`.

Balancing: every live instance aims at ceil(sections / live instances) sections.
An instance above that releases the surplus (it stops serving first); one below
claims free sections (released, or whose lease expired). A graceful stop releases
everything and leaves the registry, so the others claim at once; a dead instance's
sections are claimed when their leases expire.

The hot path (`next_nowait`, and `next`/`next_batch`/`reserve` while there is
headroom) never awaits: the database is written by one background refill task, at
most one reservation in flight at a time, started when a section's headroom falls
below the prefetch threshold. Callers wait only when headroom is exhausted, and get
`Unavailable` (retryable) if the store is down or does not answer in time, or
`NotOwner` (go to the owner) for a section this instance does not hold.
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
from dataclasses import dataclass, field
from typing import Protocol

from seqsvc.keys import InvalidArgument, key_bytes

log = logging.getLogger(__name__)

#: An instance stops serving a section this fraction of the lease after the start
#: of its last successful renewal (its own monotonic clock), while the store's
#: lease runs the whole lease from the moment the renewal executes, which is later.
#: The rest (20%) absorbs a clock that runs slower than the store's.
LEASE_SAFETY = 0.8


class Unavailable(Exception):
    """The call cannot be served now; retrying later is safe (no value was given)."""


class NotOwner(Exception):
    """This instance does not serve the key's section; nothing was handed out.
    `owner` is the address of the instance that does ('' while nobody holds it,
    e.g. during a move), as of routing table `version`."""

    def __init__(self, section: int, owner: str, version: int) -> None:
        self.section = section
        self.owner = owner
        self.version = version
        where = f"its owner is {owner}" if owner else "it is moving between instances"
        super().__init__(
            f"section {section} is not served by this instance: {where} "
            f"(routing version {version}); refresh the routing table (GetRouting) and retry"
        )


class Fenced(Exception):
    """Another process registered under this instance's id: this one must stop."""


class DuplicateInstance(Exception):
    """Another live process uses this instance's id: this one must not start."""


@dataclass(frozen=True)
class Boot:
    """One start of one process, as recorded with its registration."""

    #: Random per start: tells this start's registration from any other's,
    #: including an earlier process with the same instance id.
    nonce: str
    #: The address this process listens on, named so that it is unique on a
    #: machine while someone listens there ('<boot id>/<network namespace>/
    #: <host>:<port>'); '' when unknown, which proves nothing. The process binds it
    #: before it registers and keeps it while it serves, so another process that
    #: has bound the same listener knows the holder no longer serves.
    listener: str = ""


@dataclass(frozen=True)
class Registered:
    """This start is in the registry of live instances."""

    version: int


@dataclass(frozen=True)
class Busy:
    """This instance cannot register yet: another live process holds its id (a
    restart waiting for its predecessor, or a twin), or something else must end
    first (`owner` says what)."""

    owner: str
    lease_remaining_s: float
    #: The holder's `Boot` ('' for a holder that recorded none).
    nonce: str = ""
    listener: str = ""
    #: When the holder's registration ends, on the store's clock: it grows only
    #: when the holder renews it, i.e. is alive.
    lease_until: float = 0.0


@dataclass(frozen=True)
class Claimed:
    """A section taken by `SectionStore.claim`."""

    section: int
    epoch: int
    #: max_seq before the claim: every value ever handed out for the section is <= it.
    floor: int
    #: max_seq as committed by the claim.
    ceiling: int


@dataclass(frozen=True)
class Renewed:
    #: False: another process has registered under this instance id.
    registered: bool
    #: The sections whose lease was renewed (those still held under the given epoch).
    sections: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Status:
    """What balancing needs, in one small read."""

    version: int
    #: Instances whose registration is live (this one included, if it is).
    live: int
    #: Sections no live lease holds: claimable.
    free: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Routing:
    """Which instance serves which section."""

    version: int
    sections: int
    #: (instance id, address) of every live instance.
    instances: list[tuple[str, str]]
    #: Per section, the index in `instances` of its owner, or -1.
    owner: list[int]

    def address(self, section: int) -> str:
        i = self.owner[section] if 0 <= section < len(self.owner) else -1
        return self.instances[i][1] if i >= 0 else ""


class SectionStore(Protocol):
    """Where section ceilings, leases and the registry persist (PostgreSQL in
    production, a dict in unit tests). Every method either commits durably before it
    returns or raises; a raised error may still have committed (callers treat the
    result as unknown and never use a value they have not seen committed)."""

    async def register(
        self,
        instance: str,
        address: str,
        sections: int,
        lease_s: float,
        boot: Boot,
        takeover_from: str = "",
    ) -> Registered | Busy:
        """Records this start as a live instance, unless `instance` is registered
        live by another start that is not the boot whose nonce is `takeover_from`
        (non-empty: the caller proved that process gone; its section leases are
        ended too). Creates the section rows if missing; if the stored section count
        differs from `sections`, re-sections (every new section starts at the highest
        old max_seq, under a new epoch) when no other instance and no lease is live,
        and returns Busy otherwise. Bumps the routing version."""
        ...

    async def claim(
        self, instance: str, boot: Boot, sections: Sequence[int], step: int, lease_s: float
    ) -> list[Claimed]:
        """Takes those of `sections` that no live lease holds: bumps each one's
        epoch, raises its max_seq by `step`, leases it to `instance`, renews the
        registration and bumps the routing version. Raises Fenced if another start
        holds the registration."""
        ...

    async def renew(
        self, instance: str, address: str, boot: Boot, epochs: Mapping[int, int], lease_s: float
    ) -> Renewed:
        """Extends the registration and the lease of each section still held under
        the given epoch."""
        ...

    async def release(
        self, instance: str, boot: Boot, epochs: Mapping[int, int], leave: bool
    ) -> None:
        """Ends the lease of each section still held under the given epoch, and with
        `leave` the registration too, so other instances claim them at once."""
        ...

    async def extend(self, epochs: Mapping[int, int], amounts: Mapping[int, int]) -> dict[int, int]:
        """Raises max_seq of each section by its amount, only where the section still
        belongs to its epoch. Returns the new max_seq of the sections it raised."""
        ...

    async def status(self) -> Status: ...

    async def routing(self) -> Routing: ...


class _Section:
    __slots__ = (
        "base",
        "ceiling",
        "deadline",
        "epoch",
        "factor",
        "held",
        "high",
        "index",
        "need",
        "requested",
        "reserved_at",
        "room",
        "served_from",
        "threshold",
    )

    def __init__(self, index: int, threshold: int) -> None:
        self.index = index
        self.held = False
        self.epoch = 0
        #: Serve only while clock() < deadline (0 when not held).
        self.deadline = 0.0
        self.served_from = 0.0
        self.base = 0
        self.high = 0
        self.ceiling = 0
        self.requested = False
        self.need = 0  # values wanted by callers waiting for this section
        self.room: asyncio.Future[bool] | None = None
        self.factor = 1  # this section's step is factor * step (adaptive)
        self.threshold = threshold  # prefetch once headroom < threshold
        self.reserved_at = 0.0


_STARTING, _SERVING, _CLOSED = "starting", "serving", "closed"


class Allocator:
    """Per-key sequence numbers over a `SectionStore`. Use: `await start()` (which
    registers, starts the background work and takes a share of the sections), run
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
        routing_poll_s: float = 0.1,
        instance_id: str = "seqsvc",
        address: str = "",
        boot: Boot | None = None,
        clock: Callable[[], float] = time.monotonic,
        unsafe_serve_past_lease: bool = False,
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
        self._routing_poll = routing_poll_s
        self._instance_id = instance_id
        self._address = address
        self._boot = boot or Boot(secrets.token_hex(16))
        self._clock = clock
        self._unsafe = unsafe_serve_past_lease

        self._state = _STARTING
        self._why = "seqsvc is starting"
        self._registered = False
        self._reg_deadline = 0.0
        self._sections = [_Section(i, self._threshold) for i in range(sections)]
        self._held: set[int] = set()
        self._live = 0
        self._free: list[int] = []
        self._routing = Routing(0, sections, [], [-1] * sections)
        self._cur: dict[str, int] = {}
        self._requested: list[_Section] = []
        self._wanted = asyncio.Event()
        self._changed = asyncio.Event()
        self._store_down = False
        self._tasks: list[asyncio.Task[None]] = []
        #: Counters for metrics (plain ints: the hot path must stay cheap).
        self.evictions = 0
        self.store_writes = 0
        self.store_failures = 0
        self.waits = 0
        self.allocated = 0
        self.claims = 0
        self.releases = 0
        self.losses = 0
        #: Called with the seconds each step reservation (store write) took.
        self.on_store_write: Callable[[float], None] = lambda _s: None
        #: Called whenever the window in which this instance serves a section
        #: changes: (section, epoch, serving since, serving until), in this
        #: allocator's clock. Called before a window is extended and when it ends
        #: (`until` is then the moment it ended), so a log of it never shows less
        #: than what was served.
        self.on_window: Callable[[int, int, float, float], None] = lambda *_a: None

    # ---- lifecycle -------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """True while this instance is registered and can renew its leases."""
        return self._state is _SERVING and self._clock() < self._reg_deadline

    @property
    def epoch(self) -> int:
        """The highest fencing epoch among the sections this instance holds."""
        return max((self._sections[i].epoch for i in self._held), default=0)

    @property
    def held(self) -> frozenset[int]:
        """The sections this instance holds (and serves while their leases are valid)."""
        return frozenset(self._held)

    @property
    def routing(self) -> Routing:
        """The routing table as last read from the store."""
        return self._routing

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def keys_in_memory(self) -> int:
        return len(self._cur)

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Registers this instance, starts the background work (lease renewal,
        balancing, refills) and waits until it holds at least one section (or cannot
        hold any: more live instances than sections). Retries while the store is
        unreachable; returns False if `stop` was set first.

        A registration held under this instance's own id by another start (a
        restart, or a twin started by mistake) is taken over at once only if its
        holder is proved gone: it recorded the same listener as this process, which
        this process has bound, so the holder no longer listens there and, since an
        instance stops serving before it closes its listener, no longer serves.
        Otherwise this start waits for that registration to expire; if it sees the
        holder renew it meanwhile, the holder is alive and shares this id, and
        DuplicateInstance is raised (nothing is changed)."""
        if not await self._register(stop):
            return False
        self._state = _SERVING
        self._tasks = [
            asyncio.create_task(self._refill_loop(), name="seqsvc-refill"),
            asyncio.create_task(self._lease_loop(), name="seqsvc-lease"),
            asyncio.create_task(self._balance_loop(), name="seqsvc-balance"),
        ]
        while stop is None or not stop.is_set():
            if self._held or (self._live > self._n):
                return True
            failed = [t for t in self._tasks if t.done()]
            if failed:
                await self._tasks_result(failed)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._routing_poll):
                    await self._changed.wait()
        return False

    async def _register(self, stop: asyncio.Event | None) -> bool:
        backoff = self._retry_min
        takeover_from = ""
        twin: tuple[str, float] | None = None  # (nonce, lease_until) of a same-id holder
        while stop is None or not stop.is_set():
            t0 = self._clock()
            tried_takeover, takeover_from = takeover_from, ""
            try:
                async with asyncio.timeout(self._store_timeout * 2):
                    got = await self._store.register(
                        self._instance_id,
                        self._address,
                        self._n,
                        self._lease_s,
                        self._boot,
                        tried_takeover,
                    )
            except Exception as exc:
                log.warning(
                    "cannot register yet; retrying",
                    extra={"error": repr(exc), "retry_in_s": round(backoff, 3)},
                )
                wait = backoff
                backoff = min(backoff * 2, self._retry_max)
            else:
                if isinstance(got, Registered):
                    self._registered = True
                    self._reg_deadline = t0 + self._lease_s * LEASE_SAFETY
                    log.info(
                        "registered",
                        extra={"instance": self._instance_id, "address": self._address},
                    )
                    return True
                wait = min(self._standby_poll, max(0.01, got.lease_remaining_s))
                if got.owner != self._instance_id:
                    log.info(
                        "waiting to register",
                        extra={
                            "reason": got.owner,
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
                        "process: it renewed its registration while this one waited. "
                        "Give every instance its own id (IM_SEQSVC_INSTANCE_ID; "
                        "default hostname:port)"
                    )
                else:
                    if twin is None or twin[0] != got.nonce:
                        log.warning(
                            "this instance id is registered by another process that cannot "
                            "be proved gone: waiting for its registration to expire (and "
                            "refusing to start if it renews it)",
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

    async def run(self) -> None:
        """Waits on the background work started by `start()`. Returns on close();
        raises Fenced if another process registered under this instance's id (the
        process should exit)."""
        if not self._tasks:
            return
        try:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
            await self._tasks_result(done)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @staticmethod
    async def _tasks_result(done: Sequence[asyncio.Task[None]] | set[asyncio.Task[None]]) -> None:
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def close(self) -> None:
        """Stops serving, then releases every section and leaves the registry, so
        the other instances claim the sections at once. Idempotent."""
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        self._why = "seqsvc is shutting down"
        epochs = {i: self._sections[i].epoch for i in self._held}
        for i in list(self._held):
            self._drop(self._sections[i], "shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._registered:
            try:
                async with asyncio.timeout(self._store_timeout):
                    await self._store.release(self._instance_id, self._boot, epochs, leave=True)
            except Exception as exc:
                log.warning("could not release the sections", extra={"error": repr(exc)})
            else:
                log.info("released every section and left", extra={"sections": len(epochs)})

    def _install(self, c: Claimed, t0: float) -> None:
        """Starts serving a claimed section: every key of it resumes at the floor."""
        sec = self._sections[c.section]
        if sec.held:
            self._drop(sec, "claimed again under a new epoch")
        now = self._clock()
        sec.epoch = c.epoch
        sec.base = c.floor
        sec.high = c.floor
        sec.ceiling = c.ceiling
        sec.factor = 1
        sec.threshold = self._threshold
        sec.reserved_at = now
        sec.need = 0
        sec.served_from = now
        deadline = t0 + self._lease_s * LEASE_SAFETY
        self.on_window(sec.index, sec.epoch, now, deadline)
        sec.held = True
        sec.deadline = deadline
        self._held.add(sec.index)
        self.claims += 1

    def _drop(self, sec: _Section, why: str) -> None:
        """Stops serving a section (at once; callers waiting on it fail)."""
        if not sec.held:
            return
        now = self._clock()
        end = now if self._unsafe else min(now, sec.deadline)
        sec.held = False
        sec.deadline = 0.0
        self._held.discard(sec.index)
        self.on_window(sec.index, sec.epoch, sec.served_from, end)
        self._wake(sec, False)
        if why.startswith("lost"):
            self.losses += 1
            log.warning(
                "section lost", extra={"section": sec.index, "epoch": sec.epoch, "why": why}
            )
        else:
            log.debug("section dropped", extra={"section": sec.index, "why": why})

    # ---- the API ---------------------------------------------------------------

    def _section(self, key: str) -> _Section:
        return self._sections[zlib.crc32(key_bytes(key)) % self._n]

    def _refusal(self, sec: _Section) -> Exception:
        """Why `sec` is not served now: Unavailable or NotOwner."""
        if self._state is not _SERVING:
            return Unavailable(self._why)
        if sec.held:
            if self._unsafe:
                return Unavailable("unreachable")
            return Unavailable("seqsvc cannot renew its lease on the section (store unreachable)")
        owner = self._routing.address(sec.index)
        if owner == self._address:
            owner = ""  # our table is older than the move
        return NotOwner(sec.index, owner, self._routing.version)

    def _serves(self, sec: _Section) -> bool:
        if self._unsafe:
            return sec.held
        return self._clock() < sec.deadline

    def _take(self, key: str, sec: _Section, n: int) -> int | None:
        """Hands out `n` consecutive values for key and returns the first, or returns
        None if the section's committed ceiling is too low. Never awaits. Raises
        Unavailable or NotOwner if this instance does not serve the section now."""
        if not self._serves(sec):
            raise self._refusal(sec)
        cur = self._cur.get(key)
        if cur is None:
            cur = sec.base
            last = cur + n
            if last > sec.ceiling:
                return None
            if len(self._cur) >= self._max_keys:
                self._evict()
        else:
            if cur < sec.base:
                # Given under an earlier ownership of the section (or before keys
                # evicted since): resume above everything given since.
                cur = sec.base
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
            if last > sec.base and sec.held:
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
                if not self._serves(sec):
                    raise self._refusal(sec)
                raise Unavailable(
                    "the store did not reserve more values for this key's section; retry later"
                )

    def next_nowait(self, key: str) -> int | None:
        """The next value of key, or None if the caller would have to wait."""
        return self._take(key, self._section(key), 1)

    async def next(self, key: str) -> int:
        """The next value of key: above every value handed out for it before.
        Raises InvalidArgument, NotOwner or Unavailable."""
        sec = self._section(key)
        first = self._take(key, sec, 1)
        if first is None:
            first = await self._take_waiting(key, sec, 1)
        return first

    async def next_batch(self, keys: Sequence[str]) -> list[int]:
        """One value per entry, in order; a repeated key gets increasing values in
        the order it appears. All keys are validated, and all their sections checked
        to be served here, before any is advanced: a batch with a key of a section
        this instance does not serve is refused whole (NotOwner)."""
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
        if self._unsafe:
            for sec in secs:
                if not sec.held:
                    raise self._refusal(sec)
        else:
            now = self._clock()
            for sec in secs:
                if now >= sec.deadline:
                    raise self._refusal(sec)
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
        section's base) if this instance has not given it any since it took the
        section. Does not advance."""
        sec = self._section(key)
        if not self._serves(sec):
            raise self._refusal(sec)
        cur = self._cur.get(key)
        return sec.base if cur is None or cur < sec.base else cur

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
            for sec in batch:
                if not sec.held:
                    sec.requested = False
            batch = [sec for sec in batch if sec.held]
            if not batch:
                continue
            amounts = {sec.index: self._amount(sec) for sec in batch}
            epochs = {sec.index: sec.epoch for sec in batch}
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._store_timeout):
                    raised = await self._store.extend(epochs, amounts)
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
            for sec in batch:
                sec.requested = False
                if not sec.held or sec.epoch != epochs[sec.index]:
                    continue  # moved meanwhile: the claim reset it
                new = raised.get(sec.index)
                if new is None:
                    self._drop(sec, "lost: the section belongs to a newer epoch")
                    continue
                if new > sec.ceiling:
                    sec.ceiling = new
                self._adapt(sec)
                self._wake(sec, True)
                # Waiters that still lack room re-request themselves once they ran.
                if sec.ceiling - sec.high < sec.threshold:
                    self._request(sec)
            await asyncio.sleep(0)  # let the woken callers take their values first

    async def _lease_loop(self) -> None:
        """Renews the registration and every held section's lease every lease/4."""
        interval = self._lease_s / 4
        wait = interval
        while True:
            await asyncio.sleep(wait)
            if self._state is not _SERVING:
                return
            t0 = self._clock()
            epochs = {i: self._sections[i].epoch for i in self._held}
            try:
                async with asyncio.timeout(self._store_timeout):
                    got = await self._store.renew(
                        self._instance_id, self._address, self._boot, epochs, self._lease_s
                    )
            except Exception as exc:
                log.warning("lease renewal failed", extra={"error": repr(exc)})
                wait = min(interval, self._retry_max)
                continue
            if not got.registered:
                for i in list(self._held):
                    self._drop(self._sections[i], "lost: another process took this id")
                self._state = _CLOSED
                self._why = "another process registered under this instance id"
                raise Fenced(self._why)
            deadline = t0 + self._lease_s * LEASE_SAFETY
            self._reg_deadline = deadline
            for i, epoch in epochs.items():
                sec = self._sections[i]
                if not sec.held or sec.epoch != epoch:
                    continue
                if i in got.sections:
                    if deadline > sec.deadline:
                        self.on_window(i, epoch, sec.served_from, deadline)
                        sec.deadline = deadline
                else:
                    self._drop(sec, "lost: its lease was taken by another instance")
            wait = interval

    async def _balance_loop(self) -> None:
        """Every routing_poll_s: reads the routing version, the live instances and
        the free sections; reloads the routing table when its version moved; claims
        free sections up to this instance's share, or releases the surplus."""
        backoff = self._retry_min
        while True:
            try:
                async with asyncio.timeout(self._store_timeout):
                    await self._balance_once()
            except Fenced:
                raise
            except Exception as exc:
                log.warning("balancing failed; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._retry_max)
                continue
            backoff = self._retry_min
            self._changed.set()
            await asyncio.sleep(self._routing_poll)

    async def _balance_once(self) -> None:
        if self._state is not _SERVING:
            return
        st = await self._store.status()
        self._live = st.live
        self._free = st.free
        if st.version != self._routing.version:
            self._routing = await self._store.routing()
        target = -(-self._n // max(1, st.live))
        held = sorted(self._held)
        if len(held) > target:
            surplus = held[target:]
            epochs = {i: self._sections[i].epoch for i in surplus}
            for i in surplus:
                self._drop(self._sections[i], "released: more than this instance's share")
            await self._store.release(self._instance_id, self._boot, epochs, leave=False)
            self.releases += len(surplus)
            log.info("released sections", extra={"sections": surplus, "target": target})
        elif len(held) < target and st.free:
            want = random.sample(st.free, min(len(st.free), target - len(held)))
            t0 = self._clock()
            claimed = await self._store.claim(
                self._instance_id, self._boot, want, self._step, self._lease_s
            )
            if self._state is not _SERVING:
                return
            for c in claimed:
                self._install(c, t0)
            if claimed:
                self._reg_deadline = max(self._reg_deadline, t0 + self._lease_s * LEASE_SAFETY)
                log.info(
                    "claimed sections",
                    extra={"sections": sorted(c.section for c in claimed), "target": target},
                )
        else:
            return
        self._routing = await self._store.routing()


def _valid(key: str) -> bool:
    try:
        key_bytes(key)
    except InvalidArgument:
        return False
    return True
