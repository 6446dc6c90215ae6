"""The SDK and imctl against a whole stack that uses TLS everywhere, with CAs
made by this test:

- the gateway's client port serves a certificate for `localhost` from a public
  test CA, read from a directory laid out like a mounted Kubernetes Secret;
- every internal port (seqsvc, logic, pusher, the gateway's internal port)
  requires a client certificate of an internal CA (mutual TLS), and every
  internal channel presents one, checking the name `im-internal` (the routes in
  Redis are IP addresses).

A message sent through it arrives; the right CA connects, a wrong CA, a wrong
name and plaintext are refused with a clear error; the gateway's certificate
is renewed while devices are connected and new connections get it, without a
gateway restart, while the open streams go on.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_support import CertificateAuthority, Issued, SecretVolume, served_certificate

from imclient import (
    Client,
    ConnectTimeout,
    GatewayApi,
    TLSConfig,
    TLSError,
    direct_conversation_id,
)
from imdev.servers import ROOT, free_port
from imdev.stack import Stack

INTERNAL_NAME = "im-internal"


@dataclass
class TLSStack:
    stack: Stack
    public_ca: Path  # signs the gateway's client-port certificate
    internal_ca: Path  # signs every internal certificate (not the gateway's)
    gateway_secret: SecretVolume
    issuer: CertificateAuthority
    internal_leaf: Issued  # the certificate every internal port serves and presents

    @property
    def port(self) -> int:
        return self.stack.gateways[0].port

    @property
    def address(self) -> str:
        """Dialled by the name in the gateway's certificate."""
        return f"localhost:{self.port}"


def _env(kind: str, internal: SecretVolume, serve_tls: bool = True) -> dict[str, str]:
    prefix = f"IM_{kind.upper()}_"
    env = {
        f"{prefix}HEALTH_PORT": str(free_port()),
        f"{prefix}TLS_CA_FILE": internal.file("ca.crt"),
        f"{prefix}TLS_CLIENT_CERT_FILE": internal.file("tls.crt"),
        f"{prefix}TLS_CLIENT_KEY_FILE": internal.file("tls.key"),
        f"{prefix}TLS_SERVER_NAME": INTERNAL_NAME,
    }
    if serve_tls:
        env |= {
            f"{prefix}TLS_CERT_FILE": internal.file("tls.crt"),
            f"{prefix}TLS_KEY_FILE": internal.file("tls.key"),
            f"{prefix}TLS_CLIENT_CA_FILE": internal.file("ca.crt"),
        }
    return env


@pytest.fixture(scope="module")
def tls_stack() -> Iterator[TLSStack]:
    workdir = Path(tempfile.mkdtemp(prefix="imstack-tls-"))
    workdir.chmod(0o755)
    public, internal_ca = CertificateAuthority("public test CA"), CertificateAuthority("internal")
    internal = SecretVolume(workdir / "internal-tls")
    leaf = internal_ca.issue([INTERNAL_NAME])
    internal.write({"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": internal_ca.pem})
    gateway_secret = SecretVolume(workdir / "gateway-tls")
    first = public.issue(["localhost"], serial=1001)
    gateway_secret.write({"tls.crt": first.cert_pem, "tls.key": first.key_pem})
    gateway = _env("gateway", internal, serve_tls=False) | {
        "IM_GATEWAY_TLS_CERT_FILE": gateway_secret.file("tls.crt"),
        "IM_GATEWAY_TLS_KEY_FILE": gateway_secret.file("tls.key"),
        "IM_GATEWAY_INTERNAL_TLS_CERT_FILE": internal.file("tls.crt"),
        "IM_GATEWAY_INTERNAL_TLS_KEY_FILE": internal.file("tls.key"),
        "IM_GATEWAY_INTERNAL_TLS_CLIENT_CA_FILE": internal.file("ca.crt"),
    }
    env = {kind: _env(kind, internal) for kind in ("seqsvc", "logic", "pusher")}
    s = Stack(workdir, env={**env, "gateway": gateway})
    try:
        s.start()
    except BaseException:
        s.kill()
        raise
    yield TLSStack(
        s,
        public.write(workdir / "public-ca.pem"),
        internal_ca.write(workdir / "internal-ca.pem"),
        gateway_secret,
        public,
        leaf,
    )
    s.kill()
    if not os.environ.get("IM_KEEP_TEST_DIRS"):
        shutil.rmtree(workdir, ignore_errors=True)


