"""client_msg_id: the idempotency key the client makes for every message.

The SDK makes UUIDv7s (RFC 9562): the first 48 bits are the Unix time in
milliseconds, the rest random. The server reads that time to apply its dedup
window: it forgets the dedup key of an id older than the window (by default 30
days) and refuses, with a clear error (`SendFailed`, INVALID_ARGUMENT), a send
whose UUIDv7 id is that old and unknown, since it may be a resend of a message
stored long ago whose key is gone. Ids of any other form are accepted as before;
their keys are kept forever. See docs/protocol.md, "Idempotency and the dedup
window".
"""

from __future__ import annotations

import os
import time
import uuid

_MS_MASK = (1 << 48) - 1


def uuid7(time_ms: int | None = None) -> str:
    """A new UUIDv7 in canonical lowercase form, made at `time_ms` (default now,
    by this machine's clock)."""
    ms = int(time.time() * 1000) if time_ms is None else time_ms
    value = (ms & _MS_MASK) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant 10
    return str(uuid.UUID(int=value))


def new_client_msg_id() -> str:
    """The id the SDK gives a message that is submitted without one."""
    return uuid7()
