"""What `routelens.counterfactual` returns: the run's tables as DataFrames."""

from __future__ import annotations

import pandas as pd

from routelens.results.objects import Result


class CounterfactualResult(Result):
    """A counterfactual run: `tokens` (one row per scored token and layer), `routes` (one
    row per token, layer and route; route 0 is the standard route), `summary` (layer x bin).

    Examples:
        >>> import routelens as rl
        >>> res = rl.read_run(demo_run)
        >>> standard = res.routes[res.routes["route"] == 0]
        >>> len(standard) == len(res.tokens)
        True
        >>> int(res.summary.set_index(["layer", "bin"]).loc[(3, "All"), "tokens"]) == len(res.tokens)
        True
    """

    kind = "counterfactual"
    tables = ("tokens", "routes")

    @property
    def tokens(self) -> pd.DataFrame:
        return self.table("tokens")

    @property
    def routes(self) -> pd.DataFrame:
        return self.table("routes")

    @property
    def joint_summary(self) -> pd.DataFrame | None:
        """A `joint_layers` run's comparison of joint and single-layer gains per bin (None otherwise)."""
        from routelens.results.summary_frames import joint_frame

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
