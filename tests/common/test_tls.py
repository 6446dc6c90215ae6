"""imcommon.tls and the TLS of our gRPC ports: certificates made here by a test
CA, real TLS handshakes on loopback.

- A port serves the files it was given, and a renewed certificate (a Kubernetes
  Secret swapping its `..data` symlink) to every new connection, without a
  restart, while connections already open go on.
- Files that do not load keep the previous certificate in service; at start they
  stop the service with a message naming the file.
- Mutual TLS: a port with a client CA refuses a caller without a certificate, or
  with one from another CA.
- Settings: pairs go together; the gateway warns when its client port is
  plaintext unless that is allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tls_support import CertificateAuthority, Issued, SecretVolume, served_certificate

from gateway.config import Settings as GatewaySettings
from imcommon.config import ConfigError, load_settings
from imcommon.server import StartupError, add_port
from imcommon.telemetry import internal_channel
from imcommon.tls import (
    ChannelTLS,
    ClientTLS,
    ReloadingCertificate,
    ServerTLS,
    TLSConfigError,
    fingerprint,
)
from imdev.servers import ServiceProcess, free_port

NAME = "im-internal"


def publish(volume: SecretVolume, issued: Issued, ca: CertificateAuthority | None = None) -> None:
    files = {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem}
    if ca is not None:
        files["ca.crt"] = ca.pem
    volume.write(files)


def server_tls(volume: SecretVolume, client_ca: bool = False) -> ServerTLS:
    return ServerTLS(
        volume.file("tls.crt"), volume.file("tls.key"), volume.file("ca.crt") if client_ca else ""
    )


@contextlib.asynccontextmanager
async def health_server(tls: ServerTLS | None) -> AsyncIterator[int]:
    """A grpc.aio server with only grpc.health.v1 (SERVING), its port opened by
    `imcommon.server.add_port` as every service's is."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = add_port(server, "127.0.0.1:0", tls)
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield port
    finally:
        await server.stop(None)


async def served(port: int) -> x509.Certificate:
    """The certificate a new connection gets (a TLS handshake of its own)."""
    return await asyncio.to_thread(served_certificate, "127.0.0.1", port)


