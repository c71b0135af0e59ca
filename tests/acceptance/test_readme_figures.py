"""The README copies no performance figure: timings and speed-ups live in the generated
docs/measurements.md (benchmarks/run_all.py), which the README links to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: a number with a unit of time, speed-up or memory: what drifts when copied by hand
PERFORMANCE = re.compile(r"\b\d[\d,]*(\.\d+)?\s?(s|ms|sec|seconds|min|minutes|h|hours|x|GiB|MiB|GB|MB)(?=[\s,.;:)\]]|$)")


@pytest.mark.quick
def test_readme_prose_has_no_performance_figure_and_links_the_measurements_page():
    text = (ROOT / "README.md").read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)   # commands and examples may hold any literal
    found = [match.group(0) for match in PERFORMANCE.finditer(prose)]
    assert not found, f"README copies performance figures by hand: {found}; cite docs/measurements.md instead"
    assert "docs/measurements.md" in prose and "benchmarks/run_all.py" in prose


@pytest.mark.quick
def test_the_pattern_catches_what_the_old_readme_said():
    old = "`routelens demo` 81 s (one run); `bash .ci/run` 9 min 22 s; reference/fast 674x; 2.4 GiB"
    assert [m.group(0) for m in PERFORMANCE.finditer(old)] == ["81 s", "9 min", "22 s", "674x", "2.4 GiB"]
