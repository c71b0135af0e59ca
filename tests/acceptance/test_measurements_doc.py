"""docs/measurements.md is generated from docs/measurements/ and stays current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.quick
def test_measurements_page_is_generated_from_the_measurement_files():
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "measurements_doc.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    page = (ROOT / "docs" / "measurements.md").read_text()
    for path in (ROOT / "docs" / "measurements").iterdir():   # every file is listed
        assert f"`{path.name}{'/' if path.is_dir() else ''}`" in page
