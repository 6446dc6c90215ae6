"""End-to-end benchmark: the whole stack on this machine, driven by SDK clients.

    .venv/bin/python bench/e2e.py            # full run (6-10 minutes)
    .venv/bin/python bench/e2e.py --quick    # a smoke-sized run (about 3 minutes)
    .venv/bin/python bench/e2e.py --skip load,search,closed,full,conns,group,ws   # receipts only

Starts a fresh `imdev.stack.Stack` (PostgreSQL with fsync on, Redis, NATS
JetStream, seqsvc, logic, pusher, two gateways) and measures, with the load
generator in processes of its own (multiprocessing, spawn):

1. 1:1 traffic: many sender/recipient pairs of full SDK clients, open-loop at
   fixed offered loads (500, 1,000, 2,000 msg/s), then a search for the highest
   rate sustained with zero loss. Send-ACK latency (intended send time to the
   SendAck in the sender's app) and delivery latency (intended send time to the
   recipient's app callback); every message is counted at its recipient: it must
   arrive exactly once, in order.
2. Idle connections held by one gateway process (gateway 1, used for nothing
   else) and its memory per connection (RSS delta / connections, from /proc).
3. Read receipts: the 1:1 load plain and with every recipient marking read
   (one READ in flight per conversation, for the newest conv_seq received), at
   one offered load, runs of both sides alternated ABBA on the same stack:
   send and delivery latency of both, their ratios, and the server CPU per
   stored READ (receipts minus plain, over the READs stored in the window).
4. One message to a 500-member group with every member online: time until the
   last member's app has it, over repeats.
5. The closed loop (bench/e2e_closed.py, `--skip closed` leaves it out): 10
   senders, each waiting for its SendAck before the next, to 10 receivers:
   msg/s, send-ACK and delivery p50/p99, server CPU per message.
6. Everything on (bench/e2e_full.py, `--skip full` leaves it out): the 1:1
   load with half the devices on WebSocket, every recipient marking read,
   DELIVERED receipts, typing on a share of the conversations, liveness heads,
   at `--full-levels` (500 and 1,000 msg/s); with `--profile`, py-spy in every
   service during one more such level.

Writes bench/results/e2e.json (e2e-quick.json with --quick), a PNG of latency
against offered load (bench/results/e2e_latency.png, gitignored), and prints
`RESULT {json}` last. docs/benchmarks.md explains every number.

WebSocket devices (bench/e2e_ws.py, `--skip ws` leaves them out) get the same
measurements beside the gRPC ones: idle memory per device on a fresh gateway
(`kb_per_ws_connection`), send-ACK and delivery latency at 500 msg/s alternated
with gRPC devices, and devices opened and dropped by the thousand.

`--profile` additionally samples every service with py-spy during one extra
level (py-spy is not a project dependency: install it anywhere, e.g.
`pip install --target /tmp/pyspy py-spy`, and pass `--py-spy /tmp/pyspy/bin/py-spy`).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import e2e_conns
import e2e_load
import e2e_png
import psycopg

from imclient import direct_conversation_id
from imdev.servers import free_port
from imdev.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- statistics ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 2)

    return {
        "n": len(values),
        "p50": r(percentile(values, 50)),
        "p90": r(percentile(values, 90)),
        "p99": r(percentile(values, 99)),
        "p999": r(percentile(values, 99.9)),
        "max": r(max(values) if values else None),
    }


# -- /proc ---------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces: fields start after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and every descendant (PostgreSQL's backends, for example)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children[int(fields[1])].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine (every core), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class CpuMeter:
    """CPU time of named process groups between two samples, as cores used."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._t0 = 0.0
        self._c0: dict[str, float] = {}
        self._m0 = 0.0

    def _sample(self) -> dict[str, float]:
        out = {}
        for name, roots in self.groups.items():
            # The coordinator is the parent of everything: count only itself.
            tree = name != "bench"
            pids = [p for r in roots for p in (process_tree(r) if tree else [r])]
            out[name] = cpu_seconds(pids)
        return out

    def start(self) -> None:
        self._t0, self._c0 = time.monotonic(), self._sample()
        self._m0 = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        """Cores used per group, `total` (ours), `machine` (everything busy on the
        machine) and `foreign` (machine - ours: other people's processes)."""
        elapsed = time.monotonic() - self._t0
        c1 = self._sample()
        cores = {k: round((c1[k] - self._c0[k]) / elapsed, 3) for k in c1}
        cores["total"] = round(sum(cores.values()), 3)
        cores["machine"] = round((machine_busy_seconds() - self._m0) / elapsed, 3)
        cores["foreign"] = round(max(0.0, cores["machine"] - cores["total"]), 3)
        return cores


def wait_quiet(groups: dict[str, list[int]], max_wait_s: float, threshold: float) -> float:
    """Waits (up to `max_wait_s`) until other people's processes use less than
    `threshold` cores over a 2 s sample; returns the last foreign load seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        meter = CpuMeter(groups)
        meter.start()
        time.sleep(2.0)
        foreign = meter.stop()["foreign"]
        if foreign < threshold or time.monotonic() >= deadline:
            return foreign
        log(f"  machine busy with other processes ({foreign:.2f} cores); waiting")


def scrape_metrics(endpoints: dict[str, int]) -> Iterator[tuple[str, str, dict[str, str], float]]:
    """Every `im_*` sample of the services' Prometheus endpoints (service name ->
    metrics port) as (service, metric, labels, value); an endpoint that does not
    answer is skipped."""
    for name, port in endpoints.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if not line.startswith("im_"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, labels = key.partition("{")
            fields = dict(
                part.split("=", 1) for part in labels.rstrip("}").split(",") if "=" in part
            )
            yield name, metric, {k: v.strip('"') for k, v in fields.items()}, float(value)


class MetricsScraper:
    """Counter deltas from the services' Prometheus endpoints: RPCs by method
    (server and client side) and the services' own counters. Divided by the
    messages of a level they give the calls each message costs."""

    def __init__(self, endpoints: dict[str, int]) -> None:
        self.endpoints = endpoints  # service name -> metrics port
        self._before: dict[str, float] = {}

    def _scrape(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric, fields, value in scrape_metrics(self.endpoints):
            if not metric.endswith("_total"):
                continue
            label = ",".join(v for k, v in fields.items() if k != "code")
            short = f"{name}:{metric.removeprefix('im_').removesuffix('_total')}"
            short = f"{short}[{label}]" if label else short
            out[short] = out.get(short, 0.0) + value
        return out

    def start(self) -> None:
        self._before = self._scrape()

    def stop(self, messages: int) -> dict[str, float]:
        """Per message: counter deltas since start() divided by `messages`."""
        after = self._scrape()
        deltas = {k: v - self._before.get(k, 0.0) for k, v in after.items()}
        return {
            k: round(v / messages, 3)
            for k, v in sorted(deltas.items())
            if v > 0 and messages > 0 and not k.endswith(("[/grpc.health.v1.Health/Check]",))
        }


class PgStats:
    """PostgreSQL work per message: transactions, row writes, WAL records, bytes
    and fsyncs (pg_stat_database, pg_stat_wal), as deltas over a level."""

    QUERY = """
        SELECT d.xact_commit, d.xact_rollback, d.tup_inserted, d.tup_updated,
               d.tup_deleted, w.wal_records, w.wal_bytes, w.wal_write, w.wal_sync
        FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = current_database()
    """
    NAMES = (
        "commits",
        "rollbacks",
        "rows_inserted",
        "rows_updated",
        "rows_deleted",
        "wal_records",
        "wal_bytes",
        "wal_writes",
        "wal_fsyncs",
    )

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._before: tuple[float, ...] = ()

    def _read(self) -> tuple[float, ...]:
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_clear_snapshot()")
                row = conn.execute(self.QUERY).fetchone()
        except psycopg.Error:
            return ()
        return tuple(float(v) for v in row) if row else ()

    def start(self) -> None:
        self._before = self._read()

    def stop(self, messages: int) -> dict[str, float]:
        after = self._read()
        if not after or not self._before or messages <= 0:
            return {}
        return {
            n: round((a - b) / messages, 3)
            for n, a, b in zip(self.NAMES, after, self._before, strict=True)
        }


def machine_info() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "calibration_ms": calibration_ms(),
    }


def calibration_ms() -> float:
    """How fast this machine runs Python today: the best of 5 timings of a fixed
    pure-Python workload (ms; lower is faster). Machines here are shared VMs
    whose speed changes from day to day (steal, other tenants): CPU per message
    from two runs compares only in proportion to this figure."""

    def work() -> int:
        total = 0
        for i in range(200_000):
            total += (i * 7) % 13
        return total

    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 2)


def raise_nofile() -> tuple[int, int]:
    """Soft file-descriptor limit up to the hard one. Every process the stack and
    the workers start inherits it: the gateway needs a socket per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- worker processes ------------------------------------------------------------


