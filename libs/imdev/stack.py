"""The whole system as local processes: PostgreSQL, Redis, NATS JetStream, seqsvc,
logic, pusher and gateway, wired by their env vars. Used by `make run`, the
end-to-end tests, the chaos harness and the benchmarks.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg

from imdev.servers import (
    Managed,
    NatsServer,
    PostgresServer,
    RedisServer,
    ServiceProcess,
    free_port,
)

DEV_TOKEN_SECRET = "dev-only-secret-change-me"


@dataclass
class StackPorts:
    """Ports of one stack. `free()` picks unused ones (tests); `local()` the fixed
    ones of `make run`, all away from the servers' default ports."""

    postgres: int
    redis: int
    nats: int
    seqsvc: int
    logic: list[int]
    pusher: list[int]
    gateway: list[int]
    gateway_internal: list[int]

    @classmethod
    def free(cls, gateways: int, logics: int, pushers: int) -> StackPorts:
        return cls(
            postgres=free_port(),
            redis=free_port(),
            nats=free_port(),
            seqsvc=free_port(),
            logic=[free_port() for _ in range(logics)],
            pusher=[free_port() for _ in range(pushers)],
            gateway=[free_port() for _ in range(gateways)],
            gateway_internal=[free_port() for _ in range(gateways)],
        )

    @classmethod
    def local(cls, gateways: int, logics: int, pushers: int) -> StackPorts:
        return cls(
            postgres=17432,
            redis=17379,
            nats=17422,
            seqsvc=17020,
            logic=[17010 + i for i in range(logics)],
            pusher=[17030 + i for i in range(pushers)],
            gateway=[17000 + i for i in range(gateways)],
            gateway_internal=[17100 + i for i in range(gateways)],
        )


