"""Build hook of the im-backend-client distribution (see pyproject.toml).

Where the sources are:
- in the repository (a build from `sdk/python`): `../../libs/imclient`,
  `../../libs/imctl` and `../../protos`;
- in an sdist made by this hook: `src/imclient`, `src/imctl` and `protos/`
  beside pyproject.toml.

sdist: copies those sources in (so a wheel can be built from it anywhere).
wheel: the `imclient` and `imctl` packages (their .py files and py.typed), and
the `im` package generated from the client-facing protos with grpcio-tools
(code, `.pyi` stubs and `__init__.py` files) in a temporary directory, removed
after the build. Nothing is written into the source tree.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: The protos a client needs: the client-facing service and what it imports.
#: Internal APIs (logic, seqsvc, pusher, the gateway's internal service) stay out.
CLIENT_PROTOS = ("im/common/v1/common.proto", "im/gateway/v1/gateway.proto")
PACKAGES = ("imclient", "imctl")


class _Sources:
    def __init__(self, root: Path) -> None:
        sdist = root / "src"
        repo = root.parent.parent
        if (sdist / "imclient" / "__init__.py").is_file():
            self.packages = {name: sdist / name for name in PACKAGES}
            self.protos = root / "protos"
        elif (repo / "libs" / "imclient" / "__init__.py").is_file():
            self.packages = {name: repo / "libs" / name for name in PACKAGES}
            self.protos = repo / "protos"
        else:
            raise RuntimeError(
                f"imclient sources not found: neither {sdist} (an sdist) nor "
                f"{repo / 'libs'} (the repository)"
            )
        for proto in CLIENT_PROTOS:
            if not (self.protos / proto).is_file():
                raise RuntimeError(f"{self.protos / proto} not found")

    def package_files(self) -> dict[str, str]:
        """source path -> path in the wheel, for the hand-written packages."""
        out: dict[str, str] = {}
        for name, folder in self.packages.items():
            for path in sorted(folder.rglob("*")):
                if "__pycache__" in path.parts or not path.is_file():
                    continue
                if path.suffix == ".py" or path.name == "py.typed":
                    out[str(path)] = f"{name}/{path.relative_to(folder).as_posix()}"
        return out


def generate(protos: Path, out: Path) -> None:
    """Runs protoc (grpcio-tools) on CLIENT_PROTOS into `out`, with .pyi stubs,
    and makes every generated directory a package."""
    from importlib.resources import files

    from grpc_tools import protoc

    well_known = files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{protos}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *CLIENT_PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for folder in [p for p in out.rglob("*") if p.is_dir()]:
        (folder / "__init__.py").touch()
    (out / "im" / "py.typed").touch()


class SdkBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        sources = _Sources(Path(self.root))
        include: dict[str, str] = build_data["force_include"]
        if self.target_name == "sdist":
            for src, dest in sources.package_files().items():
                include[src] = f"src/{dest}"
            for proto in CLIENT_PROTOS:
                include[str(sources.protos / proto)] = f"protos/{proto}"
            return
        if version == "editable":
            raise RuntimeError(
                "editable installs of im-backend-client are not supported: inside the "
                "repository, `make deps` puts libs/ and gen/ on the .venv's path instead"
            )
        include.update(sources.package_files())
        self._generated = Path(tempfile.mkdtemp(prefix="imclient-gen-"))
        generate(sources.protos, self._generated)
        for path in sorted(self._generated.rglob("*")):
            if path.is_file():
                include[str(path)] = path.relative_to(self._generated).as_posix()

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        generated = getattr(self, "_generated", None)
        if generated is not None:
            shutil.rmtree(generated, ignore_errors=True)
