"""Smoke test of the everything-on level of bench/e2e.py (what `make bench`
runs, bench/e2e_full.py): a tiny level on a real stack with half the devices on
WebSocket, READs from every recipient, DELIVERED receipts and typing. It checks
the code path and the accounting, never a speed: every message exactly once
and in order on both transports, READs answered and stored, typing sent, and
the `full_*` keys in the RESULT line."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_support import run_e2e

pytestmark = pytest.mark.slow


def test_the_everything_on_level_runs_both_transports_with_receipts_and_typing(
    tmp_path: Path,
) -> None:
    report, result, _log = run_e2e(
        tmp_path / "full.json",
        "--skip=load,search,closed,receipts,conns,group,ws",
        "--full-levels=40",
        "--full-typing-every=2",
        "--pairs=8",
        "--workers=1",
        "--duration=3",
    )
    full = report["full"]
    assert full["pairs"] == {"websocket": 4, "grpc": 4}
    level = full["levels"]["40"]
    counts = level["final_counts"]
    assert counts["exactly_once"] and counts["failed"] == 0, counts
    assert counts["received"] == counts["submitted"] > 0, counts
    reads = level["reads"]
    # Every recipient marks read, on both transports: at least one READ per pair.
    assert reads["sent"] >= 8, reads
    assert reads["failed"] == 0 and reads["stored"] > 0, reads
    # Typing on every second pair's sender, once per 3 s: at least once each.
    assert level["typing_sent"] >= 4, level["typing_sent"]
    assert result["full_exactly_once_at_40"] is True
    assert result["full_send_ack_p99_ms_at_40"] == level["send_ack_ms"]["p99"]
    assert result["full_cpu_ms_per_msg_at_40"] == level["cpu_ms_per_msg_total"]
