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


TS_CLIENT = ROOT / "clients" / "ts"
#: What `npm run build` in clients/ts reads (src/gen is its output, not an input).
_TS_INPUTS = ("src", "tsconfig.json", "buf.gen.yaml", "package-lock.json")


def _newest_input() -> float:
    paths = [p for p in (ROOT / "protos").rglob("*.proto")]
    for name in _TS_INPUTS:
        path = TS_CLIENT / name
        if path.is_dir():
            paths += [p for p in path.rglob("*.ts") if "gen" not in p.relative_to(path).parts]
        elif path.exists():
            paths.append(path)
    return max(p.stat().st_mtime for p in paths)


def build_ts_client() -> Path:
    """Installs clients/ts's locked dependencies if missing and builds it (types
    from protos/ by buf + protoc-gen-es, then tsc into dist/) unless the build is
    newer than every input, as `make ts-build` does. Returns the package dir."""
    npm_ci(TS_CLIENT)
    stamp = TS_CLIENT / "dist" / ".built"
    if not stamp.exists() or stamp.stat().st_mtime < _newest_input():
        subprocess.run(["npm", "run", "build"], cwd=TS_CLIENT, check=True, timeout=600)
        stamp.touch()
    return TS_CLIENT
