"""Where and how the benchmarks write their measurement files (docs/measurements/)."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "docs", "measurements")


def write_measurement(record, path: str) -> str:
    """Write `record` as indented JSON to `path` (relative paths: from the repository root),
    whole or not at all, and say where."""
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    os.replace(partial, path)
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return path
