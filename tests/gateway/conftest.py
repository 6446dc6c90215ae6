"""Fixtures of the gateway tests: gateway processes wired to the shared Redis."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from gwkit import SECRET

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