class Stack:
    """Starts and stops the whole system under `workdir`.

    `gateways`, `logics`, `pushers` are process counts; `env` adds or overrides
    settings per service kind: {"logic": {"IM_LOGIC_X": "1"}}.
    """

    def __init__(
        self,
        workdir: Path,
        gateways: int = 1,
        logics: int = 1,
        pushers: int = 1,
        env: Mapping[str, Mapping[str, str]] | None = None,
        ports: StackPorts | None = None,
        token_secret: str | None = None,
        fsync: bool = False,
        database: str = "im",
        stream: str = "IM_MESSAGES",
        subject_prefix: str = "im.msg",
        redis_prefix: str = "im:",
    ) -> None:
        self.workdir = workdir
        self.env = env or {}
        self.token_secret = token_secret or secrets.token_hex(16)
        self.database = database
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.redis_prefix = redis_prefix
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = p = ports or StackPorts.free(gateways, logics, pushers)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        self.postgres = PostgresServer(
            p.postgres, self.workdir / "pg", logs / "postgres.log", fsync=fsync
        )
        self.redis = RedisServer(p.redis, self.workdir / "redis", logs / "redis.log")
        self.nats = NatsServer(p.nats, self.workdir / "nats", logs / "nats.log")
        self.seqsvc = ServiceProcess("seqsvc", p.seqsvc, self._seqsvc_env(), logs / "seqsvc.log")
        self.logics = [
            ServiceProcess("logic", port, self._logic_env(port), logs / f"logic-{i}.log")
            for i, port in enumerate(p.logic)
        ]
        self.pushers = [
            ServiceProcess("pusher", port, self._pusher_env(i, port), logs / f"pusher-{i}.log")
            for i, port in enumerate(p.pusher)
        ]
        self.gateways = [
            ServiceProcess("gateway", port, self._gateway_env(i, port), logs / f"gateway-{i}.log")
            for i, port in enumerate(p.gateway)
        ]

    # -- wiring -------------------------------------------------------------

    @property
    def database_url(self) -> str:
        return self.postgres.conninfo(self.database)

    def _with(self, kind: str, env: dict[str, str]) -> dict[str, str]:
        env.update(self.env.get(kind, {}))
        return env

    def _seqsvc_env(self) -> dict[str, str]:
        return self._with(
            "seqsvc",
            {
                "IM_SEQSVC_PORT": str(self.ports.seqsvc),
                "IM_SEQSVC_DATABASE_URL": self.database_url,
            },
        )

    def _logic_env(self, port: int) -> dict[str, str]:
        return self._with(
            "logic",
            {
                "IM_LOGIC_PORT": str(port),
                "IM_LOGIC_DATABASE_URL": self.database_url,
                "IM_LOGIC_SEQSVC_ADDRESS": f"127.0.0.1:{self.ports.seqsvc}",
                "IM_LOGIC_NATS_URL": self.nats.url(),
                "IM_LOGIC_NATS_STREAM": self.stream,
                "IM_LOGIC_NATS_SUBJECT_PREFIX": self.subject_prefix,
            },
        )

    def _pusher_env(self, i: int, port: int) -> dict[str, str]:
        logic = self.ports.logic[i % len(self.ports.logic)]
        return self._with(
            "pusher",
            {
                "IM_PUSHER_PORT": str(port),
                "IM_PUSHER_ADVERTISE_ADDRESS": f"127.0.0.1:{port}",
                "IM_PUSHER_LOGIC_ADDRESS": f"127.0.0.1:{logic}",
                "IM_PUSHER_NATS_URL": self.nats.url(),
                "IM_PUSHER_NATS_STREAM": self.stream,
                "IM_PUSHER_NATS_SUBJECT_PREFIX": self.subject_prefix,
                "IM_PUSHER_REDIS_URL": self.redis.url(),
                "IM_PUSHER_REDIS_PREFIX": self.redis_prefix,
            },
        )

    def _gateway_env(self, i: int, port: int) -> dict[str, str]:
        logic = self.ports.logic[i % len(self.ports.logic)]
        internal = self.ports.gateway_internal[i]
        return self._with(
            "gateway",
            {
                "IM_GATEWAY_PORT": str(port),
                "IM_GATEWAY_ADVERTISE_ADDRESS": f"127.0.0.1:{port}",
                # Deliver and Kick on a port of their own, as in a deployment: clients
                # must not reach GatewayInternal.
                "IM_GATEWAY_INTERNAL_PORT": str(internal),
                "IM_GATEWAY_INTERNAL_ADVERTISE_ADDRESS": f"127.0.0.1:{internal}",
                "IM_GATEWAY_LOGIC_ADDRESS": f"127.0.0.1:{logic}",
                "IM_GATEWAY_REDIS_URL": self.redis.url(),
                "IM_GATEWAY_REDIS_PREFIX": self.redis_prefix,
                "IM_GATEWAY_TOKEN_SECRET": self.token_secret,
                # A local stack on loopback: plaintext on purpose (no warning).
                "IM_GATEWAY_ALLOW_PLAINTEXT": "true",
            },
        )

    # -- lifecycle ----------------------------------------------------------

    @property
    def infra(self) -> list[Managed]:
        return [self.postgres, self.redis, self.nats]

    @property
    def services(self) -> list[ServiceProcess]:
        return [self.seqsvc, *self.logics, *self.pushers, *self.gateways]

    @property
    def gateway_addresses(self) -> list[str]:
        return [g.address for g in self.gateways]

    def start(self, timeout: float = 60.0) -> None:
        """Starts everything in dependency order and waits until every service is
        SERVING. Idempotent for the database (created if missing)."""
        for server in self.infra:
            server.start(timeout)
        self._ensure_database()
        self.seqsvc.start(timeout)
        for proc in self.logics:
            proc.launch()
        for proc in self.logics:
            proc.wait_ready(timeout)
        for proc in [*self.pushers, *self.gateways]:
            proc.launch()
        for proc in [*self.pushers, *self.gateways]:
            proc.wait_ready(timeout)

    def _ensure_database(self) -> None:
        with psycopg.connect(self.postgres.conninfo(), autocommit=True) as conn:
            cur = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
            if cur.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        """SIGTERM to every process, front to back; SIGKILL what does not exit."""
        for proc in [*self.gateways, *self.pushers, *self.logics, self.seqsvc]:
            proc.stop(timeout=30)
        for server in reversed(self.infra):
            server.stop(timeout=30)

    def kill(self) -> None:
        for proc in [*self.services, *self.infra]:
            proc.kill()

    def mint(self, user_id: str, device_id: str = "d1", ttl_s: int = 3600) -> str:
        """A client token for `user_id`/`device_id`, signed with this stack's secret."""
        from gateway.auth import mint_token  # type: ignore[import-not-found,unused-ignore]

        token: str = mint_token(self.token_secret, user_id, device_id, ttl_s)
        return token

    # -- state for `make run` / `make stop` ----------------------------------

    def state(self) -> dict[str, object]:
        procs = {}
        for proc in [*self.infra, *self.services]:
            key = f"{proc.name}:{proc.port}"
            procs[key] = {"pid": proc.pid, "port": proc.port, "log": str(proc.log_path)}
        return {
            "processes": procs,
            "gateways": self.gateway_addresses,
            "database_url": self.database_url,
            "redis_url": self.redis.url(),
            "nats_url": self.nats.url(),
            "token_secret_b64": base64.b64encode(self.token_secret.encode()).decode(),
        }


def postgres_can_reach(path: Path) -> bool:
    """Whether the unprivileged `postgres` user can traverse to `path` (when we
    are root, PostgreSQL runs as that user)."""
    if os.geteuid() != 0:
        return True
    probe = path
    while not probe.exists():
        probe = probe.parent
    result = subprocess.run(["test", "-x", str(probe)], user="postgres", capture_output=True)
    return result.returncode == 0


def write_state(path: Path, stack: Stack) -> None:
    path.write_text(json.dumps(stack.state(), indent=2))
