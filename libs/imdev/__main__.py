"""`python -m imdev run|stop|status`: the local stack behind `make run`.

State lives in .run/ (or, when the PostgreSQL user cannot reach the checkout, in a
folder under /tmp named in .run/stack.json). Processes outlive this command;
`stop` ends them by the pids recorded in .run/stack.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from imdev.servers import ROOT, health_status
from imdev.stack import DEV_TOKEN_SECRET, Stack, StackPorts, postgres_can_reach, write_state

RUN = ROOT / ".run"
STATE = RUN / "stack.json"


def _alive(pid: int, name: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    binary = {"postgres": "postgres", "redis": "redis-server", "nats": "nats-server"}
    return binary.get(name, f"-m {name}") in cmdline


def _load() -> dict[str, object] | None:
    if not STATE.exists():
        return None
    data: dict[str, object] = json.loads(STATE.read_text())
    return data


def _procs(state: dict[str, object]) -> dict[str, dict[str, object]]:
    return state["processes"]  # type: ignore[return-value]


def cmd_status() -> int:
    state = _load()
    if state is None:
        print("not running (no .run/stack.json)")
        return 1
    ok = True
    for key, info in _procs(state).items():
        name, port = key.split(":")
        pid = int(info["pid"])  # type: ignore[call-overload]
        alive = _alive(pid, name)
        health = ""
        if alive and name in {"seqsvc", "logic", "pusher", "gateway"}:
            try:
                health = " SERVING" if health_status(f"127.0.0.1:{port}") == 1 else " NOT_SERVING"
            except Exception as exc:
                health = f" health check failed: {type(exc).__name__}"
        ok = ok and alive and health in ("", " SERVING")
        print(f"{name:8} port {port:>5} pid {pid:>7} {'up' if alive else 'DOWN'}{health}")
    return 0 if ok else 1


def cmd_stop() -> int:
    state = _load()
    if state is None:
        print("nothing to stop")
        return 0
    procs = list(_procs(state).items())
    # Recorded infra first, services after: stop in reverse (services, then infra).
    for key, info in reversed(procs):
        name = key.split(":")[0]
        pid = int(info["pid"])  # type: ignore[call-overload]
        if not _alive(pid, name):
            continue
        os.kill(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(pid, name) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid, name):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid, name):
                time.sleep(0.05)
        print(f"stopped {name} (pid {pid})")
    STATE.unlink()
    return 0


def cmd_run() -> int:
    state = _load()
    if state is not None:
        if cmd_status() == 0:
            print("already running; `make stop` to stop it")
            return 0
        print("a previous stack is partly down; stopping it first")
        cmd_stop()
    RUN.mkdir(exist_ok=True)
    workdir = RUN
    if not postgres_can_reach(RUN):
        tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
        workdir = Path(f"/tmp/im-run-{tag}")
        workdir.mkdir(exist_ok=True)
        workdir.chmod(0o755)
    secret = os.environ.get("IM_GATEWAY_TOKEN_SECRET", DEV_TOKEN_SECRET)
    stack = Stack(workdir, ports=StackPorts.local(1, 1, 1), token_secret=secret, fsync=True)
    try:
        stack.start()
    except Exception as exc:
        print(f"start failed: {exc}; logs in {workdir / 'logs'}", file=sys.stderr)
        write_state(STATE, stack)
        cmd_stop()
        return 1
    write_state(STATE, stack)
    print("stack is up (every service SERVING):")
    for proc in [*stack.infra, *stack.services]:
        print(f"  {proc.name:8} 127.0.0.1:{proc.port}  pid {proc.pid}")
    print(f"logs: {workdir / 'logs'}")
    if secret == DEV_TOKEN_SECRET:
        print("token secret: the DEV default (never use it for real users)")
    # The dev gateway is plaintext; imctl and the SDK use TLS unless told not to.
    print("try:  .venv/bin/python -m imctl chat --plaintext --user alice --to bob")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imdev")
    parser.add_argument("command", choices=["run", "stop", "status"])
    args = parser.parse_args(argv)
    return {"run": cmd_run, "stop": cmd_stop, "status": cmd_status}[args.command]()


if __name__ == "__main__":
    raise SystemExit(main())
