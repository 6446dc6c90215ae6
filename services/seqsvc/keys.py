"""Key rules and the key -> section mapping, shared by the server and the client."""

from __future__ import annotations

import zlib

MAX_KEY_BYTES = 128


class InvalidArgument(ValueError):
    """A request the service refuses whatever its state (bad key, bad count)."""


def key_bytes(key: str) -> bytes:
    """The UTF-8 bytes of a valid key; raises InvalidArgument naming the problem."""
    if not isinstance(key, str):
        raise InvalidArgument(f"key must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidArgument("key must not be empty")
    try:
        raw = key.encode()
    except UnicodeEncodeError:
        raise InvalidArgument("key is not valid UTF-8 (it contains a lone surrogate)") from None
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"key is {len(raw)} bytes of UTF-8; the limit is {MAX_KEY_BYTES} bytes"
        )
    return raw


def section_of(raw_key: bytes, sections: int) -> int:
    """The section of a key (its UTF-8 bytes). Stable across processes, restarts and
    versions: the persisted ceilings are only meaningful if a key always maps to the
    same section for a given section count."""
    return zlib.crc32(raw_key) % sections
