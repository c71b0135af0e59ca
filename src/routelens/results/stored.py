"""Reading a run folder back: the one reader of a run's files, for `read_run`, `routelens
report` and `export`, and the steps that read a counterfactual run (rollouts, the router
update).

Everything a reader needs is checked before any work: run.json is a routelens run record
of the kind asked for and complete; summary.json and the tables it reads are there and
readable (a Parquet file's footer is read, not its rows). A missing, damaged or foreign
file is a one-line `RouteLensError` that names the file and says how to get it back, never
a JSON, OS or pyarrow error.
"""

from __future__ import annotations

import json
import os

from routelens.errors import RouteLensError, SettingError

RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
# what regenerates a file of a complete run: the run loop re-concatenates the parts and
# re-summarises when the same command runs again on the same folder
REBUILD = "re-run its command with the same settings to rebuild it from the run's parts"
# run.json itself cannot be rebuilt in place (a damaged record is neither resumed nor replaced)
REDO = "re-run the analysis into a new folder to regenerate it"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_json_file(path: str, remedy: str = REBUILD):
    """The JSON content of `path`; missing, unreadable or malformed: one line naming it."""
    if not os.path.isfile(path):
        raise RouteLensError(f"{path} is missing{' (a folder is there)' if os.path.isdir(path) else ''}; {remedy}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise RouteLensError(f"{path} is not valid JSON ({error.msg}: line {error.lineno} column {error.colno}); "
                             f"{remedy}") from None
    except UnicodeDecodeError:
        raise RouteLensError(f"{path} is not valid JSON (not UTF-8 text); {remedy}") from None
    except OSError as error:
        raise RouteLensError(f"cannot read {path} ({error.strerror}); {remedy}") from None


def read_jsonl_file(path: str, remedy: str = REBUILD) -> list:
    """The JSON values of each non-empty line of `path` (a run's own JSONL, e.g. its training log)."""
    if not os.path.isfile(path):
        raise RouteLensError(f"{path} is missing; {remedy}")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise RouteLensError(f"cannot read {path} ({getattr(error, 'strerror', None) or 'not UTF-8 text'}); "
                             f"{remedy}") from None
    values = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise RouteLensError(f"{path} line {number} is not valid JSON ({error.msg}); {remedy}") from None
    return values


def check_table_file(path: str, remedy: str = REBUILD) -> None:
    """A Parquet file is there and its footer reads (a truncated or foreign file does not)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise RouteLensError(f"{path} is missing; {remedy}")
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException) as error:
        raise RouteLensError(f"{path} is not a readable Parquet table ({_first_line(error)}); {remedy}") from None


def read_table_file(path: str, remedy: str = REBUILD, **options):
    """A Parquet table as a DataFrame (`options`: `pandas.read_parquet`'s, e.g. filters);
    missing or damaged: one line naming it."""
    import pandas as pd
    import pyarrow as pa

    check_table_file(path, remedy)
    try:
        return pd.read_parquet(path, **options)
    except (OSError, pa.ArrowException) as error:
        raise RouteLensError(f"{path} is not a readable Parquet table ({_first_line(error)}); {remedy}") from None


class StoredRun:
    """A complete run folder on disk, read-only: the `RunFolder` interface for reading.

    `kind`: the kind of run the reader needs (None: any); `needed_by`: who reads it, named
    in the refusal of a run of another kind or an unfinished one. The record is checked on
    construction; `require(...)` checks the files a reader will read."""

    def __init__(self, path: str, kind: str | None = None, needed_by: str | None = None):
        path = os.fspath(path)
        run_json = os.path.join(path, RUN_JSON)
        if not os.path.isfile(run_json):
            what = (f"a routelens {kind} run" if kind else "a routelens run")
            raise SettingError(f"{path} is not a run folder (no run.json); give the `out` folder of {what}", "out")
        self.path = path
        state = read_json_file(run_json, REDO)
        if not (isinstance(state, dict) and isinstance(state.get("kind"), str) and isinstance(state.get("config"), dict)
                and isinstance(state.get("sessions"), list)):
            raise RouteLensError(f"{run_json} is not a routelens run record (no kind, config and sessions); {REDO}")
        self.state = state
        self.kind, self.config = state["kind"], state["config"]
        status = state.get("status")
        reader = needed_by or "reading it"
        if kind is not None and self.kind != kind:
            raise RouteLensError(f"{path} holds a {status} {self.kind} run; {reader} needs a complete {kind} run")
        if status != "complete":
            raise RouteLensError(f"{path} holds a {status} {self.kind} run (units done: {state.get('units_done')}); "
                                 f"{reader} needs a complete {self.kind} run: re-run the same command to finish it first")
        self._summary = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def require(self, *names: str) -> StoredRun:
        """Check, before any work, that the files `names` (summary.json, <table>.parquet,
        *.jsonl) are there and readable."""
        for name in names:
            if name == SUMMARY_JSON:
                self.summary  # noqa: B018 - read and checked once
            elif name.endswith(".parquet"):
                check_table_file(self.file(name))
            elif name.endswith(".jsonl"):
                read_jsonl_file(self.file(name))
            else:
                read_json_file(self.file(name))
        return self

    @property
    def summary(self) -> dict:
        """summary.json, read once (a JSON object, else one line naming it)."""
        if self._summary is None:
            summary = read_json_file(self.file(SUMMARY_JSON))
            if not isinstance(summary, dict) or not summary:
                raise RouteLensError(f"{self.file(SUMMARY_JSON)} holds no summary (a JSON object); {REBUILD}")
            self._summary = summary
        return self._summary

    def read(self, table: str, **options):
        """One of the run's tables as a DataFrame (`options`: `pandas.read_parquet`'s)."""
        path = self.file(f"{table}.parquet")
        if not os.path.exists(path):
            raise RouteLensError(f"{self.path} has no {table}.parquet; this {self.kind} run does not make that table "
                                 f"(or it was deleted: {REBUILD})")
        return read_table_file(path, **options)
