"""Unit tests of the allocator against the in-memory SectionStore."""

from __future__ import annotations

import asyncio
import itertools
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from seqsvc_memstore import MemStore

from seqsvc.allocator import Allocator, Boot, DuplicateInstance, NotOwner, Unavailable
from seqsvc.keys import InvalidArgument

Factory = Callable[..., Awaitable[Allocator]]


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.001)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    made: list[tuple[Allocator, asyncio.Task[None]]] = []

    async def factory(store: MemStore, run: bool = True, **kw: Any) -> Allocator:
        kw.setdefault("sections", 4)
        kw.setdefault("step", 100)
        kw.setdefault("retry_min_s", 0.001)
        kw.setdefault("retry_max_s", 0.01)
        kw.setdefault("routing_poll_s", 0.005)
        alloc = Allocator(store, **kw)
        assert await alloc.start()
        made.append((alloc, asyncio.create_task(alloc.run() if run else asyncio.sleep(0))))
        return alloc

    yield factory
    for alloc, task in made:
        await alloc.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def section(key: str, sections: int = 4) -> int:
    return zlib.crc32(key.encode()) % sections


async def test_values_increase_per_key_and_batches_keep_order(make: Factory) -> None:
    alloc = await make(MemStore())
    last: dict[str, int] = {}
    for i in range(2000):
        key = f"k{i % 7}"
        v = await alloc.next(key)
        assert v > last.get(key, 0)
        last[key] = v
    values = await alloc.next_batch(["a", "b", "a", "a", "k1"])
    assert values[0] < values[2] < values[3]
    assert values[4] > last["k1"]
    first, end = await alloc.reserve("a", 50)
    assert first > values[3] and end == first + 49
    assert await alloc.next("a") == end + 1
    assert alloc.current("a") == end + 1


async def test_never_beyond_the_committed_ceiling(make: Factory) -> None:
    store = MemStore()
    store.gate = asyncio.Event()  # no reservation commits until we say so
    alloc = await make(store, step=100, prefetch_ratio=0.5, wait_timeout_s=0.05)
    given: list[tuple[str, int]] = []
    for i in range(400):
        key = f"k{i % 3}"
        v = alloc.next_nowait(key)
        if v is None:
            break
        given.append((key, v))
    # Stopped exactly at the ceiling committed at start, none above it.
    for key, v in given:
        assert v <= store.max_seq[section(key)]
    with pytest.raises(Unavailable):
        await alloc.next("k0")  # waits for the reservation, times out
    store.gate.set()
    v = await alloc.next("k0")
    assert v <= store.max_seq[section("k0")]


async def test_double_buffer_reserves_before_the_boundary(make: Factory) -> None:
    store = MemStore()
    store.gate = asyncio.Event()
    alloc = await make(store, sections=1, step=100, prefetch_ratio=0.5)
    assert store.extend_calls == 0
    for _ in range(51):  # headroom falls below 50: the next step is reserved
        assert alloc.next_nowait("k") is not None
    await wait_until(lambda: store.extend_calls == 1)
    store.gate.set()
    await wait_until(lambda: store.max_seq[0] == 200)
    # The boundary at 100 passes without any caller having to wait.
    for _ in range(140):
        assert alloc.next_nowait("k") is not None
    assert store.max_in_flight == 1


async def test_one_reservation_in_flight_and_waiters_all_served(make: Factory) -> None:
    store = MemStore()
    alloc = await make(store, sections=2, step=10, prefetch_ratio=0.5)
    keys = [f"k{i % 20}" for i in range(1000)]
    values = await asyncio.gather(*(alloc.next(k) for k in keys))
    seen: dict[str, set[int]] = {}
    for k, v in zip(keys, values, strict=True):
        assert v not in seen.setdefault(k, set())
        seen[k].add(v)
    assert store.max_in_flight == 1
    for k, vs in seen.items():
        assert max(vs) <= store.max_seq[section(k, 2)]


async def test_store_down_unavailable_then_resumes_by_itself(make: Factory) -> None:
    store = MemStore()
    alloc = await make(store, sections=1, step=20, wait_timeout_s=1.0)
    store.down = True
    ceiling = store.max_seq[0]
    got = []
    with pytest.raises(Unavailable):
        for _ in range(100):
            got.append(await alloc.next("k"))
    assert got and max(got) <= ceiling  # served from headroom, never past it
    store.down = False
    await wait_until(lambda: store.max_seq[0] > ceiling)
    assert await alloc.next("k") > max(got)


