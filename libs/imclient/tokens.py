"""Client tokens: the format the gateway verifies, and `mint_token` for the
server side of an application (the one place tokens are made).

A token says "this connection is user U on device D until time T". Your app's
backend mints one after it has authenticated the user its own way (a session
cookie, OAuth, ...), with the secret it shares with the gateways
(`IM_GATEWAY_TOKEN_SECRET`), and hands it to the client, which passes it to
`Client`/`GatewayApi` (a string, or a callable that fetches a fresh one before
every connection attempt). The secret never leaves the servers: a client that
holds it can act as anyone.

    from imclient.tokens import mint_token
    token = mint_token(os.environ["IM_GATEWAY_TOKEN_SECRET"], user_id, device_id, ttl_s=3600)

Format: `v1.<payload>.<signature>`, both parts unpadded base64url. The payload is
compact JSON `{"sub": user_id, "dev": device_id, "exp": unix_seconds}`; the
signature is HMAC-SHA256(secret, "v1." + payload) and is checked (in constant
time) before anything in the payload is read. A token proves who the client is for
as long as it has not expired; there is no revocation list, so keep TTLs short
(the SDK asks for a token again on every reconnect when given a callable).

The gateway (`services/gateway/auth.py`) imports this module: minting and
verifying are one implementation, so they cannot drift apart. Pure functions and
the standard library only, no I/O: `verify_token` takes the time as an argument.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from dataclasses import dataclass

#: The secret a gateway uses when IM_GATEWAY_TOKEN_SECRET is unset (`make run`,
#: tests). Anyone can mint tokens with it: the gateway logs a warning whenever it
#: is in use. Never deploy with it.
DEV_TOKEN_SECRET = "dev-only-secret-change-me"

VERSION = "v1"
ID_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
#: Tokens longer than this are refused before any decoding (a cheap DoS guard).
MAX_TOKEN_CHARS = 2048


class TokenError(ValueError):
    """A token was refused. The message says why and is safe to show a client."""


class MalformedToken(TokenError):
    """Not a token of this format (wrong shape, encoding, version or payload)."""


class ForgedToken(TokenError):
    """The signature does not match: not signed with this deployment's secret."""


class ExpiredToken(TokenError):
    """Correctly signed, but past its expiry."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for."""

    user_id: str
    device_id: str
    expires_at: int  # Unix seconds


def _key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("token secret must not be empty")
    return key


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise MalformedToken("malformed token: not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise MalformedToken("malformed token: not base64url") from None


def _sign(key: bytes, signing_input: str) -> bytes:
    return hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()


def check_id(kind: str, value: str) -> str:
    """Returns `value` if it is a valid user/device id; raises ValueError otherwise."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"{kind} must match [A-Za-z0-9_.@-]{{1,64}}, got {value!r}")
    return value


def mint_token(secret: str | bytes, user_id: str, device_id: str, ttl_s: int) -> str:
    """A token for `user_id` on `device_id`, valid for `ttl_s` seconds from now.

    Raises ValueError for an empty secret, an invalid id or a non-positive TTL.
    """
    key = _key(secret)
    check_id("user_id", user_id)
    check_id("device_id", device_id)
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    expires_at = math.ceil(time.time() + ttl_s)
    payload = json.dumps(
        {"sub": user_id, "dev": device_id, "exp": expires_at}, separators=(",", ":"), sort_keys=True
    ).encode()
    signing_input = f"{VERSION}.{_b64encode(payload)}"
    return f"{signing_input}.{_b64encode(_sign(key, signing_input))}"


def verify_token(secret: str | bytes, token: str, now: float) -> Identity:
    """The identity a token carries, if it is well-formed, signed with `secret`
    and not expired at `now` (Unix seconds).

    Raises MalformedToken, ForgedToken or ExpiredToken (all TokenError), in that
    order of checking: the payload is only parsed once the signature matched.
    """
    key = _key(secret)
    if not isinstance(token, str) or not token:
        raise MalformedToken("malformed token: empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise MalformedToken(f"malformed token: longer than {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedToken("malformed token: expected three dot-separated parts")
    version, payload_b64, signature_b64 = parts
    if version != VERSION:
        raise MalformedToken(f"malformed token: unknown version {version[:16]!r}")
    signature = _b64decode(signature_b64)
    expected = _sign(key, f"{version}.{payload_b64}")
    if not hmac.compare_digest(signature, expected):
        raise ForgedToken("token signature does not match (forged, or signed with another secret)")
    try:
        payload = json.loads(_b64decode(payload_b64))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedToken("malformed token: payload is not JSON") from None
    if not isinstance(payload, dict):
        raise MalformedToken("malformed token: payload is not an object")
    user_id, device_id, expires_at = payload.get("sub"), payload.get("dev"), payload.get("exp")
    if not isinstance(expires_at, int) or isinstance(expires_at, bool):
        raise MalformedToken("malformed token: exp must be an integer")
    try:
        check_id("user id", user_id)  # type: ignore[arg-type]
        check_id("device id", device_id)  # type: ignore[arg-type]
    except ValueError as exc:
        raise MalformedToken(f"malformed token: {exc}") from None
    if now >= expires_at:
        raise ExpiredToken(f"token expired at {expires_at} (now {int(now)}); get a new one")
    return Identity(user_id=user_id, device_id=device_id, expires_at=expires_at)  # type: ignore[arg-type]


__all__ = [
    "DEV_TOKEN_SECRET",
    "ID_PATTERN",
    "MAX_TOKEN_CHARS",
    "VERSION",
    "ExpiredToken",
    "ForgedToken",
    "Identity",
    "MalformedToken",
    "TokenError",
    "check_id",
    "mint_token",
    "verify_token",
]
