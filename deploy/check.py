"""`make k8s-check`: renders every overlay of deploy/k8s and checks it offline.

For each overlay (every directory of deploy/k8s with a kustomization.yaml, but
`base`), it

1. renders it (deploy/k8s_render.py: the kustomize subset we use);
2. validates every object against the Kubernetes OpenAPI schemas of
   KUBERNETES_VERSION, strictly (unknown fields are errors), with the
   kubernetes-validate package (its schemas ship with it: no network);
3. ties the manifests to the code, importing each service's real settings class
   (`<svc>.config.Settings`), so this stays true as the code changes:
   - every environment variable a service container gets (env, envFrom) is a
     setting of that service, or one of HELPER_VARS; every ConfigMap and Secret key
     it loads is one; the values pass the Settings validation;
   - every setting a deployment needs (see `deploy_required`) is set, secret
     settings (`Settings.secret_fields`) only from Secrets, TEST-ONLY settings never;
   - the gRPC port is the PORT setting: container port `grpc`, the three native
     gRPC health probes (on HEALTH_PORT when set, as it must be when PORT serves
     TLS: the kubelet's probes cannot), Service targetPorts, and ADVERTISE_ADDRESS
     (the pod IP);
     every other port setting is the container port named after it (METRICS_PORT:
     `metrics`, the gateway's INTERNAL_PORT: `internal`, advertised at the pod IP
     too), and the gateway's internal RPCs never share the client port;
   - every file a setting names (`*_FILE`: TLS certificates, keys, CAs) is in a
     volume the container mounts (not by subPath, which never sees a renewed
     Secret), and is a key of that Secret or ConfigMap;
   - the addresses services dial (`*_ADDRESS`, `*_URL`) name a Service of the
     overlay, when they name one, on a port that reaches the right pods, and a
     NetworkPolicy lets the caller in;
   - termination grace, preStop and liveness fit the shutdown settings (drain
     delay, grace, deadline): see `check_shutdown`;
4. checks the deployment rules of the brief: resources on every container, the
   restricted Pod Security profile, one image for all services, seqsvc a
   one-replica StatefulSet, HPAs for gateway and logic (which then own
   `replicas`), PDBs, only the gateway's client port open to everyone, JetStream
   with 3 replicas and `sync_interval: always` (the config passes `nats-server -t`).

A service whose config.py does not exist (yet) is reported as missing: the check
fails rather than pretend. Exit status 0 when every overlay passes, 1 otherwise.

    python deploy/check.py [--overlay dev] [--k8s-dir DIR] [--render dev]
"""

from __future__ import annotations

import argparse
import base64
import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import yaml
from pydantic import TypeAdapter, ValidationError
from referencing import Registry, Resource

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (HERE, ROOT / "services", ROOT / "libs", ROOT / "gen"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from k8s_render import RenderError, render  # noqa: E402

#: The Kubernetes version every object is validated against: the oldest we
#: support (native gRPC probes need >= 1.27; PDB unhealthyPodEvictionPolicy 1.31).
KUBERNETES_VERSION = "1.31"

#: Our services: `python -m <svc>` in the one project image.
SERVICES = ("seqsvc", "logic", "pusher", "gateway")

#: Non-setting variables a service container may have: downward-API values used
#: to build settings (e.g. IM_GATEWAY_ADVERTISE_ADDRESS=$(POD_IP):50051).
HELPER_VARS = frozenset({"POD_IP", "POD_NAME", "POD_NAMESPACE", "POD_UID"})

#: Stand-ins for downward-API values when the check resolves the environment.
POD_IP_PLACEHOLDER = "10.11.12.13"

#: Seconds the process needs between the end of SHUTDOWN_GRACE_S and its exit
#: (shutdown hooks such as the gateway's GoAway wait, closing pools), and between
#: SHUTDOWN_DEADLINE_S and the kubelet's SIGKILL, so that the process always ends
#: itself (exit status tells what happened) before it is killed.
HOOKS_MARGIN_S = 5.0
KILL_MARGIN_S = 5.0

#: Workloads that must have a HorizontalPodAutoscaler.
AUTOSCALED = ("gateway", "logic")

#: Calls that no setting names (the callee's address comes from Redis or a
#: request), as (caller, callee, the callee's port setting): pusher -> gateway
#: Deliver and gateway -> gateway Kick (GatewayInternal), gateway -> pusher
#: AckDelivery. NetworkPolicies must allow them. A port setting that is 0 or
#: absent means the service's PORT.
CALLBACKS = (
    ("pusher", "gateway", "internal_port"),
    ("gateway", "gateway", "internal_port"),
    ("gateway", "pusher", "port"),
)

#: Ports that must not be the client port: a service setting that, when 0,
#: serves internal-only RPCs on PORT. The gateway's PORT is open to everyone, so
#: GatewayInternal (Deliver, Kick) must have a port of its own.
SEPARATE_PORTS = {"gateway": "internal_port"}

#: The JetStream stream's replicas, and the NATS servers' fsync policy (design:
#: "NATS JetStream as a 3-node cluster (replicas=3)"; docs/deploy.md).
STREAM_REPLICAS = 3

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


@dataclass(frozen=True)
class Problem:
    overlay: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.overlay}: {self.where}: {self.message}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    #: Services whose settings class could not be imported, with the reason.
    missing: dict[str, str] = field(default_factory=dict)
    #: Per overlay: (Secret name, key) pairs the overlay expects to exist in the
    #: cluster without rendering them (prod: created by the operator).
    external_secrets: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


# -- settings classes -----------------------------------------------------------


def load_settings_classes(
    services: Iterable[str] = SERVICES,
) -> tuple[dict[str, type[Any]], dict[str, str]]:
    """Imports `<svc>.config.Settings` for every service. Returns (classes, missing)."""
    classes: dict[str, type[Any]] = {}
    missing: dict[str, str] = {}
    for svc in services:
        try:
            module = importlib.import_module(f"{svc}.config")
            classes[svc] = module.Settings
        except ModuleNotFoundError as exc:
            if exc.name in (svc, f"{svc}.config"):
                missing[svc] = f"services/{svc}/config.py does not exist"
            else:
                missing[svc] = f"importing {svc}.config failed: {exc!r}"
        except Exception as exc:  # a config.py being edited: report it, do not crash
            missing[svc] = f"importing {svc}.config failed: {exc!r}"
        else:
            if not hasattr(classes[svc], "model_fields"):
                missing[svc] = f"{svc}.config.Settings is not a settings class"
                del classes[svc]
    return classes, missing


