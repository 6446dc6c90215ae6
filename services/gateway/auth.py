"""Client authentication at the gateway: the bearer token of a call's metadata,
verified with the deployment's secret.

The token format itself (`mint_token`, `verify_token`, the errors) lives in the
client SDK's `imclient.tokens` and is re-exported here: the SDK ships it to
application backends that mint tokens, and one implementation serves both sides
so the two cannot drift apart. `imclient.tokens` is pure standard library.
"""

from __future__ import annotations

from imclient.tokens import (
    ID_PATTERN,
    MAX_TOKEN_CHARS,
    VERSION,
    ExpiredToken,
    ForgedToken,
    Identity,
    MalformedToken,
    TokenError,
    check_id,
    mint_token,
    verify_token,
)


def bearer_token(metadata: object) -> str:
    """The token of an `authorization: Bearer <token>` entry of gRPC invocation
    metadata (a sequence of (key, value) pairs). Raises MalformedToken if absent."""
    values = [
        v
        for k, v in (metadata or ())  # type: ignore[attr-defined]
        if isinstance(k, str) and k.lower() == "authorization"
    ]
    if not values:
        raise MalformedToken("missing metadata 'authorization: Bearer <token>'")
    if len(values) > 1:
        raise MalformedToken("more than one 'authorization' metadata entry")
    value = values[0]
    if isinstance(value, bytes):
        raise MalformedToken("'authorization' metadata must be text")
    scheme, _, token = str(value).strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MalformedToken("'authorization' metadata must be 'Bearer <token>'")
    return token.strip()


__all__ = [
    "ID_PATTERN",
    "MAX_TOKEN_CHARS",
    "VERSION",
    "ExpiredToken",
    "ForgedToken",
    "Identity",
    "MalformedToken",
    "TokenError",
    "bearer_token",
    "check_id",
    "mint_token",
    "verify_token",
]
