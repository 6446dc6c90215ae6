"""Ports: a taken port fails loudly, never silently shared; the test servers move
off a port they lost to a race; `make run` (python -m imdev) is all or nothing, its
ports move with one base port, and stop/status work whatever its state file says."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import imdev.servers
from imcommon.config import load_settings
from imcommon.server import (
    EXCLUSIVE_PORT,
    PortInUseError,
    bind_failure,
    server_options,
)
from imcommon.settings import ServerSettings
from imdev.__main__ import Paths, Proc, is_ours
from imdev.__main__ import main as imdev_main
from imdev.servers import (
    ROOT,
    PortTaken,
    RedisServer,
    ServiceProcess,
    listens,
    port_in_use,
    process_start_time,
)
from imdev.stack import Stack, StackPorts

# -- gRPC servers never share a port ------------------------------------------


def _listener() -> socket.socket:
    """A plain socket listening on a free loopback port: a stranger on it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


async def test_a_second_grpc_server_on_a_taken_port_fails() -> None:
    """With our options the second bind fails; with gRPC's defaults (SO_REUSEPORT)
    the same second bind succeeds and both would silently share the port."""
    settings = load_settings(ServerSettings, {})
    first = grpc.aio.server(options=server_options(settings))
    port = first.add_insecure_port("127.0.0.1:0")
    await first.start()
    try:
        ours = grpc.aio.server(options=server_options(settings))
        with pytest.raises(RuntimeError):
            ours.add_insecure_port(f"127.0.0.1:{port}")
        plain = grpc.aio.server(options=[EXCLUSIVE_PORT])
        with pytest.raises(RuntimeError):
            plain.add_insecure_port(f"127.0.0.1:{port}")
        # The hazard the option removes (both sides set SO_REUSEPORT by default).
        shared_first = grpc.aio.server()
        shared_port = shared_first.add_insecure_port("127.0.0.1:0")
        await shared_first.start()
        try:
            shared_second = grpc.aio.server()
            assert shared_second.add_insecure_port(f"127.0.0.1:{shared_port}") == shared_port
        finally:
            await shared_first.stop(None)
    finally:
        await first.stop(None)


def test_bind_failure_names_the_reason() -> None:
    with _listener() as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        err = bind_failure(address, "is another seqsvc running there?")
    assert isinstance(err, PortInUseError)
    assert str(err).startswith(f"cannot listen on {address}: ")
    assert "Address already in use" in str(err)


@pytest.mark.parametrize("which", ["PORT", "METRICS_PORT"])
def test_a_service_on_a_taken_port_exits_1_saying_so(tmp_path: Path, which: str) -> None:
    """No traceback, no silent sharing: exit status 1 and a one-line reason."""
    pythonpath = os.pathsep.join(str(ROOT / d) for d in ("services", "libs", "gen"))
    with _listener() as taken:
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "PYTHONPATH": pythonpath,
            # Never reached: the port is bound before the database is touched.
            "IM_SEQSVC_DATABASE_URL": "host=127.0.0.1 port=1 user=nobody connect_timeout=1",
            "IM_SEQSVC_PORT": "0",
            f"IM_SEQSVC_{which}": str(port),
        }
        run = subprocess.run(
            [sys.executable, "-m", "seqsvc"], env=env, capture_output=True, text=True, timeout=60
        )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "Address already in use" in out, out
    assert f"127.0.0.1:{port}" in out, out
    assert "Traceback" not in out, out


# -- test servers: the choose-then-bind race ----------------------------------