def env_prefix(cls: type[Any]) -> str:
    return str(cls.model_config.get("env_prefix", "")).upper()


def svc_name(cls: type[Any]) -> str:
    """The service a settings class belongs to (its module is `<svc>.config`)."""
    return str(cls.__module__).split(".")[0]


def env_names(cls: type[Any]) -> dict[str, str]:
    """{ENV_VAR: field name} of a settings class."""
    prefix = env_prefix(cls)
    return {f"{prefix}{name}".upper(): name for name in cls.model_fields}


def _marker(info: Any) -> str | None:
    extra = info.json_schema_extra
    if isinstance(extra, dict):
        value = extra.get("deploy")
        return str(value) if value is not None else None
    return None


def _is_test_only(info: Any) -> bool:
    return (info.description or "").upper().startswith("TEST ONLY")


def deploy_required(cls: type[Any]) -> dict[str, str]:
    """Settings a deployment must set, {field: why}, read from the class:

    - a field whose default does not validate (e.g. a required URL);
    - a field whose default is empty: it has no usable default (an address);
    - a field whose default names a loopback host (in a pod, loopback reaches only
      the pod itself), the bind address `host` among them;
    - `port` when its default is 0 (a free port: Services and probes need a fixed one);
    - a secret (`secret_fields`): its built-in default, if any, is a dev value;
    - a field marked `Field(json_schema_extra={"deploy": "required"})`.
    `{"deploy": "optional"}` on a field overrides the inference.
    """
    required: dict[str, str] = {}
    try:
        cls.model_validate({})
    except ValidationError as exc:
        for err in exc.errors():
            if err.get("loc"):
                required[str(err["loc"][0])] = "its default does not validate"
    secrets: frozenset[str] = getattr(cls, "secret_fields", frozenset())
    for name, info in cls.model_fields.items():
        default = info.default
        if name in secrets:
            required.setdefault(name, "a secret: its default is for development only")
        if isinstance(default, str) and not default.strip():
            required.setdefault(name, "it has no default")
        if isinstance(default, str) and any(h in default for h in LOOPBACK_HOSTS):
            required.setdefault(name, f"its default {default!r} is loopback, i.e. the pod itself")
        if name == "port" and default == 0:
            required.setdefault(name, "its default 0 picks a random port")
        marker = _marker(info)
        if marker == "required":
            required.setdefault(name, "marked required")
        elif marker == "optional":
            required.pop(name, None)
    return required


# -- rendering and the environment of a container --------------------------------


