"""The everything-on levels of bench/e2e.py (issue 19): the 1:1 load with the
features a deployment runs, all at once, on one gateway:

- half the pairs are WebSocket devices (e2e_ws.WsClient: raw frames, one
  DeliverAck per push), half gRPC SDK clients;
- every recipient marks what it receives read (e2e_load "Read receipts": one
  READ in flight per conversation, for the newest conv_seq), and the SDK
  clients send their automatic DELIVERED receipts;
- the sender of every `--full-typing-every`-th pair says it is typing before its
  messages, at most once per e2e_load.TYPING_REPEAT_S, as an app repeats it;
- the gateways' liveness heads are on (their default).

Each level (`--full-levels`, msg/s) is judged like a plain one: send-ACK and
delivery latency from the intended send time, every message exactly once and
in order at its recipient, sustained only when both p99 stay under
`--sustain-p99-ms`. The server CPU per message counts everything the features
add (READs, DELIVEREDs, typing relays, heads). With `--profile`, one more level
at `--profile-rate` is sampled by py-spy in every service: `report["full"]
["profile"]`, the ranked list in docs/benchmarks.md ("Everything on").

`report["full"]`, and `full_*` keys in the RESULT line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import e2e
import e2e_load
import e2e_ws
from e2e import LevelResult, LoadConfig, LoadPhase, log

from imdev.stack import Stack


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--full-levels",
        default="500,1000",
        help="offered loads (msg/s) of the everything-on levels (--skip full: none)",
    )
    p.add_argument(
        "--full-typing-every",
        type=int,
        default=5,
        help="every N-th pair's sender says it is typing (default 5: a fifth of the "
        "conversations; 0: no typing)",
    )


class FullLoadPhase(LoadPhase):
    """A LoadPhase whose pairs are half WebSocket devices, half SDK clients, on
    gateway 0, with DELIVERED receipts on; its levels mark read and type."""

    def __init__(
        self,
        stack: Stack,
        cfg: LoadConfig,
        meter_groups: dict[str, list[int]],
        metrics: e2e.MetricsScraper | None,
        typing_every: int,
    ) -> None:
        super().__init__(stack, cfg, meter_groups, metrics)
        self.typing_every = typing_every
        self.transports: dict[str, int] = {}

    def open(self) -> None:
        n_ws = self.cfg.pairs // 2
        kinds = {"websocket": n_ws, "grpc": self.cfg.pairs - n_ws}
        procs: list[e2e.Proc] = []
        slices: list[dict[str, Any]] = []
        for transport, n in kinds.items():
            prefix = "fw" if transport == "websocket" else "fg"
            pairs = e2e.make_pairs(self.stack, prefix, n)
            if transport == "websocket":
                target, address = e2e_ws.ws_worker_main, self.stack.ws_urls[0]
            else:
                target, address = e2e_load.worker_main, self.stack.gateway_addresses[0]
            workers = max(1, min(self.cfg.workers, n))
            for w in range(workers):
                procs.append(e2e.spawn(target, f"full-{transport}-{w}", [address]))
                slices.append({"pairs": pairs[w::workers], "auto_delivered": True})
            self.transports[transport] = n
        self.procs = procs
        # Every worker gets offered / workers of each level (run_level's rate_w).
        self.cfg = LoadConfig(**{**self.cfg.__dict__, "workers": len(procs)})
        self.meter_groups["loadgen"] = [p.process.pid for p in procs if p.process.pid]
        t0 = time.monotonic()
        replies = e2e.call_all(procs, "pairs", slices)
        clients = sum(r["clients"] for r in replies)
        log(
            f"  {clients} devices connected in {time.monotonic() - t0:.1f}s "
            f"({kinds['websocket']} WebSocket pairs, {kinds['grpc']} gRPC pairs)"
        )

    def level(
        self,
        offered: float,
        label: str,
        duration_s: float | None = None,
        profile: tuple[str, dict[str, int], Path] | None = None,
    ) -> LevelResult:
        return self.run_level(
            offered,
            label,
            duration_s=duration_s,
            profile=profile,
            mark_read=True,
            load_args={"typing_every": self.typing_every},
        )


def run(
    stack: Stack,
    args: argparse.Namespace,
    meter_groups: dict[str, list[int]],
    metrics: e2e.MetricsScraper | None,
    py_spy: str | None,
    pids: dict[str, int],
    workdir: Path,
) -> dict[str, Any]:
    """The everything-on levels (module docs): `report["full"]`."""
    cfg = LoadConfig.from_args(args)
    levels = [float(x) for x in args.full_levels.split(",") if x.strip()]
    log(
        f"everything on: {cfg.pairs} pairs (half WebSocket), every recipient marking read, "
        f"DELIVERED receipts, typing on every {args.full_typing_every}th pair, at "
        f"{args.full_levels} msg/s"
    )
    phase = FullLoadPhase(stack, cfg, meter_groups, metrics, args.full_typing_every)
    phase.open()
    out: dict[str, Any] = {
        "pairs": phase.transports,
        "typing_every": args.full_typing_every,
        "levels": {},
    }
    try:
        phase.level(200, "full-warmup", duration_s=3.0)
        for offered in levels:
            res = phase.level(offered, f"full-{int(offered)}")
            out["levels"][f"{int(offered)}"] = res.data
        if py_spy is not None:
            out_dir = workdir / "profile-full"
            out_dir.mkdir(exist_ok=True)
            log(f"profiling every service with py-spy, everything on, at {args.profile_rate:g}")
            res = phase.level(
                args.profile_rate,
                f"full-profiled-{int(args.profile_rate)}",
                duration_s=max(args.duration, 10.0),
                profile=(py_spy, pids, out_dir),
            )
            out["profile"] = e2e.profile_report(
                res, out_dir, pids, keep=bool(args.keep or args.workdir)
            )
    finally:
        phase.close()
    return out


def result_fields(report: dict[str, Any]) -> dict[str, Any]:
    """`full_*` keys of the RESULT line, per everything-on level."""
    out: dict[str, Any] = {}
    for rate, data in report.get("full", {}).get("levels", {}).items():
        out[f"full_send_ack_p99_ms_at_{rate}"] = data["send_ack_ms"]["p99"]
        out[f"full_delivery_p99_ms_at_{rate}"] = data["delivery_ms"]["p99"]
        out[f"full_cpu_ms_per_msg_at_{rate}"] = data["cpu_ms_per_msg_total"]
        out[f"full_sustained_at_{rate}"] = data["sustained"]
        out[f"full_exactly_once_at_{rate}"] = data["final_counts"]["exactly_once"]
    return out
