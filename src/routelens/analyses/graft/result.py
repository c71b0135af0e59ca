"""What `routelens.graft` returns: the grafted folder, its record and its evaluation."""

from __future__ import annotations

import pandas as pd

from routelens.results.objects import Result
from routelens.results.summary_frames import split_intervals


def graft_evaluation_frame(summary: dict) -> pd.DataFrame:
    """One row per (domain, measure, slot): before, after, the paired difference with its interval, p and q."""
    rows = []
    for domain, block in summary["domains"].items():
        rows.append({"domain": domain, "measure": "natural", "slot": None, **split_intervals(block["natural"])})
        for slot, tests in block["pairs"].items():
            rows += [{"domain": domain, "measure": measure, "slot": slot, **split_intervals(test)}
                     for measure, test in tests.items()]
    return pd.DataFrame(rows)


class GraftEvaluationResult(Result):
    """What a graft changed on the task's items: `items` (one row per item and grafted
    slot: natural score recipient and grafted, the slot's selection share, the original and
    the grafted expert forced alone), `summary` (per domain: paired differences with
    intervals, p and q).

    Examples:
        >>> import routelens as rl
        >>> res = rl.graft("demo", "demo", "3:5=3:9", str(tmp / "grafted-eval"), evaluate=True, per_domain=3)
        >>> sorted(res.evaluation.items["domain"].unique())
        ['addsub', 'long', 'mixed', 'mul']
    """

    frame = staticmethod(graft_evaluation_frame)   # summary.json -> the summary DataFrame

    kind = "graft-evaluation"
    tables = ("items",)

    @property
    def items(self) -> pd.DataFrame:
        return self.table("items")


class GraftResult:
    """A grafted model: `path` (a Hugging Face folder: load it with `routelens.load(path)` or
    the transformers class the recipient's checkpoint loads with), `record` (graft.json), `evaluation` (a `GraftEvaluationResult`,
    or None without `evaluate`) and `reused` (True when `path` already held this very graft,
    kept rather than written again).

    Examples:
        >>> import routelens as rl
        >>> res = rl.graft("demo", "demo", [(0, 1, 0, 2)], str(tmp / "grafted-result"))
        >>> res.evaluation is None, sorted(res.record)[:3]
        (True, ['donor', 'dtype', 'family'])
    """

    def __init__(self, path: str, record: dict, evaluation: GraftEvaluationResult | None, reused: bool = False):
        self.path, self.record, self.evaluation, self.reused = path, record, evaluation, reused

    def __repr__(self) -> str:
        pairs = ", ".join(pair["pair"] for pair in self.record["pairs"])
        return f"<GraftResult {self.path}: {pairs}{'; evaluated' if self.evaluation else ''}>"