async def test_a_section_taken_over_is_dropped_and_refused_with_its_owner(make: Factory) -> None:
    """Its lease lapses unseen (say it stalled past it) and another instance claims
    the section: the first stops serving it, refuses with the new owner, and the
    new owner continues above."""
    store = MemStore()
    alloc = await make(store, sections=1, step=10, lease_s=1.0, instance_id="a")
    before = [await alloc.next("k") for _ in range(3)]
    store.expire("a")
    other = await make(store, sections=1, step=10, instance_id="b", address="b:1")
    await wait_until(lambda: not alloc.held)  # the refill or the renewal noticed
    await wait_until(lambda: alloc.routing.address(0) == "b:1")
    with pytest.raises(NotOwner) as refused:
        await alloc.next("k")
    assert refused.value.owner == "b:1" and refused.value.section == 0
    assert await other.next("k") > max(before)


async def test_lease_expiry_stops_serving_until_renewed(make: Factory) -> None:
    clock = FakeClock()
    store = MemStore(clock)
    alloc = await make(store, sections=1, step=1000, lease_s=0.2, clock=clock)
    assert await alloc.next("k") >= 1
    store.down = True
    clock.now += 0.17  # past LEASE_SAFETY * lease without a renewal
    with pytest.raises(Unavailable, match="lease"):
        await alloc.next("k")
    store.down = False
    await wait_until(lambda: alloc.serving, timeout=10)
    await wait_until(lambda: alloc.next_nowait("k") is not None, timeout=10)


async def test_instances_split_the_sections_and_hand_over_on_close(make: Factory) -> None:
    """A second instance takes half of the sections from the first (which releases
    them first); a key's values continue above across the move; a closed
    instance's sections go to the one left."""
    store = MemStore()
    first = await make(store, sections=8, step=100, instance_id="a", address="a:1", lease_s=30)
    assert len(first.held) == 8
    last = {f"k{i}": await first.next(f"k{i}") for i in range(40)}
    second = await make(store, sections=8, step=100, instance_id="b", address="b:1", lease_s=30)
    await wait_until(lambda: len(first.held) == 4 and len(second.held) == 4)
    assert first.held.isdisjoint(second.held)
    for key, value in last.items():
        owner = first if section(key, 8) in first.held else second
        other = second if owner is first else first
        with pytest.raises(NotOwner):
            await other.next(key)  # refused, nothing handed out
        last[key] = await owner.next(key)
        assert last[key] > value
    await second.close()
    await wait_until(lambda: len(first.held) == 8)
    for key, value in last.items():
        assert await first.next(key) > value


async def test_a_batch_with_a_key_served_elsewhere_is_refused_whole(make: Factory) -> None:
    store = MemStore()
    a = await make(store, sections=8, step=100, instance_id="a", address="a:1")
    b = await make(store, sections=8, step=100, instance_id="b", address="b:1")
    await wait_until(lambda: len(a.held) == 4 and len(b.held) == 4)
    mine = next(f"k{i}" for i in range(100) if section(f"k{i}", 8) in a.held)
    theirs = next(f"k{i}" for i in range(100) if section(f"k{i}", 8) in b.held)
    before = a.current(mine)
    with pytest.raises(NotOwner):
        await a.next_batch([mine, mine, theirs])
    assert a.current(mine) == before  # nothing advanced


async def test_same_id_twin_that_renews_is_refused_and_the_holder_keeps_serving(
    make: Factory,
) -> None:
    """A second start under a live holder's instance id never registers: once it
    sees the holder renew, it raises DuplicateInstance, and the holder keeps its
    sections and serves on."""
    store = MemStore()
    holder = await make(store, sections=1, step=100, instance_id="x", lease_s=0.2)
    last = await holder.next("k")
    epoch = holder.epoch
    twin = Allocator(store, sections=1, step=100, instance_id="x", standby_poll_s=0.01)
    with pytest.raises(DuplicateInstance, match="'x' is in use by another live process"):
        await asyncio.wait_for(twin.start(), 5)
    assert store.section_epoch[0] == epoch
    assert holder.serving
    assert await holder.next("k") == last + 1


async def test_same_id_on_the_same_listener_takes_over_at_once(make: Factory) -> None:
    """A restart that has bound the listener its predecessor recorded has proved it
    gone: it takes over without waiting for the (long) lease."""
    store = MemStore()
    crashed = await make(
        store, sections=1, step=100, instance_id="x", lease_s=60,
        boot=Boot("n1", "boot/net:[1]/127.0.0.1:5000"),
    )  # fmt: skip
    last = await crashed.next("k")
    for task in crashed._tasks:  # it "crashes": no renewal, no release
        task.cancel()
    restarted = await asyncio.wait_for(
        make(
            store, sections=1, step=100, instance_id="x", lease_s=60,
            boot=Boot("n2", "boot/net:[1]/127.0.0.1:5000"),
        ),
        5,
    )  # fmt: skip
    assert store.instances["x"].nonce == "n2"
    assert await restarted.next("k") > last


