"""`python -m imdev.seqsvc_run run|stop|status`: PostgreSQL and one seqsvc, alone,
behind `make seqsvc-run` / `make seqsvc-stop` (for a team trying seqsvc, without
the rest of the IM backend).

PostgreSQL is initialised in the run directory (`--run-dir`, else
IM_SEQSVC_RUN_DIR, else .run/seqsvc in the checkout; under /tmp when the
postgres user cannot reach it, as `make run` does), with its data kept across
runs. seqsvc listens on 127.0.0.1:`--port` (IM_SEQSVC_PORT, default 50053), its
metrics on `--metrics-port` (default port+10), PostgreSQL on `--pg-port` (default
55432). Every other IM_SEQSVC_* variable of the environment reaches seqsvc as is: export
IM_SEQSVC_TEAMS_FILE to try team namespaces. The processes outlive this command;
`stop` and `status` find them from the state file and pid files, like `make stop`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imdev.__main__ import Paths, cmd_status, cmd_stop, find, is_ours
from imdev.servers import ROOT, PostgresServer, ServiceProcess, port_in_use, start_all
from imdev.stack import write_state

DATABASE = "seqsvc"


def _entry(proc: PostgresServer | ServiceProcess) -> dict[str, object]:
    from imdev.servers import process_start_time

    entry: dict[str, object] = {
        "name": proc.name,
        "key": proc.log_path.stem,
        "pid": proc.pid,
        "start_time": process_start_time(proc.pid) if proc.pid else None,
        "port": proc.port,
        "log": str(proc.log_path),
    }
    if isinstance(proc, ServiceProcess):
        metrics = int(proc.extra_env.get("IM_SEQSVC_METRICS_PORT") or 0)
        if metrics:
            entry["metrics_port"] = metrics
    return entry


def cmd_run(paths: Paths, port: int, pg_port: int, metrics: int) -> int:
    state, procs, _problems = find(paths)
    if any(is_ours(p) for p in procs):
        if state is not None and cmd_status(paths) == 0:
            print("already running; `make seqsvc-stop` to stop it")
            return 0
        print("a previous run is partly down; stopping it first")
        if cmd_stop(paths) != 0:
            return 1
    taken = [f"{p} ({what})" for what, p in (("seqsvc", port), ("metrics", metrics),
             ("postgres", pg_port)) if port_in_use(p)]  # fmt: skip
    if taken:
        print(
            f"cannot start: port {', '.join(taken)} already in use. Choose others: "
            "make seqsvc-run SEQSVC_PORT=<n> SEQSVC_PG_PORT=<m> SEQSVC_METRICS_PORT=<k>. "
            "Nothing was started.",
            file=sys.stderr,
        )
        return 1
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    workdir = paths.workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    postgres = PostgresServer(pg_port, workdir / "pg", logs / "postgres.log")
    dsn = postgres.conninfo(DATABASE)
    env = {
        "IM_SEQSVC_DATABASE_URL": dsn,
        "IM_SEQSVC_PORT": str(port),
        "IM_SEQSVC_METRICS_PORT": str(metrics),
    }
    seqsvc = ServiceProcess("seqsvc", port, env, logs / "seqsvc.log")
    for proc in (postgres, seqsvc):
        proc.pidfile = paths.pids / f"{proc.log_path.stem}.pid"
    try:
        start_all([postgres])
        import psycopg

        with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if exists.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
        start_all([seqsvc])
    except BaseException as exc:
        seqsvc.stop()
        postgres.stop()
        print(
            f"start failed: {exc}\nEverything started was stopped; logs in {logs}",
            file=sys.stderr,
        )
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    write_state(
        paths.state,
        {"version": 2, "processes": [_entry(postgres), _entry(seqsvc)], "database_url": dsn},
    )
    address = f"127.0.0.1:{port}"
    teams = os.environ.get("IM_SEQSVC_TEAMS_FILE")
    print(f"seqsvc is up (SERVING) at {address}")
    print(f"  PostgreSQL  {dsn}")
    print(f"  metrics     http://127.0.0.1:{metrics}/metrics")
    print(f"  logs        {logs}")
    print(
        f"  teams       {teams}"
        if teams
        else "  teams       none: every caller may use every key "
        "(export IM_SEQSVC_TEAMS_FILE to try namespaces)"
    )
    print("first call (add --token or SEQSVC_TOKEN with a teams file):")
    print(f"  .venv/bin/python -m seqsvc.cli --address {address} next demo:1")
    print("stop: make seqsvc-stop")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imdev.seqsvc_run")
    parser.add_argument("command", choices=["run", "stop", "status"])
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=Path(os.environ.get("IM_SEQSVC_RUN_DIR") or ROOT / ".run" / "seqsvc"),
        help="state, pid files, data and logs (env IM_SEQSVC_RUN_DIR; default .run/seqsvc)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("IM_SEQSVC_PORT") or 50053))
    parser.add_argument("--pg-port", type=int, default=55432, help="PostgreSQL (default 55432)")
    parser.add_argument("--metrics-port", type=int, default=0, help="default: --port + 10")
    args = parser.parse_args(argv)
    paths = Paths(args.run_dir.resolve())
    if args.command == "run":
        return cmd_run(paths, args.port, args.pg_port, args.metrics_port or args.port + 10)
    return {"stop": cmd_stop, "status": cmd_status}[args.command](paths)


if __name__ == "__main__":
    raise SystemExit(main())
