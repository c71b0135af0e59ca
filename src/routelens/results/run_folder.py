"""A run folder: results written as work proceeds, resumable, with provenance.

Layout:
    run.json            config (compared on resume), provenance, status, timings
    parts/<table>-<i>.parquet   one file per work unit (trajectory i) and table, each written
                        atomically (temporary file + rename) so a kill leaves whole files only
    <table>.parquet     the parts concatenated in unit order, written when the run completes
    summary.json        written when the run completes

A unit is done when all its part files exist; a re-run of the same config skips done
units and redoes a unit that was cut off half-way, so nothing is lost or duplicated.
`run.json` is rewritten after every unit, so an interrupted run shows the units done.

A different config on an existing folder is refused unless `overwrite`, and `overwrite`
never deletes what is not ours: only a folder whose `run.json` names a routelens run of the
same kind is replaced, and only the files its run.json lists are removed: `files` (every
file the run wrote at the top of its folder or in figures/, each listed before it is
written) and the parts of its `tables`. Nothing else in the folder is touched. No folder is
used that is, holds or lies inside an input of the current command (any existing path in
its config): an output never replaces an input (`results.paths`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from routelens.allocator import allocator_state
from routelens.errors import RouteLensError, SettingError
from routelens.results.paths import (
    check_apart_from_inputs,
    check_out_file,
    check_replaceable,
    existing_parent,
    inside,
    is_path_input,
    write_bytes_atomic,
    write_text_atomic,
)

__all__ = ["RunFolder", "MemoryRun", "open_run", "claim_in_run", "check_out_file", "check_out_file_beside_run",
           "write_text_atomic", "write_json_atomic"]

RUN_JSON = "run.json"
PARTS = "parts"
TRAJECTORIES_FILE = "trajectories.jsonl"   # trajectories given in memory (the API), kept with the run
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
        "allocator": allocator_state(),
    }


def write_json_atomic(path: str, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_run_json(path: str) -> dict:
    """A folder's run.json, refused in one line when it is not a routelens run record."""
    run_json = os.path.join(path, RUN_JSON)
    try:
        stored = read_json(run_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SettingError(f"{run_json} is not valid JSON ({error}); it is not a routelens run, so it is "
                           "neither resumed nor replaced: choose another `out`", "out") from None
    if not (isinstance(stored, dict) and isinstance(stored.get("kind"), str) and isinstance(stored.get("config"), dict)
            and isinstance(stored.get("sessions"), list)):
        raise SettingError(f"{run_json} is not a routelens run record (no kind, config and sessions); "
                           "choose another `out`", "out")
    return stored


def _refuse_unlisted(path: str, hint: str = "") -> None:
    """A file about to be written into a run folder that exists there unlisted is the user's."""
    if os.path.lexists(path):
        raise RouteLensError(f"{path} was not written by routelens (the run's run.json does not list it), so it is "
                             f"never replaced; move it away{hint}")


def claim_in_run(run_dir: str, names: list[str]) -> None:
    """List files that another command (`report`) is about to write into the complete run
    folder `run_dir` among the run's files; a name that exists there unlisted is the user's
    and is refused (never replaced)."""
    stored = read_run_json(run_dir)
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RouteLensError(f"{run_dir} is not writable, and the report writes its figures there; give the report "
                             "a writable copy of the run")
    hint = "" if "files" in stored else " (this run predates the list, so an earlier report of it is unlisted too)"
    files = stored.setdefault("files", [])
    for name in names:
        if name not in files:
            _refuse_unlisted(os.path.join(run_dir, name), f", or give the report another --out{hint}")
    if any(name not in files for name in names):
        files += [name for name in names if name not in files]
        write_json_atomic(os.path.join(run_dir, RUN_JSON), stored)


def _paths_in(value) -> list[str]:
    """Existing paths named anywhere in a config (the command's inputs), relative ones included."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths_in(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths_in(v)]
    return [value] if is_path_input(value) else []


def _part_name(table: str) -> re.Pattern:
    return re.compile(rf"{re.escape(table)}-\d{{7}}\.parquet(\.tmp)?")


def _owned_files(path: str, stored: dict) -> list[str]:
    """The files of the run in `path` that its run.json lists (see the module docstring), run.json last."""
    path = os.path.normpath(path)
    listed = dict.fromkeys(os.path.normpath(os.path.join(path, name)) for name in stored["files"] if _within(path, name))
    owned = [entry for name in listed for entry in (name, name + ".tmp") if os.path.isfile(entry)]
    parts = os.path.join(path, PARTS)
    if os.path.isdir(parts) and not os.path.islink(parts):   # a linked parts/ leads out: nothing in it is ours
        patterns = [_part_name(table) for table in stored.get("tables", []) if isinstance(table, str)]
        owned += [os.path.join(parts, name) for name in sorted(os.listdir(parts))
                  if any(p.fullmatch(name) for p in patterns)]
    return list(dict.fromkeys(owned)) + [os.path.join(path, RUN_JSON)]


def _within(path: str, name) -> bool:
    """A listed name that stays inside the run folder (a hand-edited run.json naming
    "../x" or an absolute path, or a folder link leading out, removes nothing outside)."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return False
    entry = os.path.join(path, name)
    return inside(os.path.dirname(entry), path) and os.path.normpath(entry) != os.path.normpath(path)


def remove_outputs(path: str, stored: dict) -> None:
    """Remove exactly the files the run in `path` wrote (its run.json's list) and the folders
    that leaves empty; anything else stays."""
    folders = set()
    for entry in _owned_files(path, stored):
        if os.path.lexists(entry):
            os.remove(entry)
        folders.add(os.path.dirname(entry))
    top = os.path.realpath(path)
    for folder in sorted(folders, key=len, reverse=True):   # deepest first; never `path` itself
        if os.path.realpath(folder) != top and not os.path.islink(folder) and not os.listdir(folder):
            os.rmdir(folder)


def copy_run(source: str, target: str) -> None:
    """Copy the run in `source` into `target` (checked by `prepare_out` beforehand): the files
    its run.json lists and its parts, each written atomically, run.json last, so an
    interrupted copy never looks complete; a file of that name already in `target` is
    refused before anything is copied."""
    stored = read_run_json(source)
    if isinstance(stored.get("files"), list):
        files = _owned_files(source, stored)
    else:   # a run made before runs listed their files: all of its folder, run.json last
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(source) for n in names if n != RUN_JSON)
        files.append(os.path.join(source, RUN_JSON))
    names = [os.path.relpath(entry, os.path.normpath(source)) for entry in files if not entry.endswith(".tmp")]
    for name in names:
        _refuse_unlisted(os.path.join(target, name))
    for name in names:
        with open(os.path.join(source, name), "rb") as handle:
            write_bytes_atomic(os.path.join(target, name), handle.read())


