"""The WebSocket part of bench/e2e.py: the same measurements as for gRPC
devices, on the gateway's WebSocket listener, beside the gRPC figures of the
same run (docs/benchmarks.md, "WebSocket").

1. Idle memory: gateway 1 restarted (a fresh process, as the gRPC connection
   test had it), 10 raw WebSocket devices (bench/e2e_ws_conns.py holders:
   handshake, Hello with the token, Welcome, then only pongs), the RSS, then N
   more held for --hold seconds: `kb_per_ws_connection` = RSS delta / N.
2. Latency: 1:1 pairs of WebSocket devices and pairs of gRPC SDK clients on
   gateway 0, both connected throughout, runs at --ws-rate msg/s alternated
   ABBA (gRPC, WebSocket, WebSocket, gRPC, ...): send-ACK and delivery latency
   of each side (medians over its runs) and WebSocket / gRPC ratios. The
   WebSocket device is `WsClient` below: raw frames, client_id order within the
   Welcome's send window, one DeliverAck per push; it drives the same
   `e2e_load.Worker` as the SDK clients, so the records, the exactly-once
   check and the analysis are the gRPC ones.
3. Churn: gateway 1 restarted again; 10 idle WebSocket devices and a few SDK
   pairs sending at a low rate on it (the other devices); N WebSocket devices
   opened and dropped without a closing handshake over --ws-churn-s (a quarter
   after the TCP connect, a quarter after the handshake, half after the
   Welcome). The gateway's RSS and fds before, at the peak and after; the SDK
   pairs' latency before and during the churn, exactly once; the idle devices
   still open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import e2e
import e2e_load
import e2e_ws_conns
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from im.common.v1 import common_pb2
from im.gateway.v1 import gateway_pb2
from imclient import SendResult
from imdev.stack import Stack

log = e2e.log


# -- a WebSocket device for the 1:1 load ---------------------------------------------


class WsClient:
    """A raw WebSocket device with the part of the SDK client's interface
    `e2e_load.Worker` uses: `start()`, `submit()` (a future resolved by the
    SendAck), `pending_sends`, `close()`, and `on_message` called once per
    timeline entry in seq order.

    Sends leave in client_id order, at most the Welcome's send window
    unanswered; every push is acknowledged (a cumulative DeliverAck of the
    highest seq received in order). No retransmit and no reconnect: a load
    level on a healthy stack needs neither, and a failure shows as a failed
    or missing message."""

    def __init__(self, url: str, token: str, on_message: Callable[[Any], None] | None) -> None:
        self.url = url
        self.token = token
        self.on_message = on_message
        self.sock: ClientConnection | None = None
        self.window = 1
        self.next_client_id = 1
        self.delivered = 0
        self.early: dict[int, common_pb2.Message] = {}  # pushes above a gap
        self.queued: deque[tuple[int, bytes]] = deque()
        self.in_flight: dict[int, asyncio.Future[SendResult]] = {}
        self.futures: dict[int, asyncio.Future[SendResult]] = {}
        self.signals: deque[bytes] = deque()  # ephemeral frames (typing)
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        sock = await connect(
            self.url, open_timeout=60, ping_interval=None, compression=None, max_size=1 << 20
        )
        self.sock = sock
        hello = gateway_pb2.ClientFrame(hello=gateway_pb2.Hello(token=self.token))
        await sock.send(hello.SerializeToString())
        first = gateway_pb2.ServerFrame.FromString(await asyncio.wait_for(sock.recv(), 60))  # type: ignore[arg-type]
        if first.WhichOneof("frame") != "welcome":
            raise ConnectionError(f"first frame was {first.WhichOneof('frame')}, not a Welcome")
        self.window = first.welcome.send_window or 1
        self.next_client_id = first.welcome.next_client_id or 1
        self.delivered = first.welcome.head_seq
        self.tasks = [
            asyncio.create_task(self._read(sock)),
            asyncio.create_task(self._write(sock)),
        ]

    @property
    def pending_sends(self) -> int:
        return len(self.queued) + len(self.in_flight)

    def submit(
        self,
        conversation_id: str,
        body: bytes,
        *,
        kind: int = common_pb2.MESSAGE_KIND_MESSAGE,
        target_conv_seq: int = 0,
    ) -> asyncio.Future[SendResult]:
        """Queues one send (a message, or with `kind` a conversation event such as
        a READ of `target_conv_seq`); the future gets the SendAck as a SendResult."""
        cid = self.next_client_id
        self.next_client_id += 1
        frame = gateway_pb2.ClientFrame(
            send=gateway_pb2.Send(
                client_id=cid,
                client_msg_id=f"{self.token[-12:]}-{cid}",
                conversation_id=conversation_id,
                body=body,
                content_type=common_pb2.CONTENT_TYPE_TEXT,
                kind=kind,  # type: ignore[arg-type]
                target_conv_seq=target_conv_seq,
            )
        )
        fut: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self.futures[cid] = fut
        self.queued.append((cid, frame.SerializeToString()))
        self.wake.set()
        return fut

    def typing(self, conversation_id: str, typing: bool = True) -> bool:
        """An ephemeral Typing frame, as the SDK's `Client.typing`: written at
        once, never queued behind sends; False when the socket is not open."""
        if self.sock is None:
            return False
        frame = gateway_pb2.ClientFrame(
            typing=gateway_pb2.Typing(conversation_id=conversation_id, typing=typing)
        )
        self.signals.append(frame.SerializeToString())
        self.wake.set()
        return True

    async def _write(self, sock: ClientConnection) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.signals:
                await sock.send(self.signals.popleft())
            while self.queued and len(self.in_flight) < self.window:
                cid, data = self.queued.popleft()
                self.in_flight[cid] = self.futures.pop(cid)
                await sock.send(data)

    async def _read(self, sock: ClientConnection) -> None:
        try:
            async for data in sock:
                frame = gateway_pb2.ServerFrame.FromString(data)  # type: ignore[arg-type]
                kind = frame.WhichOneof("frame")
                if kind == "push":
                    await self._on_push(sock, frame.push)
                elif kind == "send_ack":
                    ack = frame.send_ack
                    fut = self.in_flight.pop(ack.client_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(
                            SendResult(
                                ack.client_msg_id,
                                ack.msg_id,
                                ack.seq,
                                ack.conv_seq,
                                ack.server_time_ms,
                                ack.duplicate,
                            )
                        )
                    self.wake.set()
                elif kind == "send_error":
                    err = frame.send_error
                    fut = self.in_flight.pop(err.client_id, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(RuntimeError(f"SendError {err.code}: {err.reason}"))
                    self.wake.set()
        except ConnectionClosed:
            pass
        finally:
            self._fail_all(f"socket closed ({sock.close_code} {sock.close_reason})")

    async def _on_push(self, sock: ClientConnection, push: gateway_pb2.Push) -> None:
        if push.seq <= self.delivered:
            return  # a repeat (a catch-up after a lost ACK): already handed over
        self.early[push.seq] = push.message
        before = self.delivered
        while self.delivered + 1 in self.early:
            self.delivered += 1
            message = self.early.pop(self.delivered)
            if self.on_message is not None:
                self.on_message(message)
        if self.delivered > before:
            ack = gateway_pb2.ClientFrame(deliver_ack=gateway_pb2.DeliverAck(seq=self.delivered))
            await sock.send(ack.SerializeToString())

    def _fail_all(self, reason: str) -> None:
        for fut in [*self.in_flight.values(), *self.futures.values()]:
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
        self.in_flight.clear()
        self.futures.clear()
        self.queued.clear()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.sock is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sock.close(), 5)


class WsWorker(e2e_load.Worker):
    """e2e_load's worker with WebSocket devices instead of SDK clients: the same
    commands, records and checks."""

    def _client(self, token: str, on_message: Callable[[Any], None] | None, receive: bool) -> Any:
        return WsClient(self.addresses[0], token, on_message if receive else None)


async def _ws_serve(conn: Connection, url: str, name: str) -> None:
    worker = WsWorker([url], name)
    loop = asyncio.get_running_loop()
    handlers = {
        "pairs": worker.open_pairs,
        "load": worker.load,
        "quiesce": worker.quiesce,
        "verify": worker.verify,
    }
    while True:
        command, args = await loop.run_in_executor(None, conn.recv)
        if command == "close":
            conn.send(await worker.close())
            return
        try:
            reply = await handlers[command](args)
        except Exception as exc:  # reported to the coordinator, which fails the run
            logging.getLogger("bench.e2e.ws").exception("worker %s: %s failed", name, command)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send(reply)


def ws_worker_main(conn: Connection, addresses: list[str], name: str) -> None:
    """Process entry point of a WebSocket load generator (addresses: [ws URL])."""
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
    try:
        import uvloop

        uvloop.run(_ws_serve(conn, addresses[0], name))
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(_ws_serve(conn, addresses[0], name))


class TransportLoadPhase(e2e.LoadPhase):
    """e2e.LoadPhase with its own users (`prefix`), on a given gateway address,
    over gRPC SDK clients or WebSocket devices; several may be open at once."""

    def __init__(
        self,
        stack: Stack,
        cfg: e2e.LoadConfig,
        meter_groups: dict[str, list[int]],
        metrics: e2e.MetricsScraper | None,
        *,
        transport: str,
        prefix: str,
        address: str,
    ) -> None:
        super().__init__(stack, cfg, meter_groups, metrics)
        self.transport = transport
        self.prefix = prefix
        self.address = address

    def open(self) -> None:
        pairs = e2e.make_pairs(self.stack, self.prefix, self.cfg.pairs)
        target = ws_worker_main if self.transport == "websocket" else e2e_load.worker_main
        self.procs = [
            e2e.spawn(target, f"{self.prefix}-load-{w}", [self.address])
            for w in range(self.cfg.workers)
        ]
        pids = [p.process.pid for p in self.procs if p.process.pid]
        self.meter_groups["loadgen"] = self.meter_groups.get("loadgen", []) + pids
        slices = [{"pairs": pairs[w :: self.cfg.workers]} for w in range(self.cfg.workers)]
        t0 = time.monotonic()
        replies = e2e.call_all(self.procs, "pairs", slices)
        clients = sum(r["clients"] for r in replies)
        log(f"  {clients} {self.transport} devices connected in {time.monotonic() - t0:.1f}s")

    def close(self) -> None:
        pids = {p.process.pid for p in self.procs}
        e2e.close_all(self.procs)
        left = [p for p in self.meter_groups.get("loadgen", []) if p not in pids]
        if left:
            self.meter_groups["loadgen"] = left
        else:
            self.meter_groups.pop("loadgen", None)


# -- 1. idle memory ------------------------------------------------------------------


def _spawn_holders(url: str, n: int, tag: str) -> list[e2e.Proc]:
    return [e2e.spawn(e2e_ws_conns.ws_conns_main, f"{tag}-{i}", url) for i in range(n)]


def idle_phase(stack: Stack, target: int, procs_n: int, hold_s: float) -> dict[str, Any]:
    """N idle WebSocket devices on gateway 1 (restarted first): its RSS per device."""
    gw = stack.gateways[1]
    gw.restart()
    pid = gw.pid
    assert pid is not None
    url = stack.ws_urls[1]
    tokens = [stack.mint(f"wsidle{i:05d}") for i in range(target)]
    procs = _spawn_holders(url, procs_n, "ws-conns")
    try:
        # A few first, so the baseline holds what the first socket sets up once.
        e2e.call_all(procs[:1], "open", [{"tokens": tokens[:10], "concurrency": 10}])
        time.sleep(2.0)
        base_rss, base_fds = e2e.rss_kb(pid), e2e.open_fds(pid)
        rest = tokens[10:]
        t0 = time.monotonic()
        # 50 at once per holder: more only overflows the listen backlog (SYN retries).
        replies = e2e.call_all(
            procs, "open", [{"tokens": rest[i::procs_n], "concurrency": 50} for i in range(procs_n)]
        )
        open_s = time.monotonic() - t0
        opened = sum(r["opened"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        log(f"  {opened} WebSocket devices open ({failed} failed) in {open_s:.1f}s; holding")
        meter = e2e.CpuMeter({"gateway": [pid]})
        meter.start()
        time.sleep(hold_s)
        idle_cpu = meter.stop()
        checks = e2e.call_all(procs, "check", [{}] * procs_n)
        alive = sum(c["alive"] for c in checks)
        rss, fds = e2e.rss_kb(pid), e2e.open_fds(pid)
        per_kb = (rss - base_rss) / max(1, alive - 10)
        result = {
            "target": target,
            "opened": opened,
            "failed": failed,
            "errors": [e for r in replies for e in r["errors"]][:5],
            "open_s": round(open_s, 1),
            "connects_per_s": round(len(rest) / open_s, 1) if open_s else None,
            "alive_after_hold": alive,
            "closed_by_gateway": _merge_codes(c["close_codes"] for c in checks),
            "hold_s": hold_s,
            "gateway_rss_kb_before": base_rss,
            "gateway_rss_kb_after": rss,
            "gateway_fds_before": base_fds,
            "gateway_fds_after": fds,
            "kb_per_ws_connection": round(per_kb, 2),
            "idle_gateway_cpu_cores": idle_cpu["gateway"],
            "client_processes": procs_n,
            "client_rss_kb_total": sum(e2e.rss_kb(p.process.pid) for p in procs if p.process.pid),
        }
        log(
            f"  alive {alive}; gateway RSS {base_rss} -> {rss} kB ({per_kb:.1f} kB/WebSocket "
            f"device), fds {base_fds} -> {fds}"
        )
        return result
    finally:
        e2e.close_all(procs)


def _merge_codes(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for codes in items:
        for code, n in codes.items():
            out[str(code)] = out.get(str(code), 0) + n
    return out


# -- 2. latency, WebSocket beside gRPC -------------------------------------------------


def _median(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def _side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(runs)}
    for metric in ("send_ack_ms", "delivery_ms"):
        for q in ("p50", "p99"):
            out[f"{metric}_{q}"] = _median(d[metric][q] for d in runs)
    out["acked_per_s"] = _median(d["acked_per_s_in_window"] for d in runs)
    out["delivered_per_s"] = _median(d["delivered_per_s_in_window"] for d in runs)
    out["gateway_cores"] = _median(d["cpu_cores"].get("gateway") for d in runs)
    out["exactly_once"] = all(d["final_counts"]["exactly_once"] for d in runs)
    out["sustained"] = [bool(d["sustained"]) for d in runs]
    out["foreign_cores"] = [d["cpu_cores"]["foreign"] for d in runs]
    return out


def latency_phase(
    stack: Stack,
    cfg: e2e.LoadConfig,
    meter_groups: dict[str, list[int]],
    metrics: e2e.MetricsScraper | None,
    rate: float,
    rounds: int,
) -> dict[str, Any]:
    address, url = stack.gateway_addresses[0], stack.ws_urls[0]
    phases = {
        "grpc": TransportLoadPhase(
            stack, cfg, meter_groups, metrics, transport="grpc", prefix="lg", address=address
        ),
        "websocket": TransportLoadPhase(
            stack, cfg, meter_groups, metrics, transport="websocket", prefix="lw", address=url
        ),
    }
    runs: dict[str, list[dict[str, Any]]] = {"grpc": [], "websocket": []}
    try:
        for side, phase in phases.items():
            phase.open()
            phase.run_level(200, f"{side}-warmup", duration_s=3.0)
        for r in range(rounds):
            order = ("grpc", "websocket") if r % 2 == 0 else ("websocket", "grpc")
            for side in order:
                res = phases[side].run_level(rate, f"{side}-{int(rate)}-{r + 1}")
                runs[side].append(res.data)
    finally:
        for phase in phases.values():
            phase.close()
    g, w = _side(runs["grpc"]), _side(runs["websocket"])
    ratios = {
        k: round(w[k] / g[k], 2) if w[k] is not None and g[k] else None
        for k in ("send_ack_ms_p50", "send_ack_ms_p99", "delivery_ms_p50", "delivery_ms_p99")
    }
    log(f"  at {rate:g} msg/s, medians of {rounds} runs a side:")
    log(f"    {'':12} {'gRPC':>8} {'WebSocket':>10} {'ratio':>6}")
    for key in ("send_ack_ms_p50", "send_ack_ms_p99", "delivery_ms_p50", "delivery_ms_p99"):
        log(f"    {key:12} {g[key]!s:>8} {w[key]!s:>10} {ratios[key]!s:>6}")
    log(f"    exactly once: gRPC {g['exactly_once']}, WebSocket {w['exactly_once']}")
    return {
        "rate_msgs_per_s": rate,
        "pairs": cfg.pairs,
        "rounds": rounds,
        "grpc": g,
        "websocket": w,
        "ratios_websocket_over_grpc": ratios,
        "runs": runs,
    }


# -- 3. churn ----------------------------------------------------------------------


class RssSampler:
    """Peak RSS of a process, sampled every `interval_s` in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self.peak_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, e2e.rss_kb(self.pid))
                self.peak_fds = max(self.peak_fds, e2e.open_fds(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _probe_summary(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "offered_msgs_per_s": data["offered_msgs_per_s"],
        "send_ack_ms": data["send_ack_ms"],
        "delivery_ms": data["delivery_ms"],
        "exactly_once": data["final_counts"]["exactly_once"],
        "received": data["final_counts"]["received"],
        "submitted": data["final_counts"]["submitted"],
    }


def churn_phase(
    stack: Stack,
    n: int,
    procs_n: int,
    duration_s: float,
    rounds: int,
    probe_cfg: e2e.LoadConfig,
    probe_rate: float,
    settle_s: float = 5.0,
) -> dict[str, Any]:
    """N WebSocket devices opened and dropped on gateway 1 (restarted first) per
    round, while SDK pairs on the same gateway send at `probe_rate` and 10 idle
    WebSocket devices stay open."""
    gw = stack.gateways[1]
    gw.restart()
    pid = gw.pid
    assert pid is not None
    url = stack.ws_urls[1]
    tokens = [stack.mint(f"wschurn{i:05d}") for i in range(n)]
    idle_tokens = [stack.mint(f"wschidle{i:02d}") for i in range(10)]
    probe = TransportLoadPhase(
        stack, probe_cfg, {}, None, transport="grpc", prefix="cp", address=gw.address
    )
    procs = _spawn_holders(url, procs_n, "ws-churn")
    out: dict[str, Any] = {"devices_per_round": n, "rounds": [], "duration_s": duration_s}
    try:
        e2e.call_all(procs[:1], "open", [{"tokens": idle_tokens, "concurrency": 10}])
        probe.open()
        before = probe.run_level(probe_rate, "churn-probe-before", duration_s=10.0)
        out["probe_before"] = _probe_summary(before.data)
        time.sleep(2.0)
        out["gateway_rss_kb_baseline"] = e2e.rss_kb(pid)
        out["gateway_fds_baseline"] = e2e.open_fds(pid)
        for r in range(rounds):
            start_at = time.monotonic() + 0.5 + probe_cfg.warmup_s
            per = [
                {
                    "tokens": tokens[i::procs_n],
                    "rate": n / duration_s / procs_n,
                    "concurrency": 50,
                    "start_at": start_at,
                    "offset": i,
                }
                for i in range(procs_n)
            ]
            for p, a in zip(procs, per, strict=True):
                p.send("churn", a)
            with RssSampler(pid) as sampler:
                during = probe.run_level(
                    probe_rate, f"churn-probe-{r + 1}", duration_s=duration_s + 2.0
                )
                replies = [p.recv(duration_s * 3 + 120) for p in procs]
            time.sleep(settle_s)
            t0 = min(x["started_at"] for x in replies)
            t1 = max(x["ended_at"] for x in replies)
            by_kind: dict[str, int] = {}
            for x in replies:
                for k, v in x["by_kind"].items():
                    by_kind[k] = by_kind.get(k, 0) + v
            round_out = {
                "churned": sum(x["churned"] for x in replies),
                "by_kind": by_kind,
                "failed": sum(x["failed"] for x in replies),
                "errors": [e for x in replies for e in x["errors"]][:5],
                "churn_s": round(t1 - t0, 1),
                "churned_per_s": round(sum(x["churned"] for x in replies) / (t1 - t0), 1),
                "gateway_rss_kb_peak": sampler.peak,
                "gateway_fds_peak": sampler.peak_fds,
                "gateway_rss_kb_after": e2e.rss_kb(pid),
                "gateway_fds_after": e2e.open_fds(pid),
                "probe_during": _probe_summary(during.data),
            }
            out["rounds"].append(round_out)
            dl = round_out["probe_during"]["delivery_ms"]
            log(
                f"  churn round {r + 1}: {round_out['churned']} dropped ({by_kind}, failed "
                f"{round_out['failed']}) in {round_out['churn_s']}s; gateway RSS "
                f"{out['gateway_rss_kb_baseline']} -> peak {sampler.peak} -> after "
                f"{round_out['gateway_rss_kb_after']} kB, fds {out['gateway_fds_baseline']} -> "
                f"{round_out['gateway_fds_after']}; probe delivery p50 {dl['p50']} p99 "
                f"{dl['p99']} ms, exactly once {round_out['probe_during']['exactly_once']}"
            )
        checks = e2e.call_all(procs, "check", [{}] * procs_n)
        out["idle_devices_alive_after"] = sum(c["alive"] for c in checks)
        out["idle_devices_closed_by_gateway"] = _merge_codes(c["close_codes"] for c in checks)
        last = out["rounds"][-1] if out["rounds"] else {}
        base = out["gateway_rss_kb_baseline"]
        out["rss_after_over_baseline"] = (
            round(last["gateway_rss_kb_after"] / base, 3) if last and base else None
        )
        return out
    finally:
        probe.close()
        e2e.close_all(procs)


# -- wiring into e2e.py ------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ws-connections",
        type=int,
        help="idle WebSocket devices on one gateway (default: --connections); "
        "--skip ws skips every WebSocket measurement, ws-idle, ws-latency, ws-churn one",
    )
    p.add_argument("--ws-rate", type=float, default=500.0, help="WebSocket vs gRPC load, msg/s")
    p.add_argument(
        "--ws-rounds", type=int, help="runs a side of the latency comparison (default 2; quick 1)"
    )
    p.add_argument(
        "--ws-churn", type=int, help="WebSocket devices opened and dropped (default --connections)"
    )
    p.add_argument("--ws-churn-s", type=float, help="over this long (default 45 s; quick 15)")
    p.add_argument("--ws-churn-rounds", type=int, default=1)


def run(
    stack: Stack,
    args: argparse.Namespace,
    meter_groups: dict[str, list[int]],
    metrics: e2e.MetricsScraper | None,
) -> dict[str, Any]:
    """Every WebSocket measurement (module docs); `report["websocket"]`."""
    out: dict[str, Any] = {}
    if "ws-idle" not in args.skip:
        n = args.ws_connections or args.connections
        log(f"WebSocket idle devices: {n} on one gateway")
        out["idle"] = idle_phase(stack, n, args.conn_procs, args.hold)
    cfg = e2e.LoadConfig.from_args(args)
    if "ws-latency" not in args.skip:
        rounds = args.ws_rounds or (1 if args.quick else 2)
        log(f"WebSocket vs gRPC devices at {args.ws_rate:g} msg/s, {cfg.pairs} pairs a side")
        out["latency"] = latency_phase(stack, cfg, meter_groups, metrics, args.ws_rate, rounds)
    if "ws-churn" not in args.skip:
        churn_n = args.ws_churn or args.connections
        churn_s = args.ws_churn_s or (15.0 if args.quick else 45.0)
        probe_cfg = e2e.LoadConfig(
            **{**cfg.__dict__, "pairs": 10, "workers": 1, "quiet_wait_s": 0.0}
        )
        log(f"WebSocket churn: {churn_n} devices opened and dropped over {churn_s:g}s")
        out["churn"] = churn_phase(
            stack, churn_n, args.conn_procs, churn_s, args.ws_churn_rounds, probe_cfg, 20.0
        )
    return out


def result_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The WebSocket figures of the RESULT line, beside the gRPC ones."""
    ws = report.get("websocket", {})
    lat = ws.get("latency", {})
    g, w = lat.get("grpc", {}), lat.get("websocket", {})
    churn = ws.get("churn", {})
    rate = lat.get("rate_msgs_per_s")
    at = f"at_{int(rate)}" if rate else "at_rate"
    return {
        "ws_connections": ws.get("idle", {}).get("alive_after_hold"),
        "kb_per_ws_connection": ws.get("idle", {}).get("kb_per_ws_connection"),
        f"ws_send_ack_p99_ms_{at}": w.get("send_ack_ms_p99"),
        f"grpc_send_ack_p99_ms_{at}": g.get("send_ack_ms_p99"),
        f"ws_delivery_p99_ms_{at}": w.get("delivery_ms_p99"),
        f"grpc_delivery_p99_ms_{at}": g.get("delivery_ms_p99"),
        "ws_churn_rss_after_over_baseline": churn.get("rss_after_over_baseline"),
    }


def targets(result: dict[str, Any]) -> dict[str, bool | None]:
    kb = result.get("kb_per_ws_connection")
    n = result.get("ws_connections")
    return {
        "kb_per_ws_connection <= 15": None if kb is None else kb <= 15,
        "ws_connections >= 10000": None if n is None else n >= 10_000,
    }
