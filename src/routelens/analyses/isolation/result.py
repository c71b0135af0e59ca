"""What `routelens.isolate` returns: the run's tables as DataFrames."""

from __future__ import annotations

import pandas as pd

from routelens.results.objects import Result
from routelens.results.summary_frames import split_intervals


def isolation_frame(summary: dict) -> pd.DataFrame:
    """One row per (domain, layer): the best forced expert with its median delta, interval
    and q-value (at weight 1.0 and at the natural gate mass), significant cells, both random
    floors, the gate masses and the verdict's harmful / helpful cells (columns a run made
    before the equal-compute arms lacks are absent)."""
    return pd.DataFrame([split_intervals(row) for row in summary["layer_table"]])


class IsolationResult(Result):
    """An isolation run: `isolation` (one row per item, layer and condition), `routing`
    (natural routing counts), `cells` (per domain, layer and expert, with tests),
    `calibration`, and `summary` (the best expert per domain and layer). `summary_dict`
    holds each comparison's counts (`comparisons`) and the `verdict`.

    Examples:
        >>> import routelens as rl
        >>> res = rl.isolate(rl.load("demo"), "arithmetic", per_domain=3, layers=[0], floor_seeds=1)
        >>> len(res.cells) == 4 * 16          # domains x experts at one layer
        True
        >>> res.summary["layer"].unique().tolist()
        [0]
    """

    frame = staticmethod(isolation_frame)   # summary.json -> the summary DataFrame

    kind = "isolation"
    tables = ("isolation", "routing", "cells", "calibration")

    @property
    def isolation(self) -> pd.DataFrame:
        return self.table("isolation")

    @property
    def routing(self) -> pd.DataFrame:
        return self.table("routing")

    @property
    def cells(self) -> pd.DataFrame:
        return self.table("cells")

    @property
    def calibration(self) -> pd.DataFrame:
        return self.table("calibration")
