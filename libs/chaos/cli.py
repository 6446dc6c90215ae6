"""Command line of `python -m chaos`: sizes, seed, output; prints the table and
ends with `RESULT {json}`; exit status 1 on any violation, on a device that did
not catch up by itself, and on any late online delivery."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from chaos.faults import CLUSTER_SERVER_KINDS, SERVER_KINDS
from chaos.run import RunConfig, results_dir, run, setup_logging, write_json
from chaos.workload import WorkloadConfig

FULL = {
    "clients": 24,
    "messages": 10_000,
    "rounds": 30,
    "client_rounds": 30,
    "think": 0.5,
    "fault_interval": 1.0,
    "duration": 3 * 3600.0,
    "observers": 6,
}
#: `make chaos-cluster`: a few minutes (--duration), the cluster kinds twice.
CLUSTER = {
    "clients": 12,
    "messages": 1_000_000,  # the duration ends the fault phase, not a count
    "rounds": 2,
    "client_rounds": 10,
    "think": 0.3,
    "fault_interval": 2.0,
    "duration": 300.0,
    "observers": 3,
}
REDUCED = {
    "clients": 8,
    "messages": 400,
    "rounds": 1,
    "client_rounds": 6,
    "think": 0.3,
    "fault_interval": 0.5,
    "duration": 240.0,
    "observers": 3,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m chaos",
        description="Run SDK clients against the whole stack while killing, restarting and "
        "wiping its parts, then check that no acked message was lost, duplicated or "
        "reordered on any device, and that every device that stayed connected got every "
        "message within the liveness bound without reconnecting.",
    )
    p.add_argument("--reduced", action="store_true", help="the small run of `make test`")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="the replicated topology (3 NATS nodes, PostgreSQL primary + synchronous "
        "standby, proxies for pg_cut/nats_cut) and its fault kinds on top of all others "
        "(`make chaos-cluster`); a run of --duration seconds with 2 rounds by default",
    )
    p.add_argument("--clients", type=int, help="SDK clients (devices); a fifth are second devices")
    p.add_argument("--messages", type=int, help="keep sending until this many sends are acked")
    p.add_argument("--rounds", type=int, help="rounds of server faults (each kind once per round)")
    p.add_argument("--client-rounds", type=int, help="rounds of client faults (cut, restart)")
    p.add_argument(
        "--kinds",
        help="comma-separated server fault kinds to run (default: all of "
        + ", ".join(k.value for k in SERVER_KINDS)
        + ")",
    )
    p.add_argument(
        "--fault-interval", type=float, help="mean seconds between faults (the fault rate)"
    )
    p.add_argument(
        "--tracks", type=int, default=1, help="server faults in flight at once (overlapping)"
    )
    p.add_argument(
        "--max-downtime", type=float, default=1.0, help="longest a killed part stays down (s)"
    )
    p.add_argument(
        "--max-offline",
        type=float,
        default=3.0,
        help="longest a restarted client stays offline (s)",
    )
    p.add_argument("--think", type=float, help="mean think time between a client's sends (s)")
    p.add_argument("--duration", type=float, help="longest fault phase (s)")
    p.add_argument(
        "--quiesce",
        type=float,
        help="after the faults, how long connected devices get to have everything by "
        "themselves (s; default 3 x --liveness)",
    )
    p.add_argument(
        "--liveness",
        type=float,
        default=10.0,
        help="online delivery bound LIVENESS_S (s): slower deliveries to a connected "
        "device count as online_late",
    )
    p.add_argument("--observers", type=int, help="raw observer devices (judges of I9)")
    p.add_argument(
        "--observers-stay-down",
        action="store_true",
        help="an observer whose stream ended does not connect again",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="SERVICE:NAME=VALUE",
        help="extra setting for one service kind, e.g. "
        "logic:IM_LOGIC_TEST_FAULT_SKIP_DEDUP=1 (repeatable)",
    )
    p.add_argument("--gateways", type=int, default=2, help="gateway processes")
    p.add_argument("--logics", type=int, default=2, help="logic processes")
    p.add_argument("--pushers", type=int, default=2, help="pusher processes")
    p.add_argument(
        "--read-users",
        type=float,
        default=WorkloadConfig.read_users,
        help="fraction of users that mark conversations read (READ events, some stale)",
    )
    p.add_argument(
        "--recall-users",
        type=float,
        default=WorkloadConfig.recall_users,
        help="fraction of users that recall some of their own messages",
    )
    p.add_argument("--seed", type=int, default=1, help="seeds the workload and the schedule")
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--workdir", type=Path, help="keep the stack's data and logs here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir even on success")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO to stderr")
    args = p.parse_args(argv)
    defaults = REDUCED if args.reduced else CLUSTER if args.cluster else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.clients < 4:
        p.error("--clients must be at least 4")
    if args.liveness <= 0:
        p.error("--liveness must be positive")
    if args.quiesce is None:
        args.quiesce = 3 * args.liveness
    kinds = CLUSTER_SERVER_KINDS if args.cluster else SERVER_KINDS
    if args.kinds is None:
        args.kinds = kinds
    else:
        known = {k.value: k for k in kinds}
        names = [n.strip() for n in args.kinds.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"--kinds: not a server fault kind: {', '.join(unknown)}")
        args.kinds = tuple(known[n] for n in names)
    env: dict[str, dict[str, str]] = {}
    for item in args.env:
        service, sep, setting = item.partition(":")
        name, eq, value = setting.partition("=")
        if not sep or not eq or not name:
            p.error(f"--env {item!r}: expected SERVICE:NAME=VALUE")
        env.setdefault(service, {})[name] = value
    args.env = env
    return args


def config_from_args(args: argparse.Namespace) -> RunConfig:
    two = max(1, args.clients // 5)
    users = args.clients - two
    wl = WorkloadConfig(
        users=users,
        two_device_users=two,
        groups=max(2, users // 4),
        group_size=(3, min(6, users)),
        think_mean_s=args.think,
        messages=args.messages,
        seed=args.seed,
        read_users=args.read_users,
        recall_users=args.recall_users,
    )
    return RunConfig(
        workload=wl,
        rounds=args.rounds,
        server_kinds=args.kinds,
        client_rounds=args.client_rounds,
        fault_pause_s=args.fault_interval,
        server_tracks=args.tracks,
        max_downtime_s=args.max_downtime,
        max_offline_s=args.max_offline,
        client_fault_pause_s=args.fault_interval,
        max_duration_s=args.duration,
        quiesce_deadline_s=args.quiesce,
        liveness_s=args.liveness,
        observers=args.observers,
        observer_reconnect=not args.observers_stay_down,
        gateways=args.gateways,
        logics=args.logics,
        pushers=args.pushers,
        env=args.env,
        workdir=args.workdir,
        keep_workdir=args.keep,
        name="chaos-reduced" if args.reduced else "chaos-cluster" if args.cluster else "chaos",
        cluster=args.cluster,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    config = config_from_args(args)
    result = asyncio.run(run(config))
    default = "chaos-reduced" if args.reduced else "chaos_cluster" if args.cluster else "chaos"
    out = args.out or results_dir() / f"{default}.json"
    write_json(result, out)
    print(result.table())
    print(f"  results      {out}")
    print(result.result_line(), flush=True)
    return 0 if result.ok else 1