async def served(port: int) -> x509.Certificate:
    """The certificate a new connection to the gateway's client port gets."""
    return await asyncio.to_thread(served_certificate, "127.0.0.1", port)


def uid(name: str) -> str:
    return f"{name}{time.monotonic_ns() % 10**9}"


async def test_a_message_crosses_a_stack_that_is_tls_everywhere(tls_stack: TLSStack) -> None:
    alice, bob = uid("alice"), uid("bob")
    s, tls = tls_stack.stack, TLSConfig(ca_file=tls_stack.public_ca)
    async with (
        Client(tls_stack.address, s.mint(alice, "a1"), tls=tls) as a,
        Client(tls_stack.address, s.mint(bob, "b1"), tls=tls) as b,
    ):
        ack = await a.send(direct_conversation_id(alice, bob), "over TLS")
        async with asyncio.timeout(20):
            got = await anext(b.messages())
        assert (got.msg_id, got.text) == (ack.msg_id, "over TLS")
        # The push came through pusher -> gateway Deliver (mutual TLS), not
        # only by sync: both devices were connected before the send.
        assert b.stats.pushes >= 1
    async with GatewayApi(tls_stack.address, s.mint(bob, "b1"), tls=tls) as api:
        page = await api.history(direct_conversation_id(alice, bob))
    assert [m.text for m in page.messages] == ["over TLS"]


