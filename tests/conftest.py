"""Real PostgreSQL, Redis and NATS JetStream for tests, on free loopback ports in
temp dirs, and helpers to run our services as processes.

Servers are built with port 0: a free port, replaced by another if some other
program binds it first. Shared servers are session-scoped; isolation is per test
(a fresh database, a key prefix, a stream name). Tests that kill or restart a
server take a private one from the `*_factory` fixtures.
"""

from __future__ import annotations

import os

# Before anything imports grpc: no fork handlers in the test process. Tests fork
# (initdb, pg_ctl, the services) while gRPC threads are busy; gRPC's fork support
# then logs "skipping fork() handlers" and its child-side handler has crashed the
# child before exec (initdb "died with SIGSEGV", seen under load). The children
# exec at once and never use gRPC, so they need no handlers.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from imdev.servers import (
    Managed,
    NatsServer,
    PostgresServer,
    RedisServer,
    ServiceProcess,
)
from imdev.stack import Stack


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is mode 0700 and the postgres user must
    # reach the data directory.
    path = Path(tempfile.mkdtemp(prefix="imtest-"))
    path.chmod(0o755)
    yield path
    if not os.environ.get("IM_KEEP_TEST_DIRS"):
        shutil.rmtree(path, ignore_errors=True)


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def postgres(workdir: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(0, workdir / "pg-shared", fsync=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test."""
    name = _unique("t")
    dsn = postgres.create_database(name)
    yield dsn
    with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(0, workdir / "redis-shared")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_server(workdir: Path) -> Iterator[NatsServer]:
    server = NatsServer(0, workdir / "nats-shared")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def key_prefix() -> str:
    """A unique prefix for Redis keys, JetStream stream names and subjects."""
    return _unique("T").upper()


M = TypeVar("M", bound=Managed)


def _private_servers(make_one: Callable[..., M]) -> Iterator[Callable[..., M]]:
    """A factory of private servers (started on demand, killed at teardown)."""
    started: list[M] = []

    def make(**kwargs: Any) -> M:
        server = make_one(**kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.kill()


@pytest.fixture
def postgres_factory(workdir: Path) -> Iterator[Callable[..., PostgresServer]]:
    """Private PostgreSQL clusters, for tests that stop or kill the database."""
    yield from _private_servers(
        lambda **kw: PostgresServer(0, workdir / _unique("pg"), fsync=False, **kw)
    )


@pytest.fixture
def nats_factory(workdir: Path) -> Iterator[Callable[..., NatsServer]]:
    """Private nats-servers, for tests that restart NATS or wipe its store."""
    yield from _private_servers(lambda: NatsServer(0, workdir / _unique("nats")))


@pytest.fixture
def redis_factory(workdir: Path) -> Iterator[Callable[..., RedisServer]]:
    """Private redis-servers, for tests that restart or flush Redis."""
    yield from _private_servers(lambda: RedisServer(0, workdir / _unique("redis")))


@pytest.fixture
def spawn(workdir: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Starts one of our services as a process and waits until it is SERVING:
    `spawn("seqsvc", {"IM_SEQSVC_DATABASE_URL": dsn})`. Unless the env or `port`
    sets IM_<SERVICE>_PORT, a free port is chosen (and, if another program takes it
    first, another one: see imdev.servers). Every process is killed at teardown; its
    log stays in the test work dir."""
    started: list[ServiceProcess] = []

    def make(
        module: str, env: Mapping[str, str], port: int | None = None, wait: bool = True
    ) -> ServiceProcess:
        port = int(env.get(f"IM_{module.upper()}_PORT") or port or 0)
        proc = ServiceProcess(module, port, env, workdir / f"{_unique(module)}.log")
        if wait:
            proc.start()
        else:
            proc.launch()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole system, shared by the tests of one module (use unique user ids
    per test). Tests that kill processes take `stack_factory` instead."""
    workdir = Path(tempfile.mkdtemp(prefix="imstack-"))
    workdir.chmod(0o755)
    s = Stack(workdir)
    try:
        s.start()
    except BaseException:
        s.kill()
        raise
    yield s
    s.kill()
    if not os.environ.get("IM_KEEP_TEST_DIRS"):
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def stack_factory() -> Iterator[Callable[..., Stack]]:
    """Private stacks: `stack_factory(gateways=2, env={"logic": {...}})`."""
    made: list[tuple[Stack, Path]] = []

    def make(**kwargs: object) -> Stack:
        workdir = Path(tempfile.mkdtemp(prefix="imstack-"))
        workdir.chmod(0o755)
        s = Stack(workdir, **kwargs)  # type: ignore[arg-type]
        made.append((s, workdir))
        s.start()
        return s

    yield make
    for s, workdir in made:
        s.kill()
        if not os.environ.get("IM_KEEP_TEST_DIRS"):
            shutil.rmtree(workdir, ignore_errors=True)
