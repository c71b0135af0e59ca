"""A run folder: results written as work proceeds, resumable, with provenance.

Layout:
    run.json            config (compared on resume), provenance, status, timings
    parts/<table>-<i>.parquet   one file per work unit (trajectory i) and table, each written
                        atomically (temporary file + rename) so a kill leaves whole files only
    <table>.parquet     the parts concatenated in unit order, written when the run completes
    summary.json        written when the run completes

A unit is done when all its part files exist; a re-run of the same config skips done
units and redoes a unit that was cut off half-way, so nothing is lost or duplicated. A
different config on an existing folder is refused unless `overwrite`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

import pyarrow as pa
import pyarrow.parquet as pq

from routelens.errors import RouteLensError

RUN_JSON = "run.json"
PARTS = "parts"
PACKAGES = ("routelens", "torch", "transformers", "numpy", "scipy", "pandas", "pyarrow")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _git_hash() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git": _git_hash(),
        "command": sys.argv,
    }


def write_text_atomic(path: str, text: str) -> None:
    """Write through a temporary file and a rename: a kill leaves the old file or the new one."""
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def write_json_atomic(path: str, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


class RunFolder:
    def __init__(self, path: str, kind: str, config: dict, tables: tuple[str, ...],
                 overwrite: bool = False, extra: dict | None = None):
        self.path, self.kind, self.config, self.tables = path, kind, config, tables
        run_json = os.path.join(path, RUN_JSON)
        if os.path.exists(run_json):
            stored = read_json(run_json)
            if stored.get("config") != config or stored.get("kind") != kind:
                if not overwrite:
                    changed = sorted(k for k in set(config) | set(stored.get("config", {}))
                                     if config.get(k) != stored.get("config", {}).get(k))
                    raise RouteLensError(
                        f"{path} holds a run with a different config (differs in: {', '.join(changed) or 'kind'}); "
                        "re-run with the same settings to resume, or pass --overwrite, or choose another --out"
                    )
                shutil.rmtree(path)
        elif os.path.isdir(path) and os.listdir(path) and not overwrite:
            raise RouteLensError(f"{path} exists, is not empty and holds no run.json; choose another --out or pass --overwrite")
        elif os.path.isdir(path) and overwrite:
            shutil.rmtree(path)
        os.makedirs(os.path.join(path, PARTS), exist_ok=True)
        self.state = read_json(run_json) if os.path.exists(run_json) else {
            "kind": kind, "config": config, "status": "running", "created": _now(), "sessions": [],
        }
        self.resumed = bool(self.state["sessions"])
        self.state["status"] = "running"
        self.state["provenance"] = provenance()
        self.state.update(extra or {})
        self.state["sessions"].append({"started": _now(), "finished": None, "units_done": 0})
        self._save()

    # ------------------------------------------------------------------ parts
    def _part(self, table: str, unit: int) -> str:
        return os.path.join(self.path, PARTS, f"{table}-{unit:07d}.parquet")

    def is_done(self, unit: int) -> bool:
        return all(os.path.exists(self._part(table, unit)) for table in self.tables)

    def write_unit(self, unit: int, tables: dict[str, pa.Table]) -> None:
        """Write all tables of one unit; the unit counts as done once the last one lands."""
        for table in self.tables:
            target = self._part(table, unit)
            pq.write_table(tables[table], target + ".tmp")
            os.replace(target + ".tmp", target)
        self.state["sessions"][-1]["units_done"] += 1

    # ------------------------------------------------------------------ finish
    def concatenate(self, units: list[int]) -> dict[str, str]:
        """Concatenate every unit's parts, in unit order, into <table>.parquet; return the paths."""
        missing = [u for u in units if not self.is_done(u)]
        if missing:
            raise RuntimeError(f"cannot concatenate: units {missing[:5]} have no results")
        paths = {}
        for table in self.tables:
            target = os.path.join(self.path, f"{table}.parquet")
            writer = None
            try:
                for unit in units:
                    part = pq.read_table(self._part(table, unit))
                    if writer is None:
                        writer = pq.ParquetWriter(target + ".tmp", part.schema)
                    writer.write_table(part.cast(writer.schema))
            finally:
                if writer is not None:
                    writer.close()
            os.replace(target + ".tmp", target)
            paths[table] = target
        return paths

    def write_table(self, name: str, frame) -> str:
        """A table derived from the concatenated ones (a pandas DataFrame), written atomically."""
        target = os.path.join(self.path, f"{name}.parquet")
        frame.to_parquet(target + ".tmp", index=False)
        os.replace(target + ".tmp", target)
        return target

    def complete(self, summary: dict, extra: dict | None = None) -> None:
        """Write summary.json and mark the run complete in run.json."""
        write_json_atomic(os.path.join(self.path, "summary.json"), summary)
        self.state["status"] = "complete"
        self.state.update(extra or {})
        self._finish_session()

    def _finish_session(self) -> None:
        self.state["sessions"][-1]["finished"] = _now()
        self._save()

    def _save(self) -> None:
        write_json_atomic(os.path.join(self.path, RUN_JSON), self.state)
