"""What `routelens.passk` returns: the run's tables as DataFrames."""

from __future__ import annotations

import pandas as pd

from routelens.results.objects import Result


class PassKResult(Result):
    """A pass@k run: `samples` (one row per sample), `problems` (pass@k per problem and
    arm), `summary` (per arm and k with intervals; the paired difference with two arms).

    Examples:
        >>> import routelens as rl
        >>> res = rl.passk(rl.load("demo"), "arithmetic", n=3, samples=2, k=[1, 2])
        >>> len(res.samples), len(res.problems)
        (6, 3)
    """

    kind = "passk"
    tables = ("samples", "problems")

    @property
    def samples(self) -> pd.DataFrame:
        return self.table("samples")

    @property
    def problems(self) -> pd.DataFrame:
        return self.table("problems")
