"""What `routelens.rollout` returns: the run's tables as DataFrames."""

from __future__ import annotations

import pandas as pd

from routelens.results.objects import Result
from routelens.results.summary_frames import split_intervals


def rollout_frame(summary: dict) -> pd.DataFrame:
    """One row per bin (then per trajectory verdict, when wrong trajectories were rolled out):
    units, each arm's accuracy, the paired differences against the standard route (with 95%
    intervals), how often the outcome agrees with the proxy, and (runs that keep first tokens)
    the first-token decomposition, with the `by_unit` means as `<unit>_<statistic>` columns."""
    from routelens.analyses.rollout.table import groups

    rows = []
    for name, values in groups(summary).items():
        outcome = values.get("outcome", {})
        by_unit = {f"{unit}_{key}": value for unit, means in values.get("by_unit", {}).items()
                   for key, value in means.items()}
        rows.append({"bin": name, **split_intervals({k: v for k, v in values.items() if k not in ("outcome", "by_unit")}),
                     **outcome, **by_unit})
    return pd.DataFrame(rows)


class RolloutResult(Result):
    """Rollouts of chosen tokens: `rollouts` (one row per token, arm and sample: `correct`,
    `answer`, `tokens_generated`, `continuation`, `first_token`, `target_id`, ...), `per_token`
    (each arm's accuracy per token, and its first-token statistics) and `summary` (per bin:
    accuracy per arm, paired differences, proxy agreement, the first-token decomposition).

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:5*3=A:", "5*3=15#15")], answers=["15"])
        >>> cf = rl.counterfactual(lens, trajs, layers=[-1], routes=4).save(str(tmp / "cf-rollout-result"))
        >>> res = rl.rollout(lens, cf, tokens="all", limit=2, temperature=0, max_new_tokens=8)
        >>> res.per_token.columns.tolist()[5:8]
        ['accuracy_best_alt', 'accuracy_random_alt', 'accuracy_standard']
        >>> row = res.summary.iloc[0]                  # via + beyond the first token = the paired difference
        >>> bool(abs(row.best_alt_minus_standard_via_first_token + row.best_alt_minus_standard_beyond_first_token
        ...          - row.best_alt_minus_standard) < 1e-12)
        True
    """

    frame = staticmethod(rollout_frame)   # summary.json -> the summary DataFrame

    kind = "rollout"
    tables = ("rollouts",)

    @property
    def rollouts(self) -> pd.DataFrame:
        return self.table("rollouts")

    @property
    def per_token(self) -> pd.DataFrame:
        from routelens.analyses.rollout.analysis import per_token

        return per_token(self.rollouts)