def prepare_out(path: str, kind: str, config: dict, overwrite: bool) -> dict | None:
    """Check that `path` may hold this run; return the stored run.json to resume, or None
    for a fresh run (after removing a replaced run's outputs)."""
    check_apart_from_inputs(path, _paths_in(config))
    if os.path.exists(path) and not os.path.isdir(path):
        raise SettingError(f"`out` {path} is an existing file, not a folder; choose a folder path", "out")
    if not os.path.isdir(path):
        parent = existing_parent(path)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SettingError(f"cannot create `out` {path}: {parent} is not writable; choose another `out`", "out")
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SettingError(f"`out` {path} is not writable; choose another `out`", "out")
    if not os.path.exists(os.path.join(path, RUN_JSON)):
        if os.listdir(path):
            raise SettingError(f"{path} exists, is not empty and holds no run.json: it is not a routelens run, "
                               "so it is neither resumed nor replaced (not even with `overwrite`); choose another `out`",
                               "overwrite", "out")
        return None
    parts = os.path.join(path, PARTS)
    if os.path.islink(parts) or (os.path.exists(parts) and not os.path.isdir(parts)):
        raise SettingError(f"{parts} is a link or a file, not the run's own folder of parts; routelens neither "
                           "resumes nor replaces such a run: choose another `out`", "out")
    stored = read_run_json(path)
    if stored["config"] == config and stored["kind"] == kind:
        return stored
    if stored["kind"] != kind:
        raise SettingError(f"{path} holds a routelens {stored['kind']} run, not a {kind} run; "
                           f"`overwrite` replaces only a {kind} run: choose another `out`", "overwrite", "out")
    changed = sorted(k for k in set(config) | set(stored["config"]) if config.get(k) != stored["config"].get(k))
    check_replaceable(path, "a run with a different config", "differs in", changed, stored.get("files"), overwrite,
                      os.path.join(path, RUN_JSON), "the run")
    remove_outputs(path, stored)   # (an input inside `path` was refused above, overwrite or not)
    return None