async def check(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(resp.status)


# -- reloading, unit ---------------------------------------------------------------


def test_reload_happens_when_the_secret_swaps_and_only_then(tmp_path: Path) -> None:
    ca = CertificateAuthority("test ca")
    volume = SecretVolume(tmp_path / "secret")
    first = ca.issue([NAME], serial=1001)
    publish(volume, first)
    cert = ReloadingCertificate(server_tls(volume))
    assert cert.fingerprint == fingerprint(first.cert_pem)
    assert cert.fetch() is None  # nothing changed: gRPC keeps what it has

    second = ca.issue([NAME], serial=2002)
    publish(volume, second)
    assert cert.fetch() is not None
    assert (cert.reloads, cert.fingerprint) == (1, fingerprint(second.cert_pem))
    assert cert.fetch() is None

    publish(volume, second)  # a new ..data with the same content: nothing to do
    assert cert.fetch() is None
    assert cert.reloads == 1


def test_files_that_do_not_load_keep_the_previous_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = CertificateAuthority("test ca")
    volume = SecretVolume(tmp_path / "secret")
    good = ca.issue([NAME])
    publish(volume, good)
    cert = ReloadingCertificate(server_tls(volume))

    # A certificate with another certificate's key (e.g. copied one file at a time).
    other = ca.issue([NAME])
    volume.write({"tls.crt": other.cert_pem, "tls.key": good.key_pem})
    with caplog.at_level(logging.WARNING, logger="imcommon.tls"):
        assert cert.fetch() is None
        assert cert.fetch() is None  # the same bad files are not retried per handshake
    warnings = [r for r in caplog.records if "do not load" in r.getMessage()]
    assert len(warnings) == 1
    assert "does not match" in warnings[0].getMessage()
    assert cert.fingerprint == fingerprint(good.cert_pem)

    publish(volume, other)  # the key arrives: the new pair is served
    assert cert.fetch() is not None
    assert cert.fingerprint == fingerprint(other.cert_pem)


async def test_files_that_do_not_load_at_start_are_refused_with_the_file_named(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority("test ca")
    issued = ca.issue([NAME])
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(issued.cert_pem)
    with pytest.raises(TLSConfigError, match=f"cannot read the private key {key}"):
        ReloadingCertificate(ServerTLS(str(cert), str(key)))
    key.write_bytes(ca.issue([NAME]).key_pem)
    with pytest.raises(TLSConfigError, match="does not match the certificate"):
        ReloadingCertificate(ServerTLS(str(cert), str(key)))
    key.write_text("not a key")
    with pytest.raises(TLSConfigError, match="is not PEM"):
        ReloadingCertificate(ServerTLS(str(cert), str(key)))
    with pytest.raises(StartupError, match="is not PEM"):
        add_port(grpc.aio.server(), "127.0.0.1:0", ServerTLS(str(cert), str(key)))


# -- real handshakes ---------------------------------------------------------------


async def test_a_renewed_certificate_reaches_new_connections_without_a_restart(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority("test ca")
    volume = SecretVolume(tmp_path / "secret")
    publish(volume, ca.issue([NAME], serial=1001))
    ca_file = ca.write(tmp_path / "ca.pem")
    tls = ChannelTLS(ClientTLS(str(ca_file), server_name=NAME))
    async with health_server(server_tls(volume)) as port:
        address = f"127.0.0.1:{port}"
        assert (await served(port)).serial_number == 1001
        old = internal_channel(address, tls=tls)
        assert await check(old) == health_pb2.HealthCheckResponse.SERVING

        publish(volume, ca.issue([NAME], serial=2002))
        assert (await served(port)).serial_number == 2002
        new = internal_channel(address, tls=tls)
        assert await check(new) == health_pb2.HealthCheckResponse.SERVING
        # The connection made before the renewal goes on (TLS keeps its session).
        assert old.get_state() == grpc.ChannelConnectivity.READY
        assert await check(old) == health_pb2.HealthCheckResponse.SERVING
        await old.close()
        await new.close()


async def test_a_channel_checks_the_ca_and_the_name(tmp_path: Path) -> None:
    ca, other = CertificateAuthority("test ca"), CertificateAuthority("other ca")
    volume = SecretVolume(tmp_path / "secret")
    publish(volume, ca.issue([NAME]))
    async with health_server(server_tls(volume)) as port:
        address = f"127.0.0.1:{port}"
        wrong_ca = ChannelTLS(ClientTLS(str(other.write(tmp_path / "other.pem")), server_name=NAME))
        right_ca = str(ca.write(tmp_path / "ca.pem"))
        no_name = ChannelTLS(ClientTLS(right_ca))  # checks "127.0.0.1": not in the cert
        for tls, why in ((wrong_ca, "CERTIFICATE_VERIFY_FAILED"), (no_name, "Hostname")):
            async with internal_channel(address, tls=tls) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await check(channel)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert why in (err.value.details() or "")
        async with internal_channel(address, tls=ChannelTLS(ClientTLS(right_ca, server_name=NAME))):
            pass


async def test_mutual_tls_refuses_callers_without_a_certificate_of_the_ca(tmp_path: Path) -> None:
    ca, other = CertificateAuthority("internal ca"), CertificateAuthority("other ca")
    volume = SecretVolume(tmp_path / "server")
    publish(volume, ca.issue([NAME]), ca)
    ca_file = str(ca.write(tmp_path / "ca.pem"))

    def client(issuer: CertificateAuthority, name: str) -> ChannelTLS:
        issued = issuer.issue([name])
        cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        return ChannelTLS(ClientTLS(ca_file, str(cert), str(key), NAME))

    async with health_server(server_tls(volume, client_ca=True)) as port:
        address = f"127.0.0.1:{port}"
        async with internal_channel(address, tls=client(ca, "pusher")) as channel:
            assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
        refused = {
            "no client certificate": ChannelTLS(ClientTLS(ca_file, server_name=NAME)),
            "a certificate of another CA": client(other, "intruder"),
        }
        for what, tls in refused.items():
            async with internal_channel(address, tls=tls) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await check(channel)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await check(channel)


async def test_channel_tls_rereads_renewed_client_files(tmp_path: Path) -> None:
    ca = CertificateAuthority("internal ca")
    volume = SecretVolume(tmp_path / "client")
    publish(volume, ca.issue(["pusher"]), ca)
    tls = ChannelTLS(
        ClientTLS(volume.file("ca.crt"), volume.file("tls.crt"), volume.file("tls.key"), NAME)
    )
    before = tls.credentials()
    assert tls.credentials() is before
    publish(volume, ca.issue(["pusher"]), ca)
    renewed = tls.credentials()
    assert renewed is not before
    volume.write({"tls.crt": b"garbage", "tls.key": b"garbage", "ca.crt": ca.pem})
    assert tls.credentials() is renewed  # the last good ones, not an exception


# -- settings and the services ------------------------------------------------------


def test_tls_settings_that_go_together() -> None:
    base = {"IM_GATEWAY_INTERNAL_PORT": "1"}
    bad = [
        ({**base, "IM_GATEWAY_TLS_CERT_FILE": "/c"}, "TLS_KEY_FILE go together"),
        ({**base, "IM_GATEWAY_TLS_CLIENT_CA_FILE": "/ca"}, "needs IM_GATEWAY_TLS_CERT_FILE"),
        ({**base, "IM_GATEWAY_TLS_SERVER_NAME": "x"}, "need IM_GATEWAY_TLS_CA_FILE"),
        ({**base, "IM_GATEWAY_TLS_CLIENT_CERT_FILE": "/c"}, "TLS_CLIENT_KEY_FILE go together"),
        (
            {"IM_GATEWAY_INTERNAL_TLS_CERT_FILE": "/c", "IM_GATEWAY_INTERNAL_TLS_KEY_FILE": "/k"},
            "needs IM_GATEWAY_INTERNAL_PORT",
        ),
    ]
    for env, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_settings(GatewaySettings, env)
    ok = load_settings(
        GatewaySettings,
        {
            **base,
            "IM_GATEWAY_TLS_CERT_FILE": "/c",
            "IM_GATEWAY_TLS_KEY_FILE": "/k",
            "IM_GATEWAY_TLS_CA_FILE": "/ca",
            "IM_GATEWAY_TLS_SERVER_NAME": NAME,
        },
    )
    assert ok.server_tls() == ServerTLS("/c", "/k")
    assert ok.client_tls() == ClientTLS("/ca", server_name=NAME)
    assert load_settings(GatewaySettings, {}).server_tls() is None


def _gateway(tmp_path: Path, env: dict[str, str]) -> ServiceProcess:
    """A gateway alone (its logic and Redis need not answer to start)."""
    port = free_port()
    base = {
        "IM_GATEWAY_PORT": str(port),
        "IM_GATEWAY_LOGIC_ADDRESS": f"127.0.0.1:{free_port()}",
        "IM_GATEWAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "IM_GATEWAY_LIVENESS_S": "0",
    }
    return ServiceProcess("gateway", port, {**base, **env}, tmp_path / f"gateway-{port}.log")


def test_the_gateway_warns_when_its_client_port_is_plaintext(tmp_path: Path) -> None:
    ca = CertificateAuthority("public ca")
    volume = SecretVolume(tmp_path / "secret")
    publish(volume, ca.issue(["localhost"], serial=77))
    health_port = free_port()
    cases = {
        "plaintext": ({}, True),
        "allowed": ({"IM_GATEWAY_ALLOW_PLAINTEXT": "true"}, False),
        "tls": (
            {
                "IM_GATEWAY_TLS_CERT_FILE": volume.file("tls.crt"),
                "IM_GATEWAY_TLS_KEY_FILE": volume.file("tls.key"),
                "IM_GATEWAY_HEALTH_PORT": str(health_port),
            },
            False,
        ),
    }
    for case, (env, warned) in cases.items():
        gw = _gateway(tmp_path, env)
        gw.start()
        try:
            if case == "tls":
                assert served_certificate("127.0.0.1", gw.port).serial_number == 77
        finally:
            gw.stop()
        log = gw.log_path.read_text()
        assert ("serves PLAINTEXT" in log) == warned, case


def test_a_service_with_unloadable_tls_files_does_not_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    gw = _gateway(
        tmp_path,
        {"IM_GATEWAY_TLS_CERT_FILE": str(missing), "IM_GATEWAY_TLS_KEY_FILE": str(missing)},
    )
    gw.launch()
    assert gw.proc is not None
    assert gw.proc.wait(timeout=30) == 1
    assert f"cannot read the certificate {missing}" in gw.log_path.read_text()
