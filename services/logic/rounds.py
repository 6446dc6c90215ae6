"""The loop shared by logic's background workers (outbox relay, repair)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def run_rounds(
    one_round: Callable[[], Awaitable[int]], batch: int, interval_s: float, what: str
) -> None:
    """Runs `one_round` forever: again at once while a round fills its batch (a
    backlog), else after `interval_s`. A failed round is logged and retried after
    the interval; only cancellation ends the loop."""
    while True:
        try:
            while await one_round() >= batch:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("background round failed", extra={"worker": what, "error": repr(exc)})
        await asyncio.sleep(interval_s)
