"""gateway.auth: tokens are signed, expire, and refuse every kind of tampering."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest

from gateway.auth import (
    ExpiredToken,
    ForgedToken,
    Identity,
    MalformedToken,
    bearer_token,
    mint_token,
    verify_token,
)

SECRET = "s" * 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(payload: bytes, secret: str = SECRET, version: str = "v1") -> str:
    """A token with an arbitrary payload, correctly signed (to test payload checks)."""
    signing_input = f"{version}.{_b64(payload)}"
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def test_round_trip() -> None:
    token = mint_token(SECRET, "alice", "phone-1", 60)
    ident = verify_token(SECRET, token, time.time())
    assert ident == Identity("alice", "phone-1", ident.expires_at)
    assert time.time() + 55 < ident.expires_at <= time.time() + 61


def test_expired() -> None:
    token = mint_token(SECRET, "alice", "d1", 10)
    verify_token(SECRET, token, time.time() + 9)
    with pytest.raises(ExpiredToken, match="expired"):
        verify_token(SECRET, token, time.time() + 11)


def test_other_secret_is_forged() -> None:
    token = mint_token("another-secret-of-32-bytes......", "alice", "d1", 60)
    with pytest.raises(ForgedToken, match="signature"):
        verify_token(SECRET, token, time.time())


def test_changed_payload_is_forged() -> None:
    """Swapping the user in the payload of a valid token breaks the signature."""
    token = mint_token(SECRET, "alice", "d1", 60)
    version, _payload, sig = token.split(".")
    other = _b64(json.dumps({"sub": "bob", "dev": "d1", "exp": int(time.time()) + 60}).encode())
    with pytest.raises(ForgedToken):
        verify_token(SECRET, f"{version}.{other}.{sig}", time.time())


def test_changed_signature_is_forged() -> None:
    token = mint_token(SECRET, "alice", "d1", 60)
    head, sig = token.rsplit(".", 1)
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    with pytest.raises(ForgedToken):
        verify_token(SECRET, f"{head}.{flipped}", time.time())


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "v1.abc",
        "v1.a.b.c",
        "v2.eyJ9.sig",
        "v1.eyJ9.@@@",
        "x" * 5000,
    ],
)
def test_malformed(token: str) -> None:
    with pytest.raises(MalformedToken):
        verify_token(SECRET, token, time.time())


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"sub": "alice", "dev": "d1"}).encode(),
        json.dumps({"sub": "alice", "dev": "d1", "exp": "soon"}).encode(),
        json.dumps({"sub": "alice", "dev": "d1", "exp": True}).encode(),
        json.dumps({"sub": "al ice", "dev": "d1", "exp": 2**40}).encode(),
        json.dumps({"sub": "alice", "dev": "", "exp": 2**40}).encode(),
        json.dumps({"sub": "a" * 65, "dev": "d1", "exp": 2**40}).encode(),
        json.dumps({"dev": "d1", "exp": 2**40}).encode(),
    ],
)
def test_signed_but_malformed_payload(payload: bytes) -> None:
    with pytest.raises(MalformedToken):
        verify_token(SECRET, _signed(payload), time.time())


def test_payload_is_not_parsed_before_the_signature_matches() -> None:
    """A garbage payload under a wrong signature is reported as forged."""
    token = _signed(b"not json", secret="wrong-secret-wrong-secret-wrong!")
    with pytest.raises(ForgedToken):
        verify_token(SECRET, token, time.time())


@pytest.mark.parametrize(
    ("user", "device", "ttl"),
    [("", "d1", 60), ("alice", "d 1", 60), ("alice", "d1", 0), ("a/b", "d1", 60)],
)
def test_mint_refuses_bad_input(user: str, device: str, ttl: int) -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, user, device, ttl)


def test_empty_secret_refused() -> None:
    with pytest.raises(ValueError):
        mint_token("", "alice", "d1", 60)


def test_bearer_metadata() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token((("Authorization", "bearer  abc "),)) == "abc"
    for bad in ([], [("authorization", "Basic abc")], [("authorization", "Bearer ")],
                [("authorization", "Bearer a"), ("authorization", "Bearer b")]):  # fmt: skip
        with pytest.raises(MalformedToken):
            bearer_token(bad)
