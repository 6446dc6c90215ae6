"""bench/e2e_cluster.py's comparison (what `make bench-cluster` prints): ratios
cluster / single of the sustained rate and of each fixed level's latencies."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import e2e_cluster


def _report(max_rate: float, p99: float) -> dict[str, object]:
    level = {
        "label": "fixed-300",
        "send_ack_ms": {"p50": 10.0, "p99": p99},
        "delivery_ms": {"p50": 20.0, "p99": 2 * p99},
        "cpu_ms_per_msg_total": 4.0,
        "keeps_up": p99 < 50,
    }
    search = {"label": "search-700", "send_ack_ms": {"p99": 1.0}}
    return {"result": {"max_msgs_per_s": max_rate}, "load": {"levels": [level, search]}}


def test_ratios_are_cluster_over_single_per_fixed_level() -> None:
    out = e2e_cluster.compare(_report(800, 40.0), _report(600, 100.0))
    assert out["max_msgs_per_s"] == {"single": 800, "cluster": 600, "ratio": 0.75}
    assert list(out["levels"]) == ["fixed-300"]  # search levels differ per run
    row = out["levels"]["fixed-300"]
    assert row["send_ack_ms_p99"]["ratio"] == 2.5
    assert row["delivery_ms_p99"]["ratio"] == 2.5
    assert row["send_ack_ms_p50"]["ratio"] == 1.0
    assert row["keeps_up"] == {"single": True, "cluster": False}
