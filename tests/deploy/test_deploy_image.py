"""The image build (deploy/Dockerfile), checked without a container engine: what
it generates, installs and copies is what the services need."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import DEPLOY, ROOT, load_check
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILE = DEPLOY / "Dockerfile"
RUNTIME_IN = DEPLOY / "requirements-runtime.in"
#: Project code the image ships and the services import (libs/imdev, the local dev
#: stack, stays out; the gateway verifies tokens with the SDK's imclient.tokens).
RUNTIME_CODE = [ROOT / "services", ROOT / "libs" / "imcommon", ROOT / "libs" / "imclient"]


def _instructions() -> list[list[str]]:
    """The Dockerfile's instructions, continuation lines joined, as word lists."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_multi_stage_and_non_root() -> None:
    steps = _instructions()
    assert sum(1 for s in steps if s[0] == "FROM") >= 3
    last = max(i for i, s in enumerate(steps) if s[0] == "FROM")
    users = [s[1] for s in steps[last:] if s[0] == "USER"]
    assert users, "the final stage sets no USER"
    uid = load_check().dockerfile_uid(DOCKERFILE)
    assert uid is not None and uid != 0
    # The final stage installs no compiler or build tool.
    final = " ".join(" ".join(s) for s in steps[last:])
    for tool in ("grpcio-tools", "gcc", "build-essential", "apt-get install"):
        assert tool not in final


def test_layout_matches_the_python_path() -> None:
    steps = _instructions()
    env = " ".join(" ".join(s) for s in steps if s[0] == "ENV")
    assert "PYTHONPATH=/app/services:/app/libs:/app/gen" in env
    copies = [s[1:] for s in steps if s[0] == "COPY"]
    assert ["libs", "/app/libs"] in copies
    assert ["services", "/app/services"] in copies
    assert ["--from=codegen", "/src/gen", "/app/gen"] in copies


def test_build_context_keeps_what_the_dockerfile_copies() -> None:
    keep = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for step in _instructions():
        if step[0] != "COPY" or step[1].startswith("--from"):
            continue
        for source in step[1:-1]:
            assert f"!{source}" in keep or f"!{source}/**" in keep, source


def test_code_generation_matches_make_proto(tmp_path: Path) -> None:
    """deploy/gen_protos.sh, which the image build runs, makes what `make proto`
    made in gen/, file for file."""
    if not (ROOT / "gen" / ".stamp").exists():
        pytest.skip("gen/ was not made by `make proto`")
    out = tmp_path / "gen"
    subprocess.run(
        ["sh", str(DEPLOY / "gen_protos.sh"), str(out)],
        cwd=ROOT,
        # protoc's mypy plugins are scripts beside the interpreter.
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        },
        check=True,
        timeout=120,
    )

    def files(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.name != ".stamp"
        }

    made, reference = files(out), files(ROOT / "gen")
    assert sorted(made) == sorted(reference)
    assert made == reference
    assert not (out / "__init__.py").exists()


def _runtime_requirements() -> list[Requirement]:
    lines = [ln.split("#")[0].strip() for ln in RUNTIME_IN.read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln]


def test_runtime_requirements_are_pinned_in_the_lock() -> None:
    pinned = {
        canonicalize_name(line.split("==")[0])
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith(" ")
    }
    for req in _runtime_requirements():
        assert canonicalize_name(req.name) in pinned, req.name


def _closure(requirements: list[Requirement]) -> set[str]:
    """The distributions `pip install` brings for `requirements` (as installed here)."""
    installed: set[str] = set()
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [(r.name, frozenset(r.extras)) for r in requirements]
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in done:
            continue
        done.add(key)
        installed.add(key[0])
        for text in md.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or any(
                req.marker.evaluate({"extra": e}) for e in (extras or {""})
            ):
                todo.append((req.name, frozenset(req.extras)))
    return installed


def _imported_modules() -> set[str]:
    modules: set[str] = set()
    for root in RUNTIME_CODE:
        for path in root.rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return modules


def test_the_image_provides_every_module_the_services_import() -> None:
    first_party = {p.name for p in (ROOT / "services").iterdir() if p.is_dir()}
    first_party |= {p.name for p in (ROOT / "libs").iterdir() if p.is_dir()} | {"im"}
    shipped_libs = {p.name for p in RUNTIME_CODE if p.parent.name == "libs"}
    installed = _closure(_runtime_requirements())
    by_module = md.packages_distributions()
    missing = []
    for module in sorted(_imported_modules()):
        if module in sys.stdlib_module_names or module == "__future__":
            continue
        if module in first_party:
            if (ROOT / "libs" / module).is_dir() and module not in shipped_libs:
                missing.append(f"{module} (libs/{module} is not in the image)")
            continue
        dists = {canonicalize_name(d) for d in by_module.get(module, [])}
        if not dists & installed:
            missing.append(f"{module} (from {sorted(dists) or '?'})")
    assert not missing, f"imported by the services but not installed in the image: {missing}"
