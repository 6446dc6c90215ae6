"""What replication costs: bench/e2e.py's 1:1 load on the single-node stack and on
the cluster topology (imdev.cluster: 3 NATS nodes with the stream at R3,
PostgreSQL primary + synchronous standby, 3 seqsvc instances), one after the
other in the same session, with the same settings and the same service processes.

    .venv/bin/python bench/e2e_cluster.py                 # `make bench-cluster` (~5 min)
    .venv/bin/python bench/e2e_cluster.py -- --levels 500,1000 --duration 12

Everything after `--` goes to both bench/e2e.py runs. Writes
bench/results/e2e_cluster.json (both runs' results and levels, and the ratios
cluster / single: sustained msg/s, and send-ACK and delivery p50/p99 at each
fixed level) and prints `RESULT {json}` last. docs/benchmarks.md, "Replication".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: A short run: the 1:1 load only, two fixed levels and a short search.
DEFAULT_ARGS = [
    "--skip",
    "conns,ws,full,receipts,group",
    "--levels",
    "150,300,600",
    "--duration",
    "8",
    "--search-steps",
    "3",
    "--pairs",
    "100",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run_one(topology: str, extra: list[str], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "bench" / "e2e.py"), "--topology", topology]
    cmd += [*extra, "--out", str(out)]
    log(f"{topology}: {' '.join(cmd[1:])}")
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT)
    report: dict[str, Any] = json.loads(out.read_text())
    report["wall_s"] = round(time.monotonic() - t0, 1)
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def compare(single: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    """Ratios cluster / single of the sustained rate and of the latencies at each
    fixed level both runs measured."""

    def levels(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            lv["label"]: lv
            for lv in report.get("load", {}).get("levels", [])
            if lv["label"].startswith("fixed-")
        }

    s_levels, c_levels = levels(single), levels(cluster)
    per_level: dict[str, Any] = {}
    for label in s_levels.keys() & c_levels.keys():
        s, c = s_levels[label], c_levels[label]
        row: dict[str, Any] = {}
        for metric in ("send_ack_ms", "delivery_ms"):
            for q in ("p50", "p99"):
                sv, cv = s.get(metric, {}).get(q), c.get(metric, {}).get(q)
                row[f"{metric}_{q}"] = {"single": sv, "cluster": cv, "ratio": _ratio(cv, sv)}
        row["keeps_up"] = {"single": s.get("keeps_up"), "cluster": c.get("keeps_up")}
        for key in ("cpu_ms_per_msg_total",):
            row[key] = {
                "single": s.get(key),
                "cluster": c.get(key),
                "ratio": _ratio(c.get(key), s.get(key)),
            }
        per_level[label] = row
    s_max = single["result"].get("max_msgs_per_s")
    c_max = cluster["result"].get("max_msgs_per_s")
    return {
        "max_msgs_per_s": {"single": s_max, "cluster": c_max, "ratio": _ratio(c_max, s_max)},
        "levels": dict(sorted(per_level.items(), key=lambda kv: int(kv[0].split("-")[1]))),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS / "e2e_cluster.json")
    p.add_argument("e2e_args", nargs="*", help="after --: arguments for both e2e.py runs")
    args = p.parse_args(argv)
    extra = args.e2e_args or DEFAULT_ARGS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_start = loadavg()
    single = run_one("single", extra, args.out.with_name("e2e_cluster-single.json"))
    load_mid = loadavg()
    cluster = run_one("cluster", extra, args.out.with_name("e2e_cluster-cluster.json"))
    ratios = compare(single, cluster)
    report = {
        "e2e_args": extra,
        "loadavg": {"start": load_start, "between": load_mid, "end": loadavg()},
        "single": {"result": single["result"], "config": single["config"]},
        "cluster": {"result": cluster["result"], "config": cluster["config"]},
        "ratios_cluster_over_single": ratios,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    levels = ratios["levels"]
    # The latency ratios of the highest fixed level both topologies kept up with
    # (above it one side is saturated and its queueing is what the ratio shows).
    both = [k for k, v in levels.items() if all(v["keeps_up"].values())]
    label = both[-1] if both else next(iter(levels), None)
    first = levels.get(label, {}) if label else {}
    result = {
        "max_msgs_per_s_single": ratios["max_msgs_per_s"]["single"],
        "max_msgs_per_s_cluster": ratios["max_msgs_per_s"]["cluster"],
        "max_msgs_per_s_ratio": ratios["max_msgs_per_s"]["ratio"],
        "at_msgs_per_s": int(label.split("-")[1]) if label else None,
        "send_ack_p99_ratio": first.get("send_ack_ms_p99", {}).get("ratio"),
        "delivery_p99_ratio": first.get("delivery_ms_p99", {}).get("ratio"),
        "loadavg_start": load_start[0],
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
