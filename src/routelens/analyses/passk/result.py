"""What `routelens.passk` returns: the run's tables as DataFrames."""

from __future__ import annotations

import pandas as pd

from routelens.results.objects import Result
from routelens.results.summary_frames import split_intervals


def passk_frame(summary: dict) -> pd.DataFrame:
    """One row per (group, arm, k): pass@k with its interval; with two arms, also the paired
    difference (arm "difference")."""
    blocks = {"all": summary["all"], **summary.get("by_group", {})}
    rows = []
    for group, block in blocks.items():
        for arm, values in block.items():
            for metric, value in values.items():
                if not isinstance(value, dict):
                    continue
                rows.append({"group": group, "arm": arm, "k": int(metric.split("@")[1]),
                             **split_intervals({"pass_at_k": value["mean"], "ci": value["ci"]}),
                             **{extra: value[extra] for extra in ("problems_better", "problems_worse") if extra in value}})
    return pd.DataFrame(rows)


class PassKResult(Result):
    """A pass@k run: `samples` (one row per sample), `problems` (pass@k per problem and
    arm), `summary` (per arm and k with intervals; the paired difference with two arms).

    Examples:
        >>> import routelens as rl
        >>> res = rl.passk(rl.load("demo"), "arithmetic", n=3, samples=2, k=[1, 2])
        >>> len(res.samples), len(res.problems)
        (6, 3)
    """

    frame = staticmethod(passk_frame)   # summary.json -> the summary DataFrame

    kind = "passk"
    tables = ("samples", "problems")

    @property
    def samples(self) -> pd.DataFrame:
        return self.table("samples")

    @property
    def problems(self) -> pd.DataFrame:
        return self.table("problems")
