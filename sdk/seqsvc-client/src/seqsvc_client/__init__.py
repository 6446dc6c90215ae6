"""seqsvc's Python client: per-key strictly increasing 64-bit numbers.

    import asyncio
    from seqsvc_client import SeqClient

    async def main() -> None:
        async with SeqClient("seqsvc.seqsvc.svc:50053", token="...") as seq:
            print(await seq.next("orders:eu"))

    asyncio.run(main())

The stable API is what this module exports; everything under `seqsvc_client._*`
is the repository's own client code, vendored at build time, and may change.
"""

from seqsvc_client._seqsvc.client import (
    SeqClient,
    SeqError,
    SeqInvalidArgument,
    SeqPermissionDenied,
    SeqQuotaExceeded,
    SeqUnauthenticated,
    SeqUnavailable,
)
from seqsvc_client._seqsvc.keys import MAX_KEY_BYTES

__all__ = [
    "MAX_KEY_BYTES",
    "SeqClient",
    "SeqError",
    "SeqInvalidArgument",
    "SeqPermissionDenied",
    "SeqQuotaExceeded",
    "SeqUnauthenticated",
    "SeqUnavailable",
]
