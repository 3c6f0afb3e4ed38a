"""A wheelhouse built without the network, for installs into fresh venvs in tests.

Drawbridge's own wheels are built from a copy of the source tree (`pip wheel
--no-build-isolation`, so setuptools comes from this venv, not from an index; the
copy keeps stale `build/` leftovers out of the wheel). Every dependency is
re-packed from the distribution already installed in this (the dev) venv: its
files as listed in its RECORD, packed by `wheel pack`, which writes a fresh
RECORD. Console scripts are left out: pip writes them again from
entry_points.txt at install time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# written by the installer, not part of a wheel
INSTALLER_FILES = frozenset({"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"})
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                       "__pycache__", ".*_cache", ".hypothesis")


def build_wheels(projects: Sequence[Path], dest: Path, scratch: Path) -> list[Path]:
    """Wheels of the local projects (directories with a pyproject.toml), no dependencies."""
    copies = []
    for project in projects:
        copy = scratch / f"src-{len(copies)}"
        shutil.copytree(project, copy, ignore=SOURCE_IGNORE)
        copies.append(copy)
    before = set(dest.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dest), *map(str, copies)],
                   check=True, capture_output=True, text=True)
    return sorted(set(dest.glob("*.whl")) - before)


def dependency_closure(roots: Iterable[str], exclude: Iterable[str] = ()) -> list[Distribution]:
    """The installed distributions that `roots` (requirements, extras allowed) need, transitively.

    Requirements are read from the installed metadata and their markers evaluated for
    this interpreter and the extras asked for. Distributions named in `exclude` are
    neither returned nor followed (they are built from source instead), but their
    requirements are.
    """
    skip = {canonicalize_name(name) for name in exclude}
    found: dict[str, Distribution] = {}
    todo = [Requirement(root) for root in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            raise LookupError(f"{req.name} is needed but not installed in {sys.prefix}") from None
        if name not in skip:
            found[name] = dist
        for text in dist.requires or []:
            dep = Requirement(text)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return sorted(found.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def repack(dist: Distribution, dest: Path, scratch: Path) -> Path:
    """A wheel of an installed distribution (its files under site-packages)."""
    name = dist.metadata["Name"]
    staging = scratch / f"{canonicalize_name(name)}-{dist.version}"
    shutil.rmtree(staging, ignore_errors=True)
    for entry in dist.files or []:
        parts = entry.parts
        if parts[0] == ".." or "__pycache__" in parts:
            continue  # scripts and data outside site-packages; bytecode
        if parts[0].endswith(".dist-info") and entry.name in INSTALLER_FILES:
            continue
        source = Path(str(dist.locate_file(entry)))
        target = staging / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    out = subprocess.run([sys.executable, "-m", "wheel", "pack", "-d", str(dest), str(staging)],
                         check=True, capture_output=True, text=True).stdout
    shutil.rmtree(staging)
    # "Repacking wheel as <path>...OK"
    return Path(out.split(" as ", 1)[1].rsplit("...", 1)[0])


def make_wheelhouse(projects: Sequence[Path], roots: Iterable[str], dest: Path,
                    scratch: Path) -> list[Path]:
    """Wheels of `projects` plus every installed dependency of `roots`, in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    built = build_wheels(projects, dest, scratch)
    own = [path.name.split("-", 1)[0] for path in built]
    wheels = [repack(dist, dest, scratch) for dist in dependency_closure(roots, exclude=own)]
    return built + wheels


def subset(wheelhouse: Path, roots: Iterable[str], dest: Path) -> list[Path]:
    """Copy to `dest` the wheels of `wheelhouse` that `roots` need (what a gateway gets)."""
    roots = list(roots)
    names = {canonicalize_name(Requirement(root).name) for root in roots}
    names |= {canonicalize_name(d.metadata["Name"]) for d in dependency_closure(roots)}
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(whl, dest)) for whl in sorted(wheelhouse.glob("*.whl"))
            if canonicalize_name(whl.name.split("-", 1)[0]) in names]
