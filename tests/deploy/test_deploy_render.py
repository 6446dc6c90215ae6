"""deploy/k8s_render.py builds the overlays exactly as `kubectl kustomize` does,
and refuses what it does not support."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY, K8S

sys.path.insert(0, str(DEPLOY))
import k8s_render
from k8s_render import RenderError, content_hash, render, strategic_merge

OVERLAYS = sorted(p.name for p in K8S.iterdir() if p.name != "base")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_same_output_as_kubectl_kustomize(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: nothing to compare with")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    assert render(K8S / overlay) == theirs


def test_content_hash_is_kustomizes() -> None:
    # kubectl kustomize names a generated ConfigMap with data {A: "1"} app-config-89g4tffbfk.
    config_map = {"kind": "ConfigMap", "metadata": {"name": "app-config"}, "data": {"A": "1"}}
    assert content_hash(config_map) == "89g4tffbfk"


def test_long_secret_values_are_wrapped_as_kustomize_does() -> None:
    assert k8s_render._b64("v") == "dg=="
    wrapped = k8s_render._b64("x" * 60)  # 80 base64 characters
    assert wrapped.split("\n") == [wrapped[:70], wrapped[71:81], ""]


def test_strategic_merge_lists_by_key_patch_order_first() -> None:
    base: dict[str, Any] = {
        "containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}, {"name": "b"}]
    }
    patch = {"containers": [{"name": "c"}, {"name": "a", "env": [{"name": "Y", "value": "2"}]}]}
    merged = strategic_merge(base, patch)
    assert [c["name"] for c in merged["containers"]] == ["c", "a", "b"]
    assert merged["containers"][1]["env"] == [
        {"name": "Y", "value": "2"},
        {"name": "X", "value": "1"},
    ]
    assert base["containers"][0]["env"] == [{"name": "X", "value": "1"}]  # not mutated


def test_strategic_merge_replaces_atomic_lists_and_deletes_nulls() -> None:
    base = {"args": ["a", "b"], "keep": 1, "drop": 2}
    assert strategic_merge(base, {"args": ["c"], "drop": None}) == {"args": ["c"], "keep": 1}


def _kustomization(tmp_path: Path, text: str) -> Path:
    (tmp_path / "kustomization.yaml").write_text(text)
    return tmp_path


def test_unsupported_field_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="commonLabels"):
        render(_kustomization(tmp_path, "commonLabels: {a: b}\n"))


def test_patch_without_a_target_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: nope}\n")
    with pytest.raises(RenderError, match="Service/nope matches 0 objects"):
        render(_kustomization(tmp_path, "patches:\n  - path: p.yaml\n"))


def test_json6902_patch(tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
        "spec: {ports: [{port: 1}], selector: {a: b}}\n"
    )
    objs = render(
        _kustomization(
            tmp_path,
            "resources: [svc.yaml]\n"
            "patches:\n"
            "  - target: {kind: Service, name: s}\n"
            "    patch: |\n"
            "      - {op: add, path: /spec/ports/-, value: {port: 2}}\n"
            "      - {op: replace, path: /spec/selector/a, value: c}\n"
            "      - {op: add, path: /spec/type, value: NodePort}\n",
        )
    )
    assert objs[0]["spec"] == {
        "ports": [{"port": 1}, {"port": 2}],
        "selector": {"a": "c"},
        "type": "NodePort",
    }


def test_generated_names_follow_into_pod_specs(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(
        """apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: c
          image: img
          envFrom: [{configMapRef: {name: cfg}}]
          env: [{name: S, valueFrom: {secretKeyRef: {name: sec, key: S}}}]
"""
    )
    objs = render(
        _kustomization(
            tmp_path,
            "resources: [d.yaml]\n"
            "configMapGenerator: [{name: cfg, literals: [A=1]}]\n"
            "secretGenerator: [{name: sec, literals: [S=x]}]\n"
            "images: [{name: img, newName: reg/img, newTag: '2'}]\n",
        )
    )
    by_kind = {o["kind"]: o for o in objs}
    c = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["envFrom"][0]["configMapRef"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == by_kind["Secret"]["metadata"]["name"]
    assert by_kind["ConfigMap"]["metadata"]["name"].startswith("cfg-")
    assert c["image"] == "reg/img:2"
