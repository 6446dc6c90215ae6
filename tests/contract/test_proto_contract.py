"""The API contract (docs/protocol.md, "Versioning"): protos/ pass `buf lint`, `buf
breaking` catches a breaking change, and `make proto-check`'s script compares with
the right baseline from git history: the last release tag, else the merge base
with main, else the first commit that has protos/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from node_support import ROOT, needs_node, npm_ci

pytestmark = needs_node

BUF_DIR = ROOT / "tools" / "buf"
SCRIPT = Path("tools") / "buf" / "proto-check.sh"
GATEWAY_PROTO = Path("protos") / "im" / "gateway" / "v1" / "gateway.proto"


@pytest.fixture(scope="module")
def buf() -> str:
    npm_ci(BUF_DIR)
    return str(BUF_DIR / "node_modules" / ".bin" / "buf")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return result.returncode, result.stdout + result.stderr


def _copy_api(dest: Path) -> Path:
    """protos/, buf.yaml and the check script, as they are in this checkout."""
    shutil.copytree(ROOT / "protos", dest / "protos")
    shutil.copy2(ROOT / "buf.yaml", dest / "buf.yaml")
    (dest / SCRIPT).parent.mkdir(parents=True)
    shutil.copy2(ROOT / SCRIPT, dest / SCRIPT)
    return dest


def _renumber_send_client_id(root: Path) -> None:
    """A breaking change: Send.client_id moves from field 1 to 100."""
    path = root / GATEWAY_PROTO
    text = path.read_text()
    start = text.index("message Send {")
    changed, n = re.subn(r"int64 client_id = 1;", "int64 client_id = 100;", text[start:], count=1)
    assert n == 1
    path.write_text(text[:start] + changed)


def _add_send_field(root: Path) -> None:
    """A compatible change: a new field with a new number."""
    path = root / GATEWAY_PROTO
    text = path.read_text()
    path.write_text(text.replace("message Send {", "message Send {\n  int64 added_later = 99;", 1))


def test_protos_pass_lint(buf: str) -> None:
    code, out = _run([buf, "lint"], ROOT)
    assert code == 0, out


def test_lint_exceptions_are_per_file(buf: str, tmp_path: Path) -> None:
    """The published names are excepted by file; a new service must follow the rules."""
    ws = _copy_api(tmp_path)
    new = ws / "protos" / "im" / "widget" / "v1" / "widget.proto"
    new.parent.mkdir(parents=True)
    new.write_text(
        'syntax = "proto3";\npackage im.widget.v1;\n'
        "service Widget {\n  rpc Get(GetRequest) returns (GetResponse);\n}\n"
        "message GetRequest {}\nmessage GetResponse {}\n"
    )
    code, out = _run([buf, "lint"], ws)
    assert code != 0, out
    assert 'Service name "Widget" should be suffixed with "Service"' in out, out


def test_buf_breaking_reports_a_renumbered_field(buf: str, tmp_path: Path) -> None:
    ws = _copy_api(tmp_path)
    against = ["--against", str(ROOT / "protos")]
    code, out = _run([buf, "breaking", *against], ws)
    assert code == 0, f"an unchanged copy must pass: {out}"

    _add_send_field(ws)
    code, out = _run([buf, "breaking", *against], ws)
    assert code == 0, f"a new field with a new number is compatible: {out}"

    _renumber_send_client_id(ws)
    code, out = _run([buf, "breaking", *against], ws)
    assert code != 0, out
    assert "gateway.proto" in out and '"client_id"' in out and '"Send"' in out, out


# -- the baseline, from git history ---------------------------------------------


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.strip()


def _commit(repo: Path, message: str) -> None:
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository whose main branch has one commit: this checkout's API."""
    path = tmp_path / "repo"
    path.mkdir()
    _git(path, "init", "-q", "-b", "main")
    _copy_api(path)
    _commit(path, "the API")
    return path


def _proto_check(repo: Path, buf: str) -> tuple[int, str]:
    env = {**os.environ, "BUF": buf}
    env.pop("PROTO_AGAINST", None)
    return _run(["bash", str(SCRIPT)], repo, env)


def test_proto_check_on_a_branch_compares_with_the_merge_base(buf: str, repo: Path) -> None:
    _git(repo, "checkout", "-q", "-b", "compatible")
    _add_send_field(repo)
    _commit(repo, "a new field")
    code, out = _proto_check(repo, buf)
    assert code == 0, out
    assert "against the merge base with main" in out, out

    _git(repo, "checkout", "-q", "-b", "breaking")
    _renumber_send_client_id(repo)
    _commit(repo, "renumber Send.client_id")
    code, out = _proto_check(repo, buf)
    assert code != 0, out
    assert "against the merge base with main" in out and '"client_id"' in out, out


def test_proto_check_compares_with_the_last_release_tag(buf: str, repo: Path) -> None:
    _git(repo, "tag", "v1.0.0")
    _add_send_field(repo)
    _commit(repo, "a new field")
    _git(repo, "tag", "v1.1.0")
    _renumber_send_client_id(repo)
    _commit(repo, "renumber Send.client_id")
    code, out = _proto_check(repo, buf)
    assert code != 0, out
    assert "against the last release tag v1.1.0" in out and '"client_id"' in out, out


def test_proto_check_on_main_before_a_release_uses_the_first_protos(buf: str, repo: Path) -> None:
    """On main itself the merge base is HEAD (nothing to compare): the baseline is
    then the first commit with protos/, so main can never break what it published."""
    _add_send_field(repo)
    _commit(repo, "a new field")
    code, out = _proto_check(repo, buf)
    assert code == 0, out
    assert "against the first commit with protos/" in out, out

    _renumber_send_client_id(repo)
    _commit(repo, "renumber Send.client_id")
    code, out = _proto_check(repo, buf)
    assert code != 0, out
    assert '"client_id"' in out, out
