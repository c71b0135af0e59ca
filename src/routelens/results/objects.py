"""Result objects: what the Python API returns, in memory or read back from a run folder.

A result wraps one completed run (in memory, a run folder it wrote, or a folder read with
`read_run`) and exposes its tables as pandas DataFrames (the Parquet schemas), the summary
as a DataFrame (`summary`) and as summary.json's dict (`summary_dict`), and run.json's
record (`info`). `save(path)` writes the run folder that `routelens report`, `export` and
`read_run` read.
"""

from __future__ import annotations

import importlib
import os

import pandas as pd

from routelens.errors import RouteLensError
from routelens.results.run_folder import copy_run, prepare_out
from routelens.results.stored import SUMMARY_JSON, StoredRun


class Result:
    """A completed run of one analysis (base class of the analysis' result types)."""

    kind = ""
    tables: tuple[str, ...] = ()

    def __init__(self, run):
        self._run = run
        self._cache: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        where = f"saved in {self.path}" if self.path else "in memory"
        return f"<{type(self).__name__} ({where}); tables: {', '.join(self.tables)}; .summary for the summary table>"

    @property
    def path(self) -> str | None:
        """The run folder, or None while the result lives in memory only."""
        return self._run.path

    @property
    def summary_dict(self) -> dict:
        """summary.json's content."""
        return self._run.summary

    @property
    def summary(self) -> pd.DataFrame:
        """The summary table: the analysis' own frame of summary.json (its `result.py`)."""
        return type(self).frame(self._run.summary)

    @property
    def config(self) -> dict:
        """The settings that identify the run (run.json's `config`)."""
        return self._run.state["config"]

    @property
    def info(self) -> dict:
        """run.json's record: config, model, device, checks, timings, provenance."""
        return self._run.state

    def table(self, name: str) -> pd.DataFrame:
        """One of the run's tables as a DataFrame."""
        if name not in self._cache:
            self._cache[name] = self._run.read(name)
        return self._cache[name]

    def save(self, path: str, overwrite: bool = False):
        """Write the run folder at `path` and return the result read back from it.
        A result already in a folder is copied (its folder stays)."""
        from routelens import validate

        path = validate.path(path, "path")
        validate.flag(overwrite, "overwrite")
        if self.path is not None:
            if os.path.realpath(self.path) == os.path.realpath(path):
                return self
            if prepare_out(path, self.kind, self.config, overwrite) is not None:
                raise RouteLensError(f"{path} already holds this run; nothing to save")
            copy_run(self.path, path)
        else:
            self._run.save(path, overwrite=overwrite)
        return read_run(path)

    def report(self, out: str | None = None) -> str:
        """Build the HTML report of this (saved) run; returns its path."""
        from routelens.report.build import build_report

        if self.path is None:
            raise RouteLensError("the report reads a run folder: save the result first, e.g. result.save('runs/x')")
        return build_report([self.path], out)


# kind -> the result type, in its analysis' folder (imported when a run of that kind is read)
RESULTS = {"counterfactual": "counterfactual:CounterfactualResult", "isolation": "isolation:IsolationResult",
           "passk": "passk:PassKResult", "router-update": "router_update:RouterUpdateResult",
           "rollout": "rollout:RolloutResult", "replay": "replay:ReplayResult", "graft-evaluation": "graft:GraftEvaluationResult",
           "semantic-routing": "semantic_routing:SemanticRouteResult"}


def read_run(path: str) -> Result:
    """The result of a complete run folder (any analysis), tables read lazily.

    Examples:
        >>> import routelens as rl
        >>> result = rl.read_run(demo_run)          # a folder written by `routelens demo`
        >>> result.kind, list(result.summary.columns[:3])
        ('counterfactual', ['layer', 'bin', 'tokens'])
    """
    from routelens import validate

    path = validate.path(path, "path")
    run = StoredRun(path)
    if run.kind not in RESULTS:
        raise RouteLensError(f"{path} holds a {run.kind!r} run, which has no result type")
    analysis, name = RESULTS[run.kind].split(":")
    result_type = getattr(importlib.import_module(f"routelens.analyses.{analysis}.result"), name)
    # what is there is checked now (a missing table is named when it is asked for)
    run.require(SUMMARY_JSON, *(f"{t}.parquet" for t in result_type.tables if os.path.exists(run.file(f"{t}.parquet"))))
    return result_type(run)
