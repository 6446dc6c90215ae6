"""Runs the benchmark scripts for their smoke tests (tests/test_bench_*.py):
as `make bench` does, in a subprocess with the project on PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The options every tiny e2e.py run shares: short levels, no wait for a quiet
#: machine (a smoke test checks the code path and the accounting, never a speed).
SHORT = ["--warmup=0.5", "--drain=10", "--quiet-wait=0"]


def run_script(args: list[str], timeout_s: float = 240) -> str:
    """Runs `python *args`; returns stdout + stderr, failing the test on a
    non-zero exit with that output."""
    pythonpath = os.pathsep.join(str(ROOT / d) for d in ("services", "libs", "gen"))
    run = subprocess.run(
        [sys.executable, *args],
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    return log


def run_e2e(out: Path, *args: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """bench/e2e.py with `args` and SHORT, its JSON report written to `out`:
    (report, the RESULT line's fields, the output)."""
    log = run_script([str(ROOT / "bench" / "e2e.py"), *args, *SHORT, f"--out={out}"])
    result = json.loads(log.rsplit("RESULT ", 1)[1].splitlines()[0])
    return json.loads(out.read_text()), result, log
