"""TEST-ONLY fault switches, in one place.

Each switch breaks one guarantee on purpose so that a test or the chaos harness can
show that the guarantee's check notices. All default to off (`Faults()` is the
production value); they come from the `IM_LOGIC_TEST_FAULT_*` settings, and logic
logs a warning at start when any is on. Domain code reads them only through this
object, so `grep faults.` lists every place a guarantee can be switched off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

from logic.config import Settings

log = logging.getLogger(__name__)

#: Exit status of the crash switch, distinct from a normal failure's 1.
CRASH_EXIT_CODE = 86


@dataclass(frozen=True)
class Faults:
    crash_after_commit: bool = False
    skip_dedup: bool = False
    skip_outbox: bool = False
    skip_seq_check: bool = False
    skip_locks: bool = False
    skip_repair: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Faults:
        faults = cls(**{f.name: getattr(settings, f"test_fault_{f.name}") for f in fields(cls)})
        on = [f.name for f in fields(cls) if getattr(faults, f.name)]
        if on:
            log.warning("TEST-ONLY fault switches are on", extra={"faults": on})
        return faults

    def crash_now(self) -> None:
        """Ends the process at once, like a kill -9: no cleanup, no reply."""
        log.warning("test fault: crashing after commit")
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(CRASH_EXIT_CODE)
