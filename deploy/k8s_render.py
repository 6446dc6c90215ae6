"""Renders a kustomization offline: the subset of kustomize our manifests use.

kustomize is not on every machine that runs `make k8s-check`, so this module
builds `deploy/k8s/<overlay>` the way `kubectl kustomize` does, for exactly these
kustomization fields:

- `resources`: YAML files (one or more documents) and directories holding a
  kustomization.yaml (rendered recursively, each with its own fields);
- `namespace`: set on every namespaced object;
- `configMapGenerator` / `secretGenerator`: `name`, `literals` (KEY=value),
  `behavior` (create, merge, replace), `type` (Secret), `options.
  disableNameSuffixHash`; plus `generatorOptions.disableNameSuffixHash`. Names get
  kustomize's content-hash suffix, and references from pod specs follow them;
- `patches`: `path` or inline `patch`; a strategic merge patch (an object) is
  matched to its target by kind and name; a JSON 6902 patch (a list of
  add/replace/remove operations) needs `target` with kind and name;
- `images`: `name`, `newName`, `newTag`, `digest`, on containers and init
  containers.

Anything else in a kustomization is an error, not silently ignored: keep the
manifests inside this subset. `tests/deploy/test_render.py` compares the output
with `kubectl kustomize` where kubectl is installed.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

# The C parser when PyYAML has it (several times faster), same safe semantics.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SUPPORTED_FIELDS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "configMapGenerator",
        "secretGenerator",
        "generatorOptions",
        "patches",
        "images",
    }
)

# Kinds without a namespace among those the manifests may use.
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "PersistentVolume",
        "StorageClass",
        "PriorityClass",
        "CustomResourceDefinition",
    }
)

# Strategic-merge keys of the lists we may patch (patchMergeKey in the
# Kubernetes API types). Any other list is replaced whole, as the API does for
# atomic lists.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}

# `ports` merges on containerPort in a container and on port in a Service.
PORTS_KEYS = ("containerPort", "port")

# The order kubectl kustomize prints kinds in ("legacy" order); others follow.
KIND_ORDER = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]

# Annotation-free marker of a generated object's original name; dropped on output.
_GENERATED = "__generated__"


class RenderError(Exception):
    """The kustomization uses something outside the supported subset, or is wrong."""


def load_yaml_documents(path: Path) -> list[Obj]:
    try:
        docs = list(yaml.load_all(path.read_text(), Loader=_Loader))
    except yaml.YAMLError as exc:
        raise RenderError(f"{path}: invalid YAML: {exc}") from None
    objs = []
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
        objs.append(doc)
    return objs


def render(directory: Path) -> list[Obj]:
    """Renders the kustomization in `directory`, like `kubectl kustomize directory`.

    Returns the objects in kustomize's output order. Raises RenderError.
    """
    objs = _build(Path(directory))
    _apply_name_hashes(objs)
    for obj in objs:
        obj.pop(_GENERATED, None)
    return sorted(objs, key=_sort_key)


def _sort_key(obj: Obj) -> tuple[int, str, str, str]:
    kind = obj["kind"]
    rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    meta = obj["metadata"]
    return (rank, kind, meta.get("namespace", ""), meta["name"])


def _build(directory: Path) -> list[Obj]:
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    spec = yaml.load(kfile.read_text(), Loader=_Loader) or {}
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{kfile}: unsupported field(s) {sorted(unknown)}")

    objs: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objs.extend(_build(path))
        elif path.is_file():
            objs.extend(load_yaml_documents(path))
        else:
            raise RenderError(f"{kfile}: resource {entry!r} not found")
    _check_unique(objs, kfile)

    options = spec.get("generatorOptions", {}) or {}
    if set(options) - {"disableNameSuffixHash"}:
        raise RenderError(f"{kfile}: unsupported generatorOptions {sorted(options)}")
    for gen in spec.get("configMapGenerator", []):
        _generate(objs, gen, "ConfigMap", options, kfile)
    for gen in spec.get("secretGenerator", []):
        _generate(objs, gen, "Secret", options, kfile)

    for patch in spec.get("patches", []):
        _apply_patch(objs, patch, directory, kfile)

    namespace = spec.get("namespace")
    if namespace:
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace

    for image in spec.get("images", []):
        _apply_image(objs, image, kfile)
    return objs


def _check_unique(objs: list[Obj], where: Path) -> None:
    seen = set()
    for obj in objs:
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in seen:
            raise RenderError(f"{where}: {key[0]}/{key[2]} is defined twice")
        seen.add(key)


# -- generators ---------------------------------------------------------------


def _literals(gen: Obj, where: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for literal in gen.get("literals", []):
        if not isinstance(literal, str) or "=" not in literal:
            raise RenderError(f"{where}: literal {literal!r} is not KEY=value")
        key, value = literal.split("=", 1)
        if key in data:
            raise RenderError(f"{where}: key {key} given twice in {gen['name']}")
        data[key] = value
    return data


def _generate(objs: list[Obj], gen: Obj, kind: str, options: Obj, where: Path) -> None:
    unknown = set(gen) - {"name", "literals", "behavior", "type", "options"}
    if unknown:
        raise RenderError(f"{where}: unsupported generator field(s) {sorted(unknown)}")
    gen_options = gen.get("options", {}) or {}
    if set(gen_options) - {"disableNameSuffixHash"}:
        raise RenderError(f"{where}: unsupported generator options {sorted(gen_options)}")
    name = gen["name"]
    literals = _literals(gen, where)
    behavior = gen.get("behavior", "create")
    hashed = not gen_options.get(
        "disableNameSuffixHash", options.get("disableNameSuffixHash", False)
    )
    existing = next(
        (o for o in objs if o["kind"] == kind and o.get(_GENERATED) == name),
        None,
    )
    if behavior == "create":
        if existing is not None:
            raise RenderError(f"{where}: {kind} {name} already generated; use behavior: merge")
        if kind == "ConfigMap":
            obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
            obj["data"] = dict(literals)
        else:
            obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
            obj["data"] = {k: _b64(v) for k, v in literals.items()}
            obj["type"] = gen.get("type", "Opaque")
        obj[_GENERATED] = name
        obj["__hashed__"] = hashed
        objs.append(obj)
        return
    if behavior not in ("merge", "replace"):
        raise RenderError(f"{where}: unknown generator behavior {behavior!r}")
    if existing is None:
        raise RenderError(f"{where}: behavior {behavior} but no {kind} {name} to {behavior}")
    values = literals if kind == "ConfigMap" else {k: _b64(v) for k, v in literals.items()}
    if behavior == "replace":
        existing["data"] = dict(values)
    else:
        existing.setdefault("data", {}).update(values)
    if "options" in gen:
        existing["__hashed__"] = hashed


def _b64(value: str) -> str:
    """Base64 as kustomize writes Secret data: from 70 characters on, in lines of
    70, each ended by a newline (the API server's decoder skips newlines)."""
    encoded = base64.b64encode(value.encode()).decode()
    if len(encoded) < 70:
        return encoded
    return "".join(encoded[i : i + 70] + "\n" for i in range(0, len(encoded), 70))


def _go_json(value: Any) -> str:
    """json.Marshal as Go does it: sorted keys, no spaces, HTML characters escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_HASH_LETTERS = str.maketrans("013ae", "ghkmt")


def content_hash(obj: Obj) -> str:
    """kustomize's name suffix for a generated ConfigMap or Secret."""
    # kustomize's hasher looks the name up with a path its lookup does not split,
    # so the name it hashes is always "": only kind, data (and a Secret's type) count.
    if obj["kind"] == "ConfigMap":
        encoded: Obj = {"kind": "ConfigMap", "name": "", "data": obj.get("data", "")}
    else:
        encoded = {"kind": "Secret", "name": "", "type": obj.get("type", "")}
        encoded["data"] = obj.get("data", "")
    digest = hashlib.sha256(_go_json(encoded).encode()).hexdigest()[:10]
    return digest.translate(_HASH_LETTERS)


def _apply_name_hashes(objs: list[Obj]) -> None:
    renames: dict[tuple[str, str | None, str], str] = {}
    for obj in objs:
        hashed = obj.pop("__hashed__", False)
        if _GENERATED not in obj or not hashed:
            continue
        meta = obj["metadata"]
        new = f"{meta['name']}-{content_hash(obj)}"
        renames[(obj["kind"], meta.get("namespace"), meta["name"])] = new
        meta["name"] = new
    if not renames:
        return
    for obj in objs:
        namespace = obj["metadata"].get("namespace")
        for spec in _pod_specs(obj):
            _rename_refs(spec, namespace, renames)


def _pod_specs(obj: Obj) -> Iterable[Obj]:
    kind = obj["kind"]
    if kind == "Pod":
        yield obj.get("spec", {})
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield obj.get("spec", {}).get("template", {}).get("spec", {})
    elif kind == "CronJob":
        job = obj.get("spec", {}).get("jobTemplate", {}).get("spec", {})
        yield job.get("template", {}).get("spec", {})


def _rename_refs(
    spec: Obj, namespace: str | None, renames: dict[tuple[str, str | None, str], str]
) -> None:
    def fix(holder: Obj | None, field: str, kind: str) -> None:
        if holder and field in holder:
            holder[field] = renames.get((kind, namespace, holder[field]), holder[field])

    for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
        for source in container.get("envFrom", []):
            fix(source.get("configMapRef"), "name", "ConfigMap")
            fix(source.get("secretRef"), "name", "Secret")
        for var in container.get("env", []):
            ref = var.get("valueFrom", {})
            fix(ref.get("configMapKeyRef"), "name", "ConfigMap")
            fix(ref.get("secretKeyRef"), "name", "Secret")
    for volume in spec.get("volumes", []):
        fix(volume.get("configMap"), "name", "ConfigMap")
        fix(volume.get("secret"), "secretName", "Secret")
        for source in volume.get("projected", {}).get("sources", []):
            fix(source.get("configMap"), "name", "ConfigMap")
            fix(source.get("secret"), "name", "Secret")


# -- patches ------------------------------------------------------------------


def _apply_patch(objs: list[Obj], entry: Obj, directory: Path, where: Path) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise RenderError(f"{where}: unsupported patch field(s) {sorted(unknown)}")
    if "path" in entry:
        text = (directory / entry["path"]).read_text()
    elif "patch" in entry:
        text = entry["patch"]
    else:
        raise RenderError(f"{where}: a patch needs path or patch")
    docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    target = entry.get("target")
    if len(docs) > 1:
        # Several strategic merge patches in one file.
        for doc in docs:
            _apply_patch(objs, {"patch": yaml.safe_dump(doc)}, directory, where)
        return
    body = docs[0] if docs else None
    if isinstance(body, list):
        if not target or set(target) - {"kind", "name"} or not {"kind", "name"} <= set(target):
            raise RenderError(f"{where}: a JSON 6902 patch needs target with kind and name only")
        obj = _find(objs, target["kind"], target["name"], where)
        for op in body:
            _json6902(obj, op, where)
        return
    if not isinstance(body, dict) or "kind" not in body or "metadata" not in body:
        raise RenderError(f"{where}: a strategic merge patch must be an object with kind/metadata")
    if target:
        raise RenderError(f"{where}: target on a strategic merge patch is not supported")
    obj = _find(objs, body["kind"], body["metadata"]["name"], where)
    merged = strategic_merge(obj, body)
    obj.clear()
    obj.update(merged)


def _find(objs: list[Obj], kind: str, name: str, where: Path) -> Obj:
    matches = [
        o
        for o in objs
        if o["kind"] == kind and (o.get(_GENERATED) or o["metadata"]["name"]) == name
    ]
    if len(matches) != 1:
        raise RenderError(f"{where}: patch target {kind}/{name} matches {len(matches)} objects")
    return matches[0]


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of `patch` into `base` (both plain data); returns a new value.

    Maps merge key by key (a null value deletes the key); lists named in
    MERGE_KEYS (and `ports`) merge element by element on their key, the result
    holding the patch's elements in the patch's order followed by the elements
    only in `base`; every other list, and every scalar, is replaced.
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise RenderError(f"patch directive {key} is not supported")
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = _merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        by_key = {item.get(key): item for item in base}
        patched_keys = set()
        out_list = []
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise RenderError(f"list {field}: every element needs {key}")
            patched_keys.add(item[key])
            old = by_key.get(item[key])
            out_list.append(copy.deepcopy(item) if old is None else strategic_merge(old, item))
        out_list.extend(copy.deepcopy(i) for i in base if i.get(key) not in patched_keys)
        return out_list
    return copy.deepcopy(patch)


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field in MERGE_KEYS:
        return MERGE_KEYS[field]
    if field == "ports":
        for key in PORTS_KEYS:
            if all(isinstance(i, dict) and key in i for i in items):
                return key
    return None


def _pointer(path: str, where: Path) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"{where}: JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: Obj, op: Obj, where: Path) -> None:
    kind = op.get("op")
    parts = _pointer(op.get("path", ""), where)
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if kind in ("add", "replace"):
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
            elif kind == "add":
                parent.insert(int(last), value)
            else:
                parent[int(last)] = value
        else:
            if kind == "replace" and last not in parent:
                raise RenderError(f"{where}: replace of missing {op['path']}")
            parent[last] = value
    elif kind == "remove":
        if isinstance(parent, list):
            del parent[int(last)]
        else:
            del parent[last]
    else:
        raise RenderError(f"{where}: JSON 6902 op {kind!r} is not supported")


# -- images -------------------------------------------------------------------


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; tag and digest may be ''."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _apply_image(objs: list[Obj], image: Obj, where: Path) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise RenderError(f"{where}: unsupported image field(s) {sorted(unknown)}")
    for obj in objs:
        for spec in _pod_specs(obj):
            for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
                name, tag, digest = split_image(container.get("image", ""))
                if name != image["name"]:
                    continue
                new = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{new}@{image['digest']}"
                elif "newTag" in image:
                    container["image"] = f"{new}:{image['newTag']}"
                else:
                    suffix = f":{tag}" if tag else ""
                    suffix += f"@{digest}" if digest else ""
                    container["image"] = new + suffix