async def test_same_id_elsewhere_waits_for_the_lease_to_expire(make: Factory) -> None:
    """A restart that cannot prove its predecessor gone (another listener, or none
    known) waits for the old registration to expire, then continues above every
    value handed out before."""
    clock = FakeClock()
    store = MemStore(clock)
    crashed = await make(
        store, sections=1, step=100, instance_id="x", lease_s=10, clock=clock,
        boot=Boot("n1", "boot/net:[1]/127.0.0.1:5000"),
    )  # fmt: skip
    last = await crashed.next("k")
    for task in crashed._tasks:
        task.cancel()
    restarted = Allocator(
        store, sections=1, step=100, instance_id="x", standby_poll_s=0.01, clock=clock,
        boot=Boot("n2", "boot/net:[1]/127.0.0.1:5001"),
    )  # fmt: skip
    starting = asyncio.create_task(restarted.start())
    calls = store.register_calls
    await wait_until(lambda: store.register_calls >= calls + 3)
    assert not starting.done()  # still waiting: nothing proves "n1" gone
    clock.now += 10
    assert await asyncio.wait_for(starting, 5)
    assert store.instances["x"].nonce == "n2"
    assert await restarted.next("k") > last
    await restarted.close()


async def test_restart_and_resectioning_never_go_back(make: Factory) -> None:
    store = MemStore()
    alloc = await make(store, sections=4, step=50)
    top: dict[str, int] = {}
    for i in range(3000):
        key = f"k{i % 13}"
        top[key] = await alloc.next(key)
    await alloc.close()
    again = await make(store, sections=4, step=50)
    for key, v in top.items():
        assert await again.next(key) > v
        top[key] = again.current(key)
    await again.close()
    resectioned = await make(store, sections=7, step=50)
    for key, v in top.items():
        assert await resectioned.next(key) > v


async def test_eviction_bounds_memory_and_keeps_keys_increasing(make: Factory) -> None:
    alloc = await make(MemStore(), sections=8, step=1000, max_keys=1000)
    last: dict[str, int] = {}
    for round_ in range(3):
        for i in range(5000):
            key = f"user{i}"
            v = await alloc.next(key)
            assert v > last.get(key, 0), (round_, key)
            last[key] = v
            assert alloc.current(key) == v
        assert alloc.keys_in_memory <= 1000
    assert alloc.evictions >= 10_000


async def test_invalid_input_is_refused_and_changes_nothing(make: Factory) -> None:
    alloc = await make(MemStore(), max_batch=10, max_reserve=100)
    v = await alloc.next("ok")
    bad_keys = ["", "x" * 129, "é" * 65, "\ud800"]
    for key in bad_keys:
        with pytest.raises(InvalidArgument):
            await alloc.next(key)
    assert await alloc.next("é" * 64) >= 1  # 128 bytes is allowed
    with pytest.raises(InvalidArgument, match=r"keys\[1\]"):
        await alloc.next_batch(["ok", ""])
    with pytest.raises(InvalidArgument, match="limit is 10"):
        await alloc.next_batch(["ok"] * 11)
    for count in (0, -1, 101):
        with pytest.raises(InvalidArgument):
            await alloc.reserve("ok", count)
    assert await alloc.next("ok") == v + 1  # the refused batch advanced nothing


async def test_reserve_larger_than_a_step_is_one_contiguous_range(make: Factory) -> None:
    store = MemStore()
    alloc = await make(store, sections=1, step=100)
    before = await alloc.next("k")
    first, last = await alloc.reserve("k", 1000)
    assert first == before + 1 and last == first + 999
    assert last <= store.max_seq[0]
    assert await alloc.next("k") == last + 1
    assert alloc.waits == 1  # one wait, served by one larger reservation


async def test_hot_sections_grow_their_step_and_cold_ones_shrink_it(make: Factory) -> None:
    clock = FakeClock()
    store = MemStore(clock)
    alloc = await make(
        store, sections=1, step=100, max_step_factor=8, step_target_s=1.0, clock=clock,
        lease_s=1e9,
    )  # fmt: skip

    async def use_up_one_reservation() -> int:
        before = store.extend_calls
        while store.extend_calls == before:
            await alloc.next("k")
            await asyncio.sleep(0)
        await wait_until(lambda: not store.in_flight)
        return store.history[-1][1]

    ceilings = [store.max_seq[0]]
    for _ in range(6):  # hot: each step used up at once
        ceilings.append(await use_up_one_reservation())
    amounts = [b - a for a, b in itertools.pairwise(ceilings)]
    assert amounts == [100, 200, 400, 800, 800, 800]  # doubles up to 8 * step
    for _ in range(2):  # cold: a step lasts longer than 10 * step_target_s
        clock.now += 20
        ceilings.append(await use_up_one_reservation())
    assert [b - a for a, b in itertools.pairwise(ceilings[-3:])] == [800, 400]
