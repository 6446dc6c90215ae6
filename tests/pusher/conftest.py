"""Fixtures of the pusher tests. The raw-frame client kit lives with the gateway
tests (tests/gateway/gwkit.py); the delivery tests drive pushes through it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gateway"))

from gwkit import LOGIC_READY, NEEDS_LOGIC, start_stack


@pytest.fixture(scope="module")
def delivery_stack() -> Iterator[Any]:
    """The whole system with 2 gateways and a pusher with quick retransmits.
    The gateways' liveness catch-ups are off: these tests count the pusher's own
    deliveries (a catch-up of an unacknowledged push, 1 s after a head check at
    a random phase, would add one; the liveness tests cover that path)."""
    if not LOGIC_READY:
        pytest.skip(NEEDS_LOGIC)
    stack = start_stack(gateways=2, gateway_env={"IM_GATEWAY_LIVENESS_S": "0"})
    yield stack
    stack.kill()
    if not os.environ.get("IM_KEEP_TEST_DIRS"):
        stack.cleanup()
