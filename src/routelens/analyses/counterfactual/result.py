"""What `routelens.counterfactual` returns: the run's tables as DataFrames."""

from __future__ import annotations

import pandas as pd

from routelens.results.objects import Result
from routelens.results.summary_frames import split_intervals


def counterfactual_frame(summary: dict) -> pd.DataFrame:
    """One row per (layer, bin): tokens, trajectories and clusters, the gain, the standard
    route against the uniform null, win / tie / loss rates and their sign test, the
    standard route's percentile and alignment, with intervals at the run's confidence
    (`few_clusters`: over fewer than 10 clusters). The gain as a function of S is in
    summary.json; runs made before a column existed lack it."""
    rows = [{"layer": int(layer), "bin": name,
             **split_intervals({k: v for k, v in values.items() if k != "gain_by_routes"})}
            for layer, bins in summary["layers"].items() for name, values in bins.items()]
    return pd.DataFrame(rows)


def joint_frame(summary: dict) -> pd.DataFrame | None:
    """A joint-layers run's comparison (None for other runs): one row per bin of the joint
    routes, with their gain, the sum and the best of the single-layer gains of the same
    tokens, the paired differences with 95% intervals, and the verdict."""
    joint = summary.get("joint")
    if not joint:
        return None
    layers = "+".join(map(str, joint["layers"]))
    return pd.DataFrame([{"layers": layers, "bin": name,
                          **split_intervals({k: v for k, v in values.items() if k != "gain_by_routes"})}
                         for name, values in joint["bins"].items()])


class CounterfactualResult(Result):
    """A counterfactual run: `tokens` (one row per scored token and layer), `routes` (one
    row per token, layer and route; route 0 is the standard route, 1..S the sampled
    alternatives), `null_routes` (the uniform null routes, 1..N), `summary` (layer x bin).

    Examples:
        >>> import routelens as rl
        >>> res = rl.read_run(demo_run)
        >>> standard = res.routes[res.routes["route"] == 0]
        >>> len(standard) == len(res.tokens)
        True
        >>> int(res.summary.set_index(["layer", "bin"]).loc[(3, "All"), "tokens"]) == len(res.tokens)
        True
    """

    frame = staticmethod(counterfactual_frame)   # summary.json -> the summary DataFrame

    kind = "counterfactual"
    tables = ("tokens", "routes")

    @property
    def tokens(self) -> pd.DataFrame:
        return self.table("tokens")

    @property
    def routes(self) -> pd.DataFrame:
        return self.table("routes")

    @property
    def null_routes(self) -> pd.DataFrame | None:
        """The uniform null routes, numbered 1..N per token (None: a run without them, or made
        before they existed)."""
        return self.table("null_routes") if self._run.summary.get("null_routes") else None

    @property
    def joint_summary(self) -> pd.DataFrame | None:
        """A `joint_layers` run's comparison of joint and single-layer gains per bin (None otherwise)."""

        return joint_frame(self._run.summary)

    @property
    def joint_tokens(self) -> pd.DataFrame | None:
        """A `joint_layers` run's joint routes per token (None otherwise): the token metrics of
        routes forced at all listed layers at once, with the single-layer gains beside them."""
        return self.table("joint_tokens") if self._run.summary.get("joint") else None

    @property
    def joint_routes(self) -> pd.DataFrame | None:
        """A `joint_layers` run's joint routes (None otherwise): `layers`, `experts` and
        `weights` one list per layer, `logprob`."""
        return self.table("joint_routes") if self._run.summary.get("joint") else None
