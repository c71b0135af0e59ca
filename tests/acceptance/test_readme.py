"""The README's examples run as written, top to bottom, in one empty folder.

Every fenced `python` or `bash` block of README.md is preceded by a marker line:
`<!-- example -->` (run here, in order: a later block may read what an earlier one wrote)
or `<!-- not run: REASON -->` (a synopsis with placeholders, a GPU or cluster command, a
benchmark). A block without a marker fails the quick test, so no new block goes untested
by accident.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scaled

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!-- (example|not run: .+) -->$")


def readme_blocks() -> list[dict]:
    """Fenced blocks of the README: language, code, marker (or None) and first line number."""
    blocks, lines, index = [], README.read_text().splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before.strip())
        blocks.append({"language": opening[1], "code": "\n".join(lines[index + 1:end]), "line": index + 1,
                       "marker": marker[1] if marker else None})
        index = end + 1
    return blocks


def examples() -> list[dict]:
    return [block for block in readme_blocks() if block["marker"] == "example"]


@pytest.mark.quick
def test_every_python_and_shell_block_of_the_readme_says_whether_it_runs():
    unmarked = [block["line"] for block in readme_blocks() if block["language"] in ("python", "bash")
                and block["marker"] is None]
    assert not unmarked, f"README.md lines {unmarked}: mark each block <!-- example --> or <!-- not run: why -->"
    assert {block["language"] for block in examples()} == {"python", "bash"}


@pytest.mark.timeout(scaled(1800))
def test_readme_examples_run_as_written(tmp_path):
    """In an empty folder, each example block in turn: Python blocks with this interpreter,
    shell blocks with bash (-e, -o pipefail) and this environment's `routelens` on PATH."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for block in examples():
        command = [sys.executable, "-c", block["code"]] if block["language"] == "python" \
            else ["bash", "-e", "-o", "pipefail", "-c", block["code"]]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=scaled(600))
        assert result.returncode == 0, f"README.md line {block['line']} ({block['language']}) failed:\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"README.md line {block['line']}:\n{result.stderr[-3000:]}"
