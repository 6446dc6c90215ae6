"""seqsvc's commands without a database say so in one line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

from imdev.servers import ROOT, free_port


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join(str(ROOT / d) for d in ("services", "libs", "gen"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("IM_SEQSVC_")}
    return subprocess.run(
        [sys.executable, "-m", "seqsvc", *args],
        env={**base, "PYTHONPATH": pythonpath, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_commands_without_a_database_fail_in_one_line() -> None:
    nowhere = f"host=127.0.0.1 port={free_port()} user=postgres dbname=seq password=hunter2"
    for args in (["migrate"], ["raise-floor", "--at-least", "10"]):
        proc = run(*args, IM_SEQSVC_DATABASE_URL=nowhere)
        assert proc.returncode == 1, proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "cannot reach PostgreSQL at IM_SEQSVC_DATABASE_URL" in lines[0]
        assert "make seqsvc-run" in lines[0] and "hunter2" not in lines[0]
    bad = run("migrate", IM_SEQSVC_DATABASE_URL="not a conninfo")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad
    for args in (["migrate"], [], ["serve"]):
        proc = run(*args)
        assert proc.returncode == 2, proc
        assert proc.stderr.strip().splitlines() == [
            line for line in proc.stderr.strip().splitlines() if "IM_SEQSVC_DATABASE_URL" in line
        ]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