def overlays_in(k8s_dir: Path) -> list[str]:
    return sorted(
        p.name
        for p in k8s_dir.iterdir()
        if p.name != "base" and (p / "kustomization.yaml").is_file()
    )


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def service_of(container: dict[str, Any]) -> tuple[str, list[str]] | None:
    """(service, extra args) of a container running `python -m <service> ...`."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if (
        len(argv) >= 3
        and argv[0] in ("python", "python3")
        and argv[1] == "-m"
        and argv[2] in SERVICES
    ):
        return argv[2], argv[3:]
    return None


@dataclass
class EnvValue:
    value: str | None  # None: not known offline (an external Secret)
    origin: str  # "literal", "configmap <name>", "secret <name>", "fieldRef <path>"


class Objects:
    """The rendered objects of one overlay, indexed."""

    def __init__(self, objs: list[dict[str, Any]]) -> None:
        self.all = objs
        self.by_kind: dict[str, dict[str, dict[str, Any]]] = {}
        for obj in objs:
            self.by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.by_kind.get(kind, {}).get(name)

    def of_kind(self, *kinds: str) -> Iterator[dict[str, Any]]:
        for kind in kinds:
            yield from self.by_kind.get(kind, {}).values()

    def workloads(self) -> Iterator[dict[str, Any]]:
        return self.of_kind(*WORKLOAD_KINDS)


def _secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


def resolve_env(
    objs: Objects,
    workload: dict[str, Any],
    container: dict[str, Any],
    problems: list[str],
    external: set[tuple[str, str]],
) -> dict[str, EnvValue]:
    """The environment the container's process sees, as Kubernetes builds it:
    envFrom first, then env in order (overriding), `$(VAR)` expanded from what is
    already defined. Secrets that are not rendered are recorded in `external`."""
    env: dict[str, EnvValue] = {}
    for source in container.get("envFrom", []):
        if "prefix" in source:
            problems.append("envFrom prefix is not supported by this check")
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            cm = objs.get("ConfigMap", name)
            if cm is None:
                problems.append(f"envFrom ConfigMap {name} is not part of the overlay")
                continue
            for key, value in (cm.get("data") or {}).items():
                env[key] = EnvValue(str(value), f"configmap {name}")
        elif "secretRef" in source:
            name = source["secretRef"]["name"]
            secret = objs.get("Secret", name)
            if secret is None:
                problems.append(
                    f"envFrom Secret {name}: not rendered, so its keys cannot be checked; "
                    "use env with secretKeyRef (one entry per setting) instead"
                )
                continue
            for key, value in _secret_data(secret).items():
                env[key] = EnvValue(value, f"secret {name}")
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = EnvValue(_expand(str(var["value"]), env, name, problems), "literal")
            continue
        ref = var.get("valueFrom", {})
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            value = {
                "status.podIP": POD_IP_PLACEHOLDER,
                "metadata.name": f"{workload['metadata']['name']}-0",
                "metadata.namespace": workload["metadata"].get("namespace", "default"),
                "metadata.uid": "00000000-0000-0000-0000-000000000000",
            }.get(path, f"<{path}>")
            env[name] = EnvValue(value, f"fieldRef {path}")
        elif "configMapKeyRef" in ref:
            cm_name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
            cm = objs.get("ConfigMap", cm_name)
            if cm is None or key not in (cm.get("data") or {}):
                problems.append(f"{name}: ConfigMap {cm_name} has no key {key}")
                continue
            env[name] = EnvValue(str(cm["data"][key]), f"configmap {cm_name}")
        elif "secretKeyRef" in ref:
            s_name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            secret = objs.get("Secret", s_name)
            if secret is None:
                external.add((s_name, key))
                env[name] = EnvValue(None, f"secret {s_name}")
                continue
            data = _secret_data(secret)
            if key not in data:
                problems.append(f"{name}: Secret {s_name} has no key {key}")
                continue
            env[name] = EnvValue(data[key], f"secret {s_name}")
        else:
            problems.append(f"{name}: unsupported valueFrom {sorted(ref)}")
    return env


def _expand(value: str, env: dict[str, EnvValue], name: str, problems: list[str]) -> str:
    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        ref = match.group(1)
        known = env.get(ref)
        if known is None or known.value is None:
            problems.append(
                f"{name}: $({ref}) is not defined before it (Kubernetes would pass it "
                "through literally)"
            )
            return match.group(0)
        return known.value

    return _REF.sub(sub, value)


# -- the checks -----------------------------------------------------------------


class OverlayCheck:
    def __init__(
        self,
        overlay: str,
        objs: list[dict[str, Any]],
        classes: dict[str, type[Any]],
        dockerfile_uid: int | None,
    ) -> None:
        self.overlay = overlay
        self.objs = Objects(objs)
        self.classes = classes
        self.dockerfile_uid = dockerfile_uid
        self.problems: list[Problem] = []
        self.external: set[tuple[str, str]] = set()
        # workload name -> (service, resolved env of its main container, port)
        self.services: dict[str, tuple[str, dict[str, EnvValue], int | None]] = {}

    def fail(self, where: str, message: str) -> None:
        self.problems.append(Problem(self.overlay, where, message))

    def run(self) -> None:
        self.check_schemas()
        schema_ok = not self.problems
        for step in (
            self.check_workloads,
            self.check_services_ports,
            self.check_addresses,
            self.check_network_policies,
            self.check_scaling,
            self.check_images,
            self.check_jetstream,
            self.check_unread_config,
            self.check_unused_secret_keys,
        ):
            try:
                step()
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                # An object the schemas reject may lack what a step reads: the
                # schema error says what to fix.
                if schema_ok:
                    self.fail(step.__name__, f"could not run: {exc!r}")

    # -- schemas ------------------------------------------------------------------

    def check_schemas(self) -> None:
        for obj in self.objs.all:
            try:
                validate_object(obj)
            except jsonschema.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                self.fail(
                    _name(obj),
                    f"invalid for Kubernetes {KUBERNETES_VERSION}: "
                    f"{exc.message} (at {path or '/'})",
                )
            except kubernetes_validate.SchemaNotFoundError as exc:
                self.fail(_name(obj), exc.message)

    # -- workloads and their containers ------------------------------------------

    def check_workloads(self) -> None:
        for obj in self.objs.workloads():
            spec = pod_spec(obj)
            if spec is None:
                continue
            where = _name(obj)
            containers = spec.get("containers", [])
            for container in [*spec.get("initContainers", []), *containers]:
                self.check_container_basics(where, spec, container)
            mains = [c for c in containers if service_of(c)]
            for container in spec.get("initContainers", []):
                run = service_of(container)
                if run:
                    self.check_service_container(obj, container, run[0], run[1], main=False)
            for container in mains:
                run = service_of(container)
                assert run is not None
                self.check_service_container(obj, container, run[0], run[1], main=True)

    def check_container_basics(
        self, where: str, spec: dict[str, Any], container: dict[str, Any]
    ) -> None:
        where = f"{where} container {container['name']}"
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if res not in resources.get(kind, {}):
                    self.fail(where, f"no resources.{kind}.{res}")
        pod_sc = spec.get("securityContext", {})
        sc = container.get("securityContext", {})
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            self.fail(where, "runAsNonRoot is not true (restricted Pod Security profile)")
        if sc.get("allowPrivilegeEscalation") is not False:
            self.fail(where, "allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            self.fail(where, "capabilities.drop does not contain ALL")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            self.fail(where, "no RuntimeDefault seccompProfile")
        if service_of(container) and self.dockerfile_uid is not None:
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if uid != self.dockerfile_uid:
                self.fail(where, f"runAsUser {uid} is not the image's USER {self.dockerfile_uid}")

    def check_service_container(
        self,
        workload: dict[str, Any],
        container: dict[str, Any],
        svc: str,
        args: list[str],
        main: bool,
    ) -> None:
        where = f"{_name(workload)} container {container['name']}"
        if svc not in self.classes:
            return  # reported once as missing
        cls = self.classes[svc]
        if args:
            commands = service_commands(svc)
            if isinstance(commands, str):
                self.fail(where, commands)
            elif args[0] not in commands:
                self.fail(
                    where,
                    f"`python -m {svc} {' '.join(args)}`: {svc} has no command {args[0]!r} "
                    f"(it has {sorted(commands)})",
                )
        env_problems: list[str] = []
        env = resolve_env(self.objs, workload, container, env_problems, self.external)
        for message in env_problems:
            self.fail(where, message)
        known = env_names(cls)
        prefix = env_prefix(cls)
        secrets: frozenset[str] = getattr(cls, "secret_fields", frozenset())
        for var, value in env.items():
            if var in HELPER_VARS:
                continue
            if var not in known:
                self.fail(
                    where,
                    f"{var} ({value.origin}) is not a setting of {svc}: "
                    f"{svc} reads only {prefix}* variables that "
                    f"{svc}.config.Settings declares",
                )
                continue
            fname = known[var]
            info = cls.model_fields[fname]
            if fname in secrets and not value.origin.startswith("secret "):
                self.fail(
                    where,
                    f"{var} is a secret setting but comes from {value.origin}; put it in a Secret",
                )
            if _is_test_only(info):
                self.fail(where, f"{var} is a TEST-ONLY setting; never set it in a deployment")
            if value.origin.startswith(("secret ", "configmap ")):
                self.check_ref_key(where, container, var)
        self.check_values(where, cls, env)
        self.check_files(where, workload, container, cls, env)
        port = self.effective(cls, env, "port")
        if not main:
            return
        for fname, why in deploy_required(cls).items():
            var = f"{prefix}{fname}".upper()
            given = env.get(var)
            if given is None:
                self.fail(where, f"required setting {var} is not set ({why})")
            elif given.value is not None and not given.value.strip():
                self.fail(where, f"required setting {var} is empty ({why})")
        host = self.effective(cls, env, "host")
        if host is not None and str(host) not in WILDCARD_HOSTS:
            self.fail(where, f"{prefix}HOST is {host!r}: the pod must listen on 0.0.0.0")
        self.check_ports(where, container, cls, env, port)
        self.check_shutdown(where, pod_spec(workload) or {}, container, cls, env)
        if workload["metadata"]["name"] in self.services:
            self.fail(where, "a second container of this workload runs a service")
        self.services[workload["metadata"]["name"]] = (svc, env, port)

    def check_files(
        self,
        where: str,
        workload: dict[str, Any],
        container: dict[str, Any],
        cls: type[Any],
        env: dict[str, EnvValue],
    ) -> None:
        """Every file a setting names (`*_FILE`: certificates, keys, CAs) is inside
        a volume the container mounts, not through `subPath` (a subPath mount never
        sees a renewed Secret); from a Secret or ConfigMap, the file is one of its
        keys (or items). Secrets not rendered are recorded as external."""
        mounts = container.get("volumeMounts", [])
        volumes = {v["name"]: v for v in (pod_spec(workload) or {}).get("volumes", [])}
        for fname in cls.model_fields:
            if not fname.endswith("_file"):
                continue
            value = self.effective(cls, env, fname)
            if not value:
                continue
            var = f"{env_prefix(cls)}{fname}".upper()
            path = str(value)
            mount = max(
                (m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")),
                key=lambda m: len(m["mountPath"]),
                default=None,
            )
            if mount is None:
                self.fail(where, f"{var}={path} is in no volume the container mounts")
                continue
            if mount.get("subPath"):
                self.fail(
                    where,
                    f"{var}: {mount['mountPath']} is a subPath mount, which never sees an "
                    "update: a renewed certificate would not reach the process",
                )
            volume = volumes.get(mount["name"], {})
            rel = path[len(mount["mountPath"].rstrip("/")) + 1 :]
            source = volume.get("secret") or volume.get("configMap")
            if source is None:
                continue
            items = source.get("items")
            key = rel
            if items is not None:
                paths = {item["path"]: item["key"] for item in items}
                if rel not in paths:
                    self.fail(where, f"{var}={path}: the volume {mount['name']} has no item {rel}")
                    continue
                key = paths[rel]
            if "secret" in volume:
                name = source["secretName"]
                secret = self.objs.get("Secret", name)
                if secret is None:
                    self.external.add((name, key))
                elif key not in _secret_data(secret):
                    self.fail(where, f"{var}={path}: Secret {name} has no key {key}")
            else:
                cm = self.objs.get("ConfigMap", source["name"])
                if cm is not None and key not in (cm.get("data") or {}):
                    self.fail(where, f"{var}={path}: ConfigMap {source['name']} has no key {key}")

    def check_ref_key(self, where: str, container: dict[str, Any], var: str) -> None:
        """A key read through secretKeyRef/configMapKeyRef is named as the setting."""
        for entry in container.get("env", []):
            if entry["name"] != var:
                continue
            ref = entry.get("valueFrom", {})
            for kind in ("secretKeyRef", "configMapKeyRef"):
                if kind in ref and ref[kind]["key"] != var:
                    self.fail(
                        where,
                        f"{var} reads key {ref[kind]['key']!r} of "
                        f"{ref[kind]['name']}: name the key {var}, as the setting",
                    )

    def effective(self, cls: type[Any], env: dict[str, EnvValue], fname: str) -> Any:
        """A setting's value as the process will see it (None if unknown offline)."""
        var = f"{env_prefix(cls)}{fname}".upper()
        if var in env:
            raw = env[var].value
            if raw is None:
                return None
            try:
                return TypeAdapter(cls.model_fields[fname].annotation).validate_python(raw)
            except ValidationError:
                return raw
        return cls.model_fields[fname].default

    def check_values(self, where: str, cls: type[Any], env: dict[str, EnvValue]) -> None:
        """Validates the values with the Settings class itself. Values not known
        offline (external Secrets) are left out, and so are their errors."""
        prefix = env_prefix(cls)
        known = env_names(cls)
        values = {
            known[k]: v.value
            for k, v in env.items()
            if k.startswith(prefix) and k in known and v.value is not None
        }
        unknown_fields = {known[k] for k, v in env.items() if k in known and v.value is None}
        try:
            cls.model_validate(values)
        except Exception as exc:
            errors = getattr(exc, "errors", None)
            if errors is None:
                self.fail(where, f"settings do not validate: {exc}")
                return
            for err in errors():
                loc = err.get("loc") or ()
                fname = str(loc[0]) if loc else ""
                if fname in unknown_fields:
                    continue
                var = f"{prefix}{fname}".upper() if fname else "settings"
                self.fail(where, f"{var}: {err['msg']} (got {err.get('input')!r})")

    def check_ports(
        self,
        where: str,
        container: dict[str, Any],
        cls: type[Any],
        env: dict[str, EnvValue],
        port: Any,
    ) -> None:
        prefix = env_prefix(cls)
        if not isinstance(port, int) or not 0 < port < 65536:
            self.fail(where, f"{prefix}PORT is {port!r}: a fixed port is needed")
            return
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        if ports.get("grpc") != port:
            self.fail(
                where, f"container port 'grpc' is {ports.get('grpc')}, but {prefix}PORT is {port}"
            )
        # The kubelet's gRPC probes speak plaintext only: a TLS port is probed on
        # the plaintext HEALTH_PORT, which then must exist.
        health = self.effective(cls, env, "health_port") if "health_port" in cls.model_fields else 0
        tls = (
            self.effective(cls, env, "tls_cert_file") if "tls_cert_file" in cls.model_fields else ""
        )
        if tls and not health:
            self.fail(
                where,
                f"{prefix}PORT serves TLS ({prefix}TLS_CERT_FILE) and the kubelet's gRPC "
                f"probes cannot: set {prefix}HEALTH_PORT and probe it",
            )
        probed, probed_var = (health, "HEALTH_PORT") if health else (port, "PORT")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container.get(probe)
            if spec is None:
                self.fail(where, f"no {probe}")
            elif "grpc" not in spec:
                self.fail(where, f"{probe} is not a native gRPC probe (grpc.health.v1)")
            elif spec["grpc"].get("port") != probed:
                self.fail(
                    where,
                    f"{probe} checks port {spec['grpc'].get('port')}, but "
                    f"{prefix}{probed_var} is {probed}",
                )
            elif spec["grpc"].get("service", "") != "":
                # Only the overall status ("") is set by every service at start.
                self.fail(
                    where,
                    f"{probe} asks for service {spec['grpc']['service']!r}; "
                    "use the overall status ''",
                )
        # Every other port setting (METRICS_PORT, INTERNAL_PORT...) is the container
        # port named after it ('metrics', 'internal'), or, when 0, no such port.
        for fname in cls.model_fields:
            if not fname.endswith("_port"):
                continue
            name = fname[: -len("_port")]
            value = self.effective(cls, env, fname)
            var = f"{prefix}{fname.upper()}"
            if value and ports.get(name) != value:
                self.fail(
                    where, f"container port {name!r} is {ports.get(name)}, but {var} is {value}"
                )
            if not value and name in ports:
                self.fail(where, f"container port {name!r} declared, but {var} is 0")
            self.check_advertised(where, cls, env, f"{name}_advertise_address", value)
        self.check_advertised(where, cls, env, "advertise_address", port)
        separate = SEPARATE_PORTS.get(svc_name(cls))
        if separate and separate in cls.model_fields and not self.effective(cls, env, separate):
            self.fail(
                where,
                f"{prefix}{separate.upper()} is 0: internal RPCs would be served on the "
                f"client port {port}, which is open to everyone",
            )

    def check_advertised(
        self, where: str, cls: type[Any], env: dict[str, EnvValue], fname: str, port: Any
    ) -> None:
        """An advertise address for a port this pod serves must be the pod's own IP
        and that port (pods listen on 0.0.0.0, so no default can be right)."""
        if fname not in cls.model_fields or not port:
            return
        var = f"{env_prefix(cls)}{fname.upper()}"
        given = env.get(var)
        expected = f"{POD_IP_PLACEHOLDER}:{port}"
        if given is None:
            if fname not in deploy_required(cls):  # else reported as required
                self.fail(where, f"{var} is not set: it must be $(POD_IP):{port}")
        elif given.value not in (None, expected):
            self.fail(
                where,
                f"{var} is {given.value!r}: it must be this pod's own address, "
                f"$(POD_IP):{port} (POD_IP from status.podIP)",
            )

    def check_shutdown(
        self,
        where: str,
        spec: dict[str, Any],
        container: dict[str, Any],
        cls: type[Any],
        env: dict[str, EnvValue],
    ) -> None:
        """Aligns Kubernetes' termination with the service's own shutdown:

        1. preStop (P s): the pod is already out of the Services' endpoints; the
           process still serves normally while that spreads to every node.
        2. SIGTERM: health NOT_SERVING, DRAIN_DELAY_S, shutdown hooks (GoAway),
           SHUTDOWN_GRACE_S for in-flight RPCs, then close; its watchdog exits at
           SHUTDOWN_DEADLINE_S at the latest. So DEADLINE >= DRAIN + GRACE + hooks.
        3. terminationGracePeriodSeconds >= P + DEADLINE + margin: the kubelet's
           SIGKILL never cuts the service's own shutdown short.
        4. liveness fails only after more than DEADLINE of NOT_SERVING, so a
           draining process is not killed by its liveness probe.
        """
        prefix = env_prefix(cls)
        drain = self.effective(cls, env, "drain_delay_s")
        grace = self.effective(cls, env, "shutdown_grace_s")
        deadline = self.effective(cls, env, "shutdown_deadline_s")
        if None in (drain, grace, deadline):
            self.fail(where, "shutdown settings are not known offline")
            return
        pre = container.get("lifecycle", {}).get("preStop")
        pre_s: float | None = None
        if pre is None:
            self.fail(where, "no preStop hook")
        elif "sleep" in pre:
            pre_s = float(pre["sleep"]["seconds"])
        else:
            cmd = pre.get("exec", {}).get("command", [])
            if len(cmd) == 2 and cmd[0] == "sleep":
                pre_s = float(cmd[1])
            else:
                self.fail(where, f"preStop must be a sleep (got {pre})")
        if deadline < drain + grace + HOOKS_MARGIN_S:
            self.fail(
                where,
                f"{prefix}SHUTDOWN_DEADLINE_S {deadline} < DRAIN_DELAY_S {drain} + "
                f"SHUTDOWN_GRACE_S {grace} + {HOOKS_MARGIN_S} s for shutdown hooks",
            )
        tgps = spec.get("terminationGracePeriodSeconds", 30)
        if pre_s is not None and tgps < pre_s + deadline + KILL_MARGIN_S:
            self.fail(
                where,
                f"terminationGracePeriodSeconds {tgps} < preStop {pre_s} + "
                f"{prefix}SHUTDOWN_DEADLINE_S {deadline} + {KILL_MARGIN_S}: the kubelet "
                "would kill the service in the middle of its shutdown",
            )
        live = container.get("livenessProbe")
        if live:
            window = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
            if window <= deadline:
                self.fail(
                    where,
                    f"livenessProbe fails after {window} s of NOT_SERVING, not more "
                    f"than {prefix}SHUTDOWN_DEADLINE_S {deadline}: a draining pod would "
                    "be restarted",
                )

    # -- Services: targetPorts reach declared container ports --------------------

    def selected(self, selector: dict[str, str]) -> list[dict[str, Any]]:
        return [
            w
            for w in self.objs.workloads()
            if selector and all(pod_labels(w).get(k) == v for k, v in selector.items())
        ]

    def check_services_ports(self) -> None:
        for svc_obj in self.objs.of_kind("Service"):
            where = _name(svc_obj)
            selector = svc_obj["spec"].get("selector", {})
            pods = self.selected(selector)
            if not pods:
                self.fail(where, f"selector {selector} matches no pods of the overlay")
                continue
            for sport in svc_obj["spec"].get("ports", []):
                target = sport.get("targetPort", sport["port"])
                for pod in pods:
                    spec = pod_spec(pod) or {}
                    declared = {
                        (p.get("name"), p["containerPort"])
                        for c in spec.get("containers", [])
                        for p in c.get("ports", [])
                    }
                    if isinstance(target, str):
                        ok = any(name == target for name, _ in declared)
                    else:
                        ok = any(num == target for _, num in declared)
                    if not ok:
                        self.fail(
                            where,
                            f"port {sport.get('name', sport['port'])}: targetPort "
                            f"{target} is not a container port of {_name(pod)}",
                        )
                    run = self.services.get(pod["metadata"]["name"])
                    if run and sport.get("name") == "grpc" and target not in (run[2], "grpc"):
                        self.fail(where, f"targetPort {target} is not {run[0]}'s PORT {run[2]}")

    def route(self, host: str, port: int) -> list[dict[str, Any]] | None:
        """The pods a host:port of this overlay reaches; None if host is not ours."""
        name = host.split(".")[0]
        namespaces = {o["metadata"].get("namespace") for o in self.objs.all}
        parts = host.split(".")
        if len(parts) > 1 and parts[1] not in namespaces and parts[1] != "svc":
            return None  # another namespace (e.g. a NATS cluster of its own)
        svc_obj = self.objs.get("Service", name)
        if svc_obj is None:
            return None
        sport = next((p for p in svc_obj["spec"].get("ports", []) if p["port"] == port), None)
        if sport is None:
            return []
        return self.selected(svc_obj["spec"].get("selector", {}))

    def check_addresses(self) -> None:
        """`*_ADDRESS` settings (host:port of one of our services) and URLs
        (`*_URL`) that name a Service of the overlay must reach the right pods."""
        for wname, (svc, env, _) in self.services.items():
            cls = self.classes[svc]
            prefix = env_prefix(cls)
            for var, value in env.items():
                if value.value is None or not var.startswith(prefix):
                    continue
                setting = var[len(prefix) :]
                if setting == "ADVERTISE_ADDRESS":
                    continue
                target: tuple[str, int] | None = None
                if setting.endswith("_ADDRESS"):
                    host, _, port = value.value.rpartition(":")
                    if not port.isdigit():
                        self.fail(wname, f"{var}={value.value!r} is not host:port")
                        continue
                    target = (host, int(port))
                elif setting.endswith("_URL"):
                    for url in value.value.split(","):
                        parts = urlsplit(url.strip())
                        if parts.hostname and parts.port:
                            self.check_edge(wname, var, parts.hostname, parts.port, None)
                    continue
                if target is None:
                    continue
                callee = setting[: -len("_ADDRESS")].lower()
                self.check_edge(wname, var, target[0], target[1], callee)
        for caller, callee, port_setting in CALLBACKS:
            src = self.workload_running(caller)
            dst = self.workload_running(callee)
            if src and dst:
                _, dst_env, dst_port = self.services[dst["metadata"]["name"]]
                dst_cls = self.classes[callee]
                if port_setting in dst_cls.model_fields and port_setting != "port":
                    dst_port = self.effective(dst_cls, dst_env, port_setting) or dst_port
                if isinstance(dst_port, int) and not self.allowed(src, dst, dst_port):
                    self.fail(
                        _name(dst),
                        f"no NetworkPolicy lets {caller} reach {callee} on port {dst_port}",
                    )

    @staticmethod
    def gateway_ws_port(gateway: dict[str, Any] | None) -> int | None:
        """The gateway's WebSocket client port: its container port `ws` (tied to
        IM_GATEWAY_WS_PORT by check_ports), or None."""
        if gateway is None:
            return None
        for container in gateway["spec"]["template"]["spec"]["containers"]:
            for port in container.get("ports", []):
                if port.get("name") == "ws":
                    return int(port["containerPort"])
        return None

    def workload_running(self, svc: str) -> dict[str, Any] | None:
        for wname, (name, _, _) in self.services.items():
            if name == svc:
                for w in self.objs.workloads():
                    if w["metadata"]["name"] == wname:
                        return w
        return None

    def check_edge(self, wname: str, var: str, host: str, port: int, callee: str | None) -> None:
        pods = self.route(host, port)
        if pods is None:
            return  # outside this overlay: cannot check offline
        if not pods:
            self.fail(wname, f"{var}: Service {host.split('.')[0]} has no port {port}")
            return
        if callee in SERVICES:
            runs = {self.services.get(p["metadata"]["name"], ("?",))[0] for p in pods}
            if runs != {callee}:
                self.fail(wname, f"{var}: {host}:{port} reaches {sorted(runs)}, not {callee}")
                return
            cport = self.services[pods[0]["metadata"]["name"]][2]
            svc_obj = self.objs.get("Service", host.split(".")[0])
            assert svc_obj is not None
            sport = next(p for p in svc_obj["spec"]["ports"] if p["port"] == port)
            if sport.get("targetPort", port) not in (cport, "grpc"):
                self.fail(
                    wname,
                    f"{var}: port {port} goes to {sport.get('targetPort')}, "
                    f"not {callee}'s PORT {cport}",
                )
        src = next(w for w in self.objs.workloads() if w["metadata"]["name"] == wname)
        for pod in pods:
            target_port = self._target_port(host.split(".")[0], port, pod)
            if target_port is not None and not self.allowed(src, pod, target_port):
                self.fail(
                    wname,
                    f"{var}: no NetworkPolicy lets {wname} reach "
                    f"{_name(pod)} on port {target_port}",
                )

    def _target_port(self, service: str, port: int, pod: dict[str, Any]) -> int | None:
        svc_obj = self.objs.get("Service", service)
        assert svc_obj is not None
        sport = next(p for p in svc_obj["spec"]["ports"] if p["port"] == port)
        target = sport.get("targetPort", port)
        if isinstance(target, int):
            return target
        for c in (pod_spec(pod) or {}).get("containers", []):
            for p in c.get("ports", []):
                if p.get("name") == target:
                    return int(p["containerPort"])
        return None

    # -- NetworkPolicies ----------------------------------------------------------

    @staticmethod
    def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        if set(selector) - {"matchLabels"}:
            return False  # matchExpressions: not used here; treat as no match
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    @staticmethod
    def _open_peer(peer: dict[str, Any]) -> bool:
        """A peer that admits sources outside the namespace's own pods at large."""
        if "ipBlock" in peer:
            return True
        ns = peer.get("namespaceSelector")
        return ns is not None and not ns.get("matchLabels") and not ns.get("matchExpressions")

    def _port_ok(self, rule: dict[str, Any], pod: dict[str, Any], port: int) -> bool:
        ports = rule.get("ports")
        if not ports:
            return True
        for p in ports:
            want = p.get("port")
            if want is None or want == port:
                return True
            if isinstance(want, str):
                for c in (pod_spec(pod) or {}).get("containers", []):
                    for cp in c.get("ports", []):
                        if cp.get("name") == want and cp["containerPort"] == port:
                            return True
        return False

    def allowed(self, src: dict[str, Any], dst: dict[str, Any], port: int) -> bool:
        labels_src, labels_dst = pod_labels(src), pod_labels(dst)
        policies = [
            p
            for p in self.objs.of_kind("NetworkPolicy")
            if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
            and self._matches(p["spec"].get("podSelector", {}), labels_dst)
        ]
        if not policies:
            return True
        for policy in policies:
            for rule in policy["spec"].get("ingress", []):
                if not self._port_ok(rule, dst, port):
                    continue
                peers = rule.get("from")
                if not peers:
                    return True
                for peer in peers:
                    if self._open_peer(peer):
                        return True
                    if "namespaceSelector" in peer:
                        continue  # another namespace's pods
                    if self._matches(peer.get("podSelector", {}), labels_src):
                        return True
        return False

    def check_network_policies(self) -> None:
        policies = list(self.objs.of_kind("NetworkPolicy"))
        deny = [
            p
            for p in policies
            if p["spec"].get("podSelector") == {}
            and "Ingress" in p["spec"].get("policyTypes", [])
            and not p["spec"].get("ingress")
        ]
        if not deny:
            self.fail("NetworkPolicy", "no default-deny ingress policy (podSelector {}, no rules)")
        gateway = self.workload_running("gateway")
        gw_port = self.services[gateway["metadata"]["name"]][2] if gateway else None
        for policy in policies:
            where = _name(policy)
            for rule in policy["spec"].get("ingress", []):
                peers = rule.get("from")
                if peers and not any(self._open_peer(p) for p in peers):
                    continue
                # Open to everyone: only the gateway's client port may be.
                selected = [
                    w
                    for w in self.objs.workloads()
                    if self._matches(policy["spec"].get("podSelector", {}), pod_labels(w))
                ]
                if any(w is not gateway for w in selected) or not selected:
                    names = sorted(_name(w) for w in selected) or ["every pod"]
                    self.fail(where, f"opens {names} to every source: only the gateway may be")
                ports = [p.get("port") for p in rule.get("ports", [])]
                client_ports = (gw_port, "grpc", self.gateway_ws_port(gateway), "ws")
                if not ports or any(p is None or p not in client_ports for p in ports):
                    self.fail(
                        where,
                        f"opens ports {ports or 'all'} to every source: only the "
                        f"gateway's client ports {gw_port} (gRPC) and its WS_PORT",
                    )

    # -- scaling, disruption budgets, images ---------------------------------------

    def check_scaling(self) -> None:
        hpas = {
            h["spec"]["scaleTargetRef"]["name"]: h
            for h in self.objs.of_kind("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        }
        for target, hpa in hpas.items():
            dep = self.objs.get("Deployment", target)
            if dep is None:
                self.fail(_name(hpa), f"scales Deployment {target}, which does not exist")
            elif "replicas" in dep["spec"]:
                self.fail(
                    _name(dep),
                    "sets replicas although an HPA owns them: every apply "
                    "would reset the autoscaler's choice",
                )
        for svc in AUTOSCALED:
            w = self.workload_running(svc)
            if w is not None and (w["kind"] != "Deployment" or w["metadata"]["name"] not in hpas):
                self.fail(_name(w), f"{svc} needs a HorizontalPodAutoscaler")
        seq = self.workload_running("seqsvc")
        if seq is not None and (seq["kind"] != "StatefulSet" or seq["spec"].get("replicas") != 1):
            self.fail(
                _name(seq),
                "seqsvc must be a StatefulSet with replicas: 1 until sections "
                "are leased per replica (see the comment in base/seqsvc.yaml)",
            )
        pdbs = list(self.objs.of_kind("PodDisruptionBudget"))
        for w in self.objs.of_kind("Deployment", "StatefulSet"):
            many = w["metadata"]["name"] in hpas or w["spec"].get("replicas", 1) > 1
            covered = any(self._matches(p["spec"].get("selector", {}), pod_labels(w)) for p in pdbs)
            if many and not covered:
                self.fail(_name(w), "runs several replicas but no PodDisruptionBudget covers it")
        gateway = self.workload_running("gateway")
        if gateway is not None:
            headless = [
                s
                for s in self.objs.of_kind("Service")
                if s["spec"].get("clusterIP") == "None"
                and self._matches(
                    {"matchLabels": s["spec"].get("selector", {})}, pod_labels(gateway)
                )
            ]
            if not headless:
                self.fail(_name(gateway), "no headless Service selects the gateway pods")

    def check_images(self) -> None:
        images = set()
        for w in self.objs.workloads():
            spec = pod_spec(w) or {}
            for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                if service_of(c):
                    images.add(c["image"])
        if len(images) > 1:
            self.fail(
                "images",
                f"the services run different images {sorted(images)}; one image serves them all",
            )
        for image in images:
            tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
            if (
                self.overlay == "prod"
                and (not tag or tag in ("latest", "dev"))
                and "@" not in image
            ):
                self.fail("images", f"prod runs {image!r}: pin a release tag or digest")

    # -- JetStream ----------------------------------------------------------------

    def check_jetstream(self) -> None:
        for svc in ("logic", "pusher"):
            cls = self.classes.get(svc)
            if cls is None or "nats_replicas" not in cls.model_fields:
                continue
            w = self.workload_running(svc)
            if w is None:
                continue
            value = self.effective(cls, self.services[w["metadata"]["name"]][1], "nats_replicas")
            if value != STREAM_REPLICAS:
                self.fail(
                    _name(w),
                    f"{env_prefix(cls)}NATS_REPLICAS is {value}; the stream "
                    f"must keep {STREAM_REPLICAS} replicas",
                )
        for sts in self.objs.of_kind("StatefulSet"):
            spec = sts["spec"]["template"]["spec"]
            nats = [c for c in spec["containers"] if c["image"].split(":")[0].endswith("nats")]
            if not nats:
                continue
            self.check_nats(sts, nats[0])

    def check_nats(self, sts: dict[str, Any], container: dict[str, Any]) -> None:
        where = _name(sts)
        replicas = sts["spec"].get("replicas", 1)
        if replicas != STREAM_REPLICAS:
            self.fail(
                where,
                f"{replicas} NATS servers; a stream with {STREAM_REPLICAS} "
                f"replicas needs {STREAM_REPLICAS}",
            )
        spec = sts["spec"]["template"]["spec"]
        conf_text = None
        for volume in spec.get("volumes", []):
            cm = volume.get("configMap")
            if cm and (obj := self.objs.get("ConfigMap", cm["name"])):
                for key, text in (obj.get("data") or {}).items():
                    if key.endswith(".conf"):
                        conf_text = text
        if conf_text is None:
            self.fail(where, "no nats .conf in a ConfigMap volume")
            return
        if not re.search(r"^\s*sync_interval\s*:\s*always\s*$", conf_text, re.M):
            self.fail(where, "jetstream sync_interval is not `always`")
        routes = re.findall(r"nats://([A-Za-z0-9.-]+):(\d+)", conf_text)
        expect = {
            f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}" for i in range(replicas)
        }
        if {host for host, _ in routes} != expect:
            self.fail(
                where,
                f"cluster routes {sorted(h for h, _ in routes)} are not the "
                f"{replicas} pods {sorted(expect)}",
            )
        governing = self.objs.get("Service", sts["spec"]["serviceName"])
        if governing is None or not governing["spec"].get("publishNotReadyAddresses"):
            self.fail(
                where,
                "the governing Service must publish not-ready addresses, or the "
                "servers cannot find each other to form a cluster",
            )
        binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
        if not Path(binary).exists():
            self.fail(where, "nats-server not found: cannot test the config")
            return
        with tempfile.TemporaryDirectory() as tmp:
            conf = Path(tmp) / "nats.conf"
            conf.write_text(conf_text)
            for i in range(replicas):
                env = {
                    "PATH": os.environ.get("PATH", ""),
                    "POD_NAME": f"{sts['metadata']['name']}-{i}",
                }
                result = subprocess.run(
                    [binary, "-t", "-c", str(conf)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                if result.returncode != 0:
                    self.fail(
                        where,
                        f"nats-server -t rejects the config: "
                        f"{(result.stderr or result.stdout).strip()}",
                    )
                    break

    # -- Secrets hold settings only ----------------------------------------------

    def check_unread_config(self) -> None:
        """Every ConfigMap and Secret of the overlay is read by some pod."""
        read: set[tuple[str, str]] = set()
        for w in self.objs.workloads():
            spec = pod_spec(w) or {}
            for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                for src in c.get("envFrom", []):
                    if "configMapRef" in src:
                        read.add(("ConfigMap", src["configMapRef"]["name"]))
                    if "secretRef" in src:
                        read.add(("Secret", src["secretRef"]["name"]))
                for var in c.get("env", []):
                    ref = var.get("valueFrom", {})
                    if "configMapKeyRef" in ref:
                        read.add(("ConfigMap", ref["configMapKeyRef"]["name"]))
                    if "secretKeyRef" in ref:
                        read.add(("Secret", ref["secretKeyRef"]["name"]))
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    read.add(("ConfigMap", volume["configMap"]["name"]))
                if "secret" in volume:
                    read.add(("Secret", volume["secret"]["secretName"]))
        for kind in ("ConfigMap", "Secret"):
            for obj in self.objs.of_kind(kind):
                if (kind, obj["metadata"]["name"]) not in read:
                    self.fail(_name(obj), "nothing reads it")

    def check_unused_secret_keys(self) -> None:
        """Every key of a Secret a service reads is a setting it reads."""
        used: dict[str, set[str]] = {}
        for w in self.objs.workloads():
            spec = pod_spec(w) or {}
            for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                if not service_of(c):
                    continue
                for var in c.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        used.setdefault(ref["name"], set()).add(ref["key"])
                for src in c.get("envFrom", []):
                    if "secretRef" in src:
                        used.setdefault(src["secretRef"]["name"], set()).update(["*"])
        for name, keys in used.items():
            secret = self.objs.get("Secret", name)
            if secret is None or "*" in keys:
                continue
            extra = set(_secret_data(secret)) - keys
            if extra:
                self.fail(_name(secret), f"keys {sorted(extra)} are read by no service")


@functools.cache
def _validator(kind: str, api_version: str) -> jsonschema.Validator:
    """A strict validator for one kind, from the schemas kubernetes-validate ships
    (what its `validate()` does, with the schema files read once, not per object)."""
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    version = kubernetes_validate.utils.major_minor(KUBERNETES_VERSION)
    directory = f"kubernetes-json-schema/v{version}.0-local-strict"
    try:
        schema = kubernetes_validate.utils.schema_contents(
            f"{directory}/{kind.lower()}-{group}.json", version
        )
    except FileNotFoundError:
        raise kubernetes_validate.SchemaNotFoundError(kind, version, api_version) from None
    definitions = kubernetes_validate.utils.schema_contents(
        f"{directory}/_definitions.json", version
    )
    registry: Registry[Any] = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(definitions) @ registry
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate_object(obj: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError (or SchemaNotFoundError) unless `obj` is
    valid for KUBERNETES_VERSION, unknown fields included."""
    _validator(obj["kind"], obj["apiVersion"]).validate(obj)


_COMMANDS: dict[str, set[str] | str] = {}


def service_commands(svc: str) -> set[str] | str:
    """The subcommands `python -m <svc>` accepts, read from its own --help; or why
    that could not be run."""
    if svc not in _COMMANDS:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(str(ROOT / p) for p in ("services", "libs", "gen"))
        result = subprocess.run(
            [sys.executable, "-m", svc, "--help"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        match = re.search(r"\{([a-z_,-]+)\}", result.stdout)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            _COMMANDS[svc] = f"`python -m {svc} --help` failed: {lines[-1] if lines else '?'}"
        else:
            _COMMANDS[svc] = set(match.group(1).split(",")) if match else {"serve"}
    return _COMMANDS[svc]


def dockerfile_uid(path: Path) -> int | None:
    """The numeric USER of the Dockerfile's final stage."""
    if not path.is_file():
        return None
    user = None
    for line in path.read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM":
            user = None
        elif len(words) >= 2 and words[0].upper() == "USER":
            user = words[1].split(":")[0]
    return int(user) if user and user.isdigit() else None


def check_tree(
    k8s_dir: Path = HERE / "k8s",
    overlays: Iterable[str] | None = None,
    dockerfile: Path = HERE / "Dockerfile",
) -> Report:
    """Renders and checks the overlays of `k8s_dir` (default: all of them)."""
    report = Report()
    classes, report.missing = load_settings_classes()
    uid = dockerfile_uid(dockerfile)
    if dockerfile.is_file() and uid is None:
        report.problems.append(Problem("image", str(dockerfile), "no numeric non-root USER"))
    if uid == 0:
        report.problems.append(Problem("image", str(dockerfile), "USER is root"))
    for svc, reason in report.missing.items():
        report.problems.append(Problem("settings", svc, f"missing: {reason}"))
    for overlay in overlays or overlays_in(k8s_dir):
        try:
            objs = render(k8s_dir / overlay)
        except (RenderError, OSError, yaml.YAMLError) as exc:
            report.problems.append(Problem(overlay, "render", str(exc)))
            continue
        check = OverlayCheck(overlay, objs, classes, uid)
        check.run()
        report.problems.extend(check.problems)
        report.external_secrets[overlay] = check.external
        report.objects[overlay] = len(objs)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--k8s-dir", type=Path, default=HERE / "k8s")
    parser.add_argument("--overlay", action="append", help="check only this overlay")
    parser.add_argument("--render", metavar="OVERLAY", help="print the rendered YAML and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(yaml.safe_dump_all(render(args.k8s_dir / args.render), sort_keys=False), end="")
        return 0
    report = check_tree(args.k8s_dir, args.overlay)
    for overlay, count in report.objects.items():
        print(
            f"k8s-check: {overlay}: {count} objects rendered and validated "
            f"(Kubernetes {KUBERNETES_VERSION})"
        )
        for name, key in sorted(report.external_secrets.get(overlay, ())):
            print(f"k8s-check: {overlay}: expects Secret {name} with key {key} in the cluster")
    for problem in report.problems:
        print(f"k8s-check: FAIL {problem}", file=sys.stderr)
    if report.problems:
        print(f"k8s-check: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print("k8s-check: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
