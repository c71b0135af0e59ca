"""What `routelens.replay` returns: the run's tables as DataFrames."""

from __future__ import annotations

import pandas as pd

from routelens.results.objects import Result
from routelens.results.summary_frames import split_intervals


def replay_frame(summary: dict) -> pd.DataFrame:
    """One row per MoE layer (and one for all layers): decisions, flips, the flip rate and the
    mean Jaccard with their intervals."""
    rows = [{"layer": layer, **{k: v for k, v in at.items()}} for layer, at in summary["per_layer"].items()]
    overall = summary["overall"]
    rows.append({"layer": "all", **{k: overall[k] for k in ("decisions", "flips", "flip_rate", "flip_rate_ci",
                                                             "clusters", "jaccard")}})
    return pd.DataFrame([split_intervals(row) for row in rows])


class ReplayResult(Result):
    """A replay audit: `routes` (one row per token and reported MoE layer: flipped, Jaccard,
    the router's margin, the natural run's bin), `tokens` (one row per scored token: the
    natural and the replayed next-token log-probs, KL, layers flipped), and `summary` (per
    layer). `summary_dict` holds the flip-risk curve (`margin_curve`, its verdict), the
    flip rate by bin and the consequence per group of tokens.

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7"), ("Q:9*2=A:", "9*2=18#18")])
        >>> res = rl.replay(lens, trajs, compare_to="dtype=bfloat16", show_progress=False)
        >>> sorted(set(res.routes["layer"])) == lens.moe_layers
        True
        >>> res.summary["layer"].tolist()[-1]
        'all'
    """

    frame = staticmethod(replay_frame)   # summary.json -> the summary DataFrame

    kind = "replay"
    tables = ("routes", "tokens")

    @property
    def routes(self) -> pd.DataFrame:
        return self.table("routes")

    @property
    def tokens(self) -> pd.DataFrame:
        return self.table("tokens")
