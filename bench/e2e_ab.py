"""Before/after in one run: the 1:1 load of `bench/e2e.py` against two
configurations of the same code, alternated on the same machine.

    .venv/bin/python bench/e2e_ab.py                     # ~6-10 minutes
    .venv/bin/python bench/e2e_ab.py --levels 150,300 --rounds 1 --no-search

"before" turns one change off with the settings that reproduce the old cost
(`--preset`: `liveness`, the default, turns the gateway's head checks and
catch-ups off; `batching` turns send/fan-out/ACK batching off); "after" is the
default configuration. `--closed-senders 10` adds the closed-loop level of
bench/e2e_closed.py to each side (before the open-loop levels; `--levels ''
--no-search` runs it alone). Each
round starts a fresh stack per configuration (ABBA order over rounds, so a drift
in the machine's load does not favour one side), offers the same fixed loads,
and, unless --no-search, searches each side's highest sustained rate. Every level
is checked exactly once and in order, as in e2e.py.

Writes bench/results/e2e_ab.json and prints `RESULT {json}` last: per side the
median over rounds of CPU ms per message, ACK and delivery p99 at each level, the
max sustained rate, and after/before ratios. What cannot be switched off (code
that is simply cheaper now, e.g. the telemetry wrappers) is in both sides.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import e2e
import e2e_closed
from pydantic_settings import BaseSettings

from imdev.stack import Stack

#: The "before" side of each switchable change: the settings that restore the old
#: cost. `--preset` picks one (default: the newest); `--before` overrides it.
PRESETS: dict[str, tuple[str, ...]] = {
    # Send/fan-out/ACK batching off: one send per transaction, one conversation per
    # Fanout call and no linger, one AckDelivery call per delivery ACK.
    "batching": (
        "logic:IM_LOGIC_SEND_BATCH_MAX=1",
        "pusher:IM_PUSHER_FANOUT_BATCH_CONVERSATIONS=1",
        "pusher:IM_PUSHER_FANOUT_LINGER_MS=0",
        "gateway:IM_GATEWAY_ACK_BATCH_MS=0",
        "gateway:IM_GATEWAY_SEND_BATCH_MAX=1",
    ),
    # Liveness off: no heads in Welcome/Pong, no head checks, no catch-up pushes.
    "liveness": ("gateway:IM_GATEWAY_LIVENESS_S=0",),
    # The quiet path (issue 19): the SendAck waits for the trigger publish, and
    # every partial fan-out batch waits its linger even when nothing is in flight.
    "quiet": (
        "logic:IM_LOGIC_ACK_BEFORE_PUBLISH=0",
        "pusher:IM_PUSHER_FANOUT_LINGER_WHEN_IDLE=1",
    ),
}
DEFAULT_PRESET = "liveness"


def settings_class(kind: str) -> type[BaseSettings]:
    """The Settings class of a service. bench/ (this script's directory, first on
    sys.path) holds logic.py and seqsvc.py, which shadow the service packages of
    the same names: import the services with it out of the way."""
    if kind not in ("logic", "pusher", "gateway", "seqsvc"):
        raise SystemExit(f"unknown service kind {kind!r}")
    here = str(Path(__file__).resolve().parent)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(here)]
    try:
        module = importlib.import_module(f"{kind}.config")
    finally:
        sys.path[:] = saved
    cls: type[BaseSettings] = module.Settings
    return cls


def checked_env(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """`e2e.parse_env`, and every VAR must be a setting the service knows (a
    misspelt switch would silently compare a side with itself)."""
    env = e2e.parse_env(items)
    for kind, settings in env.items():
        cls = settings_class(kind)
        prefix = str(cls.model_config.get("env_prefix", ""))
        for var in settings:
            if (
                not var.startswith(prefix)
                or var.removeprefix(prefix).lower() not in cls.model_fields
            ):
                raise SystemExit(f"{kind}:{var}: {kind} has no setting {var}")
    return env


def run_side(
    name: str,
    env: dict[str, dict[str, str]],
    levels: list[float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One fresh stack with `env`: the warm-up, the fixed levels, the search."""
    workdir = Path(tempfile.mkdtemp(prefix=f"im-ab-{name}-"))
    workdir.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    stack = Stack(workdir, gateways=1, fsync=True, env=env)
    metrics = e2e.MetricsScraper(e2e.enable_metrics(stack))
    e2e.log(f"[{name}] starting a stack ({env or 'defaults'})")
    try:
        stack.start()
    except BaseException:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    groups: dict[str, list[int]] = {
        "gateway": [stack.gateways[0].pid or 0],
        "logic": [stack.logics[0].pid or 0],
        "pusher": [stack.pushers[0].pid or 0],
        "seqsvc": [stack.seqsvc.pid or 0],
        "postgres": [stack.postgres.pid or 0],
        "nats": [stack.nats.pid or 0],
        "redis": [stack.redis.pid or 0],
        "bench": [os.getpid()],
    }
    cfg = e2e.LoadConfig.from_args(args)
    out: dict[str, Any] = {"env": env, "levels": {}, "search": None, "closed": None}
    phase = e2e.LoadPhase(stack, cfg, groups, metrics)
    try:
        if args.closed_senders > 0:
            # On clients of its own, before the open-loop levels fill the tables.
            out["closed"] = e2e_closed.run(stack, args, groups, metrics)
        if levels or args.search:
            phase.open()
            phase.run_level(200, "warmup", duration_s=3.0)
        fixed = []
        for offered in levels:
            res = phase.run_level(offered, f"{name}-{int(offered)}")
            fixed.append(res)
            out["levels"][str(int(offered))] = res.data
        if args.search and fixed:
            out["search"] = phase.search(fixed, args.search_steps, resolution=50.0)
            e2e.log(f"[{name}] max sustained {out['search']['max_msgs_per_s']} msg/s")
    finally:
        phase.close()
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def _ratio(after: float | None, before: float | None) -> float | None:
    return round(after / before, 3) if after is not None and before else None