def test_a_server_that_lost_its_port_moves_and_never_reports_a_stranger_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: the port was free when chosen and checked, and taken before the
    server bound it. The stranger listening there must not pass for our server;
    a port chosen for us moves, an explicit one fails loudly."""
    monkeypatch.setattr(imdev.servers, "port_in_use", lambda port: False)  # lost the race
    server = RedisServer(0, tmp_path / "redis")
    chosen = server.port
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.bind(("127.0.0.1", chosen))
        stranger.listen()
        try:
            server.start(30)
            assert server.port != chosen
            assert server.pid is not None and listens(server.pid, server.port)
            assert "Address already in use" in server.log_path.read_text()
        finally:
            server.kill()

        fixed = RedisServer(chosen, tmp_path / "redis-fixed")
        with pytest.raises(PortTaken) as info:
            fixed.start(30)
        assert info.value.port == chosen
        assert not fixed.running()


def test_a_service_started_on_a_taken_port_is_reported_as_such(tmp_path: Path) -> None:
    with _listener() as taken:
        port = taken.getsockname()[1]
        proc = ServiceProcess(
            "seqsvc",
            port,
            {"IM_SEQSVC_DATABASE_URL": "host=127.0.0.1 port=1 user=nobody"},
            tmp_path / "seqsvc.log",
        )
        with pytest.raises(PortTaken) as info:
            proc.launch()  # checked before launching
        assert info.value.port == port
        proc.launch(check_port=False)  # and after, from what the process says
        with pytest.raises(PortTaken, match="Address already in use"):
            proc.wait_ready(30)
        assert not proc.running()


def test_a_stack_rewires_its_services_to_a_port_that_moved(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """seqsvc loses its port to a stranger: it moves, and logic (launched after it)
    is wired to the new address."""
    stack = Stack(workdir / f"stack-{os.getpid()}-{random.randrange(10**9)}")
    lost = stack.seqsvc.port
    monkeypatch.setattr(imdev.servers, "port_in_use", lambda port: False)
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.bind(("127.0.0.1", lost))
        stranger.listen()
        try:
            stack.start()
            assert stack.seqsvc.port != lost
            assert stack.ports.seqsvc == stack.seqsvc.port
            logic_env = stack.logics[0].extra_env
            assert logic_env["IM_LOGIC_SEQSVC_ADDRESS"] == f"127.0.0.1:{stack.seqsvc.port}"
            assert stack.seqsvc.extra_env["IM_SEQSVC_PORT"] == str(stack.seqsvc.port)
        finally:
            stack.kill()


def test_a_stack_moves_a_taken_websocket_port(workdir: Path) -> None:
    """The gateway's WebSocket port, chosen free by the stack, is taken before
    the gateway starts (a client's ephemeral port can land on it): the gateway
    moves it like its other ports, and `ws_urls` names the new one."""
    stack = Stack(workdir / f"stack-{os.getpid()}-{random.randrange(10**9)}")
    lost = stack.ports.gateway_ws[0]
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", lost))
        stranger.listen()
        try:
            stack.start()
            moved = int(stack.gateways[0].extra_env["IM_GATEWAY_WS_PORT"])
            assert moved != lost
            assert stack.ws_urls == [f"ws://127.0.0.1:{moved}/v1/connect"]
            with socket.create_connection(("127.0.0.1", moved), timeout=5):
                pass
        finally:
            stack.kill()


# -- make run ------------------------------------------------------------------


def test_the_layout_derives_every_port_from_the_base() -> None:
    ports = StackPorts.local(2, 2, 2, base=18000)
    every = [port for _what, port in ports.all()]
    assert len(every) == len(set(every))
    assert all(18000 <= port < 18500 for port in every)
    assert set(ports.metrics) == {"seqsvc", "logic", "pusher", "gateway"}
    assert ports.gateway == [18000, 18001]
    for bad in (80, 65300):
        with pytest.raises(ValueError):
            StackPorts.local(1, 1, 1, base=bad)


def _imdev(run_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join(str(ROOT / d) for d in ("services", "libs", "gen"))
    return subprocess.run(
        [sys.executable, "-m", "imdev", *args, "--run-dir", str(run_dir)],
        env={**os.environ, "PYTHONPATH": pythonpath, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _free_base() -> int:
    """A base port whose whole layout is free now, below the ephemeral range (so
    ports the kernel hands out elsewhere never land in it)."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - 500, 500)
        if not any(port_in_use(p) for _w, p in StackPorts.local(1, 1, 1, base).all()):
            return base
    raise AssertionError("no free base port")


def _layout_free(base: int) -> list[int]:
    return [p for _w, p in StackPorts.local(1, 1, 1, base).all() if port_in_use(p)]


def _ours_running(run_dir: Path) -> list[str]:
    """Processes whose command line names the run directory (PostgreSQL, Redis and
    NATS are given their data directories there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(run_dir) in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.fixture
def run_dir() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="imdevrun-"))
    parent.chmod(0o755)  # the postgres user must reach the data directory
    yield parent / "run"
    _imdev(parent / "run", "stop")
    subprocess.run(["rm", "-rf", str(parent)], check=False)


def test_run_with_a_port_taken_starts_nothing_and_says_how_to_move(run_dir: Path) -> None:
    base = _free_base()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 10))  # logic's port; bound is enough
        taken.listen()
        run = _imdev(run_dir, "run", IM_DEV_BASE_PORT=str(base))
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"port {base + 10} (logic-0) already in use" in run.stderr
    assert "IM_DEV_BASE_PORT" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert not (run_dir / "stack.json").exists()
    assert _ours_running(run_dir) == []
    status = _imdev(run_dir, "status")
    assert status.returncode == 1 and "not running" in status.stdout, status
    stop = _imdev(run_dir, "stop")
    assert stop.returncode == 0, stop


def test_a_failed_run_stops_what_it_started_and_the_next_run_works(run_dir: Path) -> None:
    """The gateway, started last, cannot start: everything started before it is
    stopped, nothing is recorded, and the commands that follow all work."""
    base = _free_base()
    run = _imdev(run_dir, "run", "--base-port", str(base), IM_GATEWAY_LOG_LEVEL="bogus")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "gateway exited with 2" in run.stderr and "IM_GATEWAY_LOG_LEVEL" in run.stderr
    assert "Everything started was stopped" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    for started in ("postgres", "seqsvc", "logic-0", "pusher-0"):  # they did start
        assert (run_dir / "logs" / f"{started}.log").stat().st_size > 0
    assert _layout_free(base) == []
    assert _ours_running(run_dir) == []
    assert not (run_dir / "stack.json").exists()
    assert list((run_dir / "pids").iterdir()) == []
    for command in ("status", "stop"):
        result = _imdev(run_dir, command)
        assert "Traceback" not in result.stdout + result.stderr, result

    run = _imdev(run_dir, "run", IM_DEV_BASE_PORT=str(base))
    assert run.returncode == 0, run.stdout + run.stderr
    metrics = {
        int(line.rsplit("http://127.0.0.1:", 1)[1].split("/")[0])
        for line in run.stdout.splitlines()
        if "/metrics" in line
    }
    assert len(metrics) == 4, run.stdout  # seqsvc, logic, pusher, gateway
    for port in metrics:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"im_rpc_server_handled" in body
    assert f"127.0.0.1:{base} " in run.stdout  # the gateway, moved with the base
    assert _imdev(run_dir, "status").returncode == 0
    stop = _imdev(run_dir, "stop")
    assert stop.returncode == 0, stop
    assert _layout_free(base) == []


def test_stop_and_status_work_with_a_corrupt_state_file(run_dir: Path) -> None:
    base = _free_base()
    run = _imdev(run_dir, "run", "--base-port", str(base))
    assert run.returncode == 0, run.stdout + run.stderr
    state = json.loads((run_dir / "stack.json").read_text())
    pids = [int(p["pid"]) for p in state["processes"]]
    (run_dir / "stack.json").write_text('{"processes": [{"name": "redis", "pid": ')

    status = _imdev(run_dir, "status")
    assert status.returncode == 1
    assert "unreadable" in status.stdout and "Traceback" not in status.stdout + status.stderr
    stop = _imdev(run_dir, "stop")  # finds every process by its pid file
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert stop.stdout.count("stopped ") == len(pids) == 8  # 7 servers and the web chat
    assert not any(_alive(pid) for pid in pids)
    assert _layout_free(base) == []
    assert not (run_dir / "stack.json").exists()
    status = _imdev(run_dir, "status")
    assert status.returncode == 1 and "not running" in status.stdout


def _alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def test_stop_signals_only_the_processes_it_started(tmp_path: Path) -> None:
    """A stale state file names pids that now belong to other processes: a
    program of another name, or one of the right name started later (a reused
    pid). stop leaves them alone; it does stop the one that matches."""
    paths = Paths(tmp_path / "run")
    paths.run_dir.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    # `exec -a` names it like the real thing: only its start time tells them apart.
    lookalike = subprocess.Popen(["bash", "-c", "exec -a redis-server sleep 60"])
    victim = subprocess.Popen(["bash", "-c", "exec -a nats-server sleep 60"])
    try:
        deadline = time.monotonic() + 10
        while not all(
            Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(name)
            for p, name in ((lookalike, b"redis-server\0"), (victim, b"nats-server\0"))
        ):
            assert time.monotonic() < deadline, "exec -a did not happen"
            time.sleep(0.01)
        real_start = process_start_time(lookalike.pid)
        assert real_start is not None
        entries = [
            {"name": "postgres", "pid": other.pid, "start_time": process_start_time(other.pid)},
            {"name": "redis", "pid": lookalike.pid, "start_time": real_start - 1},
            {"name": "nats", "pid": victim.pid, "start_time": process_start_time(victim.pid)},
        ]
        paths.state.write_text(json.dumps({"processes": entries}))
        assert not is_ours(Proc("postgres", "postgres", other.pid, None))
        assert imdev_main(["stop", "--run-dir", str(paths.run_dir)]) == 0
        assert victim.wait(10) == -signal.SIGTERM
        assert other.poll() is None and lookalike.poll() is None
        assert not paths.state.exists()
    finally:
        for p in (other, lookalike, victim):
            p.kill()
            p.wait()
