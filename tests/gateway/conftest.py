"""Fixtures of the gateway tests: gateway processes wired to the shared Redis."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gwkit import LOGIC_READY, NEEDS_LOGIC, SECRET, start_stack

from imdev.servers import RedisServer, ServiceProcess, free_port


@pytest.fixture
def gateway_env(redis_server: RedisServer, key_prefix: str) -> dict[str, str]:
    """A gateway on the shared Redis, with a unique key prefix and no logic
    reachable (a free port nothing listens on)."""
    return {
        "IM_GATEWAY_REDIS_URL": redis_server.url(),
        "IM_GATEWAY_REDIS_PREFIX": f"{key_prefix}:",
        "IM_GATEWAY_LOGIC_ADDRESS": f"127.0.0.1:{free_port()}",
        "IM_GATEWAY_TOKEN_SECRET": SECRET,
        "IM_GATEWAY_LOGIC_RETRY_S": "0",
        "IM_GATEWAY_SHUTDOWN_DEADLINE_S": "10",
    }


@pytest.fixture
def start_gateway(
    spawn: Callable[..., ServiceProcess], gateway_env: dict[str, str]
) -> Callable[..., ServiceProcess]:
    """start_gateway(IM_GATEWAY_X="1", ...) -> a SERVING gateway process."""

    def make(**overrides: str) -> ServiceProcess:
        port = free_port()
        env = {
            **gateway_env,
            "IM_GATEWAY_PORT": str(port),
            "IM_GATEWAY_ADVERTISE_ADDRESS": f"127.0.0.1:{port}",
            **overrides,
        }
        return spawn("gateway", env)

    return make


@pytest.fixture(scope="module")
def delivery_stack() -> Iterator[Any]:
    """PostgreSQL, Redis, NATS, seqsvc, logic, 2 gateways and a pusher with quick
    retransmits, shared by a module's tests (each test uses fresh user ids)."""
    if not LOGIC_READY:
        pytest.skip(NEEDS_LOGIC)
    stack = start_stack(gateways=2)
    yield stack
    stack.kill()
    if not os.environ.get("IM_KEEP_TEST_DIRS"):
        stack.cleanup()
