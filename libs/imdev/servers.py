"""Real servers as child processes, for tests, the chaos harness and `make run`.

Each server runs on 127.0.0.1 on a port it is given, with its data in a directory
it is given, and can be stopped gently (SIGTERM), killed (SIGKILL) and restarted
on the same port and data. Nothing here is a mock.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port nobody listens on now (the kernel's choice, never a default port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
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
    """A child process with stop/kill/restart. Subclasses define `argv()`."""

    name = "server"
    user: str | None = None

    def __init__(self, port: int, datadir: Path, log_path: Path | None = None) -> None:
        self.port = port
        self.datadir = datadir
        self.log_path = log_path or datadir.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> Mapping[str, str] | None:
        return None

    def prepare(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 30.0) -> None:
        """Starts the process and waits until it is ready."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self, check_port: bool = True) -> None:
        """Starts the process without waiting for it. Refuses a port that something
        else already listens on, so a test never talks to a stranger's server
        (`check_port=False`: start it anyway, for tests of what a server does when
        its port is taken)."""
        if check_port and port_in_use(self.port):
            raise RuntimeError(f"{self.name}: port {self.port} is already in use")
        self.prepare()
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                user=self.user,
                start_new_session=True,
            )
        finally:
            logf.close()

    def wait_ready(self, timeout: float) -> None:
        wait_port(self.port, timeout, self.proc)

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
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 30.0, hard: bool = False) -> None:
        if hard:
            self.kill()
        else:
            self.stop()
        self.start(timeout)


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
                user=self.user,
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

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: see {self.log_path}")
            r = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"postgres not ready after {timeout}s: see {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int | None:
        # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.conninfo(name)


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
    """nats-server with JetStream and a file store in `datadir`."""

    name = "nats"

    def argv(self) -> list[str]:
        exe = _which("nats-server", [Path(sys.executable).parent])
        return [exe, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.datadir)]

    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def wipe_store(self) -> None:
        """Deletes the JetStream store (only while stopped)."""
        assert not self.running(), "stop nats-server before wiping its store"
        shutil.rmtree(self.datadir, ignore_errors=True)


class ServiceProcess(Managed):
    """One of our services, `python -m <module>`, configured by env vars."""

    def __init__(
        self,
        module: str,
        port: int,
        env: Mapping[str, str],
        log_path: Path,
    ) -> None:
        super().__init__(port, log_path.parent, log_path)
        self.name = module
        self.module = module
        self.extra_env = dict(env)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def env(self) -> Mapping[str, str]:
        env = dict(os.environ)
        paths = [str(ROOT / "services"), str(ROOT / "libs"), str(ROOT / "gen")]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update(self.extra_env)
        return env

    def wait_ready(self, timeout: float) -> None:
        # A service whose port serves TLS is probed where a kubelet probes it: on
        # its plaintext health port, when it has one.
        health = self.extra_env.get(f"IM_{self.module.upper()}_HEALTH_PORT")
        wait_serving(f"127.0.0.1:{health or self.port}", timeout, self.proc)

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
