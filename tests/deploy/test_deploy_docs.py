"""docs/deploy.md tells what the manifests do: its numbers and lists are checked
against the rendered overlays, so the guide cannot drift from them."""

from __future__ import annotations

import re
from typing import Any

from deploy_support import K8S, ROOT, container, load_check, require_services

check = load_check()
DOC = (ROOT / "docs" / "deploy.md").read_text()


def _prod() -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in check.render(K8S / "prod")}


def test_every_secret_the_prod_overlay_expects_is_documented() -> None:
    require_services(*check.SERVICES)
    report = check.check_tree(overlays=["prod"])
    expected = report.external_secrets["prod"]
    assert expected, "prod reads no external Secret?"
    for name, key in expected:
        assert re.search(rf"secret generic {name}\b[^`]*?{key}=", DOC, re.S), (name, key)


def test_shutdown_table_matches_the_manifests() -> None:
    objs = _prod()
    rows = re.findall(r"^\| (\w+) \| (\d+) s \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", DOC, re.M)
    assert {r[0] for r in rows} == set(check.SERVICES)
    for svc, pre, drain, grace, deadline, tgps in rows:
        workload = objs.get(("Deployment", svc)) or objs[("StatefulSet", svc)]
        c = container(workload, svc)
        config = next(
            o["data"] for (kind, name), o in objs.items()
            if kind == "ConfigMap" and name.startswith(f"{svc}-config-")
        )  # fmt: skip
        prefix = f"IM_{svc.upper()}_"
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", pre]
        assert float(config[prefix + "DRAIN_DELAY_S"]) == float(drain)
        assert float(config[prefix + "SHUTDOWN_GRACE_S"]) == float(grace)
        assert float(config[prefix + "SHUTDOWN_DEADLINE_S"]) == float(deadline)
        assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == int(tgps)


def test_documented_ports_are_the_configured_ones() -> None:
    line = next(ln for ln in DOC.splitlines() if ln.startswith("Ports: "))
    documented = dict(re.findall(r"(\w+) (\d{4,5})", line))
    objs = _prod()
    for svc in check.SERVICES:
        config = next(
            o["data"] for (kind, name), o in objs.items()
            if kind == "ConfigMap" and name.startswith(f"{svc}-config-")
        )  # fmt: skip
        assert config[f"IM_{svc.upper()}_PORT"] == documented[svc]
        assert config[f"IM_{svc.upper()}_METRICS_PORT"] == "9090"


def test_documented_dev_secrets_are_the_dev_overlay_ones() -> None:
    dev = (K8S / "dev" / "kustomization.yaml").read_text()
    secret = re.search(r"IM_GATEWAY_TOKEN_SECRET=(\S+)", DOC)
    assert secret is not None and f"IM_GATEWAY_TOKEN_SECRET={secret.group(1)}" in dev
