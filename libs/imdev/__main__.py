"""`python -m imdev run|run-cluster|stop|status|clean`: the local stack behind
`make run`, and the replicated topology behind `make run-cluster` (imdev.cluster:
three NATS nodes, PostgreSQL primary + synchronous standby, two gateways, logic
and pushers, three seqsvc instances). stop, status and clean serve both.

Where things live: the run directory (`--run-dir`, else IM_DEV_RUN_DIR, else .run
in the checkout) holds `stack.json`, what runs, and `pids/`, one file per process
from its launch until it is stopped. Data and logs live there too, unless the
PostgreSQL user cannot reach it (we run as root and the checkout is private): then
in a folder under /tmp named after the run directory. Processes outlive this
command.

Ports: every port is derived from one base port (`--base-port`, else
IM_DEV_BASE_PORT, default 17000; see StackPorts.local), so two checkouts run side
by side with different bases. Every service serves Prometheus metrics; `run` and
`status` print each address.

Guarantees:
- `run` is all or nothing. It refuses to start if any port of the layout is taken,
  saying which and how to move them; if anything fails later (or it is
  interrupted), everything it started is stopped and it exits non-zero.
  `stack.json` is written atomically, once every service is SERVING, and never
  describes a process that did not start.
- `stop`, `status` and `clean` work whatever `stack.json` says: missing, stale,
  partial or corrupt. They find processes from it and from `pids/`, and signal a
  pid only while it is still the process that was started (same start time, same
  program), never one that reused its pid.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imdev.cluster import ClusterPorts, ClusterStack
from imdev.servers import ROOT, PortTaken, health_status, port_in_use, process_start_time
from imdev.stack import (
    DEFAULT_BASE_PORT,
    DEV_TOKEN_SECRET,
    Stack,
    StackPorts,
    postgres_can_reach,
    write_state,
)
from imdev.web import PORT_OFFSET as WEB_PORT_OFFSET
from imdev.web import WebProcess

SERVICES = ("seqsvc", "logic", "pusher", "gateway")
#: Stop order: the front first, the stores last.
STOP_ORDER = ("web", "gateway", "pusher", "logic", "seqsvc", "nats", "redis", "postgres")
_BINARIES = {
    "postgres": "postgres",
    "redis": "redis-server",
    "nats": "nats-server",
    "web": "imdev.web",
}


@dataclass(frozen=True)
class Paths:
    run_dir: Path

    @property
    def state(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def pids(self) -> Path:
        return self.run_dir / "pids"

    def workdir(self) -> Path:
        """Data and logs: the run directory, unless the PostgreSQL user cannot
        reach it; then a folder under /tmp, the same one every time."""
        if postgres_can_reach(self.run_dir):
            return self.run_dir
        # The default run dir keeps the name it always had (hashed checkout path).
        named = ROOT if self.run_dir == ROOT / ".run" else self.run_dir
        return Path(f"/tmp/im-run-{hashlib.sha1(str(named).encode()).hexdigest()[:8]}")


@dataclass(frozen=True)
class Proc:
    """A process `run` started, as recorded in stack.json or a pid file."""

    name: str  # postgres, redis, nats, seqsvc, logic, pusher, gateway
    key: str  # unique: postgres, logic-0, ...
    pid: int
    start_time: int | None  # None: an old state file that did not record it
    port: int = 0
    internal_port: int = 0
    metrics_port: int = 0


def is_ours(proc: Proc) -> bool:
    """Whether `proc.pid` is still the process that was recorded: the same start
    time (when recorded) and the expected program. A zombie or a reused pid is not."""
    try:
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:  # a zombie, or a kernel thread
        return False
    if proc.name in _BINARIES:
        program_ok = _BINARIES[proc.name] in " ".join(args)
    else:
        program_ok = any(a == "-m" and b == proc.name for a, b in itertools.pairwise(args))
    if not program_ok:
        return False
    return proc.start_time is None or process_start_time(proc.pid) == proc.start_time


def load_state(paths: Paths) -> tuple[dict[str, object] | None, str]:
    """The state file's content, or None and why not ("" when there is none)."""
    try:
        text = paths.state.read_text()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"cannot read {paths.state}: {exc}"
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or "processes" not in data:
            raise ValueError("no process list")
        _state_procs(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return None, f"ignoring unreadable {paths.state} ({type(exc).__name__}: {exc})"
    return data, ""


def _state_procs(state: dict[str, object]) -> list[Proc]:
    raw = state["processes"]
    procs: list[Proc] = []
    if isinstance(raw, dict):  # the first format: {"name:port": {"pid": ..., ...}}
        for key, info in raw.items():
            name, port = key.split(":")
            if info.get("pid") is not None:
                procs.append(Proc(name, name, int(info["pid"]), None, int(port)))
        return procs
    for entry in raw:  # type: ignore[attr-defined]
        if entry.get("pid") is None:
            continue
        procs.append(
            Proc(
                name=str(entry["name"]),
                key=str(entry.get("key", entry["name"])),
                pid=int(entry["pid"]),
                start_time=int(entry["start_time"]) if entry.get("start_time") else None,
                port=int(entry.get("port") or 0),
                internal_port=int(entry.get("internal_port") or 0),
                metrics_port=int(entry.get("metrics_port") or 0),
            )
        )
    return procs


def _pidfile_procs(paths: Paths) -> tuple[list[Proc], list[str]]:
    procs: list[Proc] = []
    problems: list[str] = []
    for path in sorted(paths.pids.glob("*.pid")) if paths.pids.is_dir() else []:
        try:
            pid, started, name, *port = path.read_text().split()
            procs.append(
                Proc(name, path.stem, int(pid), int(started) or None, int(port[0]) if port else 0)
            )
        except (OSError, ValueError):
            problems.append(f"ignoring unreadable pid file {path}")
    return procs, problems


def find(paths: Paths) -> tuple[dict[str, object] | None, list[Proc], list[str]]:
    """The state (None if missing or unreadable), every process recorded in it or
    in a pid file (in stop order, each pid once), and notes on what was unreadable."""
    state, problem = load_state(paths)
    problems = [problem] if problem else []
    procs = _state_procs(state) if state is not None else []
    from_files, file_problems = _pidfile_procs(paths)
    problems += file_problems
    seen = {p.pid for p in procs}
    procs += [p for p in from_files if p.pid not in seen]
    rank = {name: i for i, name in enumerate(STOP_ORDER)}
    procs.sort(key=lambda p: rank.get(p.name, -1))
    return state, procs, problems


def _terminate(proc: Proc, timeout: float = 30.0) -> bool:
    """Stops `proc` if it is still ours: SIGINT for PostgreSQL (its fast
    shutdown), SIGTERM otherwise, SIGKILL after `timeout`. True once it is gone."""
    sig = signal.SIGINT if proc.name == "postgres" else signal.SIGTERM
    for current, wait_s in ((sig, timeout), (signal.SIGKILL, 10.0)):
        if not is_ours(proc):
            return True
        try:
            os.kill(proc.pid, current)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        deadline = time.monotonic() + wait_s
        while is_ours(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
    return not is_ours(proc)


def _forget(paths: Paths) -> None:
    paths.state.unlink(missing_ok=True)
    if paths.pids.is_dir():
        for path in paths.pids.iterdir():
            path.unlink(missing_ok=True)


def cmd_stop(paths: Paths) -> int:
    """Stops every process of ours it can find; forgets the state once none is left.
    Exit status 1 only if one of ours could not be stopped."""
    _state, procs, problems = find(paths)
    for problem in problems:
        print(problem)
    live = [p for p in procs if is_ours(p)]
    if not live:
        print("nothing to stop")
    failed = []
    for proc in live:
        if _terminate(proc):
            print(f"stopped {proc.key} (pid {proc.pid})")
        else:
            failed.append(proc)
            print(f"could not stop {proc.key} (pid {proc.pid})", file=sys.stderr)
    if failed:
        return 1
    _forget(paths)
    return 0


def _line(proc: Proc) -> str:
    where = f"127.0.0.1:{proc.port}" if proc.port else "?"
    parts = [f"  {proc.key:10} {where:16}"]
    if proc.internal_port:
        parts.append(f"internal 127.0.0.1:{proc.internal_port}")
    if proc.metrics_port:
        parts.append(f"metrics http://127.0.0.1:{proc.metrics_port}/metrics")
    parts.append(f"pid {proc.pid}")
    return "  ".join(parts)


def cmd_status(paths: Paths) -> int:
    """Prints every process with its addresses and health. Exit status 0 only if
    the state is readable and every process is up (services SERVING)."""
    state, procs, problems = find(paths)
    for problem in problems:
        print(problem)
    if not procs:
        print(f"not running (nothing recorded in {paths.run_dir})")
        return 1
    ok = state is not None and not problems
    if state is None:
        print("no complete state (start-up did not finish?): `make stop` stops what is left")
    for proc in reversed(procs):  # start order
        alive = is_ours(proc)
        health = ""
        if alive and proc.name in SERVICES and proc.port:
            try:
                serving = health_status(f"127.0.0.1:{proc.port}") == 1
                health = " SERVING" if serving else " NOT_SERVING"
            except Exception as exc:
                health = f" health check failed: {type(exc).__name__}"
        ok = ok and alive and health in ("", " SERVING")
        print(f"{_line(proc)}  {'up' if alive else 'DOWN'}{health}")
    return 0 if ok else 1


def cmd_run(paths: Paths, base_port: int, cluster: bool = False) -> int:
    state, procs, _problems = find(paths)
    if any(is_ours(p) for p in procs):
        if state is not None and cmd_status(paths) == 0:
            print("already running; `make stop` to stop it")
            return 0
        print("a previous stack is partly down (or its state unreadable); stopping it first")
        if cmd_stop(paths) != 0:
            return 1
    else:
        _forget(paths)  # whatever is recorded describes nothing that runs
    n = 2 if cluster else 1  # the cluster: two of each service, three seqsvc instances
    try:
        ports = StackPorts.local(n, n, n, base=base_port)
    except ValueError as exc:
        print(f"IM_DEV_BASE_PORT: {exc}", file=sys.stderr)
        return 2
    cluster_ports = ClusterPorts.local(base_port) if cluster else None
    layout = ports.all() + (cluster_ports.all() if cluster_ports else [])
    if cluster_ports:  # the single-node servers' ports are the first nodes'
        layout = [(w, p) for w, p in layout if w not in ("postgres", "nats")]
    web_port = base_port + WEB_PORT_OFFSET
    layout.append(("web chat", web_port))
    taken = [f"{port} ({what})" for what, port in layout if port_in_use(port)]
    if taken:
        print(
            f"cannot start: port {', '.join(taken)} already in use by another program.\n"
            f"Stop it, or move every port: IM_DEV_BASE_PORT=<n> make run (now {base_port}; "
            "ports n..n+499 must be free). Nothing was started.",
            file=sys.stderr,
        )
        return 1
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    workdir = paths.workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    secret = os.environ.get("IM_GATEWAY_TOKEN_SECRET", DEV_TOKEN_SECRET)
    stack: Stack
    if cluster_ports is not None:
        stack = ClusterStack(
            workdir,
            ports=ports,
            cluster_ports=cluster_ports,
            token_secret=secret,
            fsync=True,
            pid_dir=paths.pids,
        )
    else:
        stack = Stack(workdir, ports=ports, token_secret=secret, fsync=True, pid_dir=paths.pids)
    try:
        stack.start()
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        hint = ""
        if isinstance(exc, PortTaken):
            hint = "\nMove every port with IM_DEV_BASE_PORT=<n> make run."
        print(
            f"start failed: {exc}{hint}\n"
            f"Everything started was stopped; logs in {workdir / 'logs'}",
            file=sys.stderr,
        )
        return 1
    web = WebProcess(web_port, workdir, stack.ws_urls, secret)
    web.pidfile = paths.pids / "web.pid"
    try:
        web.start()
    except BaseException as exc:
        stack.stop()
        print(f"start failed: the web chat server: {exc}", file=sys.stderr)
        return 1
    state = {**stack.state(), "workdir": str(workdir), "base_port": base_port}
    state["processes"].append(  # type: ignore[attr-defined]
        {
            "name": web.name,
            "key": "web",
            "pid": web.pid,
            "start_time": process_start_time(web.pid) if web.pid else None,
            "port": web.port,
            "log": str(web.log_path),
        }
    )
    write_state(paths.state, state)
    print(f"stack is up (every service SERVING), ports from IM_DEV_BASE_PORT={base_port}:")
    for proc in _state_procs(state):
        print(_line(proc))
    print(f"logs: {workdir / 'logs'}")
    if isinstance(stack, ClusterStack):
        print(
            f"PostgreSQL primary {stack.primary_node.node_name}, synchronous standby "
            f"{stack.standby.node_name}; services connect with\n  {stack.database_url}\n"
            f"NATS cluster (stream replicas {len(stack.nats_nodes)}): {stack.nats_url}\n"
            f"{len(stack.seqsvcs)} seqsvc instances sharing the sections (logic follows "
            "their routing table)"
        )
    if stack.ws_urls:
        print(f"WebSocket (browsers, docs/protocol.md): {stack.ws_urls[0]}")
    if secret == DEV_TOKEN_SECRET:
        print("token secret: the DEV default (never use it for real users)")
    address = stack.gateway_addresses[0]
    env = "" if address == f"127.0.0.1:{DEFAULT_BASE_PORT}" else f"IM_ADDRESS={address} "
    # The dev gateway is plaintext; imctl and the SDK use TLS unless told not to.
    print(f"try:  {env}.venv/bin/python -m imctl chat --plaintext --user alice --to bob")
    print(
        f"web chat: http://127.0.0.1:{web.port}/ (sign in as any user: the dev server "
        "mints tokens, development only)"
    )
    return 0


def cmd_clean(paths: Paths) -> int:
    """Stops the stack, then deletes the run directory and the data folder."""
    if cmd_stop(paths) != 0:
        print("not deleting data that processes still use", file=sys.stderr)
        return 1
    # Only what `run` creates, never the whole directory: IM_DEV_RUN_DIR may name a
    # directory that holds other things too.
    for where in dict.fromkeys([paths.workdir(), paths.run_dir]):
        cluster = ("pg0", "pg1", "nats0", "nats1", "nats2")
        for name in ("pg", "redis", "nats", *cluster, "logs", "pids", "stack.json"):
            path = where / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            print(f"removed {path}")
        if where.is_dir() and not any(where.iterdir()):
            where.rmdir()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imdev")
    parser.add_argument("command", choices=["run", "run-cluster", "stop", "status", "clean"])
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=Path(os.environ.get("IM_DEV_RUN_DIR") or ROOT / ".run"),
        help="state, pid files, data and logs (env IM_DEV_RUN_DIR; default .run)",
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=None,
        help=f"first port of the stack (env IM_DEV_BASE_PORT; default {DEFAULT_BASE_PORT})",
    )
    args = parser.parse_args(argv)
    paths = Paths(args.run_dir.resolve())
    if args.command in ("run", "run-cluster"):
        base = args.base_port
        if base is None:
            raw = os.environ.get("IM_DEV_BASE_PORT") or str(DEFAULT_BASE_PORT)
            if not raw.isdigit():
                print(f"IM_DEV_BASE_PORT: not a port number: {raw!r}", file=sys.stderr)
                return 2
            base = int(raw)
        return cmd_run(paths, base, cluster=args.command == "run-cluster")
    return {"stop": cmd_stop, "status": cmd_status, "clean": cmd_clean}[args.command](paths)


if __name__ == "__main__":
    raise SystemExit(main())
