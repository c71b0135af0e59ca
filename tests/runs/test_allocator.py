"""`keep_freed_memory`: large freed blocks are reused instead of page-faulted in again, the
state lands in run.json, and ROUTELENS_MALLOC=system leaves malloc alone."""

import json
import os
import platform
import subprocess
import sys

import pytest

from routelens.allocator import GLIBC_NEEDED
from routelens.errors import RouteLensError

_LIBC, _VERSION = platform.libc_ver()
GLIBC_OK = _LIBC == "glibc" and tuple(int(p) for p in _VERSION.split(".")[:2]) >= GLIBC_NEEDED
needs_glibc = pytest.mark.skipif(not GLIBC_OK, reason=f"mallopt's 1 GiB thresholds need glibc >= 2.35 ({_LIBC} {_VERSION})")

# 30 tensors of 64 MiB each allocated, written and freed in turn: the minor page faults it took
FAULTS = """
import json, resource, sys, torch
from routelens.allocator import keep_freed_memory
state = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.empty(1).fill_(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    block = torch.empty(16 << 20).fill_(1.0)
    del block
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "state": state}))
"""


def _faults(mode: str, **env) -> dict:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.quick
@needs_glibc
def test_freed_blocks_are_reused_not_faulted_in_again():
    # relative: with transparent huge pages a tensor takes fewer, larger faults
    system, kept = _faults("system"), _faults("keep")
    assert kept["faults"] * 3 < system["faults"]       # a few tensors' worth (the heap settles), not one per tensor
    assert kept["state"] == {"malloc": "glibc-kept", "mmap_threshold": 1 << 30, "trim_threshold": 1 << 30}


@pytest.mark.quick
@needs_glibc
def test_environment_leaves_malloc_alone():
    opted_out, kept = _faults("keep", ROUTELENS_MALLOC="system"), _faults("keep")
    assert opted_out["state"] == {"malloc": "system", "why": "ROUTELENS_MALLOC=system"}
    assert opted_out["faults"] > 3 * kept["faults"]


@pytest.mark.quick
def test_unknown_choice_is_refused_in_one_line(monkeypatch, capsys):
    from routelens import allocator
    from routelens.cli import main

    monkeypatch.setenv("ROUTELENS_MALLOC", "off")
    monkeypatch.setattr(allocator, "_state", {"malloc": "system", "why": "not called"})
    with pytest.raises(RouteLensError, match="ROUTELENS_MALLOC='off': use keep"):
        allocator.keep_freed_memory()
    assert main(["models"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "routelens: error: ROUTELENS_MALLOC='off': use keep (the default: freed memory is reused) or system "
        "(malloc as it is)"]


@pytest.mark.quick
def test_old_glibc_changes_nothing_and_says_why(monkeypatch):
    from routelens import allocator

    monkeypatch.delenv("ROUTELENS_MALLOC", raising=False)
    monkeypatch.setattr(allocator, "_state", {"malloc": "system", "why": "not called"})
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert allocator.keep_freed_memory() == {
        "malloc": "system", "why": "glibc 2.31 refuses mmap thresholds above 32 MiB (2.35 and later accept them)"}


@needs_glibc
def test_command_records_the_allocator_in_run_json(tmp_path):
    """A `routelens` command sets it before any work, and the run says so."""
    out = tmp_path / "iso"
    done = subprocess.run([sys.executable, "-m", "routelens", "isolate", "--model", "demo", "--task", "arithmetic",
                           "--per-domain", "2", "--layers", "3", "--floor-seeds", "1", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    state = json.loads((out / "run.json").read_text())["provenance"]["allocator"]
    assert state["malloc"] == "glibc-kept"
