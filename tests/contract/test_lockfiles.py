"""Dependencies are pinned by committed lockfiles, and no committed file names a
package registry's address: installs resolve packages from whatever registry the
machine is configured for (a mirror, a proxy), and the repository does not depend
on one. npm writes no registry address into package-lock.json when a package's
.npmrc says `omit-lockfile-registry-resolved=true`.

The host names are built from parts, so that this file does not name them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from node_support import ROOT


def _host(*labels: str) -> str:
    return ".".join(labels)


#: Package registries' addresses (npm, PyPI, and the other ecosystems' defaults).
REGISTRY_HOSTS = [
    _host("registry", "npmjs", "org"),
    _host("registry", "npmjs", "com"),
    _host("registry", "yarnpkg", "com"),
    _host("pypi", "org"),
    _host("pypi", "python", "org"),
    _host("files", "pythonhosted", "org"),
    _host("proxy", "golang", "org"),
    _host("crates", "io"),
    _host("repo1", "maven", "org"),
    _host("repo", "maven", "apache", "org"),
    _host("api", "nuget", "org"),
    _host("rubygems", "org"),
    _host("deb", "debian", "org"),
]
HOSTS = re.compile("|".join(re.escape(h) for h in REGISTRY_HOSTS), re.IGNORECASE)
EXACT_VERSION = re.compile(r"^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$")
OMIT_RESOLVED = re.compile(r"^\s*omit-lockfile-registry-resolved\s*=\s*true\s*$", re.MULTILINE)


@pytest.fixture(scope="module")
def tracked() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of committed files")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_committed_file_names_a_package_registry(tracked: list[Path]) -> None:
    found = []
    for path in tracked:
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            match = HOSTS.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{n}: {match.group(0)}")
    assert not found, "package registry addresses in committed files:\n" + "\n".join(found)


def _npm_packages(tracked: list[Path]) -> list[Path]:
    return [p.parent for p in tracked if p.name == "package.json" and "node_modules" not in p.parts]


def test_npm_packages_are_locked_without_registry_addresses(tracked: list[Path]) -> None:
    packages = _npm_packages(tracked)
    assert packages, "expected the repository's npm packages (tools/buf, clients/node-grpc)"
    tracked_set = set(tracked)
    for package in packages:
        name = package.relative_to(ROOT)
        lock = package / "package-lock.json"
        assert lock in tracked_set, f"{name}: package-lock.json is not committed"
        npmrc = package / ".npmrc"
        assert npmrc in tracked_set and OMIT_RESOLVED.search(npmrc.read_text()), (
            f"{name}/.npmrc must say omit-lockfile-registry-resolved=true (npm reads a "
            "project .npmrc from the package's own folder only)"
        )
        entries = json.loads(lock.read_text())["packages"]
        for key, entry in entries.items():
            if key == "":
                continue
            assert "resolved" not in entry, f"{name}/package-lock.json: {key} has 'resolved'"
            assert entry.get("integrity", "").startswith("sha512-"), (
                f"{name}/package-lock.json: {key} has no sha512 integrity"
            )


def test_npm_dependencies_are_exact_versions(tracked: list[Path]) -> None:
    for package in _npm_packages(tracked):
        manifest = json.loads((package / "package.json").read_text())
        for field in ("dependencies", "devDependencies", "optionalDependencies"):
            for dep, version in manifest.get(field, {}).items():
                assert EXACT_VERSION.match(version), (
                    f"{package.relative_to(ROOT)}/package.json: {dep} {version!r} is a range; "
                    "pin an exact version"
                )


def test_requirements_lock_is_pinned_and_names_no_index() -> None:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    requirements = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    assert requirements
    for line in requirements:
        assert not line.startswith("-"), f"requirements.lock: an option line: {line!r}"
        assert "://" not in line, f"requirements.lock: a URL: {line!r}"
        assert re.match(r"^[A-Za-z0-9._-]+(\[[^\]]+\])?==[^=\s]+(\s*;.*)?$", line), (
            f"requirements.lock: not pinned with ==: {line!r}"
        )