@dataclass
class Proc:
    """A worker process and its end of the command pipe."""

    name: str
    process: multiprocessing.process.BaseProcess
    pipe: Connection

    def send(self, command: str, args: dict[str, Any] | None = None) -> None:
        self.pipe.send((command, args or {}))

    def recv(self, timeout: float = 600.0) -> dict[str, Any]:
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"worker {self.name} did not answer within {timeout}s")
        reply: dict[str, Any] = self.pipe.recv()
        if "error" in reply:
            raise RuntimeError(f"worker {self.name}: {reply['error']}")
        return reply


def spawn(target: Any, name: str, *args: Any) -> Proc:
    ctx = multiprocessing.get_context("spawn")  # no inherited event loop or gRPC state
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=target, args=(theirs, *args, name), name=name, daemon=True)
    process.start()
    theirs.close()
    return Proc(name, process, ours)


def call_all(
    procs: Sequence[Proc], command: str, args: Sequence[dict[str, Any]], timeout: float = 600
) -> list[dict[str, Any]]:
    for p, a in zip(procs, args, strict=True):
        p.send(command, a)
    return [p.recv(timeout) for p in procs]


def close_all(procs: Sequence[Proc]) -> None:
    for p in procs:
        if p.process.is_alive():
            try:
                p.send("close")
                p.recv(60)
            except (OSError, EOFError, TimeoutError, RuntimeError) as exc:
                log(f"  worker {p.name} did not close cleanly: {exc}")
        p.process.join(10)
        if p.process.is_alive():
            p.process.kill()


# -- profiling (optional) ----------------------------------------------------------


