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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psycopg

from imdev.servers import (
    Managed,
    NatsServer,
    PostgresServer,
    RedisServer,
    ServiceProcess,
    free_port,
    process_start_time,
    start_all,
)

DEV_TOKEN_SECRET = "dev-only-secret-change-me"

#: `make run`'s default base port (IM_DEV_BASE_PORT); see StackPorts.local.
DEFAULT_BASE_PORT = 17000
#: Ports StackPorts.local uses, as offsets from the base port.
LAYOUT_SPAN = 500
_MAX_PER_KIND = 10


@dataclass
class StackPorts:
    """Ports of one stack. `free()` picks unused ones that may move if another
    program takes them first (tests); `local()` the fixed ones of `make run`.

    `metrics` holds the Prometheus ports by service kind ("seqsvc", "logic",
    "pusher", "gateway": one per process; a kind left out has no metrics port)."""

    postgres: int
    redis: int
    nats: int
    seqsvc: int
    logic: list[int]
    pusher: list[int]
    gateway: list[int]
    gateway_internal: list[int]
    metrics: dict[str, list[int]] = field(default_factory=dict)
    #: The gateways' WebSocket listeners (empty: none).
    gateway_ws: list[int] = field(default_factory=list)
    movable: bool = False

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
            gateway_ws=[free_port() for _ in range(gateways)],
            movable=True,
        )

    @classmethod
    def local(
        cls, gateways: int, logics: int, pushers: int, base: int = DEFAULT_BASE_PORT
    ) -> StackPorts:
        """`make run`'s ports, all derived from `base` (IM_DEV_BASE_PORT) and inside
        base .. base+499, away from the servers' default ports for the default base:
        gateways base+0.., logics +10.., seqsvc +20, pushers +30.., the gateways'
        internal ports +100.., their WebSocket ports +150.., metrics +200 + the same
        offsets (gateway +200..,
        logic +210.., seqsvc +220, pusher +230..), Redis +379, NATS +422,
        PostgreSQL +432."""
        if max(gateways, logics, pushers) > _MAX_PER_KIND:
            raise ValueError(f"at most {_MAX_PER_KIND} processes of a kind")
        if not 1024 <= base <= 65535 - LAYOUT_SPAN:
            raise ValueError(f"base port {base} is outside 1024..{65535 - LAYOUT_SPAN}")
        return cls(
            postgres=base + 432,
            redis=base + 379,
            nats=base + 422,
            seqsvc=base + 20,
            logic=[base + 10 + i for i in range(logics)],
            pusher=[base + 30 + i for i in range(pushers)],
            gateway=[base + i for i in range(gateways)],
            gateway_internal=[base + 100 + i for i in range(gateways)],
            gateway_ws=[base + 150 + i for i in range(gateways)],
            metrics={
                "gateway": [base + 200 + i for i in range(gateways)],
                "logic": [base + 210 + i for i in range(logics)],
                "seqsvc": [base + 220],
                "pusher": [base + 230 + i for i in range(pushers)],
            },
        )

    def all(self) -> list[tuple[str, int]]:
        """(what, port) for every port of the stack."""
        ports = [("postgres", self.postgres), ("redis", self.redis), ("nats", self.nats)]
        ports.append(("seqsvc", self.seqsvc))
        ports += [(f"logic-{i}", p) for i, p in enumerate(self.logic)]
        ports += [(f"pusher-{i}", p) for i, p in enumerate(self.pusher)]
        ports += [(f"gateway-{i}", p) for i, p in enumerate(self.gateway)]
        ports += [(f"gateway-{i} internal", p) for i, p in enumerate(self.gateway_internal)]
        ports += [(f"gateway-{i} websocket", p) for i, p in enumerate(self.gateway_ws)]
        for kind, kind_ports in self.metrics.items():
            ports += [(f"{kind}-{i} metrics", p) for i, p in enumerate(kind_ports)]
        return ports