def summarise(rounds: list[dict[str, Any]], levels: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in ("before", "after"):
        runs = [r[side] for r in rounds]
        per_level = {}
        for lv in levels:
            key = str(int(lv))
            data = [run["levels"][key] for run in runs if key in run["levels"]]
            per_level[key] = {
                "cpu_ms_per_msg": _median([d["cpu_ms_per_msg_total"] for d in data]),
                "completed_ack_per_s": _median([d["acked_per_s_in_window"] for d in data]),
                "send_ack_p99_ms": _median([d["send_ack_ms"]["p99"] for d in data]),
                "delivery_p99_ms": _median([d["delivery_ms"]["p99"] for d in data]),
                "exactly_once": all(d["final_counts"]["exactly_once"] for d in data),
                "sustained": [bool(d["sustained"]) for d in data],
                "foreign_cores": [d["cpu_cores"]["foreign"] for d in data],
            }
        searches = [run["search"]["max_msgs_per_s"] for run in runs if run["search"]]
        out[side] = {"levels": per_level, "max_msgs_per_s": _median(searches)}
        closed = [run["closed"] for run in runs if run.get("closed")]
        if closed:
            out[side]["closed"] = {
                "msgs_per_s": _median([c["msgs_per_s"] for c in closed]),
                "send_p50_ms": _median([c["send_ack_ms"]["p50"] for c in closed]),
                "send_p99_ms": _median([c["send_ack_ms"]["p99"] for c in closed]),
                "delivery_p50_ms": _median([c["delivery_ms"]["p50"] for c in closed]),
                "delivery_p99_ms": _median([c["delivery_ms"]["p99"] for c in closed]),
                "cpu_ms_per_msg": _median([c["server_cpu_ms_per_msg"] for c in closed]),
                "exactly_once": all(c["final_counts"]["exactly_once"] for c in closed),
                "foreign_cores": [c["cpu_cores"]["foreign"] for c in closed],
                "loadavg": [c["loadavg"] for c in closed],
            }
    out["ratios_after_over_before"] = {
        "max_msgs_per_s": _ratio(out["after"]["max_msgs_per_s"], out["before"]["max_msgs_per_s"]),
        **{
            f"cpu_ms_per_msg@{k}": _ratio(
                out["after"]["levels"][k]["cpu_ms_per_msg"],
                out["before"]["levels"][k]["cpu_ms_per_msg"],
            )
            for k in out["after"]["levels"]
        },
    }
    if "closed" in out["after"] and "closed" in out["before"]:
        a, b = out["after"]["closed"], out["before"]["closed"]
        out["ratios_after_over_before"].update(
            {f"closed_{k}": _ratio(a[k], b[k]) for k in a if k.endswith(("_ms", "_s", "_msg"))}
        )
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--levels", default="150,300,450", help="fixed offered loads, msg/s")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (before, after) pairs")
    p.add_argument(
        "--before",
        action="append",
        metavar="KIND:VAR=VALUE",
        help="the before side's settings (default: the preset's)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help=f"which change to measure (default {DEFAULT_PRESET})",
    )
    p.add_argument("--after", action="append", default=[], metavar="KIND:VAR=VALUE")
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--drain", type=float, default=20.0)
    p.add_argument("--sustain-p99-ms", type=float, default=1000.0)
    p.add_argument("--quiet-wait", type=float, default=20.0)
    p.add_argument("--no-search", dest="search", action="store_false")
    p.add_argument("--search-steps", type=int, default=3)
    e2e_closed.add_args(p, default_senders=0)
    p.add_argument(
        "--out",
        type=Path,
        help="default: bench/results/e2e_ab.json (batching), e2e_ab_<preset>.json",
    )
    args = p.parse_args(argv)
    args.before = args.before if args.before is not None else list(PRESETS[args.preset])
    if args.out is None:
        name = "e2e_ab.json" if args.preset == "batching" else f"e2e_ab_{args.preset}.json"
        args.out = e2e.RESULTS / name
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, e2e.exit_on_sigterm)
    t0 = time.monotonic()
    sides = {"before": checked_env(args.before), "after": checked_env(args.after)}
    levels = [float(x) for x in args.levels.split(",") if x.strip()]
    report: dict[str, Any] = {
        "machine": e2e.machine_info(),
        "config": {
            "levels": levels,
            "rounds": args.rounds,
            "pairs": args.pairs,
            "duration_s": args.duration,
            "closed_senders": args.closed_senders,
            "before": args.before,
            "after": args.after,
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        },
        "rounds": [],
    }
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        report["rounds"].append({side: run_side(side, sides[side], levels, args) for side in order})
    report["summary"] = summarise(report["rounds"], levels)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    e2e.log(f"wrote {args.out}")
    summary = report["summary"]
    for side in ("before", "after"):
        for lv, d in summary[side]["levels"].items():
            e2e.log(
                f"  {side:6} {lv:>5} msg/s: CPU {d['cpu_ms_per_msg']} ms/msg, ACK p99 "
                f"{d['send_ack_p99_ms']} ms, delivery p99 {d['delivery_p99_ms']} ms, "
                f"completed {d['completed_ack_per_s']}/s, exactly once {d['exactly_once']}, "
                f"foreign {d['foreign_cores']}"
            )
        e2e.log(f"  {side:6} max sustained {summary[side]['max_msgs_per_s']} msg/s")
        if "closed" in summary[side]:
            e2e.log(f"  {side:6} closed loop: {summary[side]['closed']}")
    result = {
        "before_max_msgs_per_s": summary["before"]["max_msgs_per_s"],
        "after_max_msgs_per_s": summary["after"]["max_msgs_per_s"],
        **summary["ratios_after_over_before"],
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
