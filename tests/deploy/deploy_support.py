"""Helpers for the deploy tests: load deploy/check.py, copy the manifests, edit
one YAML document in the copy."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def load_check() -> ModuleType:
    """deploy/check.py as a module (it is a script, not a package)."""
    name = "deploy_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEPLOY / "check.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def require_services(*services: str) -> None:
    """Skips the test, with the reason, while a service's settings class is missing."""
    _, missing = load_check().load_settings_classes(services)
    for svc, reason in missing.items():
        pytest.skip(f"{svc}: {reason}")


def copy_k8s(tmp_path: Path) -> Path:
    target = tmp_path / "k8s"
    shutil.copytree(K8S, target)
    return target


def edit(path: Path, kind: str, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Applies `change` to the document kind/name of a multi-document YAML file."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    hits = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name} not found once in {path}"
    change(hits[0])
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def edit_kustomization(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "kustomization.yaml"
    spec = yaml.safe_load(path.read_text())
    change(spec)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def set_literal(directory: Path, generator: str, key: str, value: str | None) -> None:
    """Sets (or, with None, removes) KEY in a configMapGenerator/secretGenerator."""

    def change(spec: dict[str, Any]) -> None:
        for section in ("configMapGenerator", "secretGenerator"):
            for gen in spec.get(section, []):
                if gen["name"] != generator:
                    continue
                literals = [lit for lit in gen.get("literals", []) if lit.split("=")[0] != key]
                if value is not None:
                    literals.append(f"{key}={value}")
                gen["literals"] = literals
                return
        raise AssertionError(f"no generator {generator} in {directory}")

    edit_kustomization(directory, change)


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"]
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def messages(report: Any) -> list[str]:
    return [str(p) for p in report.problems]
