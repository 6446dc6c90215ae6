"""An in-memory `SectionStore` with the same semantics as the PostgreSQL one
(per-section leases and fencing epochs, the registry, re-sectioning), plus fault
knobs for unit tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from seqsvc.allocator import (
    Boot,
    Busy,
    Claimed,
    Fenced,
    Registered,
    Renewed,
    Routing,
    Status,
)


class StoreDown(Exception):
    pass


@dataclass
class Reg:
    address: str
    nonce: str
    listener: str
    lease_until: float


class MemStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.max_seq: dict[int, int] = {}
        self.section_epoch: dict[int, int] = {}
        self.owner: dict[int, str] = {}
        self.lease_until: dict[int, float] = {}
        self.instances: dict[str, Reg] = {}
        self.sections = 0
        self.version = 0
        #: Raise StoreDown from every call while True.
        self.down = False
        #: When set, extend() waits for this event before committing.
        self.gate: asyncio.Event | None = None
        self.extend_calls = 0
        self.register_calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        #: (section, new max_seq) in commit order.
        self.history: list[tuple[int, int]] = []

    def _check(self) -> None:
        if self.down:
            raise StoreDown("store is down")

    def expire(self, instance: str) -> None:
        """Ends `instance`'s registration and leases now (as if it stalled past them)."""
        now = self.clock()
        if instance in self.instances:
            self.instances[instance].lease_until = now
        for s, o in self.owner.items():
            if o == instance:
                self.lease_until[s] = now

    async def register(
        self,
        instance: str,
        address: str,
        sections: int,
        lease_s: float,
        boot: Boot,
        takeover_from: str = "",
    ) -> Registered | Busy:
        self._check()
        self.register_calls += 1
        now = self.clock()
        reg = self.instances.get(instance)
        if reg is not None:
            proved_gone = bool(takeover_from) and reg.nonce == takeover_from
            if reg.lease_until > now and reg.nonce != boot.nonce and not proved_gone:
                return Busy(
                    instance, reg.lease_until - now, reg.nonce, reg.listener, reg.lease_until
                )
            if proved_gone:
                for s, o in self.owner.items():
                    if o == instance:
                        self.owner[s] = ""
                        self.lease_until[s] = float("-inf")
        if self.sections != sections:
            others = any(
                r.lease_until > now for i, r in self.instances.items() if i != instance
            ) or any(self.lease_until[s] > now and self.owner[s] != instance for s in self.owner)
            if self.sections and others:
                return Busy("section count differs", 1.0)
            top = max(self.max_seq.values(), default=0)
            top_epoch = max(self.section_epoch.values(), default=0)
            self.max_seq = dict.fromkeys(range(sections), top)
            self.section_epoch = dict.fromkeys(range(sections), top_epoch + 1)
            self.owner = dict.fromkeys(range(sections), "")
            self.lease_until = dict.fromkeys(range(sections), float("-inf"))
            self.sections = sections
        self.instances[instance] = Reg(address, boot.nonce, boot.listener, now + lease_s)
        self.version += 1
        return Registered(self.version)

    async def claim(
        self, instance: str, boot: Boot, sections: Sequence[int], step: int, lease_s: float
    ) -> list[Claimed]:
        self._check()
        now = self.clock()
        reg = self.instances.get(instance)
        if reg is None or reg.nonce != boot.nonce:
            raise Fenced("registered by another process")
        reg.lease_until = now + lease_s
        out = []
        for s in sections:
            if self.owner[s] == "" or self.lease_until[s] <= now:
                floor = self.max_seq[s]
                self.max_seq[s] += step
                self.section_epoch[s] += 1
                self.owner[s] = instance
                self.lease_until[s] = now + lease_s
                out.append(Claimed(s, self.section_epoch[s], floor, self.max_seq[s]))
        if out:
            self.version += 1
        return out

    async def renew(
        self, instance: str, address: str, boot: Boot, epochs: Mapping[int, int], lease_s: float
    ) -> Renewed:
        self._check()
        now = self.clock()
        reg = self.instances.get(instance)
        if reg is not None and reg.nonce != boot.nonce:
            return Renewed(False)
        self.instances[instance] = Reg(address, boot.nonce, boot.listener, now + lease_s)
        renewed = set()
        for s, e in epochs.items():
            if self.section_epoch.get(s) == e and self.owner.get(s) == instance:
                self.lease_until[s] = now + lease_s
                renewed.add(s)
        return Renewed(True, frozenset(renewed))

    async def release(
        self, instance: str, boot: Boot, epochs: Mapping[int, int], leave: bool
    ) -> None:
        self._check()
        for s, e in epochs.items():
            if self.section_epoch.get(s) == e and self.owner.get(s) == instance:
                self.owner[s] = ""
                self.lease_until[s] = float("-inf")
        reg = self.instances.get(instance)
        if leave and reg is not None and reg.nonce == boot.nonce:
            del self.instances[instance]
            for s, o in self.owner.items():
                if o == instance:
                    self.owner[s] = ""
                    self.lease_until[s] = float("-inf")
        self.version += 1

    async def extend(self, epochs: Mapping[int, int], amounts: Mapping[int, int]) -> dict[int, int]:
        self._check()
        self.extend_calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            self._check()
            out = {}
            for section, amount in amounts.items():
                if self.section_epoch.get(section) == epochs[section]:
                    self.max_seq[section] += amount
                    out[section] = self.max_seq[section]
                    self.history.append((section, self.max_seq[section]))
            return out
        finally:
            self.in_flight -= 1

    async def status(self) -> Status:
        self._check()
        now = self.clock()
        live = sum(1 for r in self.instances.values() if r.lease_until > now)
        free = sorted(s for s in self.owner if self.owner[s] == "" or self.lease_until[s] <= now)
        return Status(self.version, live, free)

    async def routing(self) -> Routing:
        self._check()
        now = self.clock()
        live = sorted((i, r.address) for i, r in self.instances.items() if r.lease_until > now)
        index = {i: n for n, (i, _) in enumerate(live)}
        owner = [
            index.get(self.owner[s], -1) if self.lease_until[s] > now else -1
            for s in range(self.sections)
        ]
        return Routing(self.version, self.sections, live, owner)
