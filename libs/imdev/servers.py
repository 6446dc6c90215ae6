"""Real servers as child processes, for tests, the chaos harness and `make run`.

Each server runs on 127.0.0.1 on a port it is given, with its data in a directory
it is given, and can be stopped gently (SIGTERM), killed (SIGKILL) and restarted
on the same port and data. Nothing here is a mock.

Ports: a server built with port 0 gets a free port chosen here, and if another
program takes that port before the server binds it (the choose-then-bind race of
any free-port helper), the first start moves it to a new port and tries again. A
port given explicitly never moves: a taken one fails with PortTaken. Readiness
means the very process we started listens on the port (checked in /proc where
there is one), so a test never talks to a stranger that holds its port.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]

#: How many times a server's first start may move to a new port (see PortTaken).
PORT_ATTEMPTS = 4

#: What PostgreSQL, Redis, NATS, gRPC and our own StartupError say when a bind
#: fails because the address is taken.
_IN_USE = re.compile(r"address already in use", re.IGNORECASE)


class PortTaken(RuntimeError):
    """A server could not listen because another process holds `port`."""

    def __init__(self, name: str, port: int, detail: str = "") -> None:
        super().__init__(
            f"{name}: port {port} is already in use by another program"
            + (f" ({detail})" if detail else "")
        )
        self.name = name
        self.port = port


def free_port() -> int:
    """A port nobody listens on now (the kernel's choice, never a default port).

    Racy by nature: someone else may bind it before the caller does. Give servers
    port 0 instead where you can; they retry on a new port when they lose."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether a server could not bind 127.0.0.1:`port` now: something listens on
    it or holds it bound. Probes like a server does (SO_REUSEADDR, so a port left in
    TIME_WAIT by a previous run counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_port(
    port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP `port` (any address, IPv4 or IPv6), from
    /proc/net; None where there is no /proc."""
    found: set[str] = set()
    seen_any = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen_any = True
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 the inode.
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                found.add(fields[9])
    return found if seen_any else None


def listens(pid: int, port: int) -> bool | None:
    """Whether process `pid` itself holds a socket listening on TCP `port`. None
    when this cannot be told (no /proc, or no permission to read its fds)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    except OSError:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


def process_start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (/proc/<pid>/stat field
    22): with the pid, it names one process even after the pid is reused. None if
    there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


def as_user(user: str | None) -> list[str]:
    """argv prefix that runs a command as `user` (nothing for None): setpriv
    changes user and execs, so the pid stays the command's own.

    Not Popen(user=...): that changes user in the forked child before exec, and
    in a process where gRPC's threads run (the chaos harness, tests with clients)
    the child was seen to die with SIGSEGV before it got to exec."""
    if not user:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


def _which(name: str, extra: Sequence[Path] = ()) -> str:
    for d in extra:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; run `make deps`")
    return found


def pg_bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for c in candidates:
        if (c / "postgres").exists():
            return c
    pg_config = shutil.which("pg_config")
    if pg_config:
        return Path(subprocess.check_output([pg_config, "--bindir"], text=True).strip())
    raise FileNotFoundError("PostgreSQL binaries not found (Debian: postgresql package)")


class Managed:
    """A child process with stop/kill/restart. Subclasses define `argv()` and
    may refine `wait_healthy()`.

    `port` 0 means "any free port": one is chosen now (so `port` is known at once)
    and, if another program takes it first, the first `start()` moves to a new
    one (`movable_ports`). After a successful start the ports stay put: restarts
    keep the address that peers know. `pidfile`, when set, records the pid and its
    start time ("pid start_time name port") from launch until the process is
    reaped, so a later command can find and stop it even if it was not started by
    this object."""

    name = "server"
    user: str | None = None

    def __init__(self, port: int, datadir: Path, log_path: Path | None = None) -> None:
        #: Ports this object may move while it has not started yet.
        self.movable_ports: set[int] = set()
        if port == 0:
            port = free_port()
            self.movable_ports.add(port)
        self.port = port
        self.datadir = datadir
        self.log_path = log_path or datadir.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfile: Path | None = None
        self._log_offset = 0

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> Mapping[str, str] | None:
        return None

    def prepare(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)

    def listen_ports(self) -> list[int]:
        """Every port this process listens on (all checked before launch)."""
        return [self.port]

    def start(self, timeout: float = 30.0) -> None:
        """Starts the process and waits until it is ready. Raises PortTaken if a
        port is taken and may not move (or kept being taken), RuntimeError if the
        process exits first, TimeoutError if it is not ready in time; in every case
        the process is no longer running."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self.launch()
                self.wait_ready(timeout)
            except PortTaken as exc:
                self.kill()
                if exc.port not in self.movable_ports or attempt == PORT_ATTEMPTS:
                    raise
                self.move_port(exc.port)
                continue
            except BaseException:
                self.kill()
                raise
            self.movable_ports.clear()
            return

    def move_port(self, old: int) -> int:
        """Replaces the movable port `old` with a new free one; returns it."""
        new = free_port()
        self.movable_ports.discard(old)
        self.movable_ports.add(new)
        if self.port == old:
            self.port = new
        return new

    def launch(self, check_port: bool = True) -> None:
        """Starts the process without waiting for it. Refuses a port that something
        else already holds (PortTaken), so a test never talks to a stranger's server
        (`check_port=False`: start it anyway, for tests of what a server does when
        its port is taken)."""
        if check_port:
            for port in self.listen_ports():
                if port_in_use(port):
                    raise PortTaken(self.name, port)
        self.prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._log_offset = logf.seek(0, os.SEEK_END)
            self.proc = subprocess.Popen(
                [*as_user(self.user), *self.argv()],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                start_new_session=True,
            )
        finally:
            logf.close()
        self._write_pidfile()

    def _write_pidfile(self) -> None:
        if self.pidfile is None or self.proc is None:
            return
        started = process_start_time(self.proc.pid)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text(f"{self.proc.pid} {started or 0} {self.name} {self.port}\n")
        os.replace(tmp, self.pidfile)

    def _reaped(self) -> None:
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)

    def new_log(self) -> str:
        """What the process has logged since its last launch."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def exit_error(self) -> RuntimeError:
        """Why the process exited during start-up: PortTaken when its log says a
        bind failed on a taken address, otherwise its status and last log lines."""
        code = self.proc.returncode if self.proc is not None else None
        log = self.new_log()
        for line in log.splitlines():
            if _IN_USE.search(line):
                ports = self.listen_ports()
                port = next((p for p in ports if re.search(rf":{p}\b", line)), ports[0])
                return PortTaken(self.name, port, line.strip()[:300])
        tail = "\n".join(log.strip().splitlines()[-5:])
        return RuntimeError(
            f"{self.name} exited with {code} during start-up (log: {self.log_path})"
            + (f":\n{tail}" if tail else "")
        )

    def wait_ready(self, timeout: float) -> None:
        """Waits until the process we launched listens on its port, then until it
        is healthy. Raises exit_error() if it exits first, TimeoutError past
        `timeout`."""
        deadline = time.monotonic() + timeout
        self.wait_listening(deadline)
        self.wait_healthy(deadline)

    def wait_listening(self, deadline: float) -> None:
        assert self.proc is not None, "launch() first"
        while True:
            if self.proc.poll() is not None:
                self._reaped()
                raise self.exit_error()
            owned = listens(self.proc.pid, self.port)
            if owned is None:  # cannot tell: settle for "someone listens"
                owned = _accepts(self.port)
            if owned:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} not listening on 127.0.0.1:{self.port}")
            time.sleep(0.05)

    def wait_healthy(self, deadline: float) -> None:
        """Readiness beyond listening; nothing more by default."""

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self._reaped()
            raise self.exit_error()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._reaped()
        return code

    def _terminate(self, sig: int, timeout: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reaped()
        return self.proc.returncode

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        return self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self._reaped()

    def restart(self, timeout: float = 30.0, hard: bool = False) -> None:
        if hard:
            self.kill()
        else:
            self.stop()
        self.start(timeout)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_all(servers: Iterable[Managed], timeout: float = 30.0) -> None:
    """Launches `servers` together, then waits for each; one that lost a movable
    port is started again on a new one (`Managed.start`). If any cannot start,
    every one of them is killed and the error raised."""
    servers = list(servers)
    try:
        launched: list[Managed] = []
        for server in servers:
            try:
                server.launch()
                launched.append(server)
            except PortTaken as exc:
                if exc.port not in server.movable_ports:
                    raise
                server.move_port(exc.port)
        for server in servers:
            if server in launched:
                try:
                    server.wait_ready(timeout)
                    server.movable_ports.clear()
                    continue
                except PortTaken as exc:
                    server.kill()
                    if exc.port not in server.movable_ports:
                        raise
                    server.move_port(exc.port)
            server.start(timeout)
    except BaseException:
        for server in servers:
            server.kill()
        raise


class PostgresServer(Managed):
    """A PostgreSQL cluster initialised into `datadir` (as user postgres when
    running as root, since PostgreSQL refuses to run as root)."""

    name = "postgres"

    def __init__(
        self,
        port: int,
        datadir: Path,
        log_path: Path | None = None,
        fsync: bool = True,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(port, datadir, log_path)
        self.bindir = pg_bindir()
        self.fsync = fsync
        self.settings = dict(settings or {})
        self.user = "postgres" if os.geteuid() == 0 else None

    @property
    def sockdir(self) -> Path:
        return self.datadir / "sock"

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def _chown(self, path: Path) -> None:
        if self.user:
            shutil.chown(path, self.user, self.user)

    def prepare(self) -> None:
        if not (self.datadir / "PG_VERSION").exists():
            self.datadir.mkdir(parents=True, exist_ok=True)
            self._chown(self.datadir)
            os.chmod(self.datadir, 0o700)
            subprocess.run(
                [
                    *as_user(self.user),
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        self.sockdir.mkdir(exist_ok=True)
        self._chown(self.sockdir)
        if not self.log_path.exists():
            self.log_path.touch()
        # stale pid file after a kill -9 of the postmaster is handled by postgres.

    def argv(self) -> list[str]:
        opts = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.sockdir),
            "fsync": "on" if self.fsync else "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            **self.settings,
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir)]
        for k, v in opts.items():
            argv += ["-c", f"{k}={v}"]
        return argv

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            r = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"postgres not ready in time: see {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int | None:
        # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
        return self._terminate(signal.SIGINT, timeout)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.conninfo(name)


class PostgresNode(PostgresServer):
    """One node of a primary/standby pair with streaming replication.

    The first primary is initialised with initdb; a standby (and a deposed primary,
    after a failover) is made with `pg_basebackup -R` from the current primary, so
    it starts as a standby that streams WAL under its `cluster_name` (its
    application_name in `synchronous_standby_names`) through a replication slot of
    the same name. `deposed` marks a node that was killed as a primary: it must be
    rebuilt (`rebuild_from`) before it may start again, so it can never come back as
    a second primary with commits its successor never saw."""

    def __init__(
        self,
        name: str,
        port: int,
        datadir: Path,
        log_path: Path | None = None,
        fsync: bool = True,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(port, datadir, log_path, fsync=fsync, settings=settings)
        self.node_name = name
        self.settings.setdefault("cluster_name", name)
        self.upstream: PostgresNode | None = None
        self.deposed = False
        #: When `rebuild_from` last started this node as a standby (monotonic).
        self.standby_started_at: float | None = None

    @property
    def is_standby(self) -> bool:
        """Whether its data directory is a standby's (standby.signal present)."""
        return (self.datadir / "standby.signal").exists()

    def prepare(self) -> None:
        if self.deposed:
            raise RuntimeError(
                f"{self.node_name}: refusing to start a deposed primary; rebuild it as a standby"
            )
        if not (self.datadir / "PG_VERSION").exists() and self.upstream is not None:
            self.basebackup(self.upstream)
        super().prepare()

    def basebackup(self, source: PostgresNode) -> None:
        """Copies `source` (a running primary) into an empty data directory as a
        standby of it: `pg_basebackup -R` writes primary_conninfo (with this node's
        application_name) and standby.signal, `-C -S` creates its replication slot
        on `source` (a stale slot of the same name is dropped first)."""
        import psycopg

        with psycopg.connect(source.conninfo(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s AND NOT active",
                (self.node_name,),
            )
        shutil.rmtree(self.datadir, ignore_errors=True)
        self.datadir.mkdir(parents=True, exist_ok=True)
        self._chown(self.datadir)
        os.chmod(self.datadir, 0o700)
        subprocess.run(
            [
                *as_user(self.user),
                str(self.bindir / "pg_basebackup"),
                "-d",
                # Not this node's name: with a slot, pg_basebackup reports flush
                # positions, and under that name the primary would take it for the
                # synchronous standby and let commits return on a half-made copy.
                f"host=127.0.0.1 port={source.port} user=postgres "
                f"application_name={self.node_name}_basebackup",
                "-D",
                str(self.datadir),
                "-R",
                "-X",
                "stream",
                "-C",
                "-S",
                self.node_name,
                "--checkpoint=fast",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        # -R wrote the backup's own connection; the standby streams under its
        # name (a later line of postgresql.auto.conf wins).
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.write(
                f"primary_conninfo = 'host=127.0.0.1 port={source.port} user=postgres "
                f"application_name={self.node_name}'\n"
            )

    def rebuild_from(self, primary: PostgresNode, timeout: float = 60.0) -> None:
        """Turns this (stopped) node into a standby of `primary`: wipes its data,
        takes a fresh base backup and starts it. The only way back for a deposed
        primary."""
        assert not self.running(), "stop the node before rebuilding it"
        self.upstream = primary
        self.basebackup(primary)
        self.deposed = False
        # From here on a commit on `primary` can be confirmed by this node; before
        # it, nothing can (the chaos checker's "no ACK without a standby").
        self.standby_started_at = time.monotonic()
        self.start(timeout)

    def promote(self, timeout: float = 30.0) -> None:
        """Promotes this standby to primary (`pg_promote()`, waits until done)."""
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT pg_promote(true, %s)", (int(timeout),)).fetchone()
        if not row or not row[0]:
            raise RuntimeError(f"{self.node_name}: pg_promote() did not finish in {timeout}s")
        self.upstream = None

    def in_recovery(self) -> bool:
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return bool(row and row[0])

    def sync_standbys(self) -> list[str]:
        """application_names of the standbys this primary waits for now."""
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT application_name FROM pg_stat_replication WHERE sync_state = 'sync'"
            ).fetchall()
        return [str(r[0]) for r in rows]


class RedisServer(Managed):
    name = "redis"

    def argv(self) -> list[str]:
        return [
            _which("redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.datadir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class NatsServer(Managed):
    """nats-server with JetStream and a file store in `datadir`.

    With `cluster_port` it is one node of a JetStream cluster named `cluster`: it
    listens for routes on `cluster_port` and dials `routes` (the other nodes'
    cluster ports); `server_name` must be unique in the cluster and stable across
    restarts (it is the node's JetStream identity)."""

    name = "nats"

    def __init__(
        self,
        port: int,
        datadir: Path,
        log_path: Path | None = None,
        *,
        server_name: str = "",
        cluster: str = "",
        cluster_port: int = 0,
        routes: Sequence[int] = (),
    ) -> None:
        super().__init__(port, datadir, log_path)
        self.server_name = server_name
        self.cluster = cluster
        self.cluster_port = cluster_port
        self.routes = list(routes)

    def listen_ports(self) -> list[int]:
        return [self.port, self.cluster_port] if self.cluster_port else [self.port]

    def argv(self) -> list[str]:
        exe = _which("nats-server", [Path(sys.executable).parent])
        argv = [exe, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.datadir)]
        if self.server_name:
            argv += ["-n", self.server_name]
        if self.cluster_port:
            argv += [
                "--cluster_name",
                self.cluster or "im",
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
                "--routes",
                ",".join(f"nats://127.0.0.1:{p}" for p in self.routes),
            ]
        return argv

    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def wipe_store(self) -> None:
        """Deletes the JetStream store (only while stopped)."""
        assert not self.running(), "stop nats-server before wiping its store"
        shutil.rmtree(self.datadir, ignore_errors=True)


class ServiceProcess(Managed):
    """One of our services, `python -m <module>`, configured by env vars.

    Its gRPC port is `IM_<MODULE>_PORT` in `env` (set from `port` when absent; port
    0 picks a free, movable one). Moving a port rewrites every `IM_<MODULE>_*PORT`
    and `IM_<MODULE>_*ADVERTISE_ADDRESS` that held it."""

    def __init__(
        self,
        module: str,
        port: int,
        env: Mapping[str, str],
        log_path: Path,
    ) -> None:
        prefix = f"IM_{module.upper()}_"
        given = int(env.get(prefix + "PORT") or 0)
        super().__init__(port or given, log_path.parent, log_path)
        self.name = module
        self.module = module
        self.prefix = prefix
        self.extra_env = dict(env)
        self.extra_env.setdefault(prefix + "PORT", str(self.port))
        if not given and self.extra_env[prefix + "PORT"] == "0":
            self.extra_env[prefix + "PORT"] = str(self.port)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def env(self) -> Mapping[str, str]:
        env = dict(os.environ)
        paths = [str(ROOT / "services"), str(ROOT / "libs"), str(ROOT / "gen")]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update(self.extra_env)
        return env

    def listen_ports(self) -> list[int]:
        ports = [self.port]
        for key, value in self.extra_env.items():
            own = key.startswith(self.prefix) and key.endswith("_PORT")
            if own and value.isdigit() and int(value) and int(value) not in ports:
                ports.append(int(value))
        return ports

    def move_port(self, old: int) -> int:
        new = super().move_port(old)
        for key, value in list(self.extra_env.items()):
            if not key.startswith(self.prefix):
                continue
            if key.endswith("_PORT") and value == str(old):
                self.extra_env[key] = str(new)
            elif key.endswith("ADVERTISE_ADDRESS") and value.endswith(f":{old}"):
                self.extra_env[key] = f"{value.removesuffix(str(old))}{new}"
        return new

    @property
    def health_address(self) -> str:
        """Where its health is read: a service whose port serves TLS is probed
        where a kubelet probes it, on its plaintext health port, when it has one."""
        health = self.extra_env.get(f"{self.prefix}HEALTH_PORT", "0")
        return f"127.0.0.1:{health}" if health.isdigit() and int(health) else self.address

    def wait_healthy(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if health_status(self.health_address) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} at {self.address} not SERVING in time ({last})")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def health_status(address: str, service: str = "", timeout: float = 1.0) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return int(resp.status)


def wait_serving(
    address: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service at {address} exited with {proc.returncode}")
        try:
            if health_status(address) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{address} not SERVING after {timeout}s ({last})")
