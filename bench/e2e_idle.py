"""Idle cost of open streams, liveness checks off against on, in one run (issue 13).

    .venv/bin/python bench/e2e_idle.py                      # 10,000 streams, ~12 minutes
    .venv/bin/python bench/e2e_idle.py --connections 2000 --hold 20 --rounds 1

Two sides, alternated over --rounds (off, on, off, on, ...), each on a fresh
`imdev.stack.Stack` (one gateway, one logic, one pusher, seqsvc, PostgreSQL with
pg_stat_statements, Redis, NATS):

- "off": the gateway with IM_GATEWAY_LIVENESS_S=0 (no heads, no checks: the
  behaviour before liveness);
- "on": the defaults (every stream's head checked every 4 s, batched GetHeads).

Per side, N raw `Gateway.Connect` streams (bench/e2e_conns.py holders: the bearer
token, the Welcome read, then one read kept pending that counts what arrives) are
opened to the gateway and left to settle; then two holds are measured:

1. idle: the streams send nothing, for --hold seconds;
2. pinging (unless --ping-hold 0): every stream sends a Ping every --ping-interval
   (20 s) at its own random phase, as an SDK client that pings would (each Ping now
   reads the head when liveness is on), for --ping-hold seconds.

Each hold measures:
- CPU of gateway, logic, pusher, seqsvc, PostgreSQL (the postmaster and all its
  children), Redis and NATS, in cores and ms per minute;
- Redis commands per minute: INFO total_commands_processed, without the bench's
  own INFO calls. Redis counts every command a Lua script runs, so one route
  refresh (one EVALSHA) counts as 7; the EVALSHA calls and every command by name
  are reported too. Idle streams' Redis traffic comes in refresh rounds (all N
  routes, every route refresh interval plus the round's own duration), so a 60 s
  hold catches 5 or 6 rounds whatever the side: a one-round step between sides is
  timing, a different set of commands by name is not;
- PostgreSQL transactions per minute (pg_stat_database xact_commit of the service
  database) and statements per minute (pg_stat_statements, top ones listed);
- GetHeads calls and head checks per minute (the gateway's
  im_gateway_head_lookups_total and im_gateway_head_checks_total, scraped from its
  metrics port) and the GetHeads logic served;
- the frames the streams received, by kind (an idle, up-to-date stream should get
  no Head and no Push);
- the machine's load and other people's CPU (`foreign`): the machine is shared.

Writes bench/results/e2e_idle.json, prints a table per hold (median over rounds per
side, on - off and on / off) and `RESULT {json}` last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import e2e
import e2e_ab
import e2e_conns
import psycopg
import redis

from imdev.stack import Stack

#: The gateway settings of each side (the rest is the defaults).
SIDES: dict[str, tuple[str, ...]] = {
    "off": ("gateway:IM_GATEWAY_LIVENESS_S=0",),
    "on": (),
}

#: Flat metrics of one hold, in table order: (dotted key into the hold's result, label).
METRICS: tuple[tuple[str, str], ...] = (
    ("cpu_ms_per_min.gateway", "gateway CPU, ms/min"),
    ("cpu_ms_per_min.logic", "logic CPU, ms/min"),
    ("cpu_ms_per_min.postgres", "PostgreSQL CPU, ms/min"),
    ("cpu_ms_per_min.redis", "Redis CPU, ms/min"),
    ("cpu_ms_per_min.pusher", "pusher CPU, ms/min"),
    ("cpu_ms_per_min.seqsvc", "seqsvc CPU, ms/min"),
    ("cpu_ms_per_min.nats", "NATS CPU, ms/min"),
    ("cpu_ms_per_min.services", "sum of the above, ms/min"),
    ("redis_cmds_per_min", "Redis commands/min (Lua's too)"),
    ("redis_script_calls_per_min", "Redis EVALSHA calls/min"),
    ("pg_xact_commit_per_min", "PG commits/min"),
    ("pg_statements_per_min", "PG statements/min"),
    ("gateway_head_lookups_per_min", "GetHeads calls/min (gateway)"),
    ("logic_get_heads_per_min", "GetHeads served/min (logic)"),
    ("gateway_head_checks_per_min", "head checks/min"),
    ("gateway_head_frames_per_min", "Head frames written/min"),
    ("gateway_catchups_per_min", "catch-ups/min"),
    ("pings_sent_per_min", "Pings sent/min (streams)"),
    ("frames_received_per_min.head", "Head frames received/min"),
    ("frames_received_per_min.push", "Push frames received/min"),
    ("frames_received_per_min.pong", "Pong frames received/min"),
    ("frames_received_per_min.other", "other frames received/min"),
    ("cpu_cores.foreign", "foreign CPU (other people), cores"),
)

#: Services whose CPU is summed into `services` (not the holders, bench, foreign).
SERVICE_GROUPS = ("gateway", "logic", "pusher", "seqsvc", "postgres", "redis", "nats")


class RedisCommands:
    """Commands Redis processed between two snapshots, without the bench's own
    INFO calls: `total` from INFO stats total_commands_processed (which, like
    commandstats, counts the commands a Lua script runs as well as its EVALSHA),
    `scripts` the EVAL/EVALSHA/FCALL calls, `by_name` from INFO commandstats."""

    SCRIPT_CALLS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")

    def __init__(self, port: int) -> None:
        self._r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        self._before: tuple[int, dict[str, int]] = (0, {})

    def _read(self) -> tuple[int, dict[str, int]]:
        info = self._r.info("stats", "commandstats")  # one INFO call per snapshot
        calls = {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in info.items()
            if k.startswith("cmdstat_")
        }
        return int(info["total_commands_processed"]), calls

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, Any]:
        total1, calls1 = self._read()
        total0, calls0 = self._before
        deltas = {k: v - calls0.get(k, 0) for k, v in calls1.items()}
        ours = deltas.pop("info", 0)
        return {
            "total": total1 - total0 - ours,
            "scripts": sum(deltas.get(k, 0) for k in self.SCRIPT_CALLS),
            "by_name": {k: v for k, v in sorted(deltas.items(), key=lambda kv: -kv[1]) if v},
        }

    def close(self) -> None:
        self._r.close()


class PgActivity:
    """Transactions and statements of the service database between two snapshots:
    pg_stat_database (always) and pg_stat_statements (when it is loaded). Read from
    the `postgres` database, so the bench's own queries are not counted."""

    COLUMNS = ("xact_commit", "xact_rollback", "tup_returned", "blks_hit", "blks_read")

    def __init__(self, conninfo: str, database: str) -> None:
        self._conn = psycopg.connect(conninfo, autocommit=True)
        self._db = database
        self.statements_error: str | None = None
        try:
            self._conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self._conn.execute("SELECT count(*) FROM pg_stat_statements").fetchone()
        except psycopg.Error as exc:
            self.statements_error = f"{type(exc).__name__}: {exc}".strip()
        self._before: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        self._conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self._conn.execute(
            f"SELECT {', '.join(self.COLUMNS)} FROM pg_stat_database WHERE datname = %s",
            (self._db,),
        ).fetchone()
        assert row is not None
        out: dict[str, Any] = dict(zip(self.COLUMNS, row, strict=True))
        if self.statements_error is None:
            rows = self._conn.execute(
                "SELECT queryid, calls, total_exec_time, query FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)",
                (self._db,),
            ).fetchall()
            out["statements"] = {qid: (calls, ms, query) for qid, calls, ms, query in rows}
        return out

    def start(self) -> None:
        self._before = self._read()

    def stop(self, minutes: float) -> dict[str, Any]:
        after = self._read()
        out: dict[str, Any] = {
            f"{k}_per_min": round((after[k] - self._before[k]) / minutes, 1) for k in self.COLUMNS
        }
        if self.statements_error is not None:
            out["statements_per_min"] = None
            out["top_statements"] = f"pg_stat_statements unavailable: {self.statements_error}"
            return out
        before = self._before["statements"]
        rows = []
        for qid, (calls, ms, query) in after["statements"].items():
            calls0, ms0, _ = before.get(qid, (0, 0.0, ""))
            if calls > calls0:
                rows.append((calls - calls0, ms - ms0, " ".join(query.split())[:120]))
        rows.sort(reverse=True)
        out["statements_per_min"] = round(sum(r[0] for r in rows) / minutes, 1)
        out["top_statements"] = [
            {
                "calls_per_min": round(calls / minutes, 1),
                "exec_ms_per_min": round(ms / minutes, 2),
                "query": query,
            }
            for calls, ms, query in rows[:8]
        ]
        return out

    def close(self) -> None:
        self._conn.close()


