"""TEST-ONLY fault switches, in one place (the pusher's counterpart of
`logic.faults`).

Each switch breaks the pusher at one chosen point on purpose, so that a test or the
chaos harness can show that the rest of the system copes. All default to off
(`Faults()` is the production value); they come from the `IM_PUSHER_TEST_FAULT_*`
settings, and the pusher logs a warning at start when any is on. The domain code
reads them only through this object, so `grep faults.` lists every place a fault
can fire.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields

from pusher.config import Settings

log = logging.getLogger(__name__)

#: Exit status of the crash switch, distinct from a normal failure's 1 (and the
#: same as logic's).
CRASH_EXIT_CODE = 86


@dataclass
class Faults:
    #: crash at the N-th fan-out (Fanout or FanoutBatch call) whose commit returned
    #: deliveries, before any of them is pushed; 0 = never
    crash_before_deliver: int = 0
    _fanouts_with_deliveries: int = field(default=0, init=False, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Faults:
        faults = cls(
            **{f.name: getattr(settings, f"test_fault_{f.name}") for f in fields(cls) if f.init}
        )
        on = [f.name for f in fields(cls) if f.init and getattr(faults, f.name)]
        if on:
            log.warning("TEST-ONLY fault switches are on", extra={"faults": on})
        return faults

    def before_deliver(self) -> None:
        """Called once per fan-out call whose commit returned deliveries, after the
        call returned and before any of them is pushed. Crashes the process (see
        `crash_now`) at the `crash_before_deliver`-th such call: the entries are
        then in the timelines and past the watermark, and nobody has pushed them."""
        if not self.crash_before_deliver:
            return
        self._fanouts_with_deliveries += 1
        if self._fanouts_with_deliveries == self.crash_before_deliver:
            self.crash_now()

    def crash_now(self) -> None:
        """Ends the process at once, like a kill -9: no cleanup, no ack, no nak."""
        log.warning(
            "test fault: crashing between fan-out and Deliver",
            extra={"fanouts_with_deliveries": self._fanouts_with_deliveries},
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(CRASH_EXIT_CODE)
