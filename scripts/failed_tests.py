"""Print the failed and errored tests of a JUnit XML report, one line each (scripts/test.sh
calls it when the full tier fails, so the list is the last thing CI prints).

    python scripts/failed_tests.py reports/full.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def failed(path: str) -> list[str]:
    lines = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            problem = case.find(kind)
            if problem is not None:
                message = (problem.get("message") or "").strip().splitlines()
                name = f"{case.get('classname')}::{case.get('name')}"
                lines.append(f"{kind.upper()} {name}: {message[0] if message else ''}"[:300])
    return lines


if __name__ == "__main__":
    found = failed(sys.argv[1])
    print(f"{len(found)} failed test(s) in {sys.argv[1]}:", *found, sep="\n")
