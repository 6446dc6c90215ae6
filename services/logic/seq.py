"""What logic needs from seqsvc, as a Protocol, so the domain code does not depend
on the transport; and the adapter over seqsvc's Python client."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from logic.errors import DependencyFailed, SequenceRegression, Unavailable
from seqsvc.client import SeqClient, SeqError, SeqUnavailable


class SeqSource(Protocol):
    async def next_batch(self, keys: Sequence[str]) -> list[int]:
        """One new value per key, in order; a key repeated in `keys` gets increasing
        values in the order it appears. Raises Unavailable when the source cannot be
        reached; nothing else is expected, but the caller must not trust the values:
        it checks them against what is committed (I1/I5)."""
        ...


def check_above(what: str, value: int, key: str, committed: int, note: str = "") -> None:
    """I1/I5: a value from seqsvc is used only above the last committed value of
    its key (or the last given earlier in the same transaction). Otherwise raises
    SequenceRegression: the caller writes nothing. `what` names the value (seq,
    conv_seq) in the message."""
    if value <= committed:
        raise SequenceRegression(
            f"seqsvc returned {what} {value} for {key}, not above the last committed "
            f"{committed}; nothing was written{note}"
        )


class SeqClientSource:
    """SeqSource over `seqsvc.client.SeqClient`.

    Small batches of distinct keys (a send: `c:<conv>` and `u:<sender>`) go through
    the client's coalescing `next()`, so concurrent sends share NextBatch RPCs.
    Batches that repeat a key (a fan-out writing several messages for one user) use
    one NextBatch RPC, whose values are ordered per key as the keys appear; coalesced
    calls could land in different RPCs and lose that order.
    """

    COALESCE_MAX_KEYS = 4

    def __init__(self, client: SeqClient) -> None:
        self._client = client

    async def next_batch(self, keys: Sequence[str]) -> list[int]:
        try:
            if len(keys) <= self.COALESCE_MAX_KEYS and len(set(keys)) == len(keys):
                return list(await asyncio.gather(*(self._client.next(k) for k in keys)))
            return await self._client.next_batch(keys)
        except SeqUnavailable as exc:
            raise Unavailable(f"sequence service unavailable: {exc}") from None
        except SeqError as exc:
            raise DependencyFailed(f"sequence service failed: {exc}") from None