def part_path(path: str, table: str, unit: int) -> str:
    """Where the run folder `path` keeps `table`'s part of `unit` (a job that continues from
    the unit before, such as a training run, reads it back)."""
    return os.path.join(path, PARTS, f"{table}-{unit:07d}.parquet")


def run_folder_beside(out: str) -> str:
    """The run folder kept beside an output file `out` (for resuming the command that
    writes it): `out` + ".run", checked not to be a file."""
    folder = out + ".run"
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SettingError(f"{folder} (the run folder kept beside `out` {out}, for resuming) is a file; "
                           "move it away or choose another `out`", "out")
    return folder


def check_out_file_beside_run(out: str, inputs=(), overwrite: bool = False, option: str = "--out") -> str:
    """An output file written with a run folder beside it (`run_folder_beside`), checked like
    any output file (`check_out_file`), except that one routelens wrote may be rewritten by
    its own run resumed (whose run.json then decides: same settings, or `overwrite`).
    Returns the run folder."""
    folder = run_folder_beside(out)
    check_out_file(out, option, inputs, overwrite=overwrite or os.path.isdir(folder))
    return folder


class RunFolder:
    """A run on disk (see the module docstring). `MemoryRun` is the same interface in memory."""

    def __init__(self, path: str, kind: str, config: dict, tables: tuple[str, ...],
                 overwrite: bool = False, extra: dict | None = None):
        self.path, self.kind, self.config, self.tables = path, kind, config, tables
        stored = prepare_out(path, kind, config, overwrite)
        try:
            os.makedirs(os.path.join(path, PARTS), exist_ok=True)
        except OSError as error:
            raise SettingError(f"cannot create `out` {path}: {error.strerror}; choose another `out`", "out") from None
        self.state = stored or {
            "kind": kind, "config": config, "status": "running", "created": _now(), "sessions": [], "files": [],
        }
        self.state.setdefault("files", [])   # a run resumed from before the list: what it writes from now on
        self.state["tables"] = list(tables)
        self.resumed = bool(self.state["sessions"])
        self.state["status"] = "running"
        self.state["provenance"] = provenance()
        self.state.update(extra or {})
        self.state["units_done"] = self._count_done()
        self.state["sessions"].append({"started": _now(), "finished": None, "units_done": 0})
        self._save()

    def _count_done(self) -> int:
        if not self.tables:
            return 0
        prefix = f"{self.tables[-1]}-"   # the last table of a unit lands last
        return sum(name.startswith(prefix) and name.endswith(".parquet")
                   for name in os.listdir(os.path.join(self.path, PARTS)))

    # ------------------------------------------------------------------ parts
    def _part(self, table: str, unit: int) -> str:
        return part_path(self.path, table, unit)

    def is_done(self, unit: int) -> bool:
        return all(os.path.exists(self._part(table, unit)) for table in self.tables)

    def claim(self, name: str) -> str:
        """List `name` (relative to the folder) among the run's files before it is written, so
        that `overwrite` removes it even after a kill mid-write; returns its path."""
        target = os.path.join(self.path, name)
        if name not in self.state["files"]:
            _refuse_unlisted(target)
            self.state["files"].append(name)
            self._save()
        return target

    def write_file(self, name: str, content: bytes | str) -> str:
        """Another file of the run (a copy of its trajectories), listed and written atomically."""
        target = self.claim(name)
        write_bytes_atomic(target, content.encode("utf-8") if isinstance(content, str) else content)
        return target

    def write_unit(self, unit: int, tables: dict[str, pa.Table]) -> None:
        """Write all tables of one unit; the unit counts as done once the last one lands."""
        for table in self.tables:
            target = self._part(table, unit)
            pq.write_table(tables[table], target + ".tmp")
            os.replace(target + ".tmp", target)
        self.state["sessions"][-1]["units_done"] += 1
        self.state["units_done"] += 1
        self._save()   # after Ctrl-C or a kill, run.json says how far the run got

    # ------------------------------------------------------------------ finish
    def concatenate(self, units: list[int]) -> dict[str, str]:
        """Concatenate every unit's parts, in unit order, into <table>.parquet; return the paths."""
        missing = [u for u in units if not self.is_done(u)]
        if missing:
            raise RuntimeError(f"cannot concatenate: units {missing[:5]} have no results")
        paths = {}
        for table in self.tables:
            target = self.claim(f"{table}.parquet")
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

    def read(self, table: str) -> pd.DataFrame:
        """A concatenated or derived table."""
        return pd.read_parquet(os.path.join(self.path, f"{table}.parquet"))

    def write_table(self, name: str, frame) -> str:
        """A table derived from the concatenated ones (a pandas DataFrame), written atomically."""
        target = self.claim(f"{name}.parquet")
        frame.to_parquet(target + ".tmp", index=False)
        os.replace(target + ".tmp", target)
        return target

    def complete(self, summary: dict, extra: dict | None = None) -> None:
        """Write summary.json and mark the run complete in run.json."""
        write_json_atomic(self.claim("summary.json"), summary)
        self.summary = summary
        self.state["status"] = "complete"
        self.state.update(extra or {})
        self._finish_session()

    def _finish_session(self) -> None:
        self.state["sessions"][-1]["finished"] = _now()
        self._save()

    def _save(self) -> None:
        write_json_atomic(os.path.join(self.path, RUN_JSON), self.state)


