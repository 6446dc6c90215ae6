"""Every service, as a real process: health, reflection, SIGTERM, bad config."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imdev.servers import ROOT, ServiceProcess, free_port
from imdev.stack import Stack

SERVICES = {
    "seqsvc": "im.seqsvc.v1.SeqService",
    "logic": "im.logic.v1.Logic",
    "pusher": "im.pusher.v1.Pusher",
    "gateway": "im.gateway.v1.Gateway",
}


def _procs(stack: Stack, name: str) -> ServiceProcess:
    return {
        "seqsvc": stack.seqsvc,
        "logic": stack.logics[0],
        "pusher": stack.pushers[0],
        "gateway": stack.gateways[0],
    }[name]


def _list_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([request]), timeout=5)
        return {s.name for r in responses for s in r.list_services_response.service}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_health_and_reflection(stack: Stack, name: str) -> None:
    proc = _procs(stack, name)
    with grpc.insecure_channel(proc.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICES[name]):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    listed = _list_services(proc.address)
    assert SERVICES[name] in listed
    assert "grpc.health.v1.Health" in listed


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_sigterm_flips_health_then_exits_zero(
    stack: Stack, spawn: Callable[..., ServiceProcess], name: str
) -> None:
    """A second instance of the service, wired like the stack's one, is told to
    stop: health watchers see NOT_SERVING before the process exits 0."""
    env = dict(_procs(stack, name).extra_env)
    port = free_port()
    prefix = f"IM_{name.upper()}_"
    env[prefix + "PORT"] = str(port)
    env[prefix + "ADVERTISE_ADDRESS"] = f"127.0.0.1:{port}"
    env[prefix + "DRAIN_DELAY_S"] = "1.0"
    env[prefix + "SHUTDOWN_DEADLINE_S"] = "10"
    if name == "gateway":
        internal = free_port()
        env["IM_GATEWAY_INTERNAL_PORT"] = str(internal)
        env["IM_GATEWAY_INTERNAL_ADVERTISE_ADDRESS"] = f"127.0.0.1:{internal}"
        if "IM_GATEWAY_WS_PORT" in env:  # the stack's gateway holds its own
            env["IM_GATEWAY_WS_PORT"] = str(free_port())
    if name == "seqsvc":
        # A second seqsvc on the same sections would wait for (or fence) the lease of
        # the stack's instance: give it sections of its own.
        env["IM_SEQSVC_DATABASE_URL"] = stack.postgres.create_database(f"seq_{port}")
    proc = spawn(name, env)

    seen: list[int] = []
    channel = grpc.insecure_channel(proc.address)
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICES[name]), timeout=30)

    def follow() -> None:
        try:
            for resp in watch:
                seen.append(resp.status)
        except grpc.RpcError:
            pass

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen and seen[0] == health_pb2.HealthCheckResponse.SERVING

    started = time.monotonic()
    proc.signal(15)
    code = proc.wait(timeout=15)
    elapsed = time.monotonic() - started
    follower.join(timeout=5)
    channel.close()
    assert code == 0
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
    assert elapsed < 10


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_invalid_config_names_the_setting(name: str) -> None:
    var = f"IM_{name.upper()}_PORT"
    result = subprocess.run(
        [sys.executable, "-m", name],
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{ROOT / 'services'}:{ROOT / 'libs'}:{ROOT / 'gen'}",
            var: "not-a-port",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert var in result.stderr


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_print_config_lists_every_setting(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", name, "--print-config"],
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{ROOT / 'services'}:{ROOT / 'libs'}:{ROOT / 'gen'}",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"IM_{name.upper()}_PORT=" in result.stdout
    assert f"IM_{name.upper()}_SHUTDOWN_DEADLINE_S=" in result.stdout
