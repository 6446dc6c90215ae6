"""The JetStream contract between logic (publisher) and pusher (consumer).

One stream holds "conversation has committed messages" triggers
(im.logic.v1.MessageCommitted). Both sides call `ensure_stream` with the same
settings at start, so whichever starts first creates it.

Why these settings: file storage so a nats-server restart keeps what it acked;
`duplicate_window` dedups republishes by Nats-Msg-Id (= msg_id) after an outbox
relay retry; `replicas` is 3 in a cluster. JetStream may still lose acked
messages (it fsyncs periodically, not per message): PostgreSQL stays the source of
truth and logic's repair loop covers any loss (invariant I8).
"""

from __future__ import annotations

import hashlib

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

SUBJECT_BUCKETS = 256


def subject_for(prefix: str, conversation_id: str) -> str:
    """Subject of a conversation's triggers: `<prefix>.<bucket>`, the bucket a hash
    of the conversation id, so subjects stay few and token-safe whatever the id."""
    bucket = int.from_bytes(hashlib.blake2b(conversation_id.encode(), digest_size=2).digest())
    return f"{prefix}.{bucket % SUBJECT_BUCKETS:03d}"


def stream_config(
    name: str, subject_prefix: str, replicas: int = 1, max_age_s: float = 7 * 24 * 3600
) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[f"{subject_prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
        duplicate_window=120.0,
        max_age=max_age_s,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Creates the stream, or updates it to `config` if it exists. Idempotent."""
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)
