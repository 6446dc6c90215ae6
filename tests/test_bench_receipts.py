"""Smoke test of the read-receipts phase of bench/e2e.py (what `make bench` runs):
a tiny plain/receipts pair on a real stack. It checks the code path and the
accounting, never a speed: every READ sent is answered, each stored one is a
READ of a message the recipient received, and the report holds both sides, the
ratios and the CPU per READ."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_support import run_e2e

pytestmark = pytest.mark.slow


def test_the_receipts_phase_runs_and_accounts_for_every_read(tmp_path: Path) -> None:
    report, result, log = run_e2e(
        tmp_path / "receipts.json",
        "--skip=load,search,closed,full,conns,group,ws",
        "--receipts-levels=40",
        "--receipts-rounds=1",
        "--pairs=4",
        "--workers=1",
        "--duration=2",
    )
    level = report["receipts"]["levels"]["40"]
    plain, receipts = level["plain"], level["receipts"]
    assert plain["exactly_once"] and receipts["exactly_once"], log
    assert plain["reads"]["sent"] == 0
    reads = receipts["reads"]
    # 4 pairs at 40 msg/s: a READ per delivery batch, one in flight per
    # conversation, so at least one per pair and at most one per message.
    assert reads["sent"] >= 4, reads
    assert reads["stored"] + reads["noop"] + reads["duplicate"] + reads["failed"] == reads["sent"]
    assert reads["failed"] == 0, reads
    assert reads["stored"] > 0 and reads["per_message"] <= 1.0, reads
    assert set(level["ratios_receipts_over_plain"]) >= {"send_ack_ms_p99", "delivery_ms_p99"}
    assert "cpu_ms_per_read" in level
    assert result["receipts_at_msgs_per_s"] == 40.0
    assert result["cpu_ms_per_read"] == level["cpu_ms_per_read"]
