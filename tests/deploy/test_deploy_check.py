"""`make k8s-check` passes on the manifests, and fails on a copy of them with one
thing broken: an unknown env var, a wrong port, an invalid object, and the other
rules deploy/check.py enforces."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deploy_support import (
    DEPLOY,
    ROOT,
    container,
    copy_k8s,
    edit,
    edit_kustomization,
    load_check,
    messages,
    require_services,
    set_literal,
)

check = load_check()


@pytest.fixture
def k8s(tmp_path: Path) -> Path:
    require_services(*check.SERVICES)
    return copy_k8s(tmp_path)


def problems(k8s: Path, overlay: str = "dev") -> list[str]:
    return messages(check.check_tree(k8s, [overlay]))


def assert_fails(k8s: Path, *fragments: str, overlay: str = "dev") -> list[str]:
    found = problems(k8s, overlay)
    assert found, "the check passed on a broken manifest"
    assert any(all(f in m for f in fragments) for m in found), (fragments, found)
    return found


def test_the_manifests_pass_in_every_overlay() -> None:
    require_services(*check.SERVICES)
    report = check.check_tree()
    assert report.problems == []
    assert set(report.objects) == {"dev", "prod", "seqsvc-only"}
    assert report.objects["dev"] > report.objects["prod"] > 0


def test_an_untouched_copy_passes(k8s: Path) -> None:
    """The baseline of every test below: the copy itself is fine."""
    assert problems(k8s, "dev") == []
    assert problems(k8s, "prod") == []
    assert problems(k8s, "seqsvc-only") == []


def test_make_k8s_check_runs_this_check() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^k8s-check:.*\n(\t.*\n)*\t.*deploy/check\.py", makefile, re.M)
    test_target = re.search(r"^test:(.*)$", makefile, re.M)
    assert test_target is not None and "k8s-check" in test_target.group(1).split("##")[0]


def test_cli_exits_non_zero_on_a_broken_copy(k8s: Path) -> None:
    set_literal(k8s / "base", "gateway-config", "IM_GATEWAY_NO_SUCH_SETTING", "1")
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "check.py"), "--k8s-dir", str(k8s), "--overlay", "dev"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "IM_GATEWAY_NO_SUCH_SETTING" in result.stderr


# -- env vars are the services' settings -----------------------------------------


def test_unknown_env_var_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "gateway-config", "IM_GATEWAY_NO_SUCH_SETTING", "1")
    for overlay in ("dev", "prod"):
        assert_fails(k8s, "IM_GATEWAY_NO_SUCH_SETTING", "not a setting of gateway", overlay=overlay)


def test_another_services_setting_fails(k8s: Path) -> None:
    # pusher ignores IM_LOGIC_* silently: the typo would go unnoticed at run time.
    set_literal(k8s / "base", "pusher-config", "IM_LOGIC_NATS_URL", "nats://nats:4222")
    assert_fails(k8s, "IM_LOGIC_NATS_URL", "not a setting of pusher")


def test_unknown_env_var_in_a_container_fails(k8s: Path) -> None:
    def add(obj: dict[str, Any]) -> None:
        container(obj, "logic")["env"].append({"name": "IM_LOGIC_SEQSVC_ADRESS", "value": "x"})

    edit(k8s / "base" / "logic.yaml", "Deployment", "logic", add)
    assert_fails(k8s, "IM_LOGIC_SEQSVC_ADRESS", "not a setting of logic")


def test_a_value_the_settings_reject_fails(k8s: Path) -> None:
    set_literal(k8s / "base" / "seqsvc", "seqsvc-config", "IM_SEQSVC_LOG_LEVEL", "verbose")
    assert_fails(k8s, "IM_SEQSVC_LOG_LEVEL", "verbose", overlay="prod")
    set_literal(k8s / "base" / "seqsvc", "seqsvc-config", "IM_SEQSVC_STEP", "0")
    assert_fails(k8s, "IM_SEQSVC_STEP", "greater than or equal to 1")


def test_missing_required_setting_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "logic-config", "IM_LOGIC_SEQSVC_ADDRESS", None)
    assert_fails(k8s, "required setting IM_LOGIC_SEQSVC_ADDRESS is not set")


def test_loopback_bind_address_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "pusher-config", "IM_PUSHER_HOST", None)
    assert_fails(k8s, "required setting IM_PUSHER_HOST is not set", "loopback")


def test_secret_setting_from_a_configmap_fails(k8s: Path) -> None:
    def drop_secret_ref(obj: dict[str, Any]) -> None:
        c = container(obj, "gateway")
        c["env"] = [e for e in c["env"] if e["name"] != "IM_GATEWAY_TOKEN_SECRET"]

    edit(k8s / "base" / "gateway.yaml", "Deployment", "gateway", drop_secret_ref)
    set_literal(k8s / "dev", "gateway-config", "IM_GATEWAY_TOKEN_SECRET", "x" * 40)
    set_literal(k8s / "dev", "gateway-secrets", "IM_GATEWAY_TOKEN_SECRET", None)
    set_literal(k8s / "dev", "gateway-secrets", "IM_GATEWAY_REDIS_PREFIX", "im:")
    assert_fails(k8s, "IM_GATEWAY_TOKEN_SECRET is a secret setting", "configmap")


def test_unread_secret_fails(k8s: Path) -> None:
    def drop_secret_refs(obj: dict[str, Any]) -> None:
        c = container(obj, "pusher")
        c["env"] = [e for e in c["env"] if e["name"] != "IM_PUSHER_REDIS_URL"]

    edit(k8s / "dev" / "patches" / "redis-from-secrets.yaml", "Deployment", "pusher",
         drop_secret_refs)  # fmt: skip
    set_literal(k8s / "dev", "pusher-config", "IM_PUSHER_REDIS_URL", "redis://redis:6379/0")
    found = assert_fails(k8s, "nothing reads it")
    assert any("Secret/pusher-secrets" in m for m in found), found


def test_test_only_setting_fails(k8s: Path) -> None:
    classes, _ = check.load_settings_classes(["logic"])
    test_only = [n for n, f in classes["logic"].model_fields.items() if check._is_test_only(f)]
    if not test_only:
        pytest.skip("logic has no TEST-ONLY settings")
    var = f"IM_LOGIC_{test_only[0].upper()}"
    set_literal(k8s / "base", "logic-config", var, "false")
    assert_fails(k8s, var, "TEST-ONLY")


def test_undefined_env_reference_fails(k8s: Path) -> None:
    def typo(obj: dict[str, Any]) -> None:
        for e in container(obj, "pusher")["env"]:
            if e["name"] == "IM_PUSHER_ADVERTISE_ADDRESS":
                e["value"] = "$(POD_ADDRESS):50054"

    edit(k8s / "base" / "pusher.yaml", "Deployment", "pusher", typo)
    assert_fails(k8s, "$(POD_ADDRESS) is not defined")


def test_advertise_address_of_a_service_fails(k8s: Path) -> None:
    # Gateways call AckDelivery back on this address: it must be the pod itself.
    def via_service(obj: dict[str, Any]) -> None:
        for e in container(obj, "pusher")["env"]:
            if e["name"] == "IM_PUSHER_ADVERTISE_ADDRESS":
                e["value"] = "pusher-pods:50054"

    edit(k8s / "base" / "pusher.yaml", "Deployment", "pusher", via_service)
    assert_fails(k8s, "IM_PUSHER_ADVERTISE_ADDRESS", "this pod's own address")


def test_address_of_the_wrong_service_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "gateway-config", "IM_GATEWAY_LOGIC_ADDRESS", "seqsvc:50053")
    assert_fails(k8s, "IM_GATEWAY_LOGIC_ADDRESS", "not logic")


def test_address_on_a_port_the_service_lacks_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "pusher-config", "IM_PUSHER_LOGIC_ADDRESS", "logic:50051")
    assert_fails(k8s, "IM_PUSHER_LOGIC_ADDRESS", "has no port 50051")


def test_init_container_command_the_service_lacks_fails(k8s: Path) -> None:
    def typo(obj: dict[str, Any]) -> None:
        container(obj, "migrate")["command"] = ["python", "-m", "logic", "migrat"]

    edit(k8s / "base" / "logic.yaml", "Deployment", "logic", typo)
    assert_fails(k8s, "has no command 'migrat'")


# -- ports and probes -------------------------------------------------------------


def _set_probe_port(obj: dict[str, Any]) -> None:
    container(obj, "gateway")["readinessProbe"]["grpc"]["port"] = 50052


def _set_container_port(obj: dict[str, Any]) -> None:
    container(obj, "gateway")["ports"][0]["containerPort"] = 8080


WRONG_PORTS: dict[str, tuple[str, Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "probe": ("Deployment", _set_probe_port, ("readinessProbe checks port 50052",)),
    "container": ("Deployment", _set_container_port, ("container port 'grpc' is 8080",)),
}


@pytest.mark.parametrize("what", sorted(WRONG_PORTS))
def test_wrong_port_fails(k8s: Path, what: str) -> None:
    kind, change, fragments = WRONG_PORTS[what]
    edit(k8s / "base" / "gateway.yaml", kind, "gateway", change)
    assert_fails(k8s, *fragments)


def test_port_setting_changed_alone_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "logic-config", "IM_LOGIC_PORT", "6000")
    found = assert_fails(k8s, "IM_LOGIC_PORT is 6000")
    assert any("startupProbe checks port 50052" in m for m in found), found


def test_wrong_service_target_port_fails(k8s: Path) -> None:
    def retarget(obj: dict[str, Any]) -> None:
        obj["spec"]["ports"][0]["targetPort"] = 50099

    edit(k8s / "base" / "seqsvc" / "seqsvc.yaml", "Service", "seqsvc", retarget)
    assert_fails(k8s, "Service/seqsvc", "targetPort 50099")


def test_http_probe_instead_of_grpc_fails(k8s: Path) -> None:
    def http(obj: dict[str, Any]) -> None:
        container(obj, "seqsvc")["livenessProbe"] = {"tcpSocket": {"port": 50053}}

    edit(k8s / "base" / "seqsvc" / "seqsvc.yaml", "StatefulSet", "seqsvc", http)
    assert_fails(k8s, "livenessProbe is not a native gRPC probe")


def test_metrics_port_mismatch_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "pusher-config", "IM_PUSHER_METRICS_PORT", "9100")
    assert_fails(k8s, "container port 'metrics' is 9090", "IM_PUSHER_METRICS_PORT is 9100")


# -- TLS ------------------------------------------------------------------------------


def test_a_tls_port_without_a_plaintext_health_port_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "gateway-config", "IM_GATEWAY_HEALTH_PORT", None)
    assert_fails(k8s, "serves TLS", "set IM_GATEWAY_HEALTH_PORT", overlay="prod")


def test_a_certificate_outside_every_mount_fails(k8s: Path) -> None:
    set_literal(k8s / "prod", "gateway-config", "IM_GATEWAY_TLS_CERT_FILE", "/etc/x/tls.crt")
    assert_fails(k8s, "IM_GATEWAY_TLS_CERT_FILE=/etc/x/tls.crt is in no volume", overlay="prod")


def test_a_certificate_mounted_by_subpath_fails(k8s: Path) -> None:
    def sub_path(obj: dict[str, Any]) -> None:
        container(obj, "gateway")["volumeMounts"][0]["subPath"] = "tls.crt"

    edit(k8s / "prod" / "patches" / "gateway-tls.yaml", "Deployment", "gateway", sub_path)
    assert_fails(k8s, "subPath mount, which never sees an update", overlay="prod")


def test_a_certificate_that_is_no_item_of_its_secret_fails(k8s: Path) -> None:
    def drop_key(obj: dict[str, Any]) -> None:
        volume = obj["spec"]["template"]["spec"]["volumes"][0]
        volume["secret"]["items"] = [i for i in volume["secret"]["items"] if i["key"] != "tls.key"]

    edit(k8s / "prod" / "patches" / "gateway-tls.yaml", "Deployment", "gateway", drop_key)
    assert_fails(k8s, "IM_GATEWAY_TLS_KEY_FILE", "has no item tls.key", overlay="prod")


def test_prod_serves_tls_at_the_gateway_from_a_secret() -> None:
    require_services(*check.SERVICES)
    report = check.check_tree(overlays=["prod"])
    assert {("gateway-tls", "tls.crt"), ("gateway-tls", "tls.key")} <= report.external_secrets[
        "prod"
    ]
    objs = {(o["kind"], o["metadata"]["name"]): o for o in check.render(DEPLOY / "k8s" / "prod")}
    gateway = container(objs[("Deployment", "gateway")], "gateway")
    assert gateway["readinessProbe"]["grpc"]["port"] == 50056  # the plaintext health port


# -- invalid objects -----------------------------------------------------------------


def test_misspelled_field_fails_schema_validation(k8s: Path) -> None:
    def typo(obj: dict[str, Any]) -> None:
        spec = obj["spec"]["template"]["spec"]
        spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")

    edit(k8s / "base" / "pusher.yaml", "Deployment", "pusher", typo)
    assert_fails(k8s, "Deployment/pusher", "invalid for Kubernetes", "terminationGracePeriodSecond")


def test_wrong_type_fails_schema_validation(k8s: Path) -> None:
    def text(obj: dict[str, Any]) -> None:
        obj["spec"]["replicas"] = "two"

    edit(k8s / "base" / "pusher.yaml", "Deployment", "pusher", text)
    assert_fails(k8s, "Deployment/pusher", "invalid for Kubernetes", "'two' is not of type")


def test_missing_required_field_fails_schema_validation(k8s: Path) -> None:
    def no_selector(obj: dict[str, Any]) -> None:
        del obj["spec"]["scaleTargetRef"]

    edit(k8s / "base" / "logic.yaml", "HorizontalPodAutoscaler", "logic", no_selector)
    found = problems(k8s)
    assert any("HorizontalPodAutoscaler/logic" in m and "scaleTargetRef" in m for m in found)


def test_unsupported_kustomization_field_fails(k8s: Path) -> None:
    path = k8s / "dev" / "kustomization.yaml"
    path.write_text(path.read_text() + "namePrefix: x-\n")
    assert_fails(k8s, "render", "unsupported field", "namePrefix")


# -- shutdown alignment -----------------------------------------------------------------


def test_termination_grace_shorter_than_the_shutdown_fails(k8s: Path) -> None:
    def short(obj: dict[str, Any]) -> None:
        obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30

    edit(k8s / "base" / "gateway.yaml", "Deployment", "gateway", short)
    assert_fails(k8s, "terminationGracePeriodSeconds 30", "IM_GATEWAY_SHUTDOWN_DEADLINE_S")


def test_deadline_shorter_than_drain_and_grace_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "logic-config", "IM_LOGIC_SHUTDOWN_GRACE_S", "30")
    assert_fails(k8s, "IM_LOGIC_SHUTDOWN_DEADLINE_S 20", "SHUTDOWN_GRACE_S 30")


def test_liveness_that_kills_a_draining_pod_fails(k8s: Path) -> None:
    def quick(obj: dict[str, Any]) -> None:
        container(obj, "pusher")["livenessProbe"]["failureThreshold"] = 2

    edit(k8s / "base" / "pusher.yaml", "Deployment", "pusher", quick)
    assert_fails(k8s, "livenessProbe fails after 20 s", "IM_PUSHER_SHUTDOWN_DEADLINE_S")


def test_missing_prestop_fails(k8s: Path) -> None:
    def none(obj: dict[str, Any]) -> None:
        del container(obj, "logic")["lifecycle"]

    edit(k8s / "base" / "logic.yaml", "Deployment", "logic", none)
    assert_fails(k8s, "no preStop hook")


# -- workload rules ---------------------------------------------------------------------


def test_seqsvc_as_a_deployment_fails(k8s: Path) -> None:
    def deployment(obj: dict[str, Any]) -> None:
        obj["kind"] = "Deployment"
        for field in ("serviceName", "podManagementPolicy"):
            obj["spec"].pop(field)

    edit(k8s / "base" / "seqsvc" / "seqsvc.yaml", "StatefulSet", "seqsvc", deployment)
    assert_fails(k8s, "seqsvc must be a StatefulSet with a fixed `replicas`")


def test_a_pdb_that_lets_two_seqsvc_replicas_go_at_once_fails(k8s: Path) -> None:
    def two(obj: dict[str, Any]) -> None:
        obj["spec"]["maxUnavailable"] = 2

    edit(k8s / "seqsvc-only" / "pdb.yaml", "PodDisruptionBudget", "seqsvc", two)
    assert_fails(k8s, "one disruption at a time", overlay="seqsvc-only")


def test_seqsvc_replicas_without_a_pdb_fail(k8s: Path) -> None:
    edit_kustomization(k8s / "seqsvc-only", lambda spec: spec["resources"].remove("pdb.yaml"))
    assert_fails(k8s, "StatefulSet/seqsvc", "no PodDisruptionBudget", overlay="seqsvc-only")


def test_seqsvc_without_a_client_namespace_fails(k8s: Path) -> None:
    def nobody(obj: dict[str, Any]) -> None:
        obj["spec"]["ingress"][0]["from"] = [{"podSelector": {"matchLabels": {"a": "b"}}}]

    path = k8s / "seqsvc-only" / "networkpolicies.yaml"
    edit(path, "NetworkPolicy", "seqsvc-from-client-namespaces", nobody)
    assert_fails(k8s, "no NetworkPolicy admits a client namespace", overlay="seqsvc-only")


def test_an_invalid_teams_file_fails(k8s: Path) -> None:
    set_literal(k8s / "dev", "seqsvc-teams", "teams.yaml", '{"teams": [{"name": "x"}]}')
    assert_fails(k8s, "IM_SEQSVC_TEAMS_FILE", "prefixes")


def test_a_logic_token_of_no_seqsvc_team_fails(k8s: Path) -> None:
    set_literal(k8s / "dev", "logic-secrets", "IM_LOGIC_SEQSVC_TOKEN", "another-token")
    assert_fails(k8s, "IM_LOGIC_SEQSVC_TOKEN is the token of no team")


def test_an_unpinned_image_in_the_seqsvc_only_overlay_fails(k8s: Path) -> None:
    def latest(spec: dict[str, Any]) -> None:
        spec["images"][0]["newTag"] = "latest"

    edit_kustomization(k8s / "seqsvc-only", latest)
    assert_fails(k8s, "pin a release tag", overlay="seqsvc-only")


def test_replicas_beside_an_autoscaler_fails(k8s: Path) -> None:
    def fixed(obj: dict[str, Any]) -> None:
        obj["spec"]["replicas"] = 3

    edit(k8s / "base" / "gateway.yaml", "Deployment", "gateway", fixed)
    assert_fails(k8s, "Deployment/gateway", "HPA owns them")


def test_missing_limits_fails(k8s: Path) -> None:
    def unlimited(obj: dict[str, Any]) -> None:
        del container(obj, "migrate")["resources"]["limits"]

    edit(k8s / "base" / "seqsvc" / "seqsvc.yaml", "StatefulSet", "seqsvc", unlimited)
    assert_fails(k8s, "container migrate", "no resources.limits.memory")


def test_root_container_fails(k8s: Path) -> None:
    def root(obj: dict[str, Any]) -> None:
        obj["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False

    edit(k8s / "dev" / "redis.yaml", "Deployment", "redis", root)
    assert_fails(k8s, "Deployment/redis", "runAsNonRoot")


def test_run_as_user_other_than_the_image_user_fails(k8s: Path) -> None:
    def other(obj: dict[str, Any]) -> None:
        obj["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 2000

    edit(k8s / "base" / "logic.yaml", "Deployment", "logic", other)
    assert_fails(k8s, "runAsUser 2000 is not the image's USER 10001")


# -- network policies ------------------------------------------------------------------------


def test_opening_logic_to_everyone_fails(k8s: Path) -> None:
    path = k8s / "base" / "networkpolicies.yaml"
    path.write_text(
        path.read_text()
        + """---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: logic-from-anywhere
