"""The production topology on one machine: the local stack, with a three-node
NATS JetStream cluster (stream and consumer at three replicas) and PostgreSQL as a
primary plus a synchronous streaming standby. Used by `make run-cluster`, the
cluster tests, `make chaos-cluster` and `make bench` with `--cluster`.

What is real here, not simulated:
- NATS: three nats-server processes routed to each other on loopback; the stream
  is created with num_replicas=3 by logic and pusher (IM_*_NATS_REPLICAS=3), the
  durable consumer with num_replicas=3. Every service gets all three URLs.
- PostgreSQL: the standby is a `pg_basebackup -R` of the primary and streams its
  WAL through a replication slot. Both nodes run with
  `synchronous_standby_names = 'FIRST 1 (pg0, pg1)'` and `synchronous_commit = on`:
  a node never waits for itself, so whichever is primary waits for the other, and
  a failover needs no configuration change. A COMMIT returns only once the standby
  has flushed its WAL: logic's send-ACK and seqsvc's ceilings (I3, I6) survive the
  primary's death. The price: while no standby is connected, commits wait (writes
  stop); `rebuild_deposed()` brings one back.
- Services reach PostgreSQL through a libpq multi-host URL with
  `target_session_attrs=read-write`: they connect to whichever node takes writes,
  and find the new primary after a failover by reconnecting.

Failover is the operator's (or Patroni's, or CloudNativePG's) job, done here by
the caller in three steps: `kill_primary()` (kill -9; the node is marked deposed
and refuses to start), `promote_standby()` (`pg_promote()`), `rebuild_deposed()`
(wipe, `pg_basebackup` from the new primary, start as its standby). A deposed
primary never starts again as a primary: its data may hold commits the new
primary never saw (a commit whose standby flush was not yet confirmed).

seqsvc: three ACTIVE instances (`seqsvcs`), each serving its share of the
sections under per-section leases in the same database (services/seqsvc/README.md),
each behind the multi-host URL. logic is given the first instance's address; its
routing client reads the routing table there (GetRouting) and calls each
section's owner, and falls back to the other instances it learnt while the first
is down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import psycopg

from imdev.servers import Managed, NatsServer, PostgresNode, free_port, start_all
from imdev.stack import Stack, StackPorts

NATS_NODES = 3
PG_NODES = 2
NATS_CLUSTER = "im"
#: Offsets from the base port of `make run-cluster` (beside StackPorts.local's).
NATS_CLIENT_OFFSETS = (422, 423, 424)
NATS_ROUTE_OFFSETS = (442, 443, 444)
PG_OFFSETS = (432, 433)
#: seqsvc instances: the first is the stack's (+20, metrics +220), the others next to it.
SEQSVC_INSTANCES = 3
SEQSVC_OFFSETS = (21, 22)
SEQSVC_METRICS_OFFSETS = (221, 222)


def replication_settings(names: list[str]) -> dict[str, str]:
    """PostgreSQL settings of every node (primary or standby alike)."""
    return {
        "wal_level": "replica",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "hot_standby": "on",
        "synchronous_commit": "on",
        # A node never waits for itself: whichever is primary waits for the other.
        "synchronous_standby_names": f"FIRST 1 ({', '.join(names)})",
        "wal_receiver_status_interval": "1s",
        "wal_keep_size": "256MB",
        # A standby whose primary just died waits this long before it looks for
        # WAL again, and PostgreSQL 15 finishes a promotion only after that wait:
        # with the default 5 s one chaos run's failover took 5.09 s to promote
        # (0.28 s in the other). 200 ms bounds it.
        "wal_retrieve_retry_interval": "200ms",
    }


class ClusterPorts:
    """The ports of the replicated infrastructure."""

    def __init__(
        self,
        pg: list[int],
        nats: list[int],
        nats_routes: list[int],
        seqsvc: list[int] | None = None,
        seqsvc_metrics: list[int] | None = None,
    ) -> None:
        self.pg, self.nats, self.nats_routes = pg, nats, nats_routes
        #: The seqsvc instances after the stack's own (seqsvc-1, seqsvc-2, ...),
        #: and their metrics ports (empty: none).
        self.seqsvc = seqsvc if seqsvc is not None else []
        self.seqsvc_metrics = seqsvc_metrics if seqsvc_metrics is not None else []

    @classmethod
    def free(cls, seqsvcs: int = SEQSVC_INSTANCES) -> ClusterPorts:
        return cls(
            [free_port() for _ in range(PG_NODES)],
            [free_port() for _ in range(NATS_NODES)],
            [free_port() for _ in range(NATS_NODES)],
            [free_port() for _ in range(seqsvcs - 1)],
        )

    @classmethod
    def local(cls, base: int) -> ClusterPorts:
        return cls(
            [base + o for o in PG_OFFSETS],
            [base + o for o in NATS_CLIENT_OFFSETS],
            [base + o for o in NATS_ROUTE_OFFSETS],
            [base + o for o in SEQSVC_OFFSETS],
            [base + o for o in SEQSVC_METRICS_OFFSETS],
        )

    def all(self) -> list[tuple[str, int]]:
        out = [(f"pg{i}", p) for i, p in enumerate(self.pg)]
        out += [(f"nats{i}", p) for i, p in enumerate(self.nats)]
        out += [(f"nats{i} routes", p) for i, p in enumerate(self.nats_routes)]
        out += [(f"seqsvc-{i + 1}", p) for i, p in enumerate(self.seqsvc)]
        out += [(f"seqsvc-{i + 1} metrics", p) for i, p in enumerate(self.seqsvc_metrics)]
        return out


class ClusterStack(Stack):
    """`Stack` with the replicated infrastructure (see the module docstring).

    `proxies` routes single processes through TCP proxies (the chaos harness cuts
    them): {"logic-0": {<pg or nats port>: <proxy port>}}; a process not named
    connects directly ("seqsvc-1" for the second seqsvc instance). Defaults: two
    gateways, two logic, two pushers, three seqsvc instances."""

    def __init__(
        self,
        workdir: Path,
        gateways: int = 2,
        logics: int = 2,
        pushers: int = 2,
        seqsvcs: int = SEQSVC_INSTANCES,
        env: Mapping[str, Mapping[str, str]] | None = None,
        ports: StackPorts | None = None,
        cluster_ports: ClusterPorts | None = None,
        proxies: Mapping[str, Mapping[int, int]] | None = None,
        fsync: bool = False,
        pid_dir: Path | None = None,
        **kwargs: object,
    ) -> None:
        cp = self.cluster_ports = cluster_ports or ClusterPorts.free(seqsvcs)
        if len(cp.seqsvc) < seqsvcs - 1:
            raise ValueError(f"{seqsvcs} seqsvc instances need {seqsvcs - 1} extra ports")
        self.proxies = {who: dict(m) for who, m in (proxies or {}).items()}
        workdir.mkdir(parents=True, exist_ok=True)
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        names = [f"pg{i}" for i in range(len(cp.pg))]
        self.pg_nodes = [
            PostgresNode(
                name,
                port,
                workdir / name,
                logs / f"{name}.log",
                fsync=fsync,
                settings=replication_settings(names),
            )
            for name, port in zip(names, cp.pg, strict=True)
        ]
        self.nats_nodes = [
            NatsServer(
                port,
                workdir / f"nats{i}",
                logs / f"nats{i}.log",
                server_name=f"n{i}",
                cluster=NATS_CLUSTER,
                cluster_port=cp.nats_routes[i],
                routes=[r for j, r in enumerate(cp.nats_routes) if j != i],
            )
            for i, port in enumerate(cp.nats)
        ]
        replicas = str(len(self.nats_nodes))
        merged: dict[str, dict[str, str]] = {
            "logic": {"IM_LOGIC_NATS_REPLICAS": replicas},
            "pusher": {"IM_PUSHER_NATS_REPLICAS": replicas},
        }
        for kind, settings in (env or {}).items():
            merged.setdefault(kind, {}).update(settings)
        if ports is None:
            ports = StackPorts.free(gateways, logics, pushers)
        ports.postgres, ports.nats = cp.pg[0], cp.nats[0]
        super().__init__(
            workdir,
            env=merged,
            ports=ports,
            fsync=fsync,
            pid_dir=pid_dir,
            **kwargs,  # type: ignore[arg-type]
        )
        # More seqsvc instances, each with its share of the sections (per-section
        # leases). logic is given the first one's address only: its routing
        # client reads GetRouting there and follows the table to every instance.
        for i in range(1, seqsvcs):
            seqsvc = self._service(
                "seqsvc", partial(self._seqsvc_instance_env, i), logs / f"seqsvc-{i}.log"
            )
            seqsvc.movable_ports = set()  # the routing table names it
            self.seqsvcs.append(seqsvc)
        # The replicated servers keep their ports: peers and URLs name them.
        self.postgres = self._current_primary() or self.pg_nodes[0]
        self.nats = self.nats_nodes[0]
        for proc in self.infra:
            if proc is not self.redis:
                proc.movable_ports = set()
        if pid_dir is not None:
            for managed in [*self.infra, *self.seqsvcs]:
                managed.pidfile = pid_dir / f"{managed.log_path.stem}.pid"

    # -- wiring ---------------------------------------------------------------

    def _via(self, who: str, port: int) -> int:
        return self.proxies.get(who, {}).get(port, port)

    def _seqsvc_env(self) -> dict[str, str]:
        return self._seqsvc_instance_env(0)

    def _seqsvc_instance_env(self, i: int) -> dict[str, str]:
        """seqsvc instance `i`: its port, its instance id (`seqsvc-<i>`: a restart
        on the same port takes its sections back at once), the database."""
        cp = self.cluster_ports
        if i == 0:
            port, metrics = self.ports.seqsvc, self._metrics("seqsvc", 0)
        else:
            port = cp.seqsvc[i - 1]
            metrics = (
                {"IM_SEQSVC_METRICS_PORT": str(cp.seqsvc_metrics[i - 1])}
                if i - 1 < len(cp.seqsvc_metrics)
                else {}
            )
        who = "seqsvc" if i == 0 else f"seqsvc-{i}"
        return self._with(
            "seqsvc",
            {
                "IM_SEQSVC_PORT": str(port),
                "IM_SEQSVC_DATABASE_URL": self.database_url_for(who),
                "IM_SEQSVC_INSTANCE_ID": f"seqsvc-{i}",
                **metrics,
            },
        )

    @property
    def database_url(self) -> str:
        """libpq multi-host URL: every node, the writable one chosen at connect."""
        return self._pg_url(None)

    def _pg_url(self, who: str | None) -> str:
        hosts = ",".join(
            f"127.0.0.1:{self._via(who, n.port) if who else n.port}" for n in self.pg_nodes
        )
        return f"postgresql://postgres@{hosts}/{self.database}?target_session_attrs=read-write"

    def database_url_for(self, who: str) -> str:
        return self._pg_url(who)

    @property
    def nats_url(self) -> str:
        return ",".join(n.url() for n in self.nats_nodes)

    def nats_url_for(self, who: str) -> str:
        return ",".join(f"nats://127.0.0.1:{self._via(who, n.port)}" for n in self.nats_nodes)

    @property
    def infra(self) -> list[Managed]:
        nodes: list[Managed] = [*self.pg_nodes, self.redis, *self.nats_nodes]
        return nodes

    # -- start ----------------------------------------------------------------

    def _current_primary(self) -> PostgresNode | None:
        """The node whose data directory is a primary's (None before the first
        start). Two would be a split brain: refused."""
        primaries = [
            n for n in self.pg_nodes if (n.datadir / "PG_VERSION").exists() and not n.is_standby
        ]
        if len(primaries) > 1:
            names = ", ".join(n.node_name for n in primaries)
            raise RuntimeError(f"more than one PostgreSQL primary data directory: {names}")
        return primaries[0] if primaries else None

    def _start_infra(self, timeout: float) -> None:
        primary = self._current_primary() or self.pg_nodes[0]
        self.postgres = primary
        try:
            primary.start(timeout)
            for node in self.pg_nodes:
                if node is not primary:
                    node.upstream = primary
                    node.start(timeout)
            self.wait_synchronous(timeout)
            start_all([self.redis, *self.nats_nodes], timeout)
            self.wait_jetstream(timeout)
        except BaseException:
            for proc in self.infra:
                proc.kill()
            raise

    def wait_synchronous(self, timeout: float = 60.0) -> None:
        """Waits until the primary has a synchronous standby streaming from it."""
        deadline = time.monotonic() + timeout
        while not self.primary_node.sync_standbys():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no synchronous standby after {timeout}s")
            time.sleep(0.1)

    def wait_jetstream(self, timeout: float = 60.0) -> None:
        """Waits until the NATS cluster has a JetStream meta leader (streams can
        be created)."""
        asyncio.run(_wait_jetstream([n.url() for n in self.nats_nodes], timeout))

    # -- failover (the operator's steps) --------------------------------------

    @property
    def standby(self) -> PostgresNode:
        return next(n for n in self.pg_nodes if n is not self.postgres)

    def kill_primary(self) -> PostgresNode:
        """kill -9 of the primary; it is marked deposed (refuses to start)."""
        old = self.postgres
        assert isinstance(old, PostgresNode)
        old.deposed = True
        old.kill()
        return old

    def promote_standby(self, timeout: float = 30.0) -> PostgresNode:
        """Promotes the standby; from now on it is `postgres`."""
        new = self.standby
        new.promote(timeout)
        self.postgres = new
        return new

    def rebuild_deposed(self, timeout: float = 90.0) -> None:
        """Rebuilds every deposed node as a standby of the primary and waits
        until the primary has its synchronous standby again (writes resume)."""
        for node in self.pg_nodes:
            if node is not self.postgres and node.deposed:
                node.rebuild_from(self.primary_node, timeout)
        self.wait_synchronous(timeout)

    @property
    def primary_node(self) -> PostgresNode:
        assert isinstance(self.postgres, PostgresNode)
        return self.postgres

    def fail_over(self, timeout: float = 90.0) -> None:
        """The whole failover: kill -9 the primary, promote, rebuild."""
        self.kill_primary()
        self.promote_standby(timeout)
        self.rebuild_deposed(timeout)

    # -- NATS -----------------------------------------------------------------

    def stream_leader(self, timeout: float = 10.0) -> int | None:
        """Index of the NATS node that leads the stream now (None: no leader)."""
        name = asyncio.run(
            _stream_leader([n.url() for n in self.nats_nodes if n.running()], self.stream, timeout)
        )
        for i, node in enumerate(self.nats_nodes):
            if node.server_name == name:
                return i
        return None

    def state(self) -> dict[str, object]:
        state = super().state()
        state["topology"] = "cluster"
        state["postgres_primary"] = self.primary_node.node_name
        state["nats_urls"] = [n.url() for n in self.nats_nodes]
        return state


async def _wait_jetstream(servers: list[str], timeout: float) -> None:
    import nats

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(servers=servers, connect_timeout=2, max_reconnect_attempts=1)
            try:
                await nc.jetstream(timeout=2).account_info()
                return
            finally:
                await nc.close()
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.2)
    raise TimeoutError(f"JetStream not ready after {timeout}s ({last!r})")


async def _stream_leader(servers: list[str], stream: str, timeout: float) -> str | None:
    import nats

    if not servers:
        return None
    nc = await nats.connect(servers=servers, connect_timeout=2, max_reconnect_attempts=1)
    try:
        info = await nc.jetstream(timeout=timeout).stream_info(stream)
    except Exception:
        return None
    finally:
        await nc.close()
    cluster = info.cluster
    return cluster.leader if cluster is not None else None


def primary_of(url: str) -> int:
    """The port of the node a read-write connection through `url` lands on."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SELECT inet_server_port()").fetchone()
    assert row is not None
    return int(row[0])