async def test_the_default_trusts_the_system_roots(
    tls_stack: TLSStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No `tls=`: the CAs of the operating system's bundle, the file OpenSSL and
    Python's ssl read (SSL_CERT_FILE names it here: the test CA stands in for a
    CA installed into the system)."""
    token = tls_stack.stack.mint(uid("sys"), "s1")
    # gRPC's own override of its roots would win (and is read once per process).
    monkeypatch.delenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_stack.public_ca))
    async with Client(tls_stack.address, token) as c:
        assert c.user_id is not None
    async with GatewayApi(tls_stack.address, token) as api:
        assert (await api.list_conversations()).conversations == []


async def test_a_wrong_ca_is_refused_with_a_clear_error(tls_stack: TLSStack) -> None:
    token = tls_stack.stack.mint(uid("eve"), "e1")
    wrong = TLSConfig(ca_file=tls_stack.internal_ca)  # a real CA, not the gateway's
    started = time.monotonic()
    with pytest.raises(TLSError) as err:
        async with Client(tls_stack.address, token, tls=wrong):
            pass
    assert time.monotonic() - started < 10  # at once, not after connect_timeout_s
    message = str(err.value)
    assert "certificate verification failed" in message
    assert "not signed by a CA this client trusts" in message
    assert str(tls_stack.internal_ca) in message  # says what it trusted
    with pytest.raises(TLSError, match="certificate verification failed"):
        async with GatewayApi(tls_stack.address, token, tls=wrong) as api:
            await api.list_conversations()
    # The system's roots do not know the test CA either.
    with pytest.raises(TLSError, match="certificate verification failed"):
        async with Client(tls_stack.address, token):
            pass


async def test_the_server_name_can_be_overridden(tls_stack: TLSStack) -> None:
    token = tls_stack.stack.mint(uid("carol"), "c1")
    by_ip = f"127.0.0.1:{tls_stack.port}"  # the certificate names localhost only
    with pytest.raises(TLSError, match="does not name the host"):
        async with Client(by_ip, token, tls=TLSConfig(ca_file=tls_stack.public_ca)):
            pass
    tls = TLSConfig(ca_file=tls_stack.public_ca, server_name="localhost")
    async with Client(by_ip, token, tls=tls) as c:
        assert c.user_id is not None


async def test_plaintext_and_tls_do_not_mix(tls_stack: TLSStack) -> None:
    token = tls_stack.stack.mint(uid("dave"), "d1")
    # TLS to a plaintext port (the gateway's health port): said so at once.
    health = tls_stack.stack.gateways[0].extra_env["IM_GATEWAY_HEALTH_PORT"]
    with pytest.raises(TLSError, match="does not speak TLS"):
        async with GatewayApi(f"localhost:{health}", token, tls=TLSConfig()) as api:
            await api.list_conversations()
    # Plaintext to the TLS port: the handshake never completes.
    with pytest.raises(ConnectTimeout):
        async with Client(tls_stack.address, token, insecure=True, connect_timeout_s=2):
            pass
    with pytest.raises(ValueError, match="exclude each other"):
        Client(tls_stack.address, token, insecure=True, tls=TLSConfig())


async def test_a_renewed_gateway_certificate_is_served_without_a_restart(
    tls_stack: TLSStack,
) -> None:
    s = tls_stack.stack
    gateway_pid = s.gateways[0].pid
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    tls = TLSConfig(ca_file=tls_stack.public_ca)
    async with (
        Client(tls_stack.address, s.mint(alice, "a1"), tls=tls) as a,
        Client(tls_stack.address, s.mint(bob, "b1"), tls=tls) as b,
    ):
        before = (await served(tls_stack.port)).serial_number
        renewed = tls_stack.issuer.issue(["localhost"], serial=before + 1)
        tls_stack.gateway_secret.write({"tls.crt": renewed.cert_pem, "tls.key": renewed.key_pem})
        # The next handshake gets the renewed certificate (the gateway checks the
        # files before each one).
        assert (await served(tls_stack.port)).serial_number == before + 1

        # The streams opened before the renewal go on: no reconnect, messages flow.
        ack = await a.send(conv, "after renewal")
        async with asyncio.timeout(20):
            got = await anext(b.messages())
        assert got.msg_id == ack.msg_id
        assert (a.stats.connects, b.stats.connects) == (1, 1)

        # A new device connects with the renewed certificate, same CA.
        async with Client(tls_stack.address, s.mint(bob, "b2"), tls=tls) as b2:
            async with asyncio.timeout(20):
                assert (await anext(b2.messages())).msg_id == ack.msg_id
    assert s.gateways[0].pid == gateway_pid and s.gateways[0].running()


async def test_internal_ports_refuse_callers_without_a_client_certificate(
    tls_stack: TLSStack,
) -> None:
    s = tls_stack.stack
    ca = tls_stack.internal_ca.read_bytes()
    name = (("grpc.ssl_target_name_override", INTERNAL_NAME),)
    for proc in [s.seqsvc, *s.logics, *s.pushers]:
        async with grpc.aio.secure_channel(
            proc.address, grpc.ssl_channel_credentials(ca), options=name
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, proc.name
    # The same call with the internal certificate is answered.
    leaf = tls_stack.internal_leaf
    credentials = grpc.ssl_channel_credentials(ca, leaf.key_pem, leaf.cert_pem)
    async with grpc.aio.secure_channel(s.logics[0].address, credentials, options=name) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def _imctl(tls_stack: TLSStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("IMCTL_PLAINTEXT", None)
    env.update(
        PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("services", "libs", "gen")),
        IM_ADDRESS=tls_stack.address,
        IM_GATEWAY_TOKEN_SECRET=tls_stack.stack.token_secret,
    )
    return subprocess.run(
        [sys.executable, "-m", "imctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_imctl_with_a_ca_file_and_with_the_wrong_one(tls_stack: TLSStack) -> None:
    alice, bob = uid("alice"), uid("bob")
    sent = _imctl(
        tls_stack, "send", "--ca-file", str(tls_stack.public_ca), "--user", alice, "--to", bob, "hi"
    )
    assert sent.returncode == 0, sent.stderr
    assert "sent to" in sent.stdout
    refused = _imctl(
        tls_stack, "sync", "--ca-file", str(tls_stack.internal_ca), "--user", bob, "--all"
    )
    assert refused.returncode == 1
    assert "certificate verification failed" in refused.stderr
    assert "--plaintext" in refused.stderr  # and what to do about it