spec:
  podSelector:
    matchLabels:
      app.kubernetes.io/name: logic
  policyTypes: ["Ingress"]
  ingress:
    - from:
        - ipBlock:
            cidr: 0.0.0.0/0
"""
    )
    assert_fails(k8s, "NetworkPolicy/logic-from-anywhere", "only the gateway may be")


def test_opening_every_gateway_port_fails(k8s: Path) -> None:
    def all_ports(obj: dict[str, Any]) -> None:
        del obj["spec"]["ingress"][0]["ports"]

    edit(k8s / "base" / "networkpolicies.yaml", "NetworkPolicy", "gateway-from-anywhere", all_ports)
    assert_fails(k8s, "gateway-from-anywhere", "opens ports all")


def test_blocked_call_fails(k8s: Path) -> None:
    def only_gateway(obj: dict[str, Any]) -> None:
        obj["spec"]["ingress"][0]["from"] = obj["spec"]["ingress"][0]["from"][:1]

    edit(
        k8s / "base" / "networkpolicies.yaml",
        "NetworkPolicy",
        "logic-from-gateway-and-pusher",
        only_gateway,
    )
    assert_fails(k8s, "IM_PUSHER_LOGIC_ADDRESS", "no NetworkPolicy lets pusher reach")


def test_blocked_callback_fails(k8s: Path) -> None:
    path = k8s / "base" / "networkpolicies.yaml"
    text = path.read_text()
    start = text.index("# AckDelivery, from the gateways.")
    end = text.index("---", start)
    path.write_text(text[:start] + text[end + 4 :])
    assert_fails(k8s, "no NetworkPolicy lets gateway reach pusher")


def test_no_default_deny_fails(k8s: Path) -> None:
    def allow(obj: dict[str, Any]) -> None:
        obj["spec"]["podSelector"] = {"matchLabels": {"app.kubernetes.io/name": "logic"}}

    edit(k8s / "base" / "networkpolicies.yaml", "NetworkPolicy", "default-deny-ingress", allow)
    assert_fails(k8s, "no default-deny ingress policy")


def test_internal_rpcs_on_the_client_port_fail(k8s: Path) -> None:
    # GatewayInternal (Deliver, Kick) would then be callable by every client.
    set_literal(k8s / "base", "gateway-config", "IM_GATEWAY_INTERNAL_PORT", "0")
    found = assert_fails(k8s, "IM_GATEWAY_INTERNAL_PORT is 0", "open to everyone")
    assert any("container port 'internal' declared" in m for m in found), found


def test_internal_port_mismatch_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "gateway-config", "IM_GATEWAY_INTERNAL_PORT", "50056")
    found = assert_fails(k8s, "container port 'internal' is 50055", "IM_GATEWAY_INTERNAL_PORT")
    assert any("IM_GATEWAY_INTERNAL_ADVERTISE_ADDRESS" in m for m in found), found


def test_blocked_deliver_fails(k8s: Path) -> None:
    def only_gateways(obj: dict[str, Any]) -> None:
        obj["spec"]["ingress"][0]["from"] = obj["spec"]["ingress"][0]["from"][1:]

    edit(
        k8s / "base" / "networkpolicies.yaml",
        "NetworkPolicy",
        "gateway-internal-from-pusher-and-gateway",
        only_gateways,
    )
    assert_fails(k8s, "no NetworkPolicy lets pusher reach gateway on port 50055")


# -- JetStream -----------------------------------------------------------------------------


def test_stream_with_one_replica_fails(k8s: Path) -> None:
    set_literal(k8s / "base", "logic-config", "IM_LOGIC_NATS_REPLICAS", "1")
    assert_fails(k8s, "IM_LOGIC_NATS_REPLICAS is 1")


def test_periodic_fsync_fails(k8s: Path) -> None:
    def lazy(obj: dict[str, Any]) -> None:
        obj["data"]["nats.conf"] = obj["data"]["nats.conf"].replace(
            "sync_interval: always", "sync_interval: 2m"
        )

    edit(k8s / "dev" / "nats.yaml", "ConfigMap", "nats-config", lazy)
    assert_fails(k8s, "StatefulSet/nats", "sync_interval is not `always`")


def test_nats_config_nats_server_rejects_fails(k8s: Path) -> None:
    def broken(obj: dict[str, Any]) -> None:
        obj["data"]["nats.conf"] = obj["data"]["nats.conf"].replace(
            "max_file_store: 8GB", "max_file_store: {"
        )

    edit(k8s / "dev" / "nats.yaml", "ConfigMap", "nats-config", broken)
    assert_fails(k8s, "StatefulSet/nats", "nats-server -t rejects the config")


def test_two_node_nats_fails(k8s: Path) -> None:
    def two(obj: dict[str, Any]) -> None:
        obj["spec"]["replicas"] = 2

    edit(k8s / "dev" / "nats.yaml", "StatefulSet", "nats", two)
    found = assert_fails(k8s, "2 NATS servers")
    assert any("cluster routes" in m for m in found), found


# -- missing services -------------------------------------------------------------------------


def test_a_service_without_config_is_reported_missing() -> None:
    classes, missing = check.load_settings_classes(["no_such_service"])
    assert classes == {}
    assert missing == {"no_such_service": "services/no_such_service/config.py does not exist"}


def test_required_settings_come_from_the_classes() -> None:
    """The inference on the real classes: what has no usable default is required."""
    require_services("gateway", "seqsvc")
    classes, _ = check.load_settings_classes(["gateway", "seqsvc"])
    gateway = check.deploy_required(classes["gateway"])
    assert {"logic_address", "redis_url", "token_secret", "host", "port"} <= set(gateway)
    assert "redis_prefix" not in gateway
    assert "database_url" in check.deploy_required(classes["seqsvc"])
