"""Fixtures of the logic tests: a real seqsvc process on the test's database, and
logic processes wired to it, to PostgreSQL and to the shared nats-server (with a
stream and subject prefix unique to the test)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from logic_support import LogicClient

from imdev.servers import NatsServer, ServiceProcess


@pytest.fixture
def seqsvc(spawn: Callable[..., ServiceProcess], pg_dsn: str) -> ServiceProcess:
    return spawn("seqsvc", {"IM_SEQSVC_DATABASE_URL": pg_dsn})


@pytest.fixture
def subject_prefix(key_prefix: str) -> str:
    return key_prefix.lower()


@pytest.fixture
def logic_env(
    pg_dsn: str,
    seqsvc: ServiceProcess,
    nats_server: NatsServer,
    key_prefix: str,
    subject_prefix: str,
) -> dict[str, str]:
    return {
        "IM_LOGIC_DATABASE_URL": pg_dsn,
        "IM_LOGIC_SEQSVC_ADDRESS": seqsvc.address,
        "IM_LOGIC_NATS_URL": nats_server.url(),
        "IM_LOGIC_NATS_STREAM": key_prefix,
        "IM_LOGIC_NATS_SUBJECT_PREFIX": subject_prefix,
        # Tests that exercise the relay or the repair loop lower these.
        "IM_LOGIC_OUTBOX_RELAY_MIN_AGE_S": "1",
        "IM_LOGIC_OUTBOX_RELAY_INTERVAL_S": "0.2",
        "IM_LOGIC_REPAIR_AFTER_S": "60",
    }


@pytest.fixture
def logic(spawn: Callable[..., ServiceProcess], logic_env: dict[str, str]) -> ServiceProcess:
    return spawn("logic", logic_env)


@pytest.fixture
async def client(logic: ServiceProcess) -> AsyncIterator[LogicClient]:
    c = LogicClient(logic.address)
    yield c
    await c.close()