def _stats_total(replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    frames: dict[str, int] = {}
    for r in replies:
        for kind, n in r["frames"].items():
            frames[kind] = frames.get(kind, 0) + n
    return {
        "frames": frames,
        "welcome_heads": sum(r["welcome_heads"] for r in replies),
        "pings_sent": sum(r["pings_sent"] for r in replies),
        "ping_errors": sum(r["ping_errors"] for r in replies),
    }


def _frames_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    kinds = set(after) | set(before) | {"head", "push", "pong"}
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in kinds}
    out = {k: delta.pop(k) for k in ("head", "push", "pong")}
    out["other"] = sum(delta.values())
    return out


class SideRun:
    """One side's stack with N streams held, measured hold by hold."""

    def __init__(self, name: str, env: dict[str, dict[str, str]], args: argparse.Namespace):
        self.name = name
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix=f"im-idle-{name}-"))
        self.workdir.chmod(0o755)  # PostgreSQL runs as its own user when we are root
        self.stack = Stack(self.workdir, gateways=1, fsync=True, env=env)
        pgss = self.stack.postgres.bindir.parent / "lib" / "pg_stat_statements.so"
        if args.pg_stat_statements and pgss.exists():
            # Loaded at start or not at all; PgActivity says so when it is missing.
            self.stack.postgres.settings["shared_preload_libraries"] = "pg_stat_statements"
        self.metrics = e2e.MetricsScraper(e2e.enable_metrics(self.stack))
        self.procs: list[e2e.Proc] = []
        self.redis: RedisCommands | None = None
        self.pg: PgActivity | None = None
        self.groups: dict[str, list[int]] = {}

    def start(self) -> dict[str, Any]:
        """Starts the stack, opens the streams and waits for the gateway to settle."""
        args, stack = self.args, self.stack
        e2e.log(f"[{self.name}] starting a stack ({stack.env or 'defaults'})")
        stack.start()
        self.redis = RedisCommands(stack.redis.port)
        self.pg = PgActivity(stack.postgres.conninfo("postgres"), stack.database)
        gw = stack.gateways[0]
        tokens = [stack.mint(f"idle{i:05d}") for i in range(args.connections)]
        n = args.conn_procs
        self.procs = [e2e.spawn(e2e_conns.conns_main, f"conns-{i}", gw.address) for i in range(n)]
        self.groups = {
            "gateway": [gw.pid or 0],
            "logic": [p.pid or 0 for p in stack.logics],
            "pusher": [p.pid or 0 for p in stack.pushers],
            "seqsvc": [stack.seqsvc.pid or 0],
            "postgres": [stack.postgres.pid or 0],
            "redis": [stack.redis.pid or 0],
            "nats": [stack.nats.pid or 0],
            "holders": [p.process.pid or 0 for p in self.procs],
            "bench": [os.getpid()],
        }
        rss0 = e2e.rss_kb(gw.pid or 0)
        t0 = time.monotonic()
        replies = e2e.call_all(
            self.procs,
            "open",
            [{"tokens": tokens[i::n], "concurrency": 100, "read": True} for i in range(n)],
        )
        open_s = time.monotonic() - t0
        opened = sum(r["opened"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        e2e.log(f"[{self.name}] {opened} streams open ({failed} failed) in {open_s:.1f}s")
        settle = self.settle(args.settle)
        return {
            "opened": opened,
            "failed": failed,
            "errors": [e for r in replies for e in r["errors"]][:5],
            "open_s": round(open_s, 1),
            "settle": settle,
            "gateway_rss_kb_before": rss0,
            "gateway_rss_kb_settled": e2e.rss_kb(gw.pid or 0),
        }

    def settle(self, min_s: float, max_s: float = 90.0) -> dict[str, Any]:
        """Waits at least `min_s`, then until the gateway's CPU over two successive
        2 s samples agrees within 25 % (or 0.01 cores), at most `max_s`."""
        t0 = time.monotonic()
        time.sleep(min_s)
        samples: list[float] = []
        while True:
            meter = e2e.CpuMeter({"gateway": self.groups["gateway"]})
            meter.start()
            time.sleep(2.0)
            samples.append(meter.stop()["gateway"])
            if len(samples) >= 2:
                a, b = samples[-2:]
                if abs(a - b) <= max(0.01, 0.25 * max(a, b)):
                    break
            if time.monotonic() - t0 >= max_s:
                e2e.log(f"[{self.name}] gateway CPU still moving after {max_s:g}s: {samples}")
                break
        return {"waited_s": round(time.monotonic() - t0, 1), "gateway_cores_2s": samples}

    def hold(self, label: str, hold_s: float, profile: Path | None = None) -> dict[str, Any]:
        """Measures `hold_s` seconds of whatever the streams are doing now."""
        assert self.redis is not None and self.pg is not None
        foreign_before = e2e.wait_quiet(self.groups, self.args.quiet_wait, 0.3)
        loadavg0 = Path("/proc/loadavg").read_text().split()[:3]
        stats0 = _stats_total(e2e.call_all(self.procs, "stats", [{}] * len(self.procs)))
        spies: dict[str, Any] = {}
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            for name in ("gateway", "logic"):
                out_path = profile / f"{name}.txt"
                pid = self.groups[name][0]
                spies[name] = e2e.start_py_spy(self.args.py_spy_path, pid, out_path, int(hold_s))
        meter = e2e.CpuMeter(self.groups)
        self.metrics.start()
        self.redis.start()
        self.pg.start()
        meter.start()
        t0 = time.monotonic()
        time.sleep(hold_s)
        cores = meter.stop()
        elapsed = time.monotonic() - t0
        minutes = elapsed / 60
        pg = self.pg.stop(minutes)
        redis_cmds = self.redis.stop()
        counters = self.metrics.stop(1)
        stats1 = _stats_total(e2e.call_all(self.procs, "stats", [{}] * len(self.procs)))
        alive = sum(r["alive"] for r in e2e.call_all(self.procs, "check", [{}] * len(self.procs)))
        cores["services"] = round(sum(cores[g] for g in SERVICE_GROUPS), 3)
        frames = _frames_delta(stats1["frames"], stats0["frames"])

        def per_min(key: str) -> float:
            return round(counters.get(key, 0.0) / minutes, 1)

        lookups = sum(
            v for k, v in counters.items() if k.startswith("gateway:gateway_head_lookups[")
        )
        out: dict[str, Any] = {
            "hold_s": round(elapsed, 1),
            "alive": alive,
            "loadavg_before": loadavg0,
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "foreign_cores_before": foreign_before,
            "cpu_cores": cores,
            "cpu_ms_per_min": {k: round(v * 60_000) for k, v in cores.items()},
            "redis_cmds_per_min": round(redis_cmds["total"] / minutes, 1),
            "redis_script_calls_per_min": round(redis_cmds["scripts"] / minutes, 1),
            "redis_cmds_by_name_per_min": {
                k: round(v / minutes, 1) for k, v in redis_cmds["by_name"].items()
            },
            "pg_xact_commit_per_min": pg["xact_commit_per_min"],
            "pg_statements_per_min": pg["statements_per_min"],
            "pg": pg,
            "gateway_head_lookups_per_min": round(lookups / minutes, 1),
            "gateway_head_lookup_errors_per_min": per_min("gateway:gateway_head_lookups[error]"),
            "logic_get_heads_per_min": per_min(
                "logic:rpc_server_handled[/im.logic.v1.Logic/GetHeads]"
            ),
            "gateway_head_checks_per_min": per_min("gateway:gateway_head_checks"),
            "gateway_head_frames_per_min": per_min("gateway:gateway_head_frames"),
            "gateway_catchups_per_min": per_min("gateway:gateway_catchups"),
            "pings_sent_per_min": round((stats1["pings_sent"] - stats0["pings_sent"]) / minutes, 1),
            "ping_errors": stats1["ping_errors"] - stats0["ping_errors"],
            "frames_received": frames,
            "frames_received_per_min": {k: round(v / minutes, 1) for k, v in frames.items()},
            "frames_received_since_welcome": stats1["frames"],
            "welcomes_with_head": stats1["welcome_heads"],
            "counters_per_min": {k: round(v / minutes, 1) for k, v in counters.items()},
        }
        if profile is not None:
            for spy in spies.values():
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:  # a profile is a hint, never a failure
                    spy.kill()
            out["profile"] = {
                name: e2e.summarize_profile(profile / f"{name}.txt", elapsed, 200, top=12)
                for name in spies
                if (profile / f"{name}.txt").exists()
            }
        c = out["cpu_cores"]
        e2e.log(
            f"[{self.name}] {label}: gateway {c['gateway']:.3f} logic {c['logic']:.3f} "
            f"postgres {c['postgres']:.3f} redis {c['redis']:.3f} cores; "
            f"redis {out['redis_cmds_per_min']:g}/min, PG commits "
            f"{out['pg_xact_commit_per_min']:g}/min, GetHeads "
            f"{out['gateway_head_lookups_per_min']:g}/min, checks "
            f"{out['gateway_head_checks_per_min']:g}/min, frames {out['frames_received']}, "
            f"alive {alive}, foreign {c['foreign']:.2f}"
        )
        return out

    def ping(self, interval_s: float) -> None:
        e2e.call_all(self.procs, "ping", [{"interval_s": interval_s}] * len(self.procs))

    def stop(self) -> None:
        e2e.close_all(self.procs)
        for res in (self.redis, self.pg):
            if res is not None:
                try:
                    res.close()
                except Exception as exc:  # closing a monitor never fails a run
                    e2e.log(f"[{self.name}] closing {type(res).__name__}: {exc}")
        self.stack.stop()
        if self.args.keep:
            e2e.log(f"[{self.name}] kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run_side(
    name: str, env: dict[str, dict[str, str]], args: argparse.Namespace, profile: bool
) -> dict[str, Any]:
    side = SideRun(name, env, args)
    try:
        out: dict[str, Any] = {"env": env, "streams": side.start()}
        prof_dir = side.workdir / "profile" if profile else None
        out["idle"] = side.hold("idle", args.hold, prof_dir / "idle" if prof_dir else None)
        if args.ping_hold > 0:
            side.ping(args.ping_interval)
            out["pinging_settle"] = side.settle(min(args.ping_interval, 5.0))
            out["pinging"] = side.hold(
                "pinging", args.ping_hold, prof_dir / "pinging" if prof_dir else None
            )
        return out
    finally:
        side.stop()


def _get(d: dict[str, Any], dotted: str) -> float | None:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return float(cur) if isinstance(cur, int | float) else None


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarise(rounds: list[dict[str, Any]], holds: Sequence[str]) -> dict[str, Any]:
    """Per hold and metric: the median over rounds of each side, on - off, on / off."""
    out: dict[str, Any] = {}
    for hold in holds:
        rows: dict[str, Any] = {}
        for key, _label in METRICS:
            off = _median([_get(r["off"].get(hold, {}), key) for r in rounds])
            on = _median([_get(r["on"].get(hold, {}), key) for r in rounds])
            rows[key] = {
                "off": off,
                "on": on,
                "on_minus_off": round(on - off, 3) if on is not None and off is not None else None,
                "on_over_off": round(on / off, 3) if on is not None and off else None,
            }
        out[hold] = rows
    return out


def print_table(summary: dict[str, Any], connections: int) -> None:
    for hold, rows in summary.items():
        print(f"\n{hold} ({connections} streams; median over rounds)", flush=True)
        print(f"  {'metric':36} {'off':>10} {'on':>10} {'on-off':>10} {'on/off':>8}")
        for key, label in METRICS:
            r = rows[key]

            def cell(v: float | None, width: int = 10) -> str:
                return f"{'-':>{width}}" if v is None else f"{v:>{width}.6g}"

            print(
                f"  {label:36} {cell(r['off'])} {cell(r['on'])} "
                f"{cell(r['on_minus_off'])} {cell(r['on_over_off'], 8)}"
            )
    print(flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=10_000, help="idle streams per side")
    p.add_argument("--conn-procs", type=int, default=4, help="processes holding them")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (off, on)")
    p.add_argument("--hold", type=float, default=60.0, help="measured idle seconds")
    p.add_argument(
        "--ping-hold",
        type=float,
        default=60.0,
        help="measured seconds with every stream pinging (0: skip that hold)",
    )
    p.add_argument("--ping-interval", type=float, default=20.0, help="seconds between Pings")
    p.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds to wait after opening before the gateway's CPU is watched to settle "
        "(default 10: past a route refresh round and two head check rounds)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each hold, wait up to this long for other processes on the machine "
        "to use < 0.3 cores (0: do not wait)",
    )
    p.add_argument(
        "--no-pg-stat-statements",
        dest="pg_stat_statements",
        action="store_false",
        help="do not load pg_stat_statements (statements per minute then unknown)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the gateway and logic during the holds of the last round",
    )
    p.add_argument("--py-spy", default="", help="py-spy binary (default: PATH, /tmp/pyspy/bin)")
    p.add_argument("--keep", action="store_true", help="keep the stacks' workdirs (logs, profiles)")
    p.add_argument("--out", type=Path, default=e2e.RESULTS / "e2e_idle.json")
    args = p.parse_args(argv)
    args.py_spy_path = e2e.find_py_spy(args.py_spy) if args.profile else None
    if args.profile and args.py_spy_path is None:
        e2e.log("--profile: py-spy not found (pass --py-spy PATH); profiling skipped")
        args.profile = False
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, e2e.exit_on_sigterm)
    t0 = time.monotonic()
    soft, hard = e2e.raise_nofile()
    if args.connections + 1000 > soft:
        raise SystemExit(f"file-descriptor limit {soft} (hard {hard}) is too low")
    sides = {name: e2e_ab.checked_env(env) for name, env in SIDES.items()}
    holds = ["idle", "pinging"] if args.ping_hold > 0 else ["idle"]
    report: dict[str, Any] = {
        "machine": e2e.machine_info(),
        "config": {
            "connections": args.connections,
            "holder_processes": args.conn_procs,
            "rounds": args.rounds,
            "order": "off, on in every round (ABAB)",
            "hold_s": args.hold,
            "ping_hold_s": args.ping_hold,
            "ping_interval_s": args.ping_interval,
            "settle_min_s": args.settle,
            "quiet_wait_s": args.quiet_wait,
            "sides": {k: list(v) or ["defaults"] for k, v in SIDES.items()},
            "stack": "1 gateway, 1 logic, 1 pusher, seqsvc, PostgreSQL 15 (fsync on"
            + (", pg_stat_statements" if args.pg_stat_statements else "")
            + "), Redis, NATS JetStream",
            "users": "one device per user, empty timelines (head 0)",
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "nofile_limit": soft,
        },
        "rounds": [],
    }
    for r in range(args.rounds):
        last = r == args.rounds - 1
        report["rounds"].append(
            {name: run_side(name, env, args, args.profile and last) for name, env in sides.items()}
        )
    report["summary"] = summarise(report["rounds"], holds)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    e2e.log(f"wrote {args.out}")
    print_table(report["summary"], args.connections)
    e2e.log(f"total {report['elapsed_s']}s")
    result = {
        "connections": args.connections,
        **{
            hold: {
                key: [rows[key]["off"], rows[key]["on"], rows[key]["on_over_off"]]
                for key, _label in METRICS
            }
            for hold, rows in report["summary"].items()
        },
        "format": "metric: [off, on, on/off], medians over rounds",
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
