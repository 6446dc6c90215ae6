"""Build hook of the seqsvc-client distribution (see pyproject.toml).

The client is not copied by hand: at every build this hook takes
`services/seqsvc/client.py` and `services/seqsvc/cli.py` as they are, follows
their imports of other `seqsvc` modules (e.g. `seqsvc.keys`, and whatever the
client imports later, such as a routing module), and puts them all in the wheel
under `seqsvc_client/_seqsvc/`, with `from seqsvc...` and `from im...` imports
rewritten to point into the package. The protobuf/gRPC code of
`im/seqsvc/v1/seqsvc.proto` is generated with grpcio-tools into
`seqsvc_client/_gen/`. The build fails, naming the module, if the vendored code
imports anything but the standard library, grpc and protobuf (the only
dependencies of the distribution), or imports in a form the rewrite does not
handle.

Where the sources are:
- in the repository (a build from `sdk/seqsvc-client`): `../../services/seqsvc`
  and `../../protos`;
- in an sdist made by this hook: `vendor/seqsvc/` and `protos/` beside
  pyproject.toml.
Nothing is written into the source tree.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: The modules of services/seqsvc the package is built from; what they import
#: from seqsvc comes along.
ROOTS = ("client", "cli")
PROTO = "im/seqsvc/v1/seqsvc.proto"
#: Third-party imports the vendored code may use: the declared dependencies.
ALLOWED = {"grpc", "google"}
PACKAGE = "seqsvc_client"


class _Sources:
    def __init__(self, root: Path) -> None:
        sdist = root / "vendor" / "seqsvc"
        repo = root.parent.parent
        self.hand_written = root / "src" / PACKAGE
        if (sdist / "client.py").is_file():
            self.seqsvc, self.protos = sdist, root / "protos"
        elif (repo / "services" / "seqsvc" / "client.py").is_file():
            self.seqsvc, self.protos = repo / "services" / "seqsvc", repo / "protos"
        else:
            raise RuntimeError(
                f"seqsvc client sources not found: neither {sdist} (an sdist) nor "
                f"{repo / 'services' / 'seqsvc'} (the repository)"
            )
        if not (self.protos / PROTO).is_file():
            raise RuntimeError(f"{self.protos / PROTO} not found")

    def modules(self) -> dict[str, Path]:
        """The seqsvc modules to vendor: ROOTS and every seqsvc module they import,
        transitively. {module name: file}."""
        found: dict[str, Path] = {}
        todo = list(ROOTS)
        while todo:
            name = todo.pop()
            if name in found:
                continue
            path = self.seqsvc / f"{name}.py"
            if not path.is_file():
                raise RuntimeError(f"seqsvc.{name} is imported but {path} does not exist")
            found[name] = path
            todo += _check_imports(path)
        return found


def _check_imports(path: Path) -> list[str]:
    """The seqsvc modules `path` imports; raises if it imports what the package
    cannot hold."""
    tree = ast.parse(path.read_text(), str(path))
    needed: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in ("seqsvc", "im"):
                    raise RuntimeError(
                        f"{path}: `import {alias.name}`: write `from {alias.name} import ...` "
                        "(the seqsvc-client build rewrites only from-imports)"
                    )
                _allowed(path, alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "seqsvc":
                if len(parts) == 1:  # from seqsvc import keys
                    needed += [a.name for a in node.names]
                else:
                    needed.append(parts[1])
            elif parts[0] == "im":
                if parts[:2] != ["im", "seqsvc"]:
                    raise RuntimeError(
                        f"{path} imports {node.module}: the seqsvc-client package holds only "
                        f"the generated code of {PROTO}"
                    )
            else:
                _allowed(path, node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise RuntimeError(f"{path}: relative imports are not supported by the build")
    return needed


def _allowed(path: Path, module: str) -> None:
    top = module.split(".")[0]
    if top == "__future__" or top in sys.stdlib_module_names or top in ALLOWED:
        return
    raise RuntimeError(
        f"{path} imports {module}, which the seqsvc-client distribution does not depend "
        "on (only grpcio and protobuf): keep the client's imports to those"
    )


_FROM_SEQSVC = re.compile(r"^(\s*)from seqsvc(\.[\w.]+)? import ", re.M)
_FROM_IM = re.compile(r"^(\s*)from im\.", re.M)


def rewrite(text: str) -> str:
    """Points `from seqsvc...` and `from im...` imports into the package."""
    text = _FROM_SEQSVC.sub(lambda m: f"{m[1]}from {PACKAGE}._seqsvc{m[2] or ''} import ", text)
    return _FROM_IM.sub(lambda m: f"{m[1]}from {PACKAGE}._gen.im.", text)


def generate(protos: Path, out: Path) -> None:
    """protoc (grpcio-tools) on PROTO into `out`/im, with .pyi stubs, every
    directory a package, imports rewritten."""
    from importlib.resources import files

    from grpc_tools import protoc

    well_known = files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{protos}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    for path in out.rglob("*.py*"):
        path.write_text(rewrite(path.read_text()))


class SeqClientBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        sources = _Sources(Path(self.root))
        modules = sources.modules()
        include: dict[str, str] = build_data["force_include"]
        if self.target_name == "sdist":
            for name, path in modules.items():
                include[str(path)] = f"vendor/seqsvc/{name}.py"
            include[str(sources.protos / PROTO)] = f"protos/{PROTO}"
            return
        if version == "editable":
            raise RuntimeError("editable installs of seqsvc-client are not supported")
        for path in sorted(sources.hand_written.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                include[str(path)] = f"{PACKAGE}/{path.relative_to(sources.hand_written)}"
        self._tmp = Path(tempfile.mkdtemp(prefix="seqsvc-client-build-"))
        vendored = self._tmp / "_seqsvc"
        vendored.mkdir()
        (vendored / "__init__.py").write_text(
            '"""services/seqsvc modules, vendored at build time (see hatch_build.py)."""\n'
        )
        for name, path in modules.items():
            (vendored / f"{name}.py").write_text(rewrite(path.read_text()))
        generate(sources.protos, self._tmp / "_gen")
        for path in sorted(self._tmp.rglob("*")):
            if path.is_file():
                include[str(path)] = f"{PACKAGE}/{path.relative_to(self._tmp).as_posix()}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