class Stack:
    """Starts and stops the whole system under `workdir`.

    `gateways`, `logics`, `pushers` are process counts; `env` adds or overrides
    settings per service kind: {"logic": {"IM_LOGIC_X": "1"}}. With `pid_dir`, every
    process records its pid there while it runs (Managed.pidfile), named like its
    log (postgres.pid, logic-0.pid).
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
        pid_dir: Path | None = None,
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
        # How each service's wiring is computed, to redo it if a port moves.
        self._wiring: dict[int, Callable[[], dict[str, str]]] = {}
        self.seqsvc = self._service("seqsvc", self._seqsvc_env, logs / "seqsvc.log")
        #: Every seqsvc instance (here one: `seqsvc`; a cluster runs several).
        self.seqsvcs = [self.seqsvc]
        self.logics = [
            self._service("logic", partial(self._logic_env, i), logs / f"logic-{i}.log")
            for i in range(len(p.logic))
        ]
        self.pushers = [
            self._service("pusher", partial(self._pusher_env, i), logs / f"pusher-{i}.log")
            for i in range(len(p.pusher))
        ]
        self.gateways = [
            self._service("gateway", partial(self._gateway_env, i), logs / f"gateway-{i}.log")
            for i in range(len(p.gateway))
        ]
        for proc in [*self.infra, *self.services]:
            if p.movable:  # only the ports chosen here, not those in `env`
                proc.movable_ports = {proc.port}
            if pid_dir is not None:
                proc.pidfile = pid_dir / f"{proc.log_path.stem}.pid"
        if p.movable:
            for i, gateway in enumerate(self.gateways):
                gateway.movable_ports.add(p.gateway_internal[i])
                if i < len(p.gateway_ws):
                    gateway.movable_ports.add(p.gateway_ws[i])

    def _service(
        self, module: str, wiring: Callable[[], dict[str, str]], log: Path
    ) -> ServiceProcess:
        env = wiring()
        proc = ServiceProcess(module, int(env[f"IM_{module.upper()}_PORT"]), env, log)
        self._wiring[id(proc)] = wiring
        return proc

    # -- wiring -------------------------------------------------------------

    @property
    def database_url(self) -> str:
        return self.postgres.conninfo(self.database)

    @property
    def nats_url(self) -> str:
        """What the services get as their NATS URL (comma-separated: every node)."""
        return self.nats.url()

    def database_url_for(self, who: str) -> str:
        """The database URL process `who` ("logic-0", "seqsvc") is given: the
        same for all here; a cluster may route one process through a proxy."""
        return self.database_url

    def nats_url_for(self, who: str) -> str:
        """The NATS URL(s) process `who` is given (see database_url_for)."""
        return self.nats_url

    def _with(self, kind: str, env: dict[str, str]) -> dict[str, str]:
        env.update(self.env.get(kind, {}))
        return env

    def _metrics(self, kind: str, i: int) -> dict[str, str]:
        ports = self.ports.metrics.get(kind)
        return {f"IM_{kind.upper()}_METRICS_PORT": str(ports[i])} if ports else {}

    def _seqsvc_env(self) -> dict[str, str]:
        return self._with(
            "seqsvc",
            {
                "IM_SEQSVC_PORT": str(self.ports.seqsvc),
                "IM_SEQSVC_DATABASE_URL": self.database_url_for("seqsvc"),
                **self._metrics("seqsvc", 0),
            },
        )

    def _logic_env(self, i: int) -> dict[str, str]:
        return self._with(
            "logic",
            {
                "IM_LOGIC_PORT": str(self.ports.logic[i]),
                "IM_LOGIC_DATABASE_URL": self.database_url_for(f"logic-{i}"),
                "IM_LOGIC_SEQSVC_ADDRESS": f"127.0.0.1:{self.ports.seqsvc}",
                "IM_LOGIC_NATS_URL": self.nats_url_for(f"logic-{i}"),
                "IM_LOGIC_NATS_STREAM": self.stream,
                "IM_LOGIC_NATS_SUBJECT_PREFIX": self.subject_prefix,
                **self._metrics("logic", i),
            },
        )

    def _pusher_env(self, i: int) -> dict[str, str]:
        port = self.ports.pusher[i]
        logic = self.ports.logic[i % len(self.ports.logic)]
        return self._with(
            "pusher",
            {
                "IM_PUSHER_PORT": str(port),
                "IM_PUSHER_ADVERTISE_ADDRESS": f"127.0.0.1:{port}",
                "IM_PUSHER_LOGIC_ADDRESS": f"127.0.0.1:{logic}",
                "IM_PUSHER_NATS_URL": self.nats_url_for(f"pusher-{i}"),
                "IM_PUSHER_NATS_STREAM": self.stream,
                "IM_PUSHER_NATS_SUBJECT_PREFIX": self.subject_prefix,
                "IM_PUSHER_REDIS_URL": self.redis.url(),
                "IM_PUSHER_REDIS_PREFIX": self.redis_prefix,
                **self._metrics("pusher", i),
            },
        )

    def _gateway_env(self, i: int) -> dict[str, str]:
        port = self.ports.gateway[i]
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
                **self._ws_env(i),
                **self._metrics("gateway", i),
            },
        )

    # -- lifecycle ----------------------------------------------------------

    @property
    def infra(self) -> list[Managed]:
        return [self.postgres, self.redis, self.nats]

    @property
    def services(self) -> list[ServiceProcess]:
        return [*self.seqsvcs, *self.logics, *self.pushers, *self.gateways]

    @property
    def gateway_addresses(self) -> list[str]:
        return [g.address for g in self.gateways]

    @property
    def ws_urls(self) -> list[str]:
        """ws:// URL of each gateway's WebSocket listener (empty: none)."""
        return [f"ws://127.0.0.1:{p}/v1/connect" for p in self.ports.gateway_ws]

    def _ws_env(self, i: int) -> dict[str, str]:
        if i >= len(self.ports.gateway_ws):
            return {}
        # A local stack: any web page may connect (IM_GATEWAY_WS_ORIGINS names the
        # allowed pages in a deployment).
        return {"IM_GATEWAY_WS_PORT": str(self.ports.gateway_ws[i]), "IM_GATEWAY_WS_ORIGINS": "*"}

    def start(self, timeout: float = 60.0) -> None:
        """Starts everything in dependency order and waits until every service is
        SERVING. Idempotent for the database (created if missing).

        All or nothing: if anything fails to start (or the caller is interrupted),
        everything this call started is stopped before the error is raised. With
        ports from `StackPorts.free()`, a port that another program took first is
        replaced by a new one and the services that use it are wired to it."""
        try:
            self._start_infra(timeout)
            self._follow_moves()
            self._ensure_database()
            for group in (
                self.seqsvcs,
                self.logics,
                [*self.pushers, *self.gateways],
            ):
                start_all(group, timeout)
                self._follow_moves()
        except BaseException:
            self.stop()
            raise

    def _start_infra(self, timeout: float) -> None:
        start_all(self.infra, timeout)

    def _follow_moves(self) -> None:
        """Records ports that moved during start-up in `ports` and rewires the
        services not launched yet to them."""
        p = self.ports
        before = p.all()
        p.postgres, p.redis, p.nats = self.postgres.port, self.redis.port, self.nats.port
        p.seqsvc = self.seqsvc.port
        p.logic = [proc.port for proc in self.logics]
        p.pusher = [proc.port for proc in self.pushers]
        p.gateway = [proc.port for proc in self.gateways]
        p.gateway_internal = [int(g.extra_env["IM_GATEWAY_INTERNAL_PORT"]) for g in self.gateways]
        if p.gateway_ws:
            p.gateway_ws = [int(g.extra_env["IM_GATEWAY_WS_PORT"]) for g in self.gateways]
        for kind, procs in self._by_kind().items():
            if kind in p.metrics:
                var = f"IM_{kind.upper()}_METRICS_PORT"
                p.metrics[kind] = [int(proc.extra_env[var]) for proc in procs]
        if p.all() == before:
            return
        for proc in self.services:
            if proc.proc is None:  # not launched: its own ports have not moved
                proc.extra_env.update(self._wiring[id(proc)]())

    def _by_kind(self) -> dict[str, list[ServiceProcess]]:
        return {
            "seqsvc": self.seqsvcs,
            "logic": self.logics,
            "pusher": self.pushers,
            "gateway": self.gateways,
        }

    def _ensure_database(self) -> None:
        with psycopg.connect(self.postgres.conninfo(), autocommit=True) as conn:
            cur = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
            if cur.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        """SIGTERM to every process, front to back; SIGKILL what does not exit."""
        for proc in [*self.gateways, *self.pushers, *self.logics, *self.seqsvcs]:
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
        """What runs, for `make run`'s state file: each process with its pid, the
        pid's start time (Linux clock ticks; with the pid it names one process),
        ports and log, in start order."""
        procs: list[dict[str, object]] = []
        for proc in [*self.infra, *self.services]:
            entry: dict[str, object] = {
                "name": proc.name,
                "key": proc.log_path.stem,
                "pid": proc.pid,
                "start_time": process_start_time(proc.pid) if proc.pid else None,
                "port": proc.port,
                "log": str(proc.log_path),
            }
            if isinstance(proc, ServiceProcess):
                for extra in ("INTERNAL_PORT", "METRICS_PORT"):
                    value = int(proc.extra_env.get(proc.prefix + extra) or 0)
                    if value:
                        entry[extra.lower()] = value
            procs.append(entry)
        return {
            "version": 2,
            "processes": procs,
            "gateways": self.gateway_addresses,
            "database_url": self.database_url,
            "redis_url": self.redis.url(),
            "nats_url": self.nats_url,
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


def write_state(path: Path, state: Mapping[str, object]) -> None:
    """Writes `state` as JSON atomically: a reader sees the old file or the new
    one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)
