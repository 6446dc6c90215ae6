"""One chaos run: start the stack, run the workload (and the raw observers)
under the fault schedule, stop the faults, wait without touching any device
until every connected one has everything, check, measure online delivery,
report.

`run(config)` is the whole of it (used by `python -m chaos` and the tests);
`RunResult.result_line()` is the `RESULT {json}` line.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chaos import checker, online
from chaos.faults import (
    ALL_SERVER_KINDS,
    CLIENT_KINDS,
    SERVER_KINDS,
    FailoverTimes,
    FaultKind,
    FaultLog,
    ServerFaults,
    counts,
    nats_down_long_s,
    plan,
    run_client_faults,
    run_server_faults,
    settled_since,
)
from chaos.netproxy import TcpProxy
from chaos.observer import Observer
from chaos.seqcheck import SeqProbe, SeqProbeReport, store_order_violations
from chaos.workload import Workload, WorkloadConfig
from imdev.cluster import ClusterPorts, ClusterStack
from imdev.servers import ROOT
from imdev.stack import Stack

log = logging.getLogger("chaos.run")

TOKEN_TTL_S = 24 * 3600


@dataclass(frozen=True)
class RunConfig:
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    # Fault schedule: `rounds` rounds of every enabled kind.
    rounds: int = 1
    server_kinds: tuple[FaultKind, ...] = SERVER_KINDS
    client_kinds: tuple[FaultKind, ...] = CLIENT_KINDS
    fault_pause_s: float = 1.0  # mean pause after a server fault
    client_fault_pause_s: float = 1.0  # mean pause after a client fault
    client_rounds: int | None = None  # default: as many as `rounds`
    server_tracks: int = 1  # server faults acted out by this many concurrent tracks
    max_downtime_s: float = 1.0
    max_offline_s: float = 3.0  # longest a restarted client stays offline
    # The fault phase ends when both schedules are done and `workload.messages`
    # sends are acked, or after `max_duration_s`, whichever comes first.
    max_duration_s: float = 3600.0
    min_duration_s: float = 0.0
    ack_timeout_s: float = 60.0  # after the faults, for outstanding sends
    # After the outstanding sends: how long every connected device gets to have
    # everything, by itself (nothing is reconnected or cut to heal it).
    quiesce_deadline_s: float = 30.0
    # The online delivery bound (I9): a pair slower than this, or never
    # delivered, is `online_late`. Also how long a raw observer waits before it
    # takes a seq gap as a hole.
    liveness_s: float = 10.0
    observers: int = 3  # raw observer devices (second devices of workload users)
    observer_reconnect: bool = True  # a new window after its stream ends
    # IM_LOGIC_REPAIR_AFTER_S of the stack (None: logic's default), shortened so
    # that `nats_down_long` (which outlasts it) keeps a run short.
    logic_repair_after_s: float | None = 2.0
    crash_wait_s: float = 15.0  # longest a pusher with its crash switch gets to crash
    gateways: int = 2
    logics: int = 2
    pushers: int = 2
    seqsvcs: int = 3  # the cluster's seqsvc instances (the single-node stack runs one)
    env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    workdir: Path | None = None
    keep_workdir: bool = False
    name: str = "chaos"
    # The replicated topology (imdev.cluster): 3 NATS nodes, PostgreSQL primary +
    # synchronous standby; logic and seqsvc reach PostgreSQL, pushers NATS,
    # through TCP proxies that pg_cut / nats_cut reset.
    cluster: bool = False


@dataclass
class RunResult:
    config: RunConfig
    report: checker.Report
    faults: list[dict[str, object]]
    fault_counts: dict[str, int]
    fault_errors: int
    workload: dict[str, object]
    quiet: bool
    quiesce_s: float
    phase_s: float
    total_s: float
    anomalies: list[str]
    workdir: str
    log_errors: dict[str, int]
    online: online.OnlineReport = field(default_factory=lambda: online.OnlineReport(10.0))
    observers: list[dict[str, object]] = field(default_factory=list)
    t0: float = 0.0  # monotonic time the workload's clock starts at (for the JSON)
    history: checker.History | None = None  # what the checker read (not in the JSON)
    cluster: ClusterReport | None = None
    #: seqsvc's values as a probe client saw them (I6), None: not probed.
    seq_probe: SeqProbeReport | None = None
    #: The store's seqsvc values out of msg_id order (chaos.seqcheck).
    store_order: list[str] = field(default_factory=list)

    @property
    def messages_acked(self) -> int:
        return self.report.acked_messages

    @property
    def ok(self) -> bool:
        return (
            self.report.ok
            and self.quiet
            and self.online.online_late == 0
            and (self.cluster is None or self.cluster.ok)
            and (self.seq_probe is None or self.seq_probe.repeats == 0)
            and not self.store_order
        )

    def result(self) -> dict[str, object]:
        r = self.report
        return {
            "clients": self.config.workload.clients,
            "messages_acked": self.messages_acked,
            "faults": sum(self.fault_counts.values()),
            "lost": r.lost,
            "duplicated": r.duplicated,
            "reordered": r.reordered,
            "violations": len(r.violations),
            "online_late": self.online.online_late,
            "max_online_delivery_s": round(self.online.max_delay_s, 2),
            "reads": r.reads,
            "noop_reads": r.noop_reads,
            "recalls": r.recalls,
            "recall_violations": r.recall_violations,
            "read_regressions": r.read_regressions,
            "unread_mismatches": r.unread_mismatches,
            **(self.seq_probe.result() if self.seq_probe is not None else {}),
            "store_seq_disorder": len(self.store_order),
            **(self.cluster.result() if self.cluster is not None else {}),
        }

    def result_line(self) -> str:
        return "RESULT " + json.dumps(self.result(), sort_keys=True)

    def to_json(self, violations_limit: int = 1000) -> dict[str, object]:
        r = self.report
        cfg = asdict(self.config)
        cfg["workdir"] = str(cfg["workdir"]) if cfg["workdir"] else None
        cfg["server_kinds"] = [k.value for k in self.config.server_kinds]
        cfg["client_kinds"] = [k.value for k in self.config.client_kinds]
        return {
            "result": self.result(),
            "ok": self.ok,
            "config": cfg,
            "counts": {
                "sent": r.sent,
                "acked": r.acked,
                "acked_messages": r.acked_messages,
                "committed_messages": r.committed,
                "delivered": r.delivered,
                "expected_deliveries": r.expected,
                "lost": r.lost,
                "duplicated": r.duplicated,
                "reordered": r.reordered,
                "events": r.events,
                "reads": r.reads,
                "noop_reads": r.noop_reads,
                "recalls": r.recalls,
                "recall_violations": r.recall_violations,
                "read_regressions": r.read_regressions,
                "unread_mismatches": r.unread_mismatches,
                "served_responses": len(self.history.served) if self.history else 0,
                "conversation_lists": len(self.history.conversations) if self.history else 0,
                "violations": len(r.violations),
                "violations_by_kind": r.by_kind(),
            },
            "quiet": self.quiet,
            "quiesce_s": round(self.quiesce_s, 2),
            "online": self.online.to_json(self.t0),
            "observers": self.observers,
            "fault_phase_s": round(self.phase_s, 1),
            "total_s": round(self.total_s, 1),
            "fault_counts": self.fault_counts,
            "fault_errors": self.fault_errors,
            "workload": self.workload,
            "anomalies": self.anomalies,
            "service_log_errors": self.log_errors,
            "workdir": self.workdir,
            "violations": [
                {**asdict(v), "kind": v.kind.value} for v in r.violations[:violations_limit]
            ],
            "faults": self.faults,
            **({"cluster": self.cluster.to_json()} if self.cluster is not None else {}),
            **({"seq_probe": asdict(self.seq_probe)} if self.seq_probe is not None else {}),
            "store_order": self.store_order[:100],
        }

    def table(self) -> str:
        r = self.report
        w = self.workload
        o = self.online
        rows = [
            ("clients", f"{self.config.workload.clients} ({self.config.workload.users} users)"),
            ("sent", f"{r.sent} (storm repeats {w['storms']}, resends {w['resends']})"),
            ("acked", f"{r.acked} sends, {r.acked_messages} distinct messages"),
            ("delivered", f"{r.delivered} of {r.expected} (message, device) pairs"),
            ("lost", str(r.lost)),
            ("duplicated", str(r.duplicated)),
            ("reordered", str(r.reordered)),
            (
                "events",
                f"{r.events} stored: reads {r.reads} (no-ops {r.noop_reads}), recalls {r.recalls}",
            ),
            (
                "state",
                f"recall_violations {r.recall_violations}, read_regressions "
                f"{r.read_regressions}, unread_mismatches {r.unread_mismatches}",
            ),
            ("violations", f"{len(r.violations)} {r.by_kind() or ''}".rstrip()),
            ("quiesce", f"{self.quiesce_s:.1f} s" + ("" if self.quiet else " (DEADLINE PASSED)")),
            (
                "online",
                f"{o.pairs} (message, connected device) pairs, {o.observer_pairs} on "
                f"{len(self.observers)} observers; not judged {o.skipped}",
            ),
            (
                "online_late",
                f"{o.online_late} over {o.liveness_s:g} s (never delivered {o.never}); "
                f"max {o.max_delay_s:.2f} s",
            ),
            ("fault phase", f"{self.phase_s:.0f} s (run {self.total_s:.0f} s)"),
        ]
        out = ["", "chaos run"]
        out += [f"  {k:<12} {v}" for k, v in rows]
        out.append(f"  faults       {sum(self.fault_counts.values())} ({self.fault_errors} failed)")
        for kind, n in self.fault_counts.items():
            out.append(f"    {kind:<28} {n:>5}")
        sp = self.seq_probe
        if sp is not None:
            out.append(
                f"  seqsvc       {sp.values} values on {sp.keys} probe keys ({sp.errors} failed "
                f"calls): {sp.repeats} repeated or back" + (" VIOLATION" if sp.repeats else "")
            )
            out += [f"    {e}" for e in sp.examples]
        out.append(
            f"  store        seqsvc values out of msg_id order: {len(self.store_order)}"
            + (" VIOLATION" if self.store_order else "")
        )
        out += [f"    {e}" for e in self.store_order[:20]]
        c = self.cluster
        if c is not None:
            secs = ", ".join(f"{x:.2f}" for x in c.failover_s) or "none"
            out.append(
                f"  failover     {c.pg_failovers} PostgreSQL failovers, kill -9 to the first "
                f"ACK of a new send: {secs} s; ACKed before the standby was back: "
                f"{c.acked_without_standby}" + (" VIOLATION" if c.acked_without_standby else "")
            )
        out.append("  max online delivery per fault kind (s; pairs; late)")
        for kind, worst in sorted(o.max_by_kind.items()):
            late = o.late_by_kind.get(kind, 0)
            out.append(
                f"    {kind:<28} {worst:>7.2f} {o.pairs_by_kind.get(kind, 0):>7} {late:>5}"
                + (" LATE" if late else "")
            )
        if o.late:
            out.append(f"  late online deliveries: {o.online_late} (first 20)")
            for p in o.late[:20]:
                got = "never delivered" if p.never else f"{p.delay_s:.2f} s"
                out.append(
                    f"    msg_id={p.msg_id} {p.user_id}/{p.device_id} {got}; acked "
                    f"+{p.acked_at - self.t0:.1f}s, clock from +{p.base - self.t0:.1f}s "
                    f"(faults near: {', '.join(p.kinds) or 'none'})"
                )
        if self.anomalies:
            out.append(f"  anomalies    {len(self.anomalies)}")
            out += [f"    {a}" for a in self.anomalies[:20]]
        if r.violations:
            out += ["", *checker.summarize(r, limit=40)]
            out.append(f"  service logs and client stores: {self.workdir}")
        return "\n".join(out)


def _workdir(config: RunConfig) -> Path:
    if config.workdir is not None:
        config.workdir.mkdir(parents=True, exist_ok=True)
        return config.workdir
    path = Path(tempfile.mkdtemp(prefix=f"{config.name}-"))
    path.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    return path


def _log_errors(logs: Path) -> dict[str, int]:
    """Lines at ERROR level or with a traceback, per service log: where to look."""
    out: dict[str, int] = {}
    for f in sorted(logs.glob("*.log")):
        n = 0
        with f.open(errors="replace") as fh:
            for line in fh:
                low = line[:80].lower()
                if '"level": "error"' in low or '"level": "critical"' in low or "traceback" in low:
                    n += 1
        if n:
            out[f.name] = n
    return out


async def run(config: RunConfig, echo: Callable[[str], None] = print) -> RunResult:
    """Runs the whole experiment; never raises for a violation (see RunResult.ok)."""
    t_start = time.monotonic()
    timelines: list[checker.DeviceHistory] = []
    push_logs: list[checker.PushLog] = []
    tracks: list[online.DeviceTrack] = []
    spans: list[online.FaultSpan] = []
    observers: list[Observer] = []
    workdir = _workdir(config)
    anomalies: list[str] = []
    quiet, quiesce_s, t_end = False, 0.0, time.monotonic()

    def note(line: str) -> None:
        if line.startswith("ANOMALY"):
            anomalies.append(line.removeprefix("ANOMALY ").strip())
        echo(line)

    env = stack_env(config)
    proxies: dict[str, list[TcpProxy]] = {}
    stack: Stack
    if config.cluster:
        cports = ClusterPorts.free(config.seqsvcs)
        proxies = await start_proxies(config, cports)
        stack = ClusterStack(
            workdir / "stack",
            gateways=config.gateways,
            logics=config.logics,
            pushers=config.pushers,
            seqsvcs=config.seqsvcs,
            env=env,
            cluster_ports=cports,
            proxies={who: {int(p.target_port): p.port for p in ps} for who, ps in proxies.items()},
        )
    else:
        stack = Stack(
            workdir / "stack",
            gateways=config.gateways,
            logics=config.logics,
            pushers=config.pushers,
            env=env,
        )
    echo(f"chaos: starting the stack in {workdir}")
    await asyncio.to_thread(stack.start, 120.0)
    w = Workload(
        config.workload,
        stack.gateway_addresses,
        lambda user, device: stack.mint(user, device, TOKEN_TTL_S),
        workdir,
        echo=note,
    )
    flog = FaultLog(echo=echo)
    failovers: list[FailoverTimes] = []
    probe = SeqProbe(stack.seqsvc.address)
    seq_probe: SeqProbeReport | None = None
    store_order: list[str] = []
    try:
        await probe.start()
        await w.setup()
        # Observers first: every message the workload sends is acked after
        # their Welcome, so all of them are theirs to judge.
        observers = await start_observers(
            config, stack, w.users, lambda since: settled_since(flog, since), echo
        )
        await w.start()
        client_rounds = config.client_rounds if config.client_rounds is not None else config.rounds
        echo(
            f"chaos: {len(w.devices)} clients, {len(observers)} observers, "
            f"{len(w.members)} conversations; "
            f"faults: {config.rounds} round(s) of {len(config.server_kinds)} server kinds, "
            f"{client_rounds} of {len(config.client_kinds)} client kinds"
        )
        seed = config.workload.seed
        server_plan = plan(
            seed, config.server_kinds, config.rounds, config.fault_pause_s, config.max_downtime_s
        )
        client_plan = plan(
            seed + 1,
            config.client_kinds,
            client_rounds,
            config.client_fault_pause_s,
        )
        stop = asyncio.Event()

        def connected() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
            return (
                [(o.user_id, o.device_id) for o in observers if o.connected],
                [(d.user, d.device_id) for d in w.devices if d.connection_key() is not None],
            )

        loop = asyncio.get_running_loop()

        def cut(who: str) -> int:
            """Resets `who`'s proxied connections, in the proxies' event loop."""

            async def in_loop() -> int:
                return sum(p.cut() for p in proxies.get(who, []))

            return asyncio.run_coroutine_threadsafe(in_loop(), loop).result(30)

        server_faults = ServerFaults(
            stack,
            connected=connected,
            nats_down_long_s=nats_down_long_s(env.get("logic", {})),
            crash_wait_s=config.crash_wait_s,
            cut=cut,
            cut_targets={
                "pg": [w for w in proxies if not w.startswith("pusher")],
                "nats": [w for w in proxies if w.startswith("pusher")],
            },
        )
        failovers = server_faults.failovers
        n_tracks = max(1, config.server_tracks)
        flog.started = time.monotonic()
        tracks_ = [
            asyncio.create_task(
                run_server_faults(server_faults, server_plan[i::n_tracks], flog, stop)
            )
            for i in range(n_tracks)
        ]
        tracks_.append(
            asyncio.create_task(
                run_client_faults(w, client_plan, flog, stop, seed + 2, config.max_offline_s)
            )
        )
        t_phase = time.monotonic()
        next_progress = t_phase + 10
        while True:
            now = time.monotonic()
            elapsed = now - t_phase
            done = all(t.done() for t in tracks_)
            if elapsed >= config.max_duration_s:
                echo("chaos: max duration reached")
                break
            enough = w.stats.acked >= config.workload.messages
            if done and enough and elapsed >= config.min_duration_s:
                break
            if now >= next_progress:
                next_progress = now + 10
                echo(
                    f"chaos: +{elapsed:.0f}s acked {w.stats.acked} sent {w.stats.sent} "
                    f"faults {len(flog.events)}/{len(server_plan) + len(client_plan)}"
                )
            await asyncio.sleep(0.2)  # polling progress, not synchronising
        stop.set()
        await asyncio.gather(*tracks_)
        phase_s = time.monotonic() - t_phase
        seq_probe = await probe.stop()
        for t in tracks_:
            if t.exception() is not None:
                anomalies.append(f"fault track crashed: {t.exception()!r}")

        # Whatever a failed fault left down comes back now: a fault of its own
        # for online delivery (the bound runs from when it is back).
        if isinstance(stack, ClusterStack) and any(n.deposed for n in stack.pg_nodes):
            anomalies.append("a deposed PostgreSQL primary was not rebuilt by its fault")
            echo("ANOMALY a deposed primary was left; rebuilding it as the standby")
            began = time.monotonic()
            await asyncio.to_thread(stack.rebuild_deposed)
            spans.append(online.FaultSpan("down_after_faults", began, time.monotonic()))
        for proc in [*stack.infra, *stack.services]:
            if not proc.running():
                anomalies.append(f"{proc.name}:{proc.port} was down after the faults")
                echo(f"ANOMALY {proc.name}:{proc.port} down after the faults; starting it")
                began = time.monotonic()
                await asyncio.to_thread(proc.start, 120.0)
                spans.append(online.FaultSpan("down_after_faults", began, time.monotonic()))

        echo(f"chaos: faults over after {phase_s:.0f}s; waiting for outstanding sends")
        await w.stop_sending(config.ack_timeout_s)
        echo("chaos: waiting for every connected device to have everything (no reconnects)")

        def observers_missing() -> int:
            acked = acked_messages(w)
            return sum(
                o.missing(
                    (
                        (m.msg_id, m.acked_at)
                        for m in acked
                        if o.user_id
                        in (
                            m.recipients
                            if m.recipients is not None
                            else w.members[m.conversation_id]
                        )
                    ),
                    w.timeline_seqs(o.user_id),
                )
                for o in observers
            )

        quiet, quiesce_s = await w.quiesce(config.quiesce_deadline_s, observers_missing)
        t_end = time.monotonic()
        echo(f"chaos: {'quiet' if quiet else 'NOT quiet'} after {quiesce_s:.1f}s")
        # What was connected at the end, as it was (before anything closes).
        await w.stop_watching()
        tracks = w.tracks() + [o.track() for o in observers]
        push_logs = [o.push_log() for o in observers]
        # Unread counts are only defined at quiescence: the final
        # ListConversations answers are taken only then.
        timelines = await w.audit_timelines(conversations=quiet)
        store_order = await asyncio.to_thread(store_order_violations, stack.database_url)
    finally:
        await probe.stop()
        for o in observers:
            await o.close()
        await w.close()
        await asyncio.to_thread(stack.stop)
        for ps in proxies.values():
            for proxy in ps:
                await proxy.close()

    anomalies += [f"{e.kind}: {e.note}" for e in flog.events if e.note]
    history = w.history(timelines, push_logs)
    report = checker.check(history)
    if not quiet:
        anomalies.append(f"not quiet after {config.quiesce_deadline_s}s")
    server = {k.value for k in ALL_SERVER_KINDS}
    spans += [
        online.FaultSpan(e.kind, flog.started + e.at, flog.started + e.at + e.duration_s)
        for e in flog.events
        if e.kind in server
    ]
    online_report = online.measure(
        acked_messages(w),
        w.members,
        tracks,
        spans,
        t_end,
        config.liveness_s,
        {(t.user_id, e.msg_id): e.seq for t in timelines for e in t.entries},
    )
    result = RunResult(
        config=config,
        report=report,
        faults=[e.to_json() for e in flog.events],
        fault_counts=counts(flog.events),
        fault_errors=sum(1 for e in flog.events if e.error),
        workload={k: (dict(v) if isinstance(v, dict) else v) for k, v in asdict(w.stats).items()},
        quiet=quiet,
        quiesce_s=quiesce_s,
        phase_s=phase_s,
        total_s=time.monotonic() - t_start,
        anomalies=anomalies,
        workdir=str(workdir),
        log_errors=_log_errors(workdir / "stack" / "logs"),
        online=online_report,
        observers=[{"device": o.name, **asdict(o.stats)} for o in observers],
        t0=w.t0,
        history=history,
        cluster=(
            cluster_report(stack, w, flog, failovers)
            if isinstance(stack, ClusterStack) or config.cluster
            else None
        ),
        seq_probe=seq_probe,
        store_order=store_order,
    )
    # Keep the logs of anything that deserves a look, not only of violations.
    clean = result.ok and not anomalies and not result.fault_errors
    if clean and not config.keep_workdir and config.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
        result.workdir = ""
    return result


async def start_proxies(config: RunConfig, ports: ClusterPorts) -> dict[str, list[TcpProxy]]:
    """A proxy per (process, node): every seqsvc instance and every logic to each
    PostgreSQL node, every pusher to each NATS node; keyed by process ("logic-0",
    "seqsvc" for the first seqsvc instance, "seqsvc-1" for the second)."""
    routes: dict[str, list[int]] = {"seqsvc": ports.pg}
    routes |= {f"seqsvc-{i}": ports.pg for i in range(1, config.seqsvcs)}
    routes |= {f"logic-{i}": ports.pg for i in range(config.logics)}
    routes |= {f"pusher-{i}": ports.nats for i in range(config.pushers)}
    proxies: dict[str, list[TcpProxy]] = {}
    reserved = {port for _, port in ports.all()}
    for who, targets in routes.items():
        proxies[who] = []
        for port in targets:
            proxy = TcpProxy(f"127.0.0.1:{port}")
            await proxy.start()
            # The nodes' ports are chosen but not bound yet: a proxy must not take one.
            while proxy.port in reserved:
                await proxy.close()
                proxy = TcpProxy(f"127.0.0.1:{port}")
                await proxy.start()
            proxies[who].append(proxy)
    return proxies


@dataclass
class ClusterReport:
    """What the cluster faults cost: counts, the longest write outage around
    each fault kind (longest gap between consecutive send-ACKs, of any client,
    that overlaps a fault of that kind) and each PostgreSQL failover's time from
    the primary's kill -9 to the first send-ACK of a message first sent after it.

    `acked_without_standby` counts the sends first made after a primary's kill
    and ACKed before the rebuilt standby was even started: with synchronous
    commit no such ACK can exist, so any is a durability violation (an ACK of a
    commit that only the new primary holds)."""

    nats_nodes: int
    pg_nodes: int
    pg_failovers: int
    nats_node_kills: int
    write_outage_s: dict[str, float]
    failover_s: list[float]
    acked_without_standby: int = 0

    @property
    def ok(self) -> bool:
        return self.acked_without_standby == 0

    def result(self) -> dict[str, object]:
        return {
            "nats_nodes": self.nats_nodes,
            "pg_failovers": self.pg_failovers,
            "nats_node_kills": self.nats_node_kills,
            "longest_write_outage_s": self.write_outage_s,
            "failover_s_max": round(max(self.failover_s), 2) if self.failover_s else None,
            "acked_without_standby": self.acked_without_standby,
        }

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "failover_s": [round(x, 2) for x in self.failover_s]}


@dataclass(frozen=True)
class SendTimes:
    """One submission of a send (monotonic times; acked None: no ACK)."""

    client_msg_id: str
    attempted: float
    acked: float | None


def failover_numbers(
    sends: Sequence[SendTimes], failovers: Sequence[FailoverTimes]
) -> tuple[list[float], int]:
    """(per failover, seconds from the kill to the first ACK of a message whose
    FIRST submission came after the kill; the number of such ACKs that came
    before the rebuilt standby started, over all failovers).

    Only a message first submitted after the kill measures the failover: an ACK
    that arrives just after the kill may be of a commit the old primary made
    (and its standby confirmed) before it died, and a resubmission of an older
    message may be answered from its stored ACK."""
    first: dict[str, float] = {}
    for s in sends:
        first[s.client_msg_id] = min(first.get(s.client_msg_id, math.inf), s.attempted)
    fresh = [
        (first[s.client_msg_id], s.acked)
        for s in sends
        if s.acked is not None and s.attempted == first[s.client_msg_id]
    ]
    times: list[float] = []
    early = 0
    for f in failovers:
        acks = sorted(acked for attempted, acked in fresh if attempted >= f.killed)
        if acks:
            times.append(acks[0] - f.killed)
        standby = math.inf if f.standby_started is None else f.standby_started
        early += sum(1 for a in acks if a < standby)
    return times, early


def cluster_report(
    stack: Stack, w: Workload, flog: FaultLog, failovers: Sequence[FailoverTimes]
) -> ClusterReport:
    acks = sorted(w.t0 + s.acked_at for s in w.sends if s.acked_at is not None)
    server = {k.value for k in ALL_SERVER_KINDS}
    outage: dict[str, float] = {}
    for e in flog.events:
        if e.kind not in server:
            continue
        start = flog.started + e.at
        end = start + e.duration_s
        gap = longest_gap(acks, start, end)
        outage[e.kind] = round(max(outage.get(e.kind, 0.0), gap), 2)
    times, early = failover_numbers(
        [
            SendTimes(
                s.client_msg_id,
                w.t0 + s.attempted_at,
                None if s.acked_at is None else w.t0 + s.acked_at,
            )
            for s in w.sends
        ],
        failovers,
    )
    nats = getattr(stack, "nats_nodes", [stack.nats])
    pg = getattr(stack, "pg_nodes", [stack.postgres])
    ok = [e for e in flog.events if not e.error]
    return ClusterReport(
        nats_nodes=len(nats),
        pg_nodes=len(pg),
        pg_failovers=sum(1 for e in ok if e.kind == "pg_failover"),
        nats_node_kills=sum(1 for e in ok if e.kind == "nats_node_kill"),
        write_outage_s=dict(sorted(outage.items())),
        failover_s=times,
        acked_without_standby=early,
    )


def longest_gap(acks: list[float], start: float, end: float) -> float:
    """The longest interval between consecutive times of sorted `acks` that
    overlaps [start, end]; one still open after the last ACK counts up to `end`."""
    i = max(bisect.bisect_left(acks, start) - 1, 0)
    longest = 0.0
    while i < len(acks):
        lo = acks[i]
        hi = acks[i + 1] if i + 1 < len(acks) else max(end, lo)
        if lo > end:
            break
        longest = max(longest, hi - lo)
        i += 1
    if not acks:
        return end - start
    return longest


def stack_env(config: RunConfig) -> dict[str, dict[str, str]]:
    """The stack's settings: `config.env`, plus logic's shortened repair delay
    unless `config.env` sets it."""
    env = {kind: dict(settings) for kind, settings in config.env.items()}
    if config.logic_repair_after_s is not None:
        env.setdefault("logic", {}).setdefault(
            "IM_LOGIC_REPAIR_AFTER_S", f"{config.logic_repair_after_s:g}"
        )
    return env


async def start_observers(
    config: RunConfig,
    stack: Stack,
    users: list[str],
    settled: Callable[[float], float],
    echo: Callable[[str], None],
) -> list[Observer]:
    """`config.observers` raw observers, on users spread over the workload's,
    each homed on a gateway in turn; returns once every one got its Welcome."""
    n = min(config.observers, len(users))
    chosen = [users[i * len(users) // n] for i in range(n)] if n else []
    observers = [
        Observer(
            user,
            stack.gateway_addresses,
            lambda user=user: stack.mint(user, "obs", TOKEN_TTL_S),  # type: ignore[misc]
            home=i,
            hole_after_s=config.liveness_s,
            settled=settled,
            reconnect=config.observer_reconnect,
            echo=echo,
        )
        for i, user in enumerate(chosen)
    ]
    try:
        await asyncio.gather(*(o.start() for o in observers))
    except BaseException:
        for o in observers:
            await o.close()
        raise
    return observers


def acked_messages(w: Workload) -> list[online.AckedMessage]:
    """Every acked message and stored event once, with its first SendAck's time
    (monotonic) and, for an event, whose timelines it belongs to."""
    first: dict[int, online.AckedMessage] = {}
    for s in w.sends:
        if s.ack is None or s.acked_at is None or s.ack.msg_id == 0:
            continue  # msg_id 0: a no-op READ, nothing stored
        at = w.t0 + s.acked_at
        prev = first.get(s.ack.msg_id)
        if prev is None or at < prev.acked_at:
            users = (
                None
                if s.kind == checker.EntryKind.MESSAGE
                else w.recipients(s.conversation, s.sender, s.client_msg_id)
            )
            first[s.ack.msg_id] = online.AckedMessage(s.ack.msg_id, s.conversation, at, users)
    return list(first.values())


def write_json(result: RunResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")


def results_dir() -> Path:
    return Path(os.environ.get("IM_BENCH_RESULTS", ROOT / "bench" / "results"))


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
