"""What `routelens.semantic_route` returns: the run's tables as DataFrames."""

from __future__ import annotations

import pandas as pd

from routelens.results.objects import Result
from routelens.results.summary_frames import split_intervals


def semantic_route_frame(summary: dict) -> pd.DataFrame:
    """One row per (layer set, domain, arm): mean score, the paired difference against natural
    routing with its interval, p and q."""
    rows = []
    for layer_set, block in summary["layer_sets"].items():
        for domain, entry in block.items():
            rows.append({"layer_set": layer_set, "domain": domain, "arm": "natural", "score": entry["natural"],
                         "items": entry["items"]})
            for arm, test in entry.items():
                if isinstance(test, dict):
                    rows.append({"layer_set": layer_set, "domain": domain, "arm": arm, **split_intervals(
                        {"score": test["score"], **{k: v for k, v in test.items() if k != "score"}})})
    return pd.DataFrame(rows)


class SemanticRouteResult(Result):
    """Semantic routing: `scores` (one row per evaluation item, layer set and arm: mean and
    first target log-prob), `classification` (per item and layer: the domain its prompt
    fingerprint is nearest to, and the share of its tokens classified right), `accuracy`
    (with `accuracy=True`: one greedy answer per item, layer set and arm, checked) and
    `summary` (per layer set, domain and arm: the paired difference against natural routing).

    Examples:
        >>> import routelens as rl
        >>> res = rl.semantic_route(rl.load("demo"), "arithmetic", per_domain=2, layer_sets=[[3]], floor_seeds=1,
        ...                         accuracy=False)
        >>> list(res.summary.columns[:4])
        ['layer_set', 'domain', 'arm', 'score']
    """

    frame = staticmethod(semantic_route_frame)   # summary.json -> the summary DataFrame

    kind = "semantic-routing"
    tables = ("scores", "classification")

    @property
    def scores(self) -> pd.DataFrame:
        return self.table("scores")

    @property
    def classification(self) -> pd.DataFrame:
        return self.table("classification")

    @property
    def accuracy(self) -> pd.DataFrame | None:
        return self.table("accuracy") if self._run.summary.get("accuracy") else None
