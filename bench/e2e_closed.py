"""The closed-loop level of bench/e2e.py and bench/e2e_ab.py: the quiet path.

Most conversations have one message in flight. `--closed-senders` (10) SDK
senders each send a message, wait for its SendAck, and send the next, to as
many receiving SDK clients (which ACK their pushes as apps do), for
`--closed-duration` seconds after the warm-up. Nothing is scheduled, so the
rate is what the round trip allows: msg/s = senders / send-ACK latency.

Reported (`report["closed"]`, and `closed<N>_*` in the RESULT line): messages
per second, send-ACK latency (submit to the SendAck in the sender's app) and
delivery latency (submit to the recipient's `on_message`), p50 and p99, and the
server CPU per message (the stack's processes only: PostgreSQL, NATS, Redis and
the services, not the load generator, measured over the window from /proc like
every e2e level). Every message is checked exactly once and in order.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import e2e
from e2e import LoadConfig, LoadPhase, PgStats, log, summary

from imdev.stack import Stack

#: Upper bound of one worker's closed-loop rate, for its preallocated records.
MAX_RATE_PER_WORKER = 5000


def add_args(p: argparse.ArgumentParser, default_senders: int = 10) -> None:
    p.add_argument(
        "--closed-senders",
        type=int,
        default=default_senders,
        help=f"closed-loop senders, each waiting for its SendAck before the next "
        f"(default {default_senders}; 0 or --skip closed: no closed-loop level)",
    )
    p.add_argument(
        "--closed-duration",
        type=float,
        help="measured seconds of the closed-loop level (default: --duration)",
    )


class HistScraper:
    """Sums and counts of the services' Prometheus histograms between two
    scrapes: the mean time of each hop (RPC client and server latency by
    method, logic's transactions by operation, the pusher's commit-to-push) and
    how many observations each message made of it."""

    def __init__(self, endpoints: dict[str, int]) -> None:
        self.endpoints = endpoints
        self._before: dict[str, float] = {}

    def _scrape(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric, fields, value in e2e.scrape_metrics(self.endpoints):
            if metric.endswith(("_sum", "_count")):
                label = ",".join(fields.values())
                out[f"{name}:{metric.removeprefix('im_')}[{label}]"] = value
        return out

    def start(self) -> None:
        self._before = self._scrape()

    def stop(self, messages: int) -> dict[str, dict[str, float]]:
        """{hop: {"mean_ms", "per_msg"}} for every histogram observed meanwhile
        (sizes, such as logic's send batch size, as plain means)."""
        after = self._scrape()
        delta = {k: v - self._before.get(k, 0.0) for k, v in after.items()}
        out: dict[str, dict[str, float]] = {}
        for key, count in sorted(delta.items()):
            name, _, label = key.partition("[")
            if not name.endswith("_count") or count <= 0:
                continue
            base = name.removesuffix("_count")
            total = delta.get(f"{base}_sum[{label}", 0.0)
            seconds = base.endswith("_seconds")
            hop = f"{base.removesuffix('_seconds')}[{label}"
            out[hop] = {
                "mean_ms" if seconds else "mean": round(
                    total / count * (1000 if seconds else 1), 3
                ),
                "per_msg": round(count / messages, 3) if messages else 0.0,
            }
        return out


def analyse(
    replies: list[dict[str, Any]], window: tuple[float, float], cpu: dict[str, float]
) -> dict[str, Any]:
    """Rate, latency and CPU per message of the messages sent in `window`."""
    w0, w1 = window
    ack_ms: list[float] = []
    deliv_ms: list[float] = []
    acks = 0
    for reply in replies:
        for sub, ack, rcv, count in zip(
            reply["submitted_at"],
            reply["ack_at"],
            reply["recv_at"],
            reply["recv_count"],
            strict=True,
        ):
            if not math.isnan(ack) and w0 <= ack < w1:
                acks += 1
            if not w0 <= sub < w1:
                continue
            if not math.isnan(ack):
                ack_ms.append((ack - sub) * 1000)
            if count > 0:
                deliv_ms.append((rcv - sub) * 1000)
    rate = acks / (w1 - w0)
    servers = {k: v for k, v in cpu.items() if k in e2e.SERVER_GROUPS}
    server_cores = sum(servers.values())
    return {
        "msgs_per_s": round(rate, 1),
        "send_ack_ms": summary(ack_ms),
        "delivery_ms": summary(deliv_ms),
        "server_cores": round(server_cores, 3),
        "server_cpu_ms_per_msg": round(server_cores * 1000 / rate, 3) if rate else None,
        "server_cpu_ms_per_msg_by_group": (
            {k: round(v * 1000 / rate, 3) for k, v in servers.items()} if rate else {}
        ),
        "loadgen_cpu_ms_per_msg": (
            round(cpu.get("loadgen", 0.0) * 1000 / rate, 3) if rate else None
        ),
        "cpu_cores": cpu,
    }


def run_level(phase: LoadPhase, senders: int, label: str, duration_s: float) -> dict[str, Any]:
    """One closed-loop level on `phase`'s open clients (its first `senders`
    pairs, spread over the workers): warm-up, the measured window, then the
    drain and the exactly-once check."""
    cfg = phase.cfg
    foreign_before = (
        e2e.wait_quiet(phase.meter_groups, cfg.quiet_wait_s, cfg.quiet_threshold)
        if cfg.quiet_wait_s
        else None
    )
    workers = len(phase.procs)
    per_worker = [senders // workers + (w < senders % workers) for w in range(workers)]
    start_at = time.monotonic() + 0.5
    run_s = cfg.warmup_s + duration_s
    if phase.metrics is not None:
        phase.metrics.start()
    hists = HistScraper(phase.metrics.endpoints) if phase.metrics is not None else None
    pg = PgStats(phase.stack.database_url)
    pg.start()
    for proc, n in zip(phase.procs, per_worker, strict=True):
        proc.send(
            "closed",
            {
                "level": label,
                "senders": n,
                "start_at": start_at,
                "run_s": run_s,
                "drain_s": cfg.drain_s,
                "max_rate": MAX_RATE_PER_WORKER,
            },
        )
    window = (start_at + cfg.warmup_s, start_at + run_s)
    meter = e2e.CpuMeter(phase.meter_groups)
    time.sleep(max(0.0, window[0] - time.monotonic()))
    meter.start()
    if hists is not None:
        hists.start()
    time.sleep(max(0.0, window[1] - time.monotonic()))
    cpu = meter.stop()
    hops = hists.stop(1) if hists is not None else {}
    replies = [p.recv(cfg.drain_s + run_s + 120) for p in phase.procs]
    for r in replies:
        if "error" in r:
            raise RuntimeError(f"closed-loop worker failed: {r['error']}")
    data = analyse(replies, window, cpu)
    acked = data["msgs_per_s"] * duration_s
    # Per-hop means over the measured window (see docs/benchmarks.md, "The
    # closed loop, hop by hop"); per_msg = observations per message ACKed.
    data["hops"] = {
        k: {**v, "per_msg": round(v["per_msg"] / acked, 3) if acked else None}
        for k, v in hops.items()
    }
    submitted = sum(r["submitted"] for r in replies)
    e2e.call_all(
        phase.procs, "quiesce", [{"timeout_s": cfg.quiesce_s, "quiet_s": 1.0}] * len(phase.procs)
    )
    time.sleep(1.0)  # PostgreSQL flushes its activity stats about once a second
    data["postgres_per_msg"] = pg.stop(submitted)
    if phase.metrics is not None:
        data["per_msg_counters"] = phase.metrics.stop(submitted)
    verified = e2e.call_all(phase.procs, "verify", [{"level": label}] * len(phase.procs))
    final = e2e.final_counts(verified)
    data.update(
        label=label,
        senders=senders,
        duration_s=duration_s,
        window_monotonic=list(window),
        foreign_cores_before=foreign_before,
        loadavg=Path("/proc/loadavg").read_text().split()[:3],
        final_counts=final,
        zero_loss=final["exactly_once"] and final["failed"] == 0,
    )
    ack, dl = data["send_ack_ms"], data["delivery_ms"]
    log(
        f"  {label}: {data['msgs_per_s']} msg/s | send-ACK p50 {ack['p50']} p99 {ack['p99']} ms"
        f" | delivery p50 {dl['p50']} p99 {dl['p99']} ms | server CPU "
        f"{data['server_cpu_ms_per_msg']} ms/msg ({data['server_cores']} cores) | exactly-once "
        f"{final['exactly_once']} ({final['received']}/{final['submitted']}, dup "
        f"{final['duplicates']}, failed {final['failed']}) | foreign {cpu['foreign']} cores"
    )
    return data


def run(
    stack: Stack,
    args: argparse.Namespace,
    meter_groups: dict[str, list[int]],
    metrics: e2e.MetricsScraper | None,
) -> dict[str, Any]:
    """The closed-loop level on clients of its own (`--closed-senders` pairs):
    `report["closed"]`."""
    senders = args.closed_senders
    cfg = LoadConfig.from_args(args)
    cfg.pairs = senders
    cfg.workers = min(args.workers, senders)
    duration = args.closed_duration or args.duration
    log(f"closed loop: {senders} senders, each waiting for its SendAck, {duration:g} s")
    phase = LoadPhase(stack, cfg, meter_groups, metrics)
    phase.open()
    try:
        return run_level(phase, senders, f"closed{senders}", duration)
    finally:
        phase.close()


def result_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The closed-loop figures of the RESULT line (`closed10_*` with 10 senders)."""
    c = report.get("closed")
    if not c:
        return {}
    k = f"closed{c['senders']}"
    return {
        f"{k}_msgs_per_s": c["msgs_per_s"],
        f"{k}_send_p50_ms": c["send_ack_ms"]["p50"],
        f"{k}_send_p99_ms": c["send_ack_ms"]["p99"],
        f"{k}_delivery_p50_ms": c["delivery_ms"]["p50"],
        f"{k}_delivery_p99_ms": c["delivery_ms"]["p99"],
        f"{k}_cpu_ms_per_msg": c["server_cpu_ms_per_msg"],
        f"{k}_exactly_once": c["final_counts"]["exactly_once"],
    }


def targets(result: dict[str, Any]) -> dict[str, bool | None]:
    """Issue 19's targets for the quiet path (10 senders)."""
    p50 = result.get("closed10_send_p50_ms")
    cpu = result.get("closed10_cpu_ms_per_msg")
    if p50 is None and cpu is None:
        return {}
    return {
        "closed10_send_p50_ms <= 10": None if p50 is None else p50 <= 10,
        "closed10_cpu_ms_per_msg <= 1.2": None if cpu is None else cpu <= 1.2,
    }
