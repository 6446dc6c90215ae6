"""Where the closed loop's milliseconds go, hop by hop.

    mkdir /tmp/hops && IM_HOPS_DIR=/tmp/hops PYTHONPATH=bench/hops \\
      .venv/bin/python bench/e2e.py --skip load,search,receipts,conns,group,ws \\
      --out /tmp/hops/e2e.json
    .venv/bin/python bench/e2e_hops.py /tmp/hops

bench/hops/sitecustomize.py (on every process's PYTHONPATH, active with
IM_HOPS_DIR) times a fixed list of coroutines in the gateway, logic and pusher
and writes each process's calls to IM_HOPS_DIR/<pid>.json when it exits. This
script takes the calls that ended inside the closed-loop level's measured
window (from the report) and prints, per hop, calls per message and the
mean/p50/p99 wall time in ms, beside the level's own send-ACK and delivery
latency. Hops nest (a transaction contains its statements): they are not to be
added up.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summarise(hops_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    closed = report["closed"]
    w0, w1 = closed["window_monotonic"]
    messages = closed["msgs_per_s"] * (w1 - w0)
    out: dict[str, Any] = {}
    for path in sorted(hops_dir.glob("*.json")):
        if path.name == "e2e.json":
            continue
        data = json.loads(path.read_text())
        proc = Path(data["argv"][0]).parent.name if data["argv"] else "?"
        for name, recs in data["records"].items():
            ms = [d * 1000 for t, d in recs if w0 <= t < w1]
            if not ms:
                continue
            out[f"{proc}: {name}"] = {
                "per_msg": round(len(ms) / messages, 3),
                "mean_ms": round(statistics.fmean(ms), 2),
                "p50_ms": round(_pct(ms, 50), 2),
                "p99_ms": round(_pct(ms, 99), 2),
            }
    return out


def main() -> int:
    hops_dir = Path(sys.argv[1])
    report = json.loads((hops_dir / "e2e.json").read_text())
    closed = report["closed"]
    print(
        f"closed loop: {closed['msgs_per_s']} msg/s, send-ACK p50 {closed['send_ack_ms']['p50']}"
        f" ms, delivery p50 {closed['delivery_ms']['p50']} ms, foreign "
        f"{closed['cpu_cores']['foreign']} cores, loadavg {closed['loadavg']}"
    )
    print(f"{'hop':58} {'calls/msg':>9} {'mean':>7} {'p50':>7} {'p99':>7}")
    for name, s in summarise(hops_dir, report).items():
        print(f"{name:58} {s['per_msg']:9} {s['mean_ms']:7} {s['p50_ms']:7} {s['p99_ms']:7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
