"""Node.js for the tests that drive npm packages of this repository (the Node gRPC
client, buf): a skip marker for machines without node, and the locked install."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_node = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not installed (make system-deps installs Debian's nodejs and npm)",
)


def npm_ci(package_dir: Path) -> None:
    """Installs `package_dir`'s locked dependencies if node_modules is missing (a
    fresh clone run by plain pytest; `make test` installs them first)."""
    if (package_dir / "node_modules").is_dir():
        return
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"], cwd=package_dir, check=True, timeout=600
    )
