"""requirements/lock.txt (what scripts/setup.sh installs) agrees with pyproject.toml (the
ranges users install from), and the environment running the tests is the lock's."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")   # Python 3.11+ (the lock's Python; 3.10 installs the ranges)

ROOT = Path(__file__).resolve().parents[2]
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _lock() -> dict[str, dict]:
    """name -> {version, hashes, direct} read off the lock (uv's pip-compatible format)."""
    entries, current = {}, None
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        match = ENTRY.match(line)
        if match:
            current = entries[canonicalize_name(match[1])] = {"version": match[2], "hashes": 0, "direct": False}
        elif current is not None and "--hash=sha256:" in line:
            current["hashes"] += 1
        elif current is not None and "routelens (pyproject.toml)" in line:
            current["direct"] = True
    return entries


def _requirements() -> list[Requirement]:
    """The direct requirements setup.sh installs: the dependencies, the test and ray extras,
    and the build backend (routelens is installed without build isolation)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, extras = pyproject["project"], pyproject["project"]["optional-dependencies"]
    return [Requirement(text) for text in project["dependencies"] + extras["test"] + extras["ray"]
            + pyproject["build-system"]["requires"]]


@pytest.mark.quick
def test_every_requirement_of_pyproject_is_locked_inside_its_range():
    lock = _lock()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in lock, "torch is installed by setup.sh (kept when a GPU build is there), not locked"
            continue
        assert name in lock, f"{requirement} is not in requirements/lock.txt: run bash scripts/lock.sh"
        assert requirement.specifier.contains(lock[name]["version"], prereleases=True), \
            f"the lock has {name}=={lock[name]['version']}, outside pyproject's {requirement}: run bash scripts/lock.sh"


@pytest.mark.quick
def test_the_lock_pins_every_package_with_hashes_and_names_no_stale_requirement():
    lock = _lock()
    assert len(lock) > 50                              # transitive dependencies are locked too
    unhashed = [name for name, entry in lock.items() if entry["hashes"] == 0]
    assert not unhashed, f"locked without a hash: {unhashed}"
    direct = {canonicalize_name(r.name) for r in _requirements()} - {"torch"}
    stale = {name for name, entry in lock.items() if entry["direct"]} - direct
    assert not stale, f"the lock still names {sorted(stale)} as routelens requirements: run bash scripts/lock.sh"


@pytest.mark.quick
@pytest.mark.skipif(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="the lock is for CPython 3.11 on Linux x86_64 (setup.sh installs the ranges elsewhere)")
def test_this_environment_holds_the_locked_versions():
    wrong = {}
    for name, entry in _lock().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != entry["version"]:
            wrong[name] = (installed, entry["version"])
    assert not wrong, f"installed vs locked (run bash scripts/setup.sh): {wrong}"
