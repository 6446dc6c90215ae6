"""An in-memory `SectionStore` with the same semantics as the PostgreSQL one
(fencing epochs, lease by owner, re-sectioning), plus fault knobs for unit tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from seqsvc.allocator import Boot, Busy, Grant


class StoreDown(Exception):
    pass


class MemStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.max_seq: dict[int, int] = {}
        self.section_epoch: dict[int, int] = {}
        self.sections = 0
        self.epoch = 0
        self.owner = ""
        self.nonce = ""
        self.listener = ""
        self.lease_until = float("-inf")
        #: Raise StoreDown from every call while True.
        self.down = False
        #: When set, extend() waits for this event before committing.
        self.gate: asyncio.Event | None = None
        self.extend_calls = 0
        self.acquire_calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        #: (section, new max_seq) in commit order.
        self.history: list[tuple[int, int]] = []

    def _check(self) -> None:
        if self.down:
            raise StoreDown("store is down")

    async def acquire(
        self,
        owner: str,
        sections: int,
        step: int,
        lease_s: float,
        boot: Boot,
        takeover_from: str = "",
    ) -> Grant | Busy:
        self._check()
        self.acquire_calls += 1
        now = self.clock()
        proved_gone = bool(takeover_from) and self.owner == owner and self.nonce == takeover_from
        if self.lease_until > now and self.nonce != boot.nonce and not proved_gone:
            return Busy(
                self.owner, self.lease_until - now, self.nonce, self.listener, self.lease_until
            )
        if self.sections != sections:
            top = max(self.max_seq.values(), default=0)
            self.max_seq = dict.fromkeys(range(sections), top)
            self.sections = sections
        self.epoch += 1
        floors = [self.max_seq[i] for i in range(sections)]
        for i in range(sections):
            self.max_seq[i] += step
            self.section_epoch[i] = self.epoch
        self.owner = owner
        self.nonce = boot.nonce
        self.listener = boot.listener
        self.lease_until = now + lease_s
        return Grant(self.epoch, floors, [self.max_seq[i] for i in range(sections)])

    async def extend(self, epoch: int, amounts: Mapping[int, int]) -> dict[int, int]:
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
                if self.section_epoch.get(section) == epoch:
                    self.max_seq[section] += amount
                    out[section] = self.max_seq[section]
                    self.history.append((section, self.max_seq[section]))
            return out
        finally:
            self.in_flight -= 1

    async def renew(self, epoch: int, lease_s: float) -> bool:
        self._check()
        if self.epoch != epoch:
            return False
        self.lease_until = self.clock() + lease_s
        return True

    async def release(self, epoch: int) -> None:
        self._check()
        if self.epoch == epoch:
            self.lease_until = self.clock()
