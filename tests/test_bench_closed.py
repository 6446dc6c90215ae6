"""Smoke test of the closed-loop level of bench/e2e.py (what `make bench` runs)
and of e2e_ab's --closed-senders: a tiny run on a real stack. It checks the code
path and the accounting, never a speed: every message sent in the loop is ACKed
and received exactly once, the RESULT line carries the closed-loop keys, and the
report holds the per-hop histogram means."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_support import ROOT, SHORT, run_e2e, run_script

pytestmark = pytest.mark.slow


def test_the_closed_loop_level_runs_and_accounts_for_every_message(tmp_path: Path) -> None:
    out = tmp_path / "closed.json"
    report, result, _log = run_e2e(
        out,
        "--skip=load,search,full,receipts,conns,group,ws",
        "--closed-senders=3",
        "--workers=2",
        "--duration=2",
    )
    closed = report["closed"]
    final = closed["final_counts"]
    assert final["exactly_once"] and final["failed"] == 0, final
    # Closed loop: at most one message per sender in flight, so the senders
    # together sent at least one each and everything sent was ACKed.
    assert final["submitted"] >= 3 and final["acked"] == final["submitted"], final
    assert closed["msgs_per_s"] > 0 and closed["server_cpu_ms_per_msg"] > 0, closed
    assert closed["send_ack_ms"]["p50"] <= closed["delivery_ms"]["p99"] * 10, closed
    assert any("SendMessage" in hop for hop in closed["hops"]), closed["hops"]
    for key in ("msgs_per_s", "send_p50_ms", "send_p99_ms", "delivery_p50_ms", "cpu_ms_per_msg"):
        assert result[f"closed3_{key}"] is not None, result


def test_bench_ab_runs_the_closed_loop_on_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    log = run_script(
        [
            str(ROOT / "bench" / "e2e_ab.py"),
            "--levels=",
            "--no-search",
            "--rounds=1",
            "--closed-senders=2",
            "--workers=1",
            "--duration=2",
            *SHORT,
            f"--out={out}",
        ]
    )
    summary = json.loads(out.read_text())["summary"]
    for side in ("before", "after"):
        assert summary[side]["closed"]["exactly_once"], summary[side]
    result = json.loads(log.rsplit("RESULT ", 1)[1])
    assert result["closed_send_p50_ms"] is not None, result