class MemoryRun:
    """A run kept in memory (the Python API without `out`): the interface of `RunFolder`,
    nothing written; `save(path)` writes it as the run folder the same run would have made."""

    path = None
    resumed = False

    def __init__(self, kind: str, config: dict, tables: tuple[str, ...], extra: dict | None = None):
        self.kind, self.config, self.tables = kind, config, tables
        self.state = {"kind": kind, "config": config, "status": "running", "created": _now(), "sessions": [],
                      **(extra or {})}
        self.parts: dict[int, dict[str, pa.Table]] = {}
        self.derived: dict[str, pd.DataFrame] = {}
        self.files: dict[str, bytes] = {}     # other files of the run (name -> bytes), written by save
        self.summary: dict | None = None

    def is_done(self, unit: int) -> bool:
        return unit in self.parts

    def write_unit(self, unit: int, tables: dict[str, pa.Table]) -> None:
        self.parts[unit] = {table: tables[table] for table in self.tables}

    def concatenate(self, units: list[int]) -> None:
        missing = [u for u in units if u not in self.parts]
        if missing:
            raise RuntimeError(f"cannot concatenate: units {missing[:5]} have no results")
        self.units = list(units)

    def read(self, table: str) -> pd.DataFrame:
        if table in self.derived:
            return self.derived[table]
        parts = [self.parts[unit][table] for unit in self.units]
        return pa.concat_tables(parts, promote_options="permissive").to_pandas() if parts else pd.DataFrame()

    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        self.derived[name] = frame

    def write_file(self, name: str, content: bytes | str) -> None:
        self.files[name] = content.encode("utf-8") if isinstance(content, str) else content

    def complete(self, summary: dict, extra: dict | None = None) -> None:
        self.summary = summary
        self.state.update(extra or {}, status="complete")

    def save(self, path: str, overwrite: bool = False) -> str:
        """Write this run as a run folder at `path` (refused where the folder holds another
        run, unless `overwrite`); `routelens report` and `read_run` read it."""
        if self.summary is None:
            raise RouteLensError("this run is not complete; nothing to save")
        extra = {k: v for k, v in self.state.items() if k not in ("kind", "config", "status", "created", "sessions")}
        folder = RunFolder(path, self.kind, self.config, self.tables, overwrite=overwrite, extra=extra)
        for name, content in self.files.items():
            folder.write_file(name, content)
        for unit in self.units:
            folder.write_unit(unit, self.parts[unit])
        folder.concatenate(self.units)
        for name, frame in self.derived.items():
            folder.write_table(name, frame)
        folder.complete(self.summary)
        return path


def open_run(out: str | None, kind: str, config: dict, tables: tuple[str, ...], overwrite: bool = False,
             extra: dict | None = None) -> RunFolder | MemoryRun:
    """The run folder `out` (created or resumed), or a `MemoryRun` when `out` is None."""
    if out is None:
        return MemoryRun(kind, config, tables, extra)
    return RunFolder(out, kind, config, tables, overwrite=overwrite, extra=extra)