def start_py_spy(py_spy: str, pid: int, out: Path, duration_s: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration_s),
            "--rate",
            "200",
            "--nonblocking",
            "--gil",  # only samples holding the GIL: Python work, not idle waits
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (dir/file.py)`: lines merged."""
    if " (" not in frame:
        return frame
    func, where = frame.split(" (", 1)
    path = where.rsplit(":", 1)[0].rstrip(")")
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{func} ({short})"


#: Frames every sample passes through (process entry, event loop, thread start).
_ENTRY_FRAMES = (
    "_run_module_as_main ",
    "_run_code ",
    "<module> ",
    "main (",
    "run (uvloop",
    "Thread._bootstrap",
)


def summarize_profile(raw: Path, duration_s: float, rate_hz: int, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed
    stacks (recorded with --gil: samples of the thread holding the GIL). `busy_cores`
    is samples / (duration * rate): how much of a core Python code kept busy.
    `Runner.run` self time is C code run by the event loop (uvloop, grpc's Cython
    layer); `Thread.run` self time is gRPC's polling threads."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        # The first frame is the thread ("process 1234:..." / "thread (0x...)").
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_counts[frames[-1]] += n
        for f in set(frames):
            incl_counts[f] += n

    def share(counter: Counter[str], skip: tuple[str, ...]) -> list[list[Any]]:
        ranked = [(n, c) for n, c in counter.most_common() if not n.startswith(skip)]
        return [[name, round(100 * c / total, 1)] for name, c in ranked[:top]]

    return {
        "samples": total,
        "busy_cores": round(total / (duration_s * rate_hz), 3) if duration_s else None,
        "self_pct": share(self_counts, _ENTRY_FRAMES) if total else [],
        # The event loop is an ancestor of nearly every sample: left out here.
        "inclusive_pct": share(incl_counts, (*_ENTRY_FRAMES, "Runner.run ")) if total else [],
    }


def profile_report(
    res: LevelResult, out_dir: Path, pids: dict[str, int], keep: bool
) -> dict[str, Any]:
    """A profiled level's report: its data and each service's py-spy summary."""
    dur = res.data["duration_s"]
    return {
        "level": res.data,
        "services": {
            name: summarize_profile(out_dir / f"{name}.txt", dur, 200)
            for name in pids
            if (out_dir / f"{name}.txt").exists()
        },
        # py-spy's collapsed stacks stay only with --keep/--workdir.
        "raw_dir": str(out_dir) if keep else None,
    }


# -- 1:1 load ----------------------------------------------------------------------


@dataclass
class LoadConfig:
    pairs: int
    workers: int
    warmup_s: float
    duration_s: float
    drain_s: float
    quiesce_s: float
    sustain_p99_ms: float
    quiet_wait_s: float = 0.0
    quiet_threshold: float = 0.3
    max_backlog_s: float = 3.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoadConfig:
        """From the command-line options e2e.py and e2e_ab.py share."""
        return cls(
            pairs=args.pairs,
            workers=args.workers,
            warmup_s=args.warmup,
            duration_s=args.duration,
            drain_s=args.drain,
            quiesce_s=60.0,
            sustain_p99_ms=args.sustain_p99_ms,
            quiet_wait_s=args.quiet_wait,
        )


@dataclass
class LevelResult:
    offered: float
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def sustained(self) -> bool:
        return bool(self.data.get("sustained"))


def analyse_level(
    offered: float,
    start_at: float,
    cfg: LoadConfig,
    rate_w: float,
    replies: list[dict[str, Any]],
    cpu: dict[str, float],
) -> dict[str, Any]:
    """Latency and throughput of one level from the workers' per-message records
    (taken when the drain deadline passed). Loss is judged later, by `verify`."""
    w0, w1 = start_at + cfg.warmup_s, start_at + cfg.warmup_s + cfg.duration_s
    aborts = [r["aborted_at"] for r in replies if r["aborted_at"] is not None]
    end = min([w1, *aborts])  # messages intended after an abort were never sent
    span = max(end - w0, 1e-9)
    ack_ms: list[float] = []
    deliv_ms: list[float] = []
    deliv_by_time: list[tuple[float, float]] = []
    lag_ms: list[float] = []
    acks_in_window = recvs_in_window = sent_in_window = 0
    settled = True
    for reply in replies:
        settled &= bool(reply["settled"])
        for j, (sub, ack, rcv, count) in enumerate(
            zip(
                reply["submitted_at"],
                reply["ack_at"],
                reply["recv_at"],
                reply["recv_count"],
                strict=True,
            )
        ):
            intended = start_at + j / rate_w
            lag_ms.append((sub - intended) * 1000)
            # Throughput: what the system completed during the measured window
            # (the CPU window), backlog included.
            if w0 <= ack < w1:
                acks_in_window += 1
            if w0 <= rcv < w1:
                recvs_in_window += 1
            if not w0 <= intended < end:
                continue
            sent_in_window += 1
            if not math.isnan(ack):
                ack_ms.append((ack - intended) * 1000)
            if count > 0:
                deliv_ms.append((rcv - intended) * 1000)
                deliv_by_time.append((intended, (rcv - intended) * 1000))
    quarter = span / 4
    first = [d for t, d in deliv_by_time if t < w0 + quarter]
    last = [d for t, d in deliv_by_time if t >= end - quarter]
    p50_first, p50_last = percentile(first, 50), percentile(last, 50)
    growing = (
        p50_first is None or p50_last is None or p50_last > max(2 * p50_first, p50_first + 100)
    )
    ack_rate = acks_in_window / cfg.duration_s
    deliv_rate = recvs_in_window / cfg.duration_s
    deliv = summary(deliv_ms)
    ack_summary = summary(ack_ms)
    # Both tails: a level whose deliveries keep up while its senders wait over a
    # second for their ACKs is not sustained either.
    keeps_up = (
        not aborts
        and settled
        and ack_rate >= 0.95 * offered
        and deliv_rate >= 0.95 * offered
        and not growing
        and deliv["p99"] is not None
        and float(deliv["p99"]) <= cfg.sustain_p99_ms
        and ack_summary["p99"] is not None
        and float(ack_summary["p99"]) <= cfg.sustain_p99_ms
    )
    ours = [k for k in cpu if k not in ("machine", "foreign", "total", "bench")]
    # A message's cost is half send path (ACKed) and half delivery path: when
    # overloaded the two rates differ, so the mean of both is the denominator.
    done_rate = (ack_rate + deliv_rate) / 2
    per_msg = {k: round(cpu[k] * 1000 / done_rate, 3) for k in ours} if done_rate else {}
    per_msg_total = round(sum(per_msg.values()), 3) if per_msg else None
    return {
        "offered_msgs_per_s": offered,
        "overloaded_abort_after_s": round(min(aborts) - start_at, 1) if aborts else None,
        "sent_per_s_in_window": round(sent_in_window / span, 1),
        "acked_per_s_in_window": round(ack_rate, 1),
        "delivered_per_s_in_window": round(deliv_rate, 1),
        "settled_by_drain_deadline": settled,
        "keeps_up": keeps_up,
        "send_ack_ms": ack_summary,
        "delivery_ms": deliv,
        "delivery_p50_ms_first_vs_last_quarter": [p50_first, p50_last],
        "loadgen_lag_ms": {"p99": summary(lag_ms)["p99"], "max": summary(lag_ms)["max"]},
        "cpu_cores": cpu,
        # CPU time per delivered message by process group (load generator
        # included): on an otherwise idle machine with N cores the rate cannot
        # exceed N * 1000 / cpu_ms_per_msg_total messages per second.
        "cpu_ms_per_msg": per_msg,
        "cpu_ms_per_msg_total": per_msg_total,
        "cpu_bound_msgs_per_s": (
            round((os.cpu_count() or 1) * 1000 / per_msg_total) if per_msg_total else None
        ),
    }


def final_counts(verified: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [
        "submitted",
        "acked",
        "failed",
        "unacked",
        "received",
        "duplicates",
        "missing",
        "received_unacked",
        "wrong_recipient",
        "out_of_order",
    ]
    out: dict[str, Any] = {k: sum(v[k] for v in verified) for k in keys}
    out["failures_sample"] = [f for v in verified for f in v["failures_sample"]][:5]
    out["exactly_once"] = (
        out["acked"] == out["submitted"]
        and out["received"] == out["submitted"]
        and out["duplicates"] == 0
        and out["missing"] == 0
        and out["wrong_recipient"] == 0
        and out["out_of_order"] == 0
    )
    return out


def read_counts(
    verified: list[dict[str, Any]], window: tuple[float, float], messages: int
) -> dict[str, Any]:
    """The READs of a level (all zero without mark_read): counted over the whole
    level, plus the rate of stored ones whose ACK came in the CPU window."""
    reads = [v["reads"] for v in verified]
    out: dict[str, Any] = {
        k: sum(r[k] for r in reads) for k in ("sent", "stored", "noop", "duplicate", "failed")
    }
    out["failures_sample"] = [f for r in reads for f in r["failures_sample"]][:5]
    w0, w1 = window
    in_window = sum(1 for r in reads for t in r["stored_at"] if w0 <= t < w1)
    out["stored_per_s_in_window"] = round(in_window / max(w1 - w0, 1e-9), 1)
    out["per_message"] = round(out["stored"] / messages, 3) if messages else None
    out["ack_ms"] = summary([ms for r in reads for ms in r["ack_ms"]])
    return out


def make_pairs(stack: Stack, prefix: str, n: int) -> list[tuple[str, str, str, str, str]]:
    """n 1:1 pairs (sender, recipient, conversation, sender token, recipient token),
    users `<prefix>s0000`/`<prefix>r0000`...: the workers' `pairs` command."""
    pairs = []
    for i in range(n):
        s, r = f"{prefix}s{i:04d}", f"{prefix}r{i:04d}"
        pairs.append((s, r, direct_conversation_id(s, r), stack.mint(s), stack.mint(r)))
    return pairs


class LoadPhase:
    def __init__(
        self,
        stack: Stack,
        cfg: LoadConfig,
        meter_groups: dict[str, list[int]],
        metrics: MetricsScraper | None = None,
    ) -> None:
        self.stack = stack
        self.cfg = cfg
        self.meter_groups = meter_groups
        self.metrics = metrics
        self.procs: list[Proc] = []
        self.results: list[LevelResult] = []

    def open(self) -> None:
        address = self.stack.gateway_addresses[0]
        pairs = make_pairs(self.stack, "", self.cfg.pairs)
        self.procs = [
            spawn(e2e_load.worker_main, f"load-{w}", [address]) for w in range(self.cfg.workers)
        ]
        self.meter_groups["loadgen"] = [p.process.pid for p in self.procs if p.process.pid]
        slices = [{"pairs": pairs[w :: self.cfg.workers]} for w in range(self.cfg.workers)]
        t0 = time.monotonic()
        replies = call_all(self.procs, "pairs", slices)
        clients = sum(r["clients"] for r in replies)
        log(f"  {clients} SDK clients connected in {time.monotonic() - t0:.1f}s")

    def close(self) -> None:
        close_all(self.procs)
        self.meter_groups.pop("loadgen", None)

    def run_level(
        self,
        offered: float,
        label: str,
        duration_s: float | None = None,
        profile: tuple[str, dict[str, int], Path] | None = None,
        mark_read: bool = False,
        load_args: dict[str, Any] | None = None,
    ) -> LevelResult:
        """One open-loop level at `offered` msg/s. With `mark_read` every
        recipient also marks what it receives read (READs coalesced per
        conversation, e2e_load's "Read receipts"); `data["reads"]` counts them.
        `load_args` go to the workers' `load` command as well (e.g. typing)."""
        cfg = self.cfg
        foreign_before = (
            wait_quiet(self.meter_groups, cfg.quiet_wait_s, cfg.quiet_threshold)
            if cfg.quiet_wait_s
            else None
        )
        duration = duration_s or cfg.duration_s
        run_cfg = LoadConfig(**{**cfg.__dict__, "duration_s": duration})
        rate_w = offered / cfg.workers
        total_w = int(rate_w * (cfg.warmup_s + duration))
        start_at = time.monotonic() + 0.5
        args = {
            "level": label,
            "rate": rate_w,
            "total": total_w,
            "start_at": start_at,
            "drain_s": cfg.drain_s,
            "max_backlog_s": cfg.max_backlog_s,
            "mark_read": mark_read,
            **(load_args or {}),
        }
        if self.metrics is not None:
            self.metrics.start()
        pg = PgStats(self.stack.database_url)
        pg.start()
        for p in self.procs:
            p.send("load", args)
        meter = CpuMeter(self.meter_groups)
        time.sleep(max(0.0, start_at + cfg.warmup_s - time.monotonic()))
        meter.start()
        spies: list[subprocess.Popen[bytes]] = []
        if profile is not None:
            py_spy, pids, out_dir = profile
            for name, pid in pids.items():
                spies.append(start_py_spy(py_spy, pid, out_dir / f"{name}.txt", int(duration)))
        time.sleep(max(0.0, start_at + cfg.warmup_s + duration - time.monotonic()))
        cpu = meter.stop()
        replies = [p.recv(cfg.drain_s + duration + 120) for p in self.procs]
        for spy in spies:
            spy.wait(60)
        data = analyse_level(offered, start_at, run_cfg, rate_w, replies, cpu)
        submitted = sum(r["submitted"] for r in replies)
        quiet = call_all(
            self.procs, "quiesce", [{"timeout_s": cfg.quiesce_s, "quiet_s": 1.0}] * len(self.procs)
        )
        if not all(q["quiet"] for q in quiet):
            log(f"  backlog still draining after {cfg.quiesce_s}s: {quiet}")
        # Counted over the whole level (warm-up and drain too), per message sent.
        # PostgreSQL's activity stats are flushed lazily (about once a second).
        time.sleep(1.0)
        data["postgres_per_msg"] = pg.stop(submitted)
        if self.metrics is not None:
            data["per_msg_counters"] = self.metrics.stop(submitted)
        verified = call_all(self.procs, "verify", [{"level": label}] * len(self.procs))
        final = final_counts(verified)
        window = (start_at + cfg.warmup_s, start_at + cfg.warmup_s + duration)
        data["reads"] = read_counts(verified, window, submitted)
        data["typing_sent"] = sum(int(r.get("typing_sent", 0)) for r in replies)
        data.update(
            label=label,
            duration_s=duration,
            foreign_cores_before=foreign_before,
            final_counts=final,
            zero_loss=final["exactly_once"] and final["failed"] == 0,
            sustained=final["exactly_once"] and final["failed"] == 0 and data["keeps_up"],
        )
        ack, dl = data["send_ack_ms"], data["delivery_ms"]
        log(
            f"  {label}: offered {offered:g}/s, completed {data['acked_per_s_in_window']} ACK/s "
            f"{data['delivered_per_s_in_window']} deliveries/s | ACK p50 {ack['p50']} p99 "
            f"{ack['p99']} p99.9 {ack['p999']} ms | delivery p50 {dl['p50']} p99 {dl['p99']} ms "
            f"| exactly-once {final['exactly_once']} ({final['received']}/{final['submitted']}, "
            f"dup {final['duplicates']}, failed {final['failed']}) | keeps up {data['keeps_up']}"
            + (
                f" (aborted: backlog > {cfg.max_backlog_s:g}s)"
                if data["overloaded_abort_after_s"] is not None
                else ""
            )
            + f" | CPU ms/msg {data['cpu_ms_per_msg_total']}, foreign load "
            f"{cpu['foreign']} cores"
            + (
                f" | READs sent {data['reads']['sent']} stored {data['reads']['stored']} "
                f"no-op {data['reads']['noop']} failed {data['reads']['failed']}"
                if mark_read
                else ""
            )
        )
        return LevelResult(offered, data)

    def search(self, fixed: list[LevelResult], steps: int, resolution: float) -> dict[str, Any]:
        """Highest offered load (a multiple of 50 msg/s) that is sustained with zero
        loss: from the fixed levels, up by 1.5x while it holds; otherwise first just
        below what the overloaded levels delivered, then bisection between the best
        pass and the lowest fail."""
        tried = {r.offered: r for r in fixed}
        path: list[dict[str, Any]] = []

        def bounds() -> tuple[float, float | None]:
            passed = [o for o, r in tried.items() if r.sustained]
            lo = max(passed, default=0.0)
            failed = [o for o, r in tried.items() if not r.sustained and o > lo]
            return lo, min(failed, default=None)

        def hint() -> float | None:
            """What an overloaded level actually delivered: a first guess of the
            capacity (aimed a little below it)."""
            rates = [
                r.data["delivered_per_s_in_window"]
                for r in tried.values()
                if not r.sustained and r.data.get("overloaded_abort_after_s") is not None
            ]
            return 0.85 * max(rates) if rates else None

        for step in range(steps):
            lo, hi = bounds()
            if hi is not None and hi - lo <= max(resolution, 0.1 * lo):
                break  # with lo = 0 this goes down to hi = resolution
            guess = hint()
            if hi is None:
                nxt = lo * 1.5 if lo else 250.0
            elif guess is not None and lo + 50 <= guess <= hi - 50 and step == 0:
                nxt = guess
            else:
                nxt = (lo + hi) / 2
            nxt = max(50.0, 50 * math.floor(nxt / 50 + 0.5))
            if nxt in tried:
                break
            res = self.run_level(nxt, f"search-{step + 1}-{int(nxt)}")
            self.results.append(res)
            tried[nxt] = res
            path.append({"offered": nxt, "sustained": res.sustained})
        lo, hi = bounds()
        return {"max_msgs_per_s": lo, "lowest_failing": hi, "path": path}


# -- read receipts ------------------------------------------------------------------

#: The stack's own processes (not the load generator, not this coordinator): the
#: CPU a read receipt costs is counted over these.
SERVER_GROUPS = ("gateway", "logic", "pusher", "seqsvc", "postgres", "nats", "redis")


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over one side's runs of a level."""
    out: dict[str, Any] = {
        "runs": len(runs),
        "acked_per_s": _median(d["acked_per_s_in_window"] for d in runs),
        "delivered_per_s": _median(d["delivered_per_s_in_window"] for d in runs),
    }
    for metric in ("send_ack_ms", "delivery_ms"):
        for q in ("p50", "p99"):
            out[f"{metric}_{q}"] = _median(d[metric][q] for d in runs)
    out["server_cores"] = _median(sum(d["cpu_cores"][g] for g in SERVER_GROUPS) for d in runs)
    out["server_cores_by_group"] = {
        g: _median(d["cpu_cores"][g] for d in runs) for g in SERVER_GROUPS
    }
    out["cpu_ms_per_msg_total"] = _median(d["cpu_ms_per_msg_total"] for d in runs)
    out["exactly_once"] = all(d["final_counts"]["exactly_once"] for d in runs)
    out["sustained"] = [bool(d["sustained"]) for d in runs]
    out["foreign_cores"] = [d["cpu_cores"]["foreign"] for d in runs]
    out["machine_cores"] = [d["cpu_cores"]["machine"] for d in runs]
    out["postgres_per_msg"] = {
        k: _median(d["postgres_per_msg"].get(k) for d in runs)
        for k in ("commits", "rows_inserted", "wal_bytes", "wal_fsyncs")
    }
    reads = [d["reads"] for d in runs]
    out["reads"] = {
        **{k: sum(r[k] for r in reads) for k in ("sent", "stored", "noop", "duplicate", "failed")},
        "stored_per_s": _median(r["stored_per_s_in_window"] for r in reads),
        "per_message": _median(r["per_message"] for r in reads),
        "ack_ms_p50": _median(r["ack_ms"]["p50"] for r in reads),
        "ack_ms_p99": _median(r["ack_ms"]["p99"] for r in reads),
    }
    return out


def compare_receipts(plain: list[dict[str, Any]], receipts: list[dict[str, Any]]) -> dict[str, Any]:
    """One level: both sides' medians, receipts/plain ratios, and what one stored
    READ costs: the extra server CPU (receipts minus plain, in the same measured
    window) over the stored READs whose ACK came in that window, and the extra
    PostgreSQL work per stored READ."""
    p, r = _side(plain), _side(receipts)
    ratios = {
        k: _ratio(r[k], p[k])
        for k in (
            "acked_per_s",
            "send_ack_ms_p50",
            "send_ack_ms_p99",
            "delivery_ms_p50",
            "delivery_ms_p99",
            "server_cores",
            "cpu_ms_per_msg_total",
        )
    }
    per_s = r["reads"]["stored_per_s"]

    def per_read(extra_cores: float | None) -> float | None:
        return round(extra_cores * 1000 / per_s, 3) if extra_cores is not None and per_s else None

    extra = {
        g: None if a is None or b is None else a - b
        for g, a, b in (
            (g, r["server_cores_by_group"][g], p["server_cores_by_group"][g]) for g in SERVER_GROUPS
        )
    }
    extra_total = (
        r["server_cores"] - p["server_cores"]
        if r["server_cores"] is not None and p["server_cores"] is not None
        else None
    )
    reads_per_msg = r["reads"]["per_message"]
    return {
        "plain": p,
        "receipts": r,
        "ratios_receipts_over_plain": ratios,
        "cpu_ms_per_read": per_read(extra_total),
        "cpu_ms_per_read_by_group": {g: per_read(v) for g, v in extra.items()},
        "postgres_per_read": {
            k: round((r["postgres_per_msg"][k] - v) / reads_per_msg, 3)
            if v is not None and r["postgres_per_msg"][k] is not None and reads_per_msg
            else None
            for k, v in p["postgres_per_msg"].items()
        },
        "both_sustained": all(p["sustained"]) and all(r["sustained"]),
        # The whole machine busy in a run (ours and other people's processes).
        # If a side then also fell behind, its work did not fit in the measured
        # window: the CPU difference understates what a READ costs.
        "machine_saturated": any(
            m >= 0.9 * (os.cpu_count() or 1) for m in p["machine_cores"] + r["machine_cores"]
        ),
    }


def receipts_phase(phase: LoadPhase, levels: list[float], rounds: int) -> dict[str, Any]:
    """Plain against receipts (every recipient marks read) on the same stack and
    clients: per level, `rounds` runs of each side in ABBA order (plain first in
    even rounds), so a drift in the machine's load does not favour one side."""
    out: dict[str, Any] = {"levels": {}, "rounds": rounds}
    for offered in levels:
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "receipts": []}
        for r in range(rounds):
            order = ("plain", "receipts") if r % 2 == 0 else ("receipts", "plain")
            for side in order:
                res = phase.run_level(
                    offered, f"{side}-{int(offered)}-{r + 1}", mark_read=side == "receipts"
                )
                runs[side].append(res.data)
        cmp = compare_receipts(runs["plain"], runs["receipts"])
        cmp["runs"] = runs
        out["levels"][str(int(offered))] = cmp
        p, rc, ratio = cmp["plain"], cmp["receipts"], cmp["ratios_receipts_over_plain"]
        log(f"  receipts at {offered:g} msg/s (medians of {rounds} runs a side):")
        log(f"    {'':10} {'plain':>10} {'receipts':>10} {'ratio':>7}")
        for label, key in (
            ("ACK/s", "acked_per_s"),
            ("ACK p50", "send_ack_ms_p50"),
            ("ACK p99", "send_ack_ms_p99"),
            ("dlv p50", "delivery_ms_p50"),
            ("dlv p99", "delivery_ms_p99"),
            ("srv cores", "server_cores"),
        ):
            log(f"    {label:10} {p[key]!s:>10} {rc[key]!s:>10} {ratio[key]!s:>7}")
        reads = rc["reads"]
        log(
            f"    READs sent {reads['sent']} stored {reads['stored']} no-op {reads['noop']} "
            f"duplicate {reads['duplicate']} failed {reads['failed']} "
            f"({reads['per_message']} stored per message); CPU per stored READ "
            f"{cmp['cpu_ms_per_read']} ms (server processes); exactly once "
            f"{p['exactly_once']}/{rc['exactly_once']}, sustained {cmp['both_sustained']}"
        )
        if cmp["machine_saturated"] and not cmp["both_sustained"]:
            log("    a run fell behind on a saturated machine: the CPU per READ is a lower bound")
    return out


# -- connections ------------------------------------------------------------------


def connections_phase(stack: Stack, target: int, procs_n: int, hold_s: float) -> dict[str, Any]:
    gw = stack.gateways[1]
    pid = gw.pid
    assert pid is not None
    tokens = [stack.mint(f"idle{i:05d}") for i in range(target)]
    procs = [spawn(e2e_conns.conns_main, f"conns-{i}", gw.address) for i in range(procs_n)]
    try:
        # A few streams first, so the baseline includes whatever the first
        # stream initialises once (channels to Redis, code paths warmed up).
        call_all(procs[:1], "open", [{"tokens": tokens[:10], "concurrency": 10}])
        time.sleep(2.0)
        base_rss, base_fds = rss_kb(pid), open_fds(pid)
        rest = tokens[10:]
        t0 = time.monotonic()
        replies = call_all(
            procs,
            "open",
            [{"tokens": rest[i::procs_n], "concurrency": 100} for i in range(procs_n)],
        )
        open_s = time.monotonic() - t0
        opened = sum(r["opened"] for r in replies)  # the first holder counts its 10 too
        failed = sum(r["failed"] for r in replies)
        errors = [e for r in replies for e in r["errors"]][:5]
        log(f"  {opened} streams open ({failed} failed) in {open_s:.1f}s; holding {hold_s:g}s")
        # Hold past at least one route refresh round of the gateway, measuring
        # what the idle streams cost it in CPU (pings, route refreshes).
        meter = CpuMeter({"gateway": [pid], "redis": [stack.redis.pid or 0]})
        meter.start()
        time.sleep(hold_s)
        idle_cpu = meter.stop()
        alive = sum(r["alive"] for r in call_all(procs, "check", [{}] * procs_n))
        rss, fds = rss_kb(pid), open_fds(pid)
        per_conn_kb = (rss - base_rss) / max(1, alive - 10)
        client_rss = sum(rss_kb(p.process.pid) for p in procs if p.process.pid)
        result = {
            "target": target,
            "opened": opened,
            "failed": failed,
            "errors": errors,
            "open_s": round(open_s, 1),
            "connects_per_s": round(len(rest) / open_s, 1) if open_s else None,
            "alive_after_hold": alive,
            "hold_s": hold_s,
            "gateway_rss_kb_before": base_rss,
            "gateway_rss_kb_after": rss,
            "gateway_fds_before": base_fds,
            "gateway_fds_after": fds,
            "kb_per_connection": round(per_conn_kb, 2),
            "idle_cpu_cores": {k: idle_cpu[k] for k in ("gateway", "redis", "foreign")},
            "client_processes": procs_n,
            "client_rss_kb_total": client_rss,
        }
        log(
            f"  alive {alive}; gateway RSS {base_rss} -> {rss} kB "
            f"({per_conn_kb:.1f} kB/connection), fds {base_fds} -> {fds}"
        )
        return result
    finally:
        close_all(procs)


# -- group -----------------------------------------------------------------------


def group_phase(stack: Stack, size: int, repeats: int, workers: int) -> dict[str, Any]:
    address = stack.gateway_addresses[0]
    users = [f"gm{i:04d}" for i in range(size)]
    tokens = {u: stack.mint(u) for u in users}
    procs = [spawn(e2e_load.worker_main, f"group-{w}", [address]) for w in range(workers)]
    try:
        created = call_all(
            procs[:1],
            "create_group",
            [{"token": tokens[users[0]], "name": f"bench-{size}", "member_ids": users[1:]}],
        )[0]
        conv = created["conversation_id"]
        members = users[1:]
        args = [
            {
                "conversation_id": conv,
                "members": [(u, tokens[u]) for u in members[w::workers]],
                "sender": (users[0], tokens[users[0]]) if w == 0 else None,
            }
            for w in range(workers)
        ]
        t0 = time.monotonic()
        replies = call_all(procs, "group", args)
        log(
            f"  group {conv} of {created['members']}: {sum(r['clients'] for r in replies)} "
            f"members online in {time.monotonic() - t0:.1f}s"
        )
        last_ms: list[float] = []
        median_ms: list[float] = []
        ack_ms: list[float] = []
        incomplete = 0
        for k in range(repeats + 1):
            sent = call_all(procs[:1], "group_send", [{"k": k}])[0]
            waits = call_all(procs, "group_wait", [{"k": k, "timeout_s": 30.0}] * workers)
            times = [t for w in waits for t in w["times"]]
            expected = sum(w["expected"] for w in waits)
            if k == 0:
                continue  # warm-up: first use of the group's member list and channels
            if len(times) < expected:
                incomplete += 1
            lat = [(t - sent["sent_at"]) * 1000 for t in times]
            if lat:
                last_ms.append(max(lat))
                median_ms.append(percentile(lat, 50) or 0.0)
            ack_ms.append((sent["ack_at"] - sent["sent_at"]) * 1000)
            time.sleep(0.2)
        result = {
            "members": created["members"],
            "online": sum(r["clients"] for r in replies),
            "repeats": repeats,
            "incomplete_repeats": incomplete,
            "last_member_ms": summary(last_ms),
            "median_member_ms": summary(median_ms),
            "send_ack_ms": summary(ack_ms),
        }
        log(
            f"  last member: p50 {result['last_member_ms']['p50']} p99 "
            f"{result['last_member_ms']['p99']} ms; median member p50 "
            f"{result['median_member_ms']['p50']} ms; incomplete {incomplete}"
        )
        return result
    finally:
        close_all(procs)


# -- plot ------------------------------------------------------------------------


def plot(levels: list[dict[str, Any]], path: Path, title: str) -> None:
    def pts(metric: str, q: str) -> list[tuple[float, float]]:
        out = []
        for lv in sorted(levels, key=lambda d: d["offered_msgs_per_s"]):
            v = lv[metric][q]
            if v is not None and v > 0:
                out.append((float(lv["offered_msgs_per_s"]), float(v)))
        return out

    series = [
        e2e_png.Series("SEND-ACK P50", (31, 119, 180), pts("send_ack_ms", "p50")),
        e2e_png.Series("SEND-ACK P99", (31, 119, 180), pts("send_ack_ms", "p99"), dash=8),
        e2e_png.Series("SEND-ACK P99.9", (120, 170, 220), pts("send_ack_ms", "p999"), dash=4),
        e2e_png.Series("DELIVERY P50", (214, 39, 40), pts("delivery_ms", "p50")),
        e2e_png.Series("DELIVERY P99", (214, 39, 40), pts("delivery_ms", "p99"), dash=8),
    ]
    hlines = [
        e2e_png.HLine("TARGET ACK P99", (100, 100, 100), 50.0),
        e2e_png.HLine("TARGET DLV P99", (200, 120, 120), 100.0),
    ]
    e2e_png.line_chart(path, title, "OFFERED LOAD (MSG/S)", "LATENCY (MS, LOG)", series, hlines)


# -- main ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small, short run (~2 min)")
    p.add_argument("--levels", default="500,1000,2000", help="fixed offered loads, msg/s")
    p.add_argument("--pairs", type=int, help="1:1 sender/recipient pairs (default 200; quick 100)")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument("--duration", type=float, help="measured seconds per level (default 12)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    p.add_argument("--drain", type=float, help="seconds to wait for stragglers after a level")
    p.add_argument("--search-steps", type=int, help="extra levels for the max-rate search")
    p.add_argument(
        "--sustain-p99-ms",
        type=float,
        default=1000.0,
        help="send-ACK or delivery p99 above this means the level is not sustained",
    )
    p.add_argument("--connections", type=int, help="idle streams to open (default 10000)")
    p.add_argument("--conn-procs", type=int, default=4, help="processes holding them")
    p.add_argument("--hold", type=float, help="seconds to hold them (default 12)")
    p.add_argument("--group-size", type=int, default=500)
    p.add_argument("--group-repeats", type=int, help="group sends measured (default 30)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each level, wait up to this long (default 20 s) for other "
        "processes on the machine to use < 0.3 cores (shared machines; 0: do not wait)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KIND:VAR=VALUE",
        help="extra setting for one service kind (repeatable), e.g. "
        "logic:IM_LOGIC_DB_POOL_MAX=40 or gateway:OTEL_TRACES_SAMPLER=always_off",
    )
    p.add_argument(
        "--receipts-levels",
        help="offered loads (msg/s) run plain and with read receipts (default 200; quick 100)",
    )
    p.add_argument(
        "--receipts-rounds",
        type=int,
        default=2,
        help="runs per side and level, ABBA order (default 2)",
    )
    p.add_argument(
        "--skip",
        default="",
        help="comma list of: load,search,closed,full,receipts,conns,group,ws",
    )
    p.add_argument("--profile", action="store_true", help="py-spy every service during a level")
    p.add_argument("--profile-rate", type=float, default=1000.0)
    p.add_argument("--py-spy", default="", help="py-spy binary (default: PATH, /tmp/pyspy/bin)")
    p.add_argument("--workdir", type=Path, help="stack directory (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (logs, data)")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/e2e.json)")
    p.add_argument(
        "--topology",
        choices=("single", "cluster"),
        default="single",
        help="single: one PostgreSQL, one NATS server, one seqsvc; cluster: imdev.cluster "
        "(3 NATS nodes with the stream at R3, PostgreSQL primary + synchronous standby, "
        "3 seqsvc instances), the same gateways, logic and pusher (`make bench-cluster`)",
    )
    import e2e_ws  # here, not at the top: e2e_ws builds on this module

    e2e_ws.add_args(p)
    import e2e_closed

    e2e_closed.add_args(p)
    import e2e_full

    e2e_full.add_args(p)
    args = p.parse_args(argv)
    quick = args.quick
    args.pairs = args.pairs or (100 if quick else 200)
    args.duration = args.duration or (5.0 if quick else 12.0)
    args.drain = args.drain or (20.0 if quick else 30.0)
    args.search_steps = args.search_steps if args.search_steps is not None else (3 if quick else 5)
    args.connections = args.connections or (2000 if quick else 10_000)
    args.hold = args.hold or (5.0 if quick else 12.0)
    args.group_repeats = args.group_repeats or (5 if quick else 30)
    args.receipts_levels = args.receipts_levels or ("100" if quick else "200")
    args.out = args.out or RESULTS / ("e2e-quick.json" if quick else "e2e.json")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def enable_metrics(stack: Stack) -> dict[str, int]:
    """Gives the services on the message path a Prometheus port each (before
    start); returns {service: port}."""
    procs = {
        "gateway": stack.gateways[0],
        "logic": stack.logics[0],
        "pusher": stack.pushers[0],
        "seqsvc": stack.seqsvc,
    }
    ports = {}
    for name, proc in procs.items():
        ports[name] = free_port()
        proc.extra_env[f"IM_{name.upper()}_METRICS_PORT"] = str(ports[name])
    return ports


def make_stack(topology: str, workdir: Path, env: dict[str, dict[str, str]]) -> Stack:
    """The stack under test: the single-node one or the replicated topology,
    with the same service processes (the cluster adds its seqsvc instances)."""
    if topology == "cluster":
        from imdev.cluster import ClusterStack

        return ClusterStack(workdir, gateways=2, logics=1, pushers=1, fsync=True, env=env)
    return Stack(workdir, gateways=2, fsync=True, env=env)


def infra_groups(stack: Stack) -> dict[str, list[Any]]:
    """The servers whose CPU the bench meters, by name (every node of a cluster:
    the standby and the NATS followers do replication work; every seqsvc
    instance)."""
    groups: dict[str, list[Any]] = {"redis": [stack.redis]}
    groups["postgres"] = list(getattr(stack, "pg_nodes", [stack.postgres]))
    groups["nats"] = list(getattr(stack, "nats_nodes", [stack.nats]))
    groups["seqsvc"] = list(stack.seqsvcs)
    return groups


def find_py_spy(hint: str) -> str | None:
    for cand in (hint, shutil.which("py-spy") or "", "/tmp/pyspy/bin/py-spy"):
        if cand and Path(cand).exists():
            return cand
    return None


def main(argv: Sequence[str] | None = None) -> int:
    import e2e_closed  # here, not at the top: these build on this module
    import e2e_full
    import e2e_ws

    args = parse_args(argv)
    t_start = time.monotonic()
    soft, hard = raise_nofile()
    if args.connections + 1000 > soft:
        log(f"file-descriptor limit {soft} (hard {hard}) caps the connection test")
        args.connections = max(100, soft - 1000)
    py_spy = find_py_spy(args.py_spy) if args.profile else None
    if args.profile and py_spy is None:
        log("--profile: py-spy not found (pass --py-spy PATH); profiling skipped")

    if args.workdir:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="im-e2e-"))
    workdir.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    stack = make_stack(args.topology, workdir, parse_env(args.env))
    metrics = MetricsScraper(enable_metrics(stack))
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "quick": args.quick,
            "pairs": args.pairs,
            "loadgen_processes": args.workers,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "drain_s": args.drain,
            "sustain_p99_ms": args.sustain_p99_ms,
            "fsync": True,
            "quiet_wait_s": args.quiet_wait,
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "nofile_limit": soft,
            "extra_env": args.env,
            "topology": args.topology,
            "stack": (
                "1 seqsvc, 1 logic, 1 pusher, 2 gateways (gateway 1 only for the "
                "idle-connection test), PostgreSQL, Redis, NATS JetStream"
                if args.topology == "single"
                else "3 seqsvc instances, 1 logic, 1 pusher, 2 gateways (gateway 1 only for "
                "the idle-connection test), PostgreSQL primary + synchronous standby, Redis, "
                "3 NATS nodes (stream and consumer R3)"
            ),
        },
    }
    log(f"starting the stack in {workdir}")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    log(f"stack up in {time.monotonic() - t_start:.1f}s")
    pids = {
        "gateway": stack.gateways[0].pid,
        "logic": stack.logics[0].pid,
        "pusher": stack.pushers[0].pid,
        "seqsvc": stack.seqsvc.pid,
    }
    meter_groups: dict[str, list[int]] = {k: [v] for k, v in pids.items() if v}
    for name, servers in infra_groups(stack).items():
        if any(s.pid for s in servers):
            meter_groups[name] = [s.pid for s in servers if s.pid]
    meter_groups["bench"] = [os.getpid()]
    try:
        if "conns" not in args.skip:
            log(f"idle connections: {args.connections} streams to one gateway")
            report["connections"] = connections_phase(
                stack, args.connections, args.conn_procs, args.hold
            )
        if "ws" not in args.skip:
            report["websocket"] = e2e_ws.run(stack, args, meter_groups, metrics)
        if "closed" not in args.skip and args.closed_senders > 0:
            report["closed"] = e2e_closed.run(stack, args, meter_groups, metrics)
        if "load" not in args.skip:
            cfg = LoadConfig.from_args(args)
            log(f"1:1 load: {args.pairs} pairs in {args.workers} load-generator processes")
            phase = LoadPhase(stack, cfg, meter_groups, metrics)
            phase.open()
            try:
                phase.run_level(200, "warmup", duration_s=3.0)
                fixed = []
                for offered in [float(x) for x in args.levels.split(",") if x.strip()]:
                    res = phase.run_level(offered, f"fixed-{int(offered)}")
                    fixed.append(res)
                    phase.results.append(res)
                search: dict[str, Any] = {}
                if "search" not in args.skip:
                    search = phase.search(fixed, args.search_steps, resolution=50.0)
                    log(f"  max sustained: {search['max_msgs_per_s']} msg/s ({search['path']})")
                busiest = max(phase.results, key=lambda r: r.data["delivered_per_s_in_window"])
                report["load"] = {
                    "levels": [r.data for r in phase.results],
                    "search": search,
                    # From the level that completed the most messages per second:
                    # the rate this CPU cost per message allows on an idle machine.
                    "cpu_bound_estimate": {
                        "level": busiest.data["label"],
                        "cpu_ms_per_msg_total": busiest.data["cpu_ms_per_msg_total"],
                        "cpu_ms_per_msg": busiest.data["cpu_ms_per_msg"],
                        "msgs_per_s": busiest.data["cpu_bound_msgs_per_s"],
                    },
                }
                if py_spy is not None:
                    out_dir = workdir / "profile"
                    out_dir.mkdir(exist_ok=True)
                    log(f"profiling every service with py-spy at {args.profile_rate:g} msg/s")
                    targets = {k: v for k, v in pids.items() if v}
                    res = phase.run_level(
                        args.profile_rate,
                        f"profiled-{int(args.profile_rate)}",
                        duration_s=max(args.duration, 10.0),
                        profile=(py_spy, targets, out_dir),
                    )
                    report["profile"] = profile_report(
                        res, out_dir, targets, keep=bool(args.keep or args.workdir)
                    )
            finally:
                phase.close()
        if "full" not in args.skip and args.full_levels.strip():
            report["full"] = e2e_full.run(
                stack,
                args,
                meter_groups,
                metrics,
                py_spy,
                {k: v for k, v in pids.items() if v},
                workdir,
            )
        if "receipts" not in args.skip:
            r_levels = [float(x) for x in args.receipts_levels.split(",") if x.strip()]
            log(
                f"read receipts: plain vs every recipient marking read, at {args.receipts_levels} "
                f"msg/s, {args.receipts_rounds} runs a side (ABBA), {args.pairs} fresh clients"
            )
            phase = LoadPhase(stack, LoadConfig.from_args(args), meter_groups, metrics)
            phase.open()
            try:
                phase.run_level(200, "receipts-warmup", duration_s=3.0, mark_read=True)
                report["receipts"] = receipts_phase(phase, r_levels, args.receipts_rounds)
            finally:
                phase.close()
        if "group" not in args.skip:
            log(f"group: one message to {args.group_size} members, {args.group_repeats} times")
            report["group"] = group_phase(stack, args.group_size, args.group_repeats, args.workers)
    finally:
        log("stopping the stack")
        stack.stop()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    levels = report.get("load", {}).get("levels", [])
    by_label = {lv["label"]: lv for lv in levels}
    at_1000 = by_label.get("fixed-1000", {})
    conns = report.get("connections", {})
    group = report.get("group", {})
    receipts = report.get("receipts", {}).get("levels", {})
    first_r = receipts[min(receipts, key=float)] if receipts else {}
    r_ratios = first_r.get("ratios_receipts_over_plain", {})
    result = {
        "max_msgs_per_s": report.get("load", {}).get("search", {}).get("max_msgs_per_s"),
        "send_ack_p99_ms_at_1000": at_1000.get("send_ack_ms", {}).get("p99"),
        "delivery_p99_ms_at_1000": at_1000.get("delivery_ms", {}).get("p99"),
        "connections": conns.get("alive_after_hold"),
        "kb_per_connection": conns.get("kb_per_connection"),
        "group500_last_member_p99_ms": group.get("last_member_ms", {}).get("p99"),
        # Read receipts at the lowest receipts level: receipts/plain ratios and
        # the server CPU one stored READ costs.
        "receipts_at_msgs_per_s": min((float(k) for k in receipts), default=None),
        "receipts_send_ack_p99_ratio": r_ratios.get("send_ack_ms_p99"),
        "receipts_delivery_p99_ratio": r_ratios.get("delivery_ms_p99"),
        "receipts_server_cpu_ratio": r_ratios.get("server_cores"),
        "cpu_ms_per_read": first_r.get("cpu_ms_per_read"),
    }
    report["result"] = result
    result.update(e2e_ws.result_fields(report))
    result.update(e2e_closed.result_fields(report))
    result.update(e2e_full.result_fields(report))
    report["targets"] = {
        "max_msgs_per_s >= 2000": _met(result["max_msgs_per_s"], 2000, ge=True),
        "send_ack_p99_ms_at_1000 <= 50": _met(result["send_ack_p99_ms_at_1000"], 50),
        "delivery_p99_ms_at_1000 <= 100": _met(result["delivery_p99_ms_at_1000"], 100),
        "connections >= 10000": _met(result["connections"], 10_000, ge=True),
        "kb_per_connection <= 30": _met(result["kb_per_connection"], 30),
        "group500_last_member_p99_ms <= 1000": _met(result["group500_last_member_p99_ms"], 1000),
    }
    report["targets"].update(e2e_ws.targets(result))
    report["targets"].update(e2e_closed.targets(result))
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    measured = [lv for lv in levels if lv["label"].startswith(("fixed-", "search-"))]
    if measured:
        png = args.out.with_name("e2e_latency-quick.png" if args.quick else "e2e_latency.png")
        plot(measured, png, "IM E2E: LATENCY VS OFFERED LOAD (1:1)")
        log(f"wrote {png}")
    log(f"total {report['elapsed_s']}s")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def parse_env(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """--env KIND:VAR=VALUE items -> {kind: {var: value}} for `Stack(env=...)`."""
    env: dict[str, dict[str, str]] = defaultdict(dict)
    for item in items:
        kind, _, assignment = item.partition(":")
        var, _, value = assignment.partition("=")
        if not kind or not var:
            raise SystemExit(f"--env {item!r}: expected KIND:VAR=VALUE")
        env[kind][var] = value
    return dict(env)


def exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: the stack stops


def _met(value: float | None, bound: float, ge: bool = False) -> bool | None:
    if value is None:
        return None
    return value >= bound if ge else value <= bound


if __name__ == "__main__":
    sys.exit(main())
